//! FAS snapshots: what every target of the chosen xnames runs at one moment, linked to the
//! image of that version where one exists; restoring one is an action with those images.

use serde::{Deserialize, Serialize};

use super::model::{
    InventoryHardwareFilter, OperationState, PlannedOperation, StateComponentFilter, TargetFilter, Xname,
};
use super::plan::{applies, selected_by};
use super::ImageRecord;

/// `POST /api/v1/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRequest {
    pub name: String,
    /// RFC 3339 time (or Unix seconds) after which it may no longer be restored.
    #[serde(default)]
    pub expiration_time: Option<String>,
    #[serde(default)]
    pub state_component_filter: StateComponentFilter,
    #[serde(default)]
    pub inventory_hardware_filter: InventoryHardwareFilter,
    #[serde(default)]
    pub target_filter: TargetFilter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTarget {
    pub name: String,
    pub firmware_version: String,
    /// The image of that version for this device and target, when one exists.
    #[serde(rename = "imageID", default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotDevice {
    pub xname: String,
    pub targets: Vec<SnapshotTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    pub capture_time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<u64>,
    pub devices: Vec<SnapshotDevice>,
}

/// Parses `expirationTime`: RFC 3339 or Unix seconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t =
        crate::parse_moment(text).ok_or_else(|| format!("expirationTime {text:?}: not RFC 3339 or Unix seconds"))?;
    u64::try_from(t).map_err(|_| format!("expirationTime {text:?} is before 1970"))
}

/// Records what each target of the chosen xnames runs, with the image of that version.
pub fn capture(
    req: &SnapshotRequest,
    devices: impl IntoIterator<Item = Xname>,
    images: &[ImageRecord],
) -> Vec<SnapshotDevice> {
    let targets = &req.target_filter.targets;
    devices
        .into_iter()
        .filter(|x| selected_by(&req.state_component_filter, &req.inventory_hardware_filter, x))
        .map(|x| SnapshotDevice {
            targets: x
                .targets
                .iter()
                .filter(|(t, _)| targets.is_empty() || targets.iter().any(|f| f.eq_ignore_ascii_case(t)))
                .map(|(t, v)| SnapshotTarget {
                    name: t.clone(),
                    firmware_version: v.clone(),
                    image_id: images
                        .iter()
                        .filter(|i| i.identity.firmware_version == *v && applies(i, &x, t))
                        .map(|i| i.id.clone())
                        .min(),
                })
                .collect(),
            xname: x.xname,
        })
        .collect()
}

/// The operations that put a snapshot back, over the xnames registered now (`current`): a
/// device removed since is skipped (and returned), one added since is not touched. A target
/// already on its snapshot version needs nothing; one whose version had no image cannot be
/// restored. Of an xname's operations one is free to start, the others wait.
pub fn restore_plan(snap: &Snapshot, current: &[Xname]) -> (Vec<PlannedOperation>, Vec<String>) {
    let mut ops = Vec::new();
    let mut skipped = Vec::new();
    for d in &snap.devices {
        let Some(x) = current.iter().find(|x| x.xname == d.xname) else {
            skipped.push(d.xname.clone());
            continue;
        };
        let first = ops.len();
        for t in &d.targets {
            let running = x.targets.iter().find(|(n, _)| n == &t.name).map(|(_, v)| v.clone()).unwrap_or_default();
            let mut op = PlannedOperation {
                operation_id: String::new(),
                xname: d.xname.clone(),
                target: t.name.clone(),
                state: OperationState::Configured,
                from_firmware_version: running.clone(),
                to_image_id: t.image_id.clone(),
                to_firmware_version: Some(t.firmware_version.clone()),
                from_image_id: None,
                state_helper: format!("restore snapshot {}", snap.name),
            };
            if running == t.firmware_version {
                op.state = OperationState::NoOperation;
                op.state_helper = format!("already runs {running}, its snapshot version");
            } else if t.image_id.is_none() {
                op.state = OperationState::NoSolution;
                op.state_helper = format!("no image of {} was known when the snapshot was taken", t.firmware_version);
            }
            ops.push(op);
        }
        super::plan::block_siblings(&mut ops[first..]);
    }
    (ops, skipped)
}
