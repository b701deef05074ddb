//! A device's deletion, as rollouts know it: it leaves every group it is a member of (the
//! group's total drops, as in hawkBit), stored with the deletion's step, so counts rebuilt
//! after a restart agree with the ones before it.

use std::sync::MutexGuard;

use super::{left_key, rollout_key, Book, Rollouts};
use crate::engine::OpState;
use crate::planner::{PlannerError, Step};
use crate::store::Cf;

/// Why a deleted member left its group.
pub const DELETED: &str = "the device was deleted";

/// The rollouts, locked for a device's deletion (see `planner::delete_device`).
pub struct RolloutsLeaving<'a> {
    rollouts: &'a Rollouts,
    book: MutexGuard<'a, Book>,
    /// (rollout, group, the device's outcome counted in the group, if one was).
    staged: Vec<(String, usize, Option<OpState>)>,
    device: String,
}

impl Rollouts {
    /// Locks the rollouts for a device's deletion: before the step opens, as every plan
    /// takes its own lock before the planner's.
    pub fn leaving(&self) -> RolloutsLeaving<'_> {
        RolloutsLeaving { rollouts: self, book: self.lock(), staged: Vec::new(), device: String::new() }
    }
}

impl RolloutsLeaving<'_> {
    /// Adds the device's leaving of each group it is in to `step`. The step holds the
    /// planner's gate, so every ending of the device's operations has been told: those told
    /// are counted first, and what the device's latest operation of a group says is then
    /// exactly what the group has counted of it.
    pub fn stage(&mut self, step: &mut Step<'_>, id: &str, now: u64) -> Result<(), PlannerError> {
        let batch: Vec<_> = self.rollouts.events.lock().unwrap_or_else(|e| e.into_inner()).try_iter().collect();
        for e in &batch {
            // Only counting: a verdict that changes is acted on at the next pump or tick.
            let Some((name, g)) = super::parse_origin(&e.origin) else { continue };
            let Some(live) = self.book.live.get_mut(name) else { continue };
            if live.left.get(g).is_some_and(|l| l.contains_key(&e.device)) {
                continue;
            }
            if let Some(c) = live.counts.get_mut(g) {
                super::count(c, e.state);
            }
        }
        self.device = id.to_owned();
        let ops = step.operations_of(id).to_vec();
        for (name, live) in self.book.live.iter() {
            let mut r = live.r.clone();
            let mut touched = false;
            for g in 0..live.members.len() {
                if live.left[g].contains_key(id) || !live.members[g].iter().any(|m| m == id) {
                    continue;
                }
                let origin = live.r.origin(g);
                let counted = ops
                    .iter()
                    .filter(|o| o.origin == origin)
                    .max_by_key(|o| o.seq)
                    .map(|o| o.state)
                    .filter(|s| s.is_terminal());
                self.staged.push((name.clone(), g, counted));
                if crate::planner::rules::broken(crate::planner::rules::Rule::LeftStored) {
                    continue;
                }
                step.batch().put(Cf::Rollouts, &left_key(name, g, id), DELETED.as_bytes());
                r.groups[g].total = r.groups[g].total.saturating_sub(1);
                touched = true;
            }
            if touched {
                r.updated_at = now;
                step.batch().put_json(Cf::Rollouts, &rollout_key(name), &r)?;
            }
        }
        Ok(())
    }

    /// The step is committed: the device is out of its groups' totals and counts, and the
    /// rollouts it was in move on if that was what they waited for.
    pub fn apply(mut self, now: u64) {
        let mut names = Vec::new();
        for (name, g, counted) in std::mem::take(&mut self.staged) {
            let Some(live) = self.book.live.get_mut(&name) else { continue };
            live.left[g].insert(self.device.clone(), DELETED.to_owned());
            live.r.groups[g].total = live.r.groups[g].total.saturating_sub(1);
            live.r.updated_at = now;
            let c = &mut live.counts[g];
            c.total = c.total.saturating_sub(1);
            match counted {
                Some(OpState::Succeeded) => c.succeeded = c.succeeded.saturating_sub(1),
                Some(OpState::Failed | OpState::TimedOut) => c.failed = c.failed.saturating_sub(1),
                Some(OpState::Canceled) => c.canceled = c.canceled.saturating_sub(1),
                _ => {}
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        for name in names {
            if let Err(e) = self.rollouts.advance(&mut self.book, &name, now) {
                tracing::error!(rollout = %name, error = %e, "moving a rollout on after a device left it failed");
            }
        }
    }
}
