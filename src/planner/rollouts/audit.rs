//! What the simulator checks of rollouts after every step (`crate::sim`): the records in
//! memory are the stored ones, the counts are a recount from stored facts, no member handed
//! out is lost, and a finished rollout has nothing left to do.

use super::{count, rollout_key, Counts, Rollout, RolloutState, Rollouts};
use crate::store::Cf;

impl Rollouts {
    /// The first broken fact, if any; `stored` adds the comparisons with the store. Outcomes
    /// not yet handled make counts lag: pump first.
    pub fn audit(&self, stored: bool) -> Result<(), String> {
        let with_store = stored;
        let book = self.lock();
        let latest = self.latest_ops(|n| book.live.contains_key(n));
        for (name, live) in &book.live {
            if with_store {
                let stored: Option<Rollout> =
                    self.store.get_json(Cf::Rollouts, &rollout_key(name)).map_err(|e| e.to_string())?;
                if stored.as_ref() != Some(&live.r) {
                    return Err(format!("rollout {name}: memory {:?} is not the stored {stored:?}", live.r));
                }
            }
            for g in 0..live.members.len() {
                let (members, left) = (&live.members[g], &live.left[g]);
                let mut c = Counts {
                    total: members.iter().filter(|m| !left.contains_key(*m)).count() as u64,
                    ..Default::default()
                };
                for m in members.iter().filter(|m| !left.contains_key(*m)) {
                    if let Some(l) = latest.get(&(name.clone(), g, m.clone())) {
                        count(&mut c, l.state);
                    }
                }
                if c != live.counts[g] {
                    return Err(format!(
                        "rollout {name} group {}: counts {:?}, a recount from the store {c:?}",
                        g + 1,
                        live.counts[g]
                    ));
                }
                if live.r.groups[g].total != c.total {
                    return Err(format!(
                        "rollout {name} group {}: total {} recorded, {} members",
                        g + 1,
                        live.r.groups[g].total,
                        c.total
                    ));
                }
                let prefix = format!("x\0{name}\0{g:04x}\0");
                let mut stored_left = left.len();
                if with_store {
                    stored_left = 0;
                    self.store
                        .scan(Cf::Rollouts, prefix.as_bytes(), None, |_, _| {
                            stored_left += 1;
                            Ok(true)
                        })
                        .map_err(|e| e.to_string())?;
                }
                if stored_left != left.len() {
                    return Err(format!("rollout {name} group {}: {} left, {stored_left} stored", g + 1, left.len()));
                }
                let handed = &members[..live.released[g].min(members.len())];
                if let Some(lost) = handed
                    .iter()
                    .find(|m| !left.contains_key(*m) && !latest.contains_key(&(name.clone(), g, (*m).clone())))
                {
                    let with_ops: Vec<&String> =
                        members.iter().filter(|m| latest.contains_key(&(name.clone(), g, (*m).clone()))).collect();
                    return Err(format!(
                        "rollout {name} group {}: member {lost} was handed out but has no operation and no stored reason \
                         ({} of {members:?} handed out; with operations {with_ops:?}; left {:?})",
                        g + 1,
                        live.released[g],
                        left.keys().collect::<Vec<_>>()
                    ));
                }
            }
            if live.r.state == RolloutState::Finished {
                if let Some(g) = (0..live.members.len()).find(|&g| !live.settled(g)) {
                    return Err(format!(
                        "rollout {name} is finished, but group {} has members not handed out or not ended ({} of {} handed out, {:?})",
                        g + 1,
                        live.released[g],
                        live.members[g].len(),
                        live.counts[g]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rollouts that are running or starting: (name, state, whether a member is not handed
    /// out or has not ended, whether devices may still join). One running with nothing to do
    /// that is not dynamic is stalled.
    pub fn unsettled(&self) -> Vec<(String, RolloutState, bool, bool)> {
        let book = self.lock();
        book.live
            .values()
            .filter(|l| l.r.state.is_active())
            .map(|l| {
                let busy = (0..l.members.len()).any(|g| !l.settled(g));
                (l.r.name.clone(), l.r.state, busy, l.r.dynamic_group_size.is_some())
            })
            .collect()
    }
}
