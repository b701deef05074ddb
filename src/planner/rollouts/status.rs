//! Where a rollout's devices are (`rollouts status`), and a retry of the ones that failed.

use std::collections::HashMap;

use super::{Group, GroupState, GroupStatus, RolloutError, RolloutState, RolloutStatus, Rollouts};
use crate::engine::OpState;
use crate::planner::rollouts::Rollout;

impl Rollouts {
    /// A row per group: its state, its devices by where they are, and how far it is toward
    /// each threshold.
    pub fn status(&self, name: &str) -> Result<RolloutStatus, RolloutError> {
        let (r, counts, released) = {
            let book = self.lock();
            if let Some(r) = book.deleted.get(name) {
                return Ok(RolloutStatus {
                    name: r.name.clone(),
                    state: r.state,
                    image: r.image.clone(),
                    total: 0,
                    groups: Vec::new(),
                });
            }
            let live = book.live.get(name).ok_or_else(|| RolloutError::NotFound(name.into()))?;
            (live.r.clone(), live.counts.clone(), live.released.clone())
        };
        // Queued and in flight, by group, from the planner (each device by its latest
        // operation of the group).
        let mut scheduled = vec![0u64; r.groups.len()];
        let mut running = vec![0u64; r.groups.len()];
        for ((_, g, _), latest) in self.latest_ops(|n| n == name) {
            match latest.state {
                OpState::Pending if g < scheduled.len() => scheduled[g] += 1,
                s if s.in_flight() && g < running.len() => running[g] += 1,
                _ => {}
            }
        }
        let groups = r
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let c = counts[g];
                let (toward_success, toward_error) = group.conditions.progress(&c);
                GroupStatus {
                    name: group.name.clone(),
                    state: group.state,
                    waiting: c.total.saturating_sub(released[g] as u64),
                    scheduled: scheduled[g],
                    running: running[g],
                    counts: c,
                    toward_success: (toward_success * 10.0).round() / 10.0,
                    toward_error: (toward_error * 10.0).round() / 10.0,
                }
            })
            .collect();
        Ok(RolloutStatus { name: r.name.clone(), state: r.state, image: r.image.clone(), total: r.total(), groups })
    }

    /// A new rollout (`NAME-retry`, then `-retry2`, …) of the devices whose latest operation
    /// of a finished or stopped rollout failed or timed out, in one group, with the original's
    /// image, weight and the first group's conditions.
    pub fn retry(&self, name: &str, now: u64) -> Result<Rollout, RolloutError> {
        let (orig, taken) = {
            let book = self.lock();
            let live = book.live.get(name).ok_or_else(|| RolloutError::NotFound(name.into()))?;
            if !matches!(live.r.state, RolloutState::Finished | RolloutState::Stopped) {
                return Err(RolloutError::NotRetryable { name: name.into(), state: live.r.state.as_str() });
            }
            let taken = |n: &str| book.live.contains_key(n) || book.deleted.contains_key(n);
            let retry_name = (1..)
                .map(|i| if i == 1 { format!("{name}-retry") } else { format!("{name}-retry{i}") })
                .find(|n| !taken(n))
                .expect("some name is free");
            (live.r.clone(), retry_name)
        };
        // Each device by its latest operation of the rollout, whatever its group.
        let mut latest: HashMap<String, (u64, OpState)> = HashMap::new();
        for ((_, _, device), l) in self.latest_ops(|n| n == name) {
            let e = latest.entry(device).or_insert((l.seq, l.state));
            if l.seq >= e.0 {
                *e = (l.seq, l.state);
            }
        }
        let failed: std::collections::HashSet<String> = latest
            .into_iter()
            .filter(|(_, (_, s))| matches!(s, OpState::Failed | OpState::TimedOut))
            .map(|(d, _)| d)
            .collect();
        if failed.is_empty() {
            return Err(RolloutError::NothingToRetry(name.into()));
        }
        let images = self.images(&orig.image)?;
        let ids = self.choose(&orig.image, &images, now, |d| failed.contains(&d.spec.id))?;
        let conditions = orig.groups.first().map(|g| g.conditions).unwrap_or_default();
        let mut r = Rollout {
            name: taken,
            filter: String::new(),
            image: orig.image.clone(),
            weight: orig.weight,
            state: RolloutState::Creating,
            groups: vec![Group {
                name: "group-1".into(),
                state: GroupState::Ready,
                conditions,
                total: ids.len() as u64,
                dynamic: false,
                released: 0,
                started_at: None,
                ended_at: None,
            }],
            start_at: None,
            dynamic_group_size: None,
            rate: orig.rate,
            retry_of: Some(name.into()),
            remark: None,
            created_at: now,
            updated_at: now,
            order: 0,
        };
        self.insert(&mut r, vec![ids])
    }
}
