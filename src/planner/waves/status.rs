//! `waves status`: counts of a wave's devices, from the operations and the devices' own
//! reports.

use std::collections::HashMap;

use super::{GroupStatus, WaveError, WaveState, WaveStatus, Waves};
use crate::engine::OpState;
use crate::fleet::select::Idx;

impl Waves {
    /// Counts of the wave's devices, from the operations and the devices' own reports.
    pub fn status(&self, name: &str, now: u64) -> Result<WaveStatus, WaveError> {
        let wave = self.get(name).ok_or_else(|| WaveError::NotFound(name.into()))?;
        let origin = wave.origin();
        // The latest operation of the wave per device.
        let mut ops: HashMap<String, (u64, OpState)> = HashMap::new();
        self.planner.scan(|o| {
            if o.origin == origin {
                let e = ops.entry(o.device.clone()).or_insert((o.seq, o.state));
                if o.seq >= e.0 {
                    *e = (o.seq, o.state);
                }
            }
        });
        let since = now.saturating_sub(self.online_secs);
        let status = self.fleet.with_index(|x| {
            let state: HashMap<Idx, OpState> =
                ops.iter().filter_map(|(id, &(_, s))| x.lookup(id).map(|i| (i, s))).collect();
            let mut totals = WaveStatus {
                name: wave.name.clone(),
                tag: wave.tag.clone(),
                production: wave.production,
                version: wave.version.clone(),
                state: wave.state,
                total: 0,
                updated: 0,
                need_update: 0,
                scheduled: 0,
                in_progress: 0,
                failed: 0,
                canceled: 0,
                online: 0,
                groups: Vec::new(),
                waiting: None,
                deferred: wave.deferred.len(),
            };
            let runs = x.running(&wave.version);
            let count = |g: &mut GroupStatus, i: Idx| {
                g.total += 1;
                if runs(i) {
                    g.updated += 1;
                } else {
                    g.need_update += 1;
                    if state.get(&i).is_some_and(|s| !s.is_terminal()) {
                        g.scheduled += 1;
                    }
                }
                if x.last_seen(i) >= since && x.last_seen(i) > 0 {
                    g.online += 1;
                }
            };
            let mut all = GroupStatus::default();
            for i in x.on_tag(&wave.tag, wave.production) {
                count(&mut all, i);
                match state.get(&i) {
                    Some(s) if s.in_flight() => totals.in_progress += 1,
                    Some(OpState::Failed | OpState::TimedOut) => totals.failed += 1,
                    Some(OpState::Canceled) => totals.canceled += 1,
                    _ => {}
                }
            }
            let follows = x.following(&wave.tag, wave.production);
            for (group, members) in x.groups() {
                let mut g = GroupStatus { group: group.to_owned(), ..GroupStatus::default() };
                for &i in members.iter().filter(|&&i| follows(i)) {
                    count(&mut g, i);
                }
                if g.total > 0 {
                    totals.groups.push(g);
                }
            }
            totals.total = all.total;
            totals.updated = all.updated;
            totals.need_update = all.need_update;
            totals.scheduled = all.scheduled;
            totals.online = all.online;
            totals
        });
        let mut status = status;
        if wave.state != WaveState::Canceled {
            let (images, why) = self.images(&wave, now);
            status.waiting = why.filter(|d| images.is_empty() && d.transient).map(|d| d.to_string());
        }
        Ok(status)
    }
}
