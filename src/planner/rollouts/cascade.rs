//! How a rollout moves by itself: outcomes counted as the planner reports them, a group's
//! conditions evaluated on each (the error condition first), the next group started, devices
//! handed out at the group's rate, and newcomers joining a dynamic rollout.

use std::sync::Arc;

use tracing::{error, info, warn};

use super::{
    count, group_key, parse_origin, Book, Group, GroupState, Live, Progress, RolloutError, RolloutState, Rollouts,
    SuccessAction, Verdict,
};
use crate::firmware::pick;
use crate::fleet::MAIN_COMPONENT;
use crate::planner::Ended;
use crate::store::Cf;

impl Rollouts {
    /// Moves a starting or running rollout as far as its groups allow: evaluates the running
    /// group, acts on its verdict, starts the next scheduled group, finishes the rollout when
    /// none is left. Every change of state is written before the next group's operations are
    /// queued.
    pub(super) fn advance(&self, book: &mut Book, name: &str, now: u64) -> Result<(), RolloutError> {
        let Some(live) = book.live.get_mut(name) else { return Ok(()) };
        let before = live.r.clone();
        let moved = self.advance_live(live, name, now);
        // Whatever changed and was not written on the way (a group ended with nothing after
        // it) is written now: the record in memory is always the stored one.
        if moved.is_ok() && live.r != before {
            self.put(&live.r)?;
        }
        moved
    }

