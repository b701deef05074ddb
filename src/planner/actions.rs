//! Cray FAS-style firmware actions (`../shared/seeds/003_…`, issue 14): filter → plan →
//! execute over devices with several firmware targets (a FAS target is a DFU `component`), one
//! operation per xname at a time: the action as FAS users write it ([`model`]), the filter and
//! plan phases ([`plan`]), the execute phase through the operation queue ([`run`]), and
//! snapshots and their restore ([`snapshot`]).

pub mod model;
pub mod plan;
pub mod run;
pub mod snapshot;

pub use model::*;
pub use plan::{plan, PlanError};
pub use run::{Action, ActionError, ActionState, Actions, DRY_RUN_KEEP_SECS};
pub use snapshot::{Snapshot, SnapshotDevice, SnapshotRequest, SnapshotTarget};

use crate::firmware::ImageMeta;
use crate::fleet::Device;

impl Xname {
    /// A registered device as the planner sees it: its inventory, its groups, and each
    /// component it has reported (a FAS target) with the version it runs.
    pub fn of(d: &Device) -> Xname {
        let inv = d.spec.inventory.as_deref();
        Xname {
            xname: d.spec.id.clone(),
            device_type: inv.and_then(|i| i.device_type.clone()),
            manufacturer: inv.and_then(|i| i.manufacturer.clone()),
            model: inv.and_then(|i| i.model.clone()),
            groups: d.spec.groups.clone(),
            targets: d.running.iter().map(|(t, v)| (t.clone(), v.clone())).collect(),
        }
    }
}

impl ImageRecord {
    /// An uploaded image with a FAS identity; `None` for one without.
    pub fn of(m: &ImageMeta) -> Option<ImageRecord> {
        m.identity.clone().map(|identity| ImageRecord { id: m.id(), identity })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod run_tests;
