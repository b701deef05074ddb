//! What the planner tells data-plane nodes, and how it takes their reports (see `cluster`).

use super::{Lookup, Planner, PlannerError};
use crate::engine::OpState;

/// How far along an operation is: reports only ever move an operation forward.
fn rank(s: OpState) -> u8 {
    match s {
        OpState::Pending => 0,
        OpState::Downloading => 1,
        OpState::Swapping => 2,
        _ => 3,
    }
}

impl Planner {
    /// The components a device has operations for (queued, in flight or finished).
    pub fn components_of(&self, device: &str) -> Vec<String> {
        let Some(ops) = self.ops.get(device) else { return Vec::new() };
        let mut c: Vec<String> = ops.iter().map(|o| o.component.clone()).collect();
        c.dedup();
        c
    }

    /// Each component's answer, without bytes: a device's view for data-plane nodes.
    pub fn view_of(&self, device: &str, now: u64) -> Result<Vec<(String, Lookup<()>)>, PlannerError> {
        let mut out = Vec::new();
        for c in self.components_of(device) {
            let l = self.lookup_meta(device, &c, now)?;
            out.push((c, l));
        }
        Ok(out)
    }

    /// Applies a data-plane node's report on operation `seq`: the state the device reached
    /// (`to`) and how far its transfer got. Reports may come twice, late or out of order (a
    /// node re-sends what the planner has not confirmed): a report moves an operation only
    /// forward, never out of a finished state, so a duplicate or stale one changes nothing.
    /// Returns whether the operation moved.
    #[allow(clippy::too_many_arguments)]
    pub fn advance(
        &self,
        device: &str,
        seq: u64,
        to: Option<OpState>,
        progress: Option<u32>,
        served: Option<&str>,
        reported: Option<&str>,
        now: u64,
    ) -> Result<bool, PlannerError> {
        let Some(from) = self.ops.get(device).and_then(|ops| ops.iter().find(|o| o.seq == seq).map(|o| o.state)) else {
            return Ok(false);
        };
        if from.is_terminal() {
            return Ok(false);
        }
        let to = to.filter(|t| rank(*t) > rank(from));
        // A report of progress only is for a transfer under way.
        let progress = progress.filter(|_| to.is_some() || from == OpState::Downloading);
        if to.is_none() && progress.is_none() {
            return Ok(false);
        }
        self.record_reported(device, seq, from, to, progress, served, reported, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_rank_the_states_in_their_order() {
        let order = [OpState::Pending, OpState::Downloading, OpState::Swapping, OpState::Succeeded];
        assert!(order.windows(2).all(|w| rank(w[0]) < rank(w[1])));
        assert_eq!(rank(OpState::Failed), rank(OpState::Canceled));
    }
}