    fn advance_live(&self, live: &mut Live, name: &str, now: u64) -> Result<(), RolloutError> {
        loop {
            if !live.r.state.is_active() {
                return Ok(());
            }
            // Groups whose turn is over keep handing out their rest at their rate: all of a
            // group's devices get the update, as in hawkBit, whatever its conditions decided.
            for g in 0..live.r.groups.len() {
                if live.r.groups[g].state.is_done() {
                    self.release(live, g, now)?;
                }
            }
            if let Some(g) = live.r.groups.iter().position(|g| g.state == GroupState::Running) {
                // Hand out what the rate allows before judging: a group is judged on its
                // devices' outcomes, and an empty group succeeds at once.
                self.release(live, g, now)?;
                match live.r.groups[g].conditions.evaluate(&live.counts[g]) {
                    Verdict::Pending => {
                        if let Some(next) = live.r.state.advance(Progress::Started) {
                            live.r.state = next;
                            self.put(&live.r)?;
                        }
                        return Ok(());
                    }
                    Verdict::Error => {
                        end_group(&mut live.r.groups[g], GroupState::Error, now);
                        live.r.state = live.r.state.advance(Progress::PauseByCondition).expect("active");
                        live.r.updated_at = now;
                        self.put(&live.r)?;
                        warn!(rollout = name, group = g + 1, counts = ?live.counts[g], "error condition met: rollout paused");
                        return Ok(());
                    }
                    Verdict::Success => {
                        end_group(&mut live.r.groups[g], GroupState::Finished, now);
                        info!(rollout = name, group = g + 1, counts = ?live.counts[g], "group finished");
                        if live.r.groups[g].conditions.success_action == SuccessAction::Pause {
                            live.r.state = live.r.state.advance(Progress::PauseByCondition).expect("active");
                            live.r.updated_at = now;
                            self.put(&live.r)?;
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            match live.r.groups.iter().position(|g| g.state == GroupState::Scheduled) {
                Some(g) => {
                    live.r.groups[g].state = GroupState::Running;
                    live.r.groups[g].started_at = Some(now);
                    live.r.updated_at = now;
                    // Written before a single operation of the group is queued: a crash in
                    // between is finished by open, which hands out the rest.
                    self.put(&live.r)?;
                    info!(rollout = name, group = g + 1, devices = live.members[g].len(), "group started");
                }
                None => {
                    // A dynamic rollout keeps running for devices that match later, and any
                    // rollout until every member of every group has been handed out and has
                    // ended: a group's threshold starts the next group, it does not excuse the
                    // rest of its own.
                    let all_settled = (0..live.members.len()).all(|g| live.settled(g))
                        || crate::planner::rules::broken(crate::planner::rules::Rule::FinishSettled);
                    let progress = if live.r.dynamic_group_size.is_some() || !all_settled {
                        Progress::Started
                    } else {
                        Progress::AllGroupsDone
                    };
                    if let Some(next) = live.r.state.advance(progress) {
                        live.r.state = next;
                        live.r.updated_at = now;
                        self.put(&live.r)?;
                        if next == RolloutState::Finished {
                            info!(rollout = name, "rollout finished");
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Hands a running group's devices to the planner: all of them, or as many as its rate
    /// allows within the last minute. One step: the operations, the members that left (with
    /// why) and the rollout record with its groups' totals are one batch, so a crash hands out
    /// all of a slice or none of it, and a member left out stays left out.
    fn release(&self, live: &mut Live, g: usize, now: u64) -> Result<(), RolloutError> {
        let members = &live.members[g];
        if live.released[g] >= members.len() {
            return Ok(());
        }
        let mut allowance = usize::MAX;
        if let Some(rate) = &live.r.rate {
            let window = &mut live.window[g];
            while window.front().is_some_and(|&t| t + 60 <= now) {
                window.pop_front();
            }
            allowance = (rate.now(live.counts[g].succeeded) as usize).saturating_sub(window.len());
        }
        if allowance == 0 {
            return Ok(());
        }
        let images = match self.images(&live.r.image) {
            Ok(i) => i,
            Err(e) => {
                error!(rollout = %live.r.name, error = %e, "the rollout's image is gone: nothing handed out");
                return Ok(());
            }
        };
        let origin = live.r.origin(g);
        let mut step = self.planner.step();
        let (mut released, mut handed, mut left) = (live.released[g], Vec::new(), Vec::new());
        while allowance > 0 && released < members.len() {
            let id = &members[released];
            released += 1;
            if live.left[g].contains_key(id) {
                continue;
            }
            let picked = match self.fleet.hardware(id) {
                None => Err("the device was deleted".to_owned()),
                Some(hw) => pick(&images, hw.as_deref()).map(Arc::clone),
            };
            match picked {
                Ok(meta) => {
                    step.push(id, MAIN_COMPONENT, &meta, live.r.weight, &origin, now);
                    allowance -= 1;
                    handed.push(now);
                }
                Err(why) => {
                    // It cannot take part any more: it leaves the group (its total drops), so
                    // the group can end; the reason is stored with the step.
                    warn!(rollout = %live.r.name, device = %id, why, "device left out of its group");
                    step.batch().put(Cf::Rollouts, &super::left_key(&live.r.name, g, id), why.as_bytes());
                    left.push((id.clone(), why));
                }
            }
        }
        let mut r = live.r.clone();
        r.groups[g].total = r.groups[g].total.saturating_sub(left.len() as u64);
        r.groups[g].released = released as u64;
        if !left.is_empty() {
            r.updated_at = now;
        }
        step.batch().put_json(Cf::Rollouts, &super::rollout_key(&r.name), &r)?;
        step.commit()?;
        live.r = r;
        live.released[g] = released;
        live.counts[g].total = live.counts[g].total.saturating_sub(left.len() as u64);
        if live.r.rate.is_some() {
            live.window[g].extend(handed);
        }
        live.left[g].extend(left);
        Ok(())
    }

    /// Counts one operation's outcome and, if its group's verdict changes, acts on it.
    pub(super) fn on_outcome(&self, book: &mut Book, e: &Ended, now: u64) -> Result<(), RolloutError> {
        let Some((name, g)) = parse_origin(&e.origin) else { return Ok(()) };
        let Some(live) = book.live.get_mut(name) else { return Ok(()) };
        if live.left.get(g).is_some_and(|l| !l.is_empty() && l.contains_key(&e.device)) {
            // Its leaving already took it out of the group's total.
            return Ok(());
        }
        let Some(c) = live.counts.get_mut(g) else { return Ok(()) };
        count(c, e.state);
        self.outcomes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (active, group) = (live.r.state.is_active(), live.r.groups[g].state);
        let act = match group {
            GroupState::Running => active && live.r.groups[g].conditions.evaluate(&live.counts[g]) != Verdict::Pending,
            // The last member of a group whose turn is over ending may be what finishes the
            // rollout.
            _ => active && group.is_done() && live.settled(g),
        };
        if act {
            let name = name.to_owned();
            self.advance(book, &name, now)?;
        }
        Ok(())
    }

    /// Handles every outcome reported so far, then the timed work ([`Rollouts::tick`]).
    /// Returns how many outcomes were handled. The gateway's worker ([`Rollouts::spawn`]) does
    /// this as outcomes arrive; tests call it directly.
    pub fn pump(&self, now: u64) -> Result<usize, RolloutError> {
        let batch: Vec<Ended> = self.events.lock().unwrap_or_else(|e| e.into_inner()).try_iter().collect();
        self.handle_outcomes(&batch, now)?;
        Ok(batch.len())
    }

    /// Counts each outcome, acts on what its group's verdict calls for, then does the timed
    /// work: what the worker does with each batch it receives (public for the benchmarks).
    pub fn handle_outcomes(&self, batch: &[Ended], now: u64) -> Result<(), RolloutError> {
        let mut book = self.lock();
        // Every outcome is counted even when acting on one fails (a store error): the batch
        // has left the channel, and the counts must not drift.
        let mut failed = Ok(());
        for e in batch {
            if let Err(err) = self.on_outcome(&mut book, e, now) {
                failed = failed.and(Err(err));
            }
        }
        failed?;
        self.tick(&mut book, now)
    }

    /// Starts ready rollouts whose start time has come and hands out what the rate now allows.
    fn tick(&self, book: &mut Book, now: u64) -> Result<(), RolloutError> {
        let due: Vec<String> = book
            .live
            .values()
            .filter(|l| l.r.state == RolloutState::Ready && l.r.start_at.is_some_and(|t| t <= now))
            .map(|l| l.r.name.clone())
            .collect();
        for name in due {
            let live = book.live.get_mut(&name).expect("listed above");
            live.r.state = RolloutState::Starting;
            for g in live.r.groups.iter_mut().filter(|g| g.state == GroupState::Ready) {
                g.state = GroupState::Scheduled;
            }
            info!(rollout = %name, "start time reached: rollout starting");
            self.advance(book, &name, now)?;
        }
        let limited: Vec<String> = book
            .live
            .values()
            .filter(|l| l.r.state.is_active() && l.r.rate.is_some())
            .map(|l| l.r.name.clone())
            .collect();
        for name in limited {
            self.advance(book, &name, now)?;
        }
        Ok(())
    }

    /// Runs the rollouts' worker on its own thread until `stop`: outcomes are handled as they
    /// arrive, timed work (start times, rates) at least every [`crate::planner::POLL`].
    pub fn spawn(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        // What was not acted on is acted on again at the next outcome, tick or open: the
        // counts are rebuilt from the operations.
        crate::planner::spawn_worker("rollouts", stop, move |wait| {
            let batch = crate::planner::next_batch(&me.events, wait)?;
            Some(me.handle_outcomes(&batch, crate::now_secs()).map_err(|e| e.to_string()))
        })
    }

    /// After devices were registered or changed: each that now matches a dynamic rollout's
    /// filter and is not in it joins its trailing group (a new one when that is full or has
    /// ended); a running rollout hands it out at once. Returns how many joined.
    pub fn devices_changed(&self, ids: &[String], now: u64) -> Result<usize, RolloutError> {
        let mut book = self.lock();
        let names: Vec<String> = book
            .live
            .values()
            .filter(|l| l.r.dynamic_group_size.is_some() && !l.r.state.is_final() && l.filter.is_some())
            .map(|l| l.r.name.clone())
            .collect();
        let mut joined = 0;
        for name in names {
            let live = book.live.get_mut(&name).expect("listed above");
            let size = live.r.dynamic_group_size.expect("dynamic") as usize;
            let newcomers: Vec<String> = ids
                .iter()
                .filter(|id| !live.joined.as_ref().is_some_and(|j| j.contains(*id)))
                .filter(|id| self.fleet.get(id).is_some_and(|d| live.filter.as_ref().is_some_and(|f| f.matches(&d))))
                .cloned()
                .collect();
            if newcomers.is_empty() {
                continue;
            }
            let mut touched = Vec::new();
            for id in newcomers {
                // The last dynamic group takes newcomers until it is full, as in hawkBit, even
                // once its turn is over (it hands them out at once: see `advance`); past
                // MAX_GROUPS the last group takes them all.
                let last = live.r.groups.last();
                let open = last.is_some_and(|g| g.dynamic && (g.total as usize) < size)
                    || (live.r.groups.len() >= super::MAX_GROUPS && last.is_some());
                if !open {
                    let conditions = live.r.groups.last().map(|g| g.conditions).unwrap_or_default();
                    let state =
                        if live.r.state == RolloutState::Ready || live.r.state == RolloutState::WaitingForApproval {
                            GroupState::Ready
                        } else {
                            GroupState::Scheduled
                        };
                    live.r.groups.push(Group {
                        name: format!("group-{}", live.r.groups.len() + 1),
                        state,
                        conditions,
                        total: 0,
                        dynamic: true,
                        released: 0,
                        started_at: None,
                        ended_at: None,
                    });
                    live.members.push(Vec::new());
                    live.counts.push(Default::default());
                    live.released.push(0);
                    live.window.push(Default::default());
                    live.left.push(Default::default());
                }
                let g = live.r.groups.len() - 1;
                live.members[g].push(id.clone());
                live.counts[g].total += 1;
                live.r.groups[g].total += 1;
                if let Some(j) = live.joined.as_mut() {
                    j.insert(id);
                }
                if !touched.contains(&g) {
                    touched.push(g);
                }
                joined += 1;
            }
            live.r.updated_at = now;
            let mut b = self.store.batch();
            for &g in &touched {
                b.put(Cf::Rollouts, &group_key(&name, g), &super::encode_members(&live.members[g]));
            }
            b.put_json(Cf::Rollouts, &super::rollout_key(&name), &live.r)?;
            b.commit()?;
            info!(rollout = %name, devices = joined, "devices joined a dynamic rollout");
            self.advance(&mut book, &name, now)?;
        }
        Ok(joined)
    }
}

fn end_group(g: &mut Group, state: GroupState, now: u64) {
    g.state = state;
    g.ended_at = Some(now);
}
