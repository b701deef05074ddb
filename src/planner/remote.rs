//! What the planner tells data-plane nodes, and how it takes their reports (see `cluster`).

use super::{Lookup, Planner, PlannerError};
use crate::engine::OpState;

impl Planner {
    /// The components a device has operations for (queued, in flight or finished).
    pub fn components_of(&self, device: &str) -> Vec<String> {
        let Some(ops) = self.ops.get(device) else { return Vec::new() };
        let mut c: Vec<String> = ops.iter().map(|o| o.component.clone()).collect();
        c.dedup();
        c
    }

    /// Each component's answer, without bytes: a device's view for data-plane nodes. Computing
    /// it is not the device asking: a held operation's time limit runs on.
    /// A node may start only the operation the view grants (see [`Planner::grant`]): another
    /// component's queued head is told to wait, so two nodes, or one node answering two
    /// components at once, never start two transfers on one device.
    pub fn view_of(&self, device: &str, now: u64) -> Result<Vec<(String, Lookup<()>)>, PlannerError> {
        let mut out = Vec::new();
        let grant = self.grant(device);
        for c in self.components_of(device) {
            let mut l = self.lookup_meta(device, &c, now, false)?;
            if let Lookup::Active(a) = &l {
                if a.state == OpState::Pending && Some(a.seq) != grant {
                    l = Lookup::Wait(self.polling_hint(&a.meta.id()));
                }
            }
            out.push((c, l));
        }
        Ok(out)
    }

    /// What a data-plane node needs to judge admission on its own between two views: until
    /// when TUF admits anything for the device's class (past it, the node answers WAIT), and
    /// whether a downgrade is refused (a node seeing the device report a higher version than
    /// an operation installs answers WAIT instead of starting it).
    pub fn trust_facts(&self, device: &str) -> (Option<u64>, bool) {
        let deadline = self.fleet.is_production(device).and_then(|p| self.trust.deadline(p));
        (deadline, !self.allow_downgrade)
    }

    /// The one operation of a device that may start now: none while one is in flight, else
    /// the queued one of the highest weight, oldest first, across its components.
    pub fn grant(&self, device: &str) -> Option<u64> {
        let ops = self.ops.get(device)?;
        if ops.iter().any(|o| o.state.in_flight()) {
            return None;
        }
        ops.iter()
            .filter(|o| o.state == OpState::Pending)
            .max_by(|a, b| a.weight.cmp(&b.weight).then(b.seq.cmp(&a.seq)))
            .map(|o| o.seq)
    }

    /// A data-plane node saw the device ask: its operations in flight are not silent (as a
    /// Status handled here would have kept them).
    pub fn touch(&self, device: &str, now: u64) {
        if let Some(mut ops) = self.ops.get_mut(device) {
            for o in ops.iter_mut().filter(|o| o.state.in_flight()) {
                o.last_activity = o.last_activity.max(now);
            }
        }
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
        let to = to.filter(|t| t.stage() > from.stage());
        // A start the planner did not grant (from an older view, or a second component) is
        // refused: at most one transfer per device, and in queue order.
        if from == OpState::Pending && to.is_some_and(|t| t.in_flight()) && self.grant(device) != Some(seq) {
            return Ok(false);
        }
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
    use crate::fleet::MAIN_COMPONENT;

    #[test]
    fn a_nodes_reports_move_an_operation_only_forward_and_never_twice() {
        let w = super::super::tests::world();
        let p = &w.planner;
        let op = p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap();
        let Lookup::Active(a) = p.lookup_meta("d1", MAIN_COMPONENT, 1, false).unwrap() else { panic!("active") };
        assert!(!a.resume && !a.foreign, "nothing served yet");
        let sha = a.meta.sha256.clone();
        let down = Some(OpState::Downloading);
        assert!(p.advance("d1", op.seq, down, Some(4), Some(&sha), None, 2).unwrap());
        // The same report again, or one from before it, changes nothing.
        assert!(!p.advance("d1", op.seq, down, None, Some(&sha), None, 3).unwrap());
        assert!(!p.advance("d1", op.seq, Some(OpState::Pending), None, None, None, 3).unwrap());
        assert_eq!(p.head_state("d1", MAIN_COMPONENT), Some((op.seq, OpState::Downloading)));
        // Progress of a transfer under way is taken; a jump to the end is too.
        assert!(p.advance("d1", op.seq, None, Some(8), None, None, 4).unwrap());
        assert_eq!(p.operation("d1", MAIN_COMPONENT).unwrap().offset, 8);
        assert!(p.advance("d1", op.seq, Some(OpState::Succeeded), None, None, Some("2.0"), 5).unwrap());
        // Nothing moves a finished operation, and an unknown one is no error.
        assert!(!p.advance("d1", op.seq, Some(OpState::Failed), None, None, None, 6).unwrap());
        assert!(!p.advance("d1", op.seq + 100, down, None, None, None, 6).unwrap());
        assert!(!p.advance("nope", 1, down, None, None, None, 6).unwrap());
        let (c, l) = p.view_of("d1", 7).unwrap().pop().unwrap();
        assert_eq!(c, MAIN_COMPONENT);
        assert!(matches!(l, Lookup::Active(a) if a.state == OpState::Succeeded && a.resume));
    }

    #[test]
    fn a_device_seen_by_a_node_keeps_its_transfer_from_timing_out() {
        let w = super::super::tests::world();
        let p = &w.planner;
        let op = p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap();
        assert!(p.advance("d1", op.seq, Some(OpState::Downloading), Some(4), None, None, 10).unwrap());
        p.touch("d1", 90);
        // The planner's limit is 100 s: from 90, not from 10.
        assert_eq!(p.sweep_timeouts(150).unwrap(), 0);
        assert_eq!(p.sweep_timeouts(191).unwrap(), 1);
    }
}
