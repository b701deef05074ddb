//! How long actions are kept: an ended action can be deleted (FAS's `DELETE /actions/{id}`),
//! and dry runs expire by themselves after [`Actions::keep_dry_runs`] (default a week), so the
//! list of actions does not grow without a bound from plans nobody ran.

use std::sync::atomic::Ordering;

use tracing::info;

use super::{Action, ActionError, ActionState, Actions, Book};
use crate::store::Cf;

/// A dry run is kept a week unless configured otherwise (`actions.dry_run_keep_secs`).
pub const DRY_RUN_KEEP_SECS: u64 = 7 * 24 * 3600;

impl Actions {
    /// Keeps dry runs `secs` seconds after they were made (0: until deleted).
    pub fn keep_dry_runs(mut self, secs: u64) -> Actions {
        self.keep_dry_runs = secs;
        self
    }

    /// Deletes an ended action (completed or aborted) and its plan; its operations stay in
    /// the devices' histories. A waiting or running action is aborted first.
    pub fn delete(&self, id: &str) -> Result<Action, ActionError> {
        let mut book = self.lock();
        let a = book.actions.get(id).ok_or_else(|| ActionError::NotFound(id.into()))?.clone();
        if !matches!(a.state, ActionState::Completed | ActionState::Aborted) {
            return Err(ActionError::NotDeletable { id: id.into(), state: a.state.as_str() });
        }
        self.remove(&mut book, &[id.to_owned()])?;
        info!(action = id, "action deleted");
        Ok(a)
    }

    /// Deletes the dry runs past their keep time, at most once a minute.
    pub(super) fn expire_dry_runs(&self, book: &mut Book, now: u64) -> Result<(), ActionError> {
        if self.keep_dry_runs == 0 || self.dry_runs_checked.swap(now / 60, Ordering::Relaxed) == now / 60 {
            return Ok(());
        }
        let expired: Vec<String> = book
            .actions
            .values()
            .filter(|a| a.dryrun && now >= a.create_time.saturating_add(self.keep_dry_runs))
            .map(|a| a.action_id.clone())
            .collect();
        if !expired.is_empty() {
            self.remove(book, &expired)?;
            info!(dry_runs = expired.len(), keep_secs = self.keep_dry_runs, "expired dry runs deleted");
        }
        Ok(())
    }

    /// Deletes ended actions in one write, then forgets them.
    fn remove(&self, book: &mut Book, ids: &[String]) -> Result<(), ActionError> {
        let mut b = self.store.batch();
        for id in ids {
            b.delete(Cf::Actions, id.as_bytes());
        }
        b.commit()?;
        for id in ids {
            book.actions.remove(id);
        }
        Ok(())
    }
}
