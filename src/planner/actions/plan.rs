//! FAS's filter and plan phases: the (xname, target) candidates the five filters leave, each
//! with the image it gets — or why none (`noSolution`), why it needs none (`noOperation`), why
//! it may not (restore not possible) — and at most one operation per xname free to start, its
//! siblings `blocked`.

use super::model::{
    ActionRequest, ImageRecord, InventoryHardwareFilter, OperationState, PlannedOperation, StateComponentFilter,
    VersionChoice, Xname,
};
use crate::firmware::version_order;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("command.version is explicit: name the image in imageFilter.imageID")]
    ExplicitWithoutImage,
    #[error("imageFilter.imageID {0}: no image with a FAS identity has this id")]
    UnknownImage(String),
    /// A FAS filter fwgate does not implement: refused, never ignored (ignoring it would
    /// select devices the operator meant to leave out).
    #[error("{0} is not supported by fwgate: remove it, or select the devices with xnames, groups or deviceTypes")]
    Unsupported(&'static str),
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn same_opt(want: &Option<String>, have: &Option<String>) -> bool {
    want.as_deref().is_none_or(|w| have.as_deref().is_some_and(|h| same(w, h)))
}

/// Whether `img` is made for this xname's target: its target, and where the image names them,
/// its device type, manufacturer and one of its models (FAS compares them without case).
pub(super) fn applies(img: &ImageRecord, x: &Xname, target: &str) -> bool {
    let i = &img.identity;
    same(&i.target, target)
        && (i.device_type.is_empty() || x.device_type.as_deref().is_some_and(|d| same(d, &i.device_type)))
        && (i.manufacturer.is_empty() || x.manufacturer.as_deref().is_some_and(|m| same(m, &i.manufacturer)))
        && (i.models.is_empty() || x.model.as_deref().is_some_and(|m| i.models.iter().any(|im| same(im, m))))
}

/// The release order of an image: its semantic version, else its firmware version.
fn order(img: &ImageRecord) -> Option<semver::Version> {
    version_order(&img.identity.semantic_firmware_version).or_else(|| version_order(&img.identity.firmware_version))
}

/// Whether the xname passes the state component and inventory filters.
pub(super) fn selected_by(s: &StateComponentFilter, hw: &InventoryHardwareFilter, x: &Xname) -> bool {
    (s.xnames.is_empty() || s.xnames.iter().any(|n| n == &x.xname))
        && (s.groups.is_empty() || s.groups.iter().any(|g| x.groups.contains(g)))
        && (s.device_types.is_empty()
            || x.device_type.as_deref().is_some_and(|d| s.device_types.iter().any(|t| same(t, d))))
        && same_opt(&hw.manufacturer, &x.manufacturer)
        && same_opt(&hw.model, &x.model)
}

/// Filters and plans: one operation per (xname, target) the filters leave, in xname order and
/// each xname's target order.
pub fn plan(
    req: &ActionRequest,
    devices: impl IntoIterator<Item = Xname>,
    images: &[ImageRecord],
) -> Result<Vec<PlannedOperation>, PlanError> {
    if !req.state_component_filter.partitions.is_empty() {
        return Err(PlanError::Unsupported("stateComponentFilter.partitions"));
    }
    let cmd = &req.command;
    let named = match &req.image_filter.image_id {
        Some(id) => Some(images.iter().find(|i| &i.id == id).ok_or_else(|| PlanError::UnknownImage(id.clone()))?),
        None if cmd.version == VersionChoice::Explicit => return Err(PlanError::ExplicitWithoutImage),
        None => None,
    };
    // The tagged images with their release order, parsed once (not per comparison).
    let tagged: Vec<(&ImageRecord, Option<semver::Version>)> =
        images.iter().filter(|i| i.identity.tags.iter().any(|t| same(t, &cmd.tag))).map(|i| (i, order(i))).collect();
    let targets = &req.target_filter.targets;
    let mut out = Vec::new();
    for x in devices {
        if !selected_by(&req.state_component_filter, &req.inventory_hardware_filter, &x) {
            continue;
        }
        let first = out.len();
        for (target, running) in &x.targets {
            if !targets.is_empty() && !targets.iter().any(|t| same(t, target)) {
                continue;
            }
            // The image filter keeps only the targets its image is for.
            if let Some(img) = named {
                let fits = if req.image_filter.override_image {
                    same(&img.identity.target, target)
                } else {
                    applies(img, &x, target)
                };
                if !fits {
                    continue;
                }
            }
            let chosen = match named {
                Some(img) => Some(img),
                None => {
                    let fit = tagged.iter().filter(|(i, _)| applies(i, &x, target));
                    let best = match cmd.version {
                        VersionChoice::Earliest => fit.min_by(|a, b| a.1.cmp(&b.1)),
                        _ => fit.max_by(|a, b| a.1.cmp(&b.1)),
                    };
                    best.map(|(i, _)| *i)
                }
            };
            let from_image = images
                .iter()
                .filter(|i| i.identity.firmware_version == *running && applies(i, &x, target))
                .min_by(|a, b| a.id.cmp(&b.id));
            let mut op = PlannedOperation {
                operation_id: String::new(),
                xname: x.xname.clone(),
                target: target.clone(),
                state: OperationState::Configured,
                from_firmware_version: running.clone(),
                to_image_id: chosen.map(|i| i.id.clone()),
                to_firmware_version: chosen.map(|i| i.identity.firmware_version.clone()),
                from_image_id: from_image.map(|i| i.id.clone()),
                state_helper: String::new(),
            };
            match chosen {
                None => {
                    op.state = OperationState::NoSolution;
                    op.state_helper = format!("no image with tag {:?} for this device and target {target}", cmd.tag);
                }
                Some(img) if img.identity.firmware_version == *running && !cmd.overwrite_same_image => {
                    op.state = OperationState::NoOperation;
                    op.state_helper = format!("already runs {running}");
                }
                Some(_) if from_image.is_none() && !cmd.restore_not_possible_override => {
                    op.state = OperationState::Failed;
                    op.state_helper = format!(
                        "restore not possible: no image of {running}, which the target runs now; \
                         set command.restoreNotPossibleOverride to update anyway"
                    );
                }
                Some(_) => {}
            }
            out.push(op);
        }
        block_siblings(&mut out[first..]);
    }
    Ok(out)
}

/// At most one operation per xname at a time: of one xname's operations the first free one
/// stays configured, its siblings wait behind it.
pub(super) fn block_siblings(ops: &mut [PlannedOperation]) {
    let mut free: Option<String> = None;
    for op in ops.iter_mut().filter(|o| o.state == OperationState::Configured) {
        match &free {
            None => free = Some(op.target.clone()),
            Some(t) => {
                op.state = OperationState::Blocked;
                op.state_helper = format!("waits for {t} on the same xname");
            }
        }
    }
}
