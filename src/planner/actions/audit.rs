//! What the simulator checks of actions after every step (`crate::sim`): the records in
//! memory are the stored ones, a running action waits for exactly its unfinished operations,
//! and none of a running action's operations is lost.

use super::{origin, Action, ActionState, Actions, OperationState};
use crate::store::Cf;

impl Actions {
    /// The first broken fact, if any; `stored` adds the comparisons with the store. Outcomes
    /// not yet handled make counts lag: pump first.
    pub fn audit(&self, stored: bool) -> Result<(), String> {
        let with_store = stored;
        let book = self.lock();
        let running = book.actions.values().filter(|a| a.state == ActionState::Running).count();
        if running > 1 {
            return Err(format!("{running} actions running at once"));
        }
        for a in book.actions.values() {
            if with_store {
                let stored: Option<Action> =
                    self.store.get_json(Cf::Actions, a.action_id.as_bytes()).map_err(|e| e.to_string())?;
                if stored.as_ref() != Some(a) {
                    return Err(format!("action {}: memory {a:?} is not the stored {stored:?}", a.action_id));
                }
            }
            if a.state != ActionState::Running {
                continue;
            }
            let open = book.open.get(&a.action_id).copied().unwrap_or(0);
            let unfinished = self.unfinished(&a.action_id);
            if open != unfinished {
                return Err(format!("action {}: waits for {open} operations, {unfinished} unfinished", a.action_id));
            }
            let origin = origin(&a.action_id);
            for op in
                a.operations.iter().filter(|o| matches!(o.state, OperationState::Configured | OperationState::Blocked))
            {
                if op.to_image_id.is_none() || !self.fleet.contains(&op.xname) {
                    continue;
                }
                let queued = self
                    .planner
                    .operations_of(&op.xname)
                    .iter()
                    .any(|o| o.origin == origin && o.component == op.target);
                if !queued {
                    return Err(format!(
                        "action {}: operation {} ({}/{}) was planned but is neither queued nor ended",
                        a.action_id, op.operation_id, op.xname, op.target
                    ));
                }
            }
        }
        Ok(())
    }

    /// Actions running or waiting to.
    pub fn unsettled(&self) -> Vec<(String, ActionState)> {
        self.lock()
            .actions
            .values()
            .filter(|a| matches!(a.state, ActionState::Running | ActionState::Blocked | ActionState::Configured))
            .map(|a| (a.action_id.clone(), a.state))
            .collect()
    }
}
