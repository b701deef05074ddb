//! Deleting a device: its record, all its operations and what every plan stores of it, in
//! one step. Each plan is locked before the step opens (a plan's lock comes before the
//! planner's), and changes its memory only once the step is committed; while the device is
//! being deleted nothing writes its record or queues for it.

use super::rollouts::Rollouts;
use super::waves::Waves;
use super::{Planner, PlannerError};
use crate::fleet::Fleet;

/// Deletes device `id`; returns how many of its operations had not ended, `None` for an
/// unknown device. `rollouts` is `None` where there are none (tests of waves alone).
pub fn delete_device(
    planner: &Planner,
    fleet: &Fleet,
    waves: &Waves,
    rollouts: Option<&Rollouts>,
    id: &str,
    now: u64,
) -> Result<Option<usize>, PlannerError> {
    let mut waves = waves.leaving();
    let mut rollouts = rollouts.map(Rollouts::leaving);
    let mut step = planner.step();
    if !fleet.stage_delete(step.batch(), id, now) {
        return Ok(None);
    }
    let staged = (|| {
        waves.stage(&mut step, fleet, id)?;
        if let Some(r) = rollouts.as_mut() {
            r.stage(&mut step, id, now)?;
        }
        Ok::<_, PlannerError>(step.forget(id))
    })();
    let open = match staged.and_then(|open| step.commit().map(|()| open)) {
        Ok(open) => open,
        Err(e) => {
            fleet.cancel_delete(id);
            return Err(e);
        }
    };
    waves.apply();
    if let Some(r) = rollouts {
        r.apply(now);
    }
    fleet.finish_delete(id);
    tracing::info!(device = id, operations = open, "device deleted");
    Ok(Some(open))
}
