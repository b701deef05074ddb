//! A plan step: every queue change a plan makes in one step (an action started, a rollout
//! group or rate slice released, a device deleted) and the plan's own records, written in one
//! batch. A crash leaves the store before the step or after it, never between.
//!
//! While a step is open no other writer changes any device's operations (the planner's gate
//! is held exclusively), so what the step staged from a device's operations is still what
//! they are when it commits. Memory changes only after the batch is durable.

use std::collections::BTreeMap;

use super::{op_key, Operation, Planner, PlannerError};
use crate::engine::OpState;
use crate::firmware::ImageMeta;
use crate::store::{Batch, Cf};

pub struct Step<'p> {
    planner: &'p Planner,
    _gate: parking_lot::RwLockWriteGuard<'p, ()>,
    batch: Batch<'p>,
    /// Per device touched, its operations as the step leaves them.
    next: BTreeMap<String, Vec<Operation>>,
    /// Devices whose operations all go (the device is deleted).
    forgotten: BTreeMap<String, Vec<Operation>>,
}

impl Planner {
    /// Opens a step: queue changes over any number of devices, committed together with what
    /// the plan adds to [`Step::batch`].
    pub fn step(&self) -> Step<'_> {
        let gate = self.gate.write();
        Step {
            planner: self,
            _gate: gate,
            batch: self.store.batch(),
            next: BTreeMap::new(),
            forgotten: BTreeMap::new(),
        }
    }
}

impl<'p> Step<'p> {
    fn ops(&mut self, device: &str) -> &mut Vec<Operation> {
        if !self.next.contains_key(device) {
            let current = self.planner.ops.get(device).map(|o| o.clone()).unwrap_or_default();
            self.next.insert(device.to_owned(), current);
        }
        self.next.get_mut(device).expect("inserted above")
    }

    /// The device's operations as this step leaves them so far.
    pub fn operations_of(&mut self, device: &str) -> &[Operation] {
        self.ops(device)
    }

    /// [`Planner::push_expecting`], within the step.
    #[allow(clippy::too_many_arguments)]
    pub fn push_expecting(
        &mut self,
        device: &str,
        component: &str,
        meta: &ImageMeta,
        version: &str,
        weight: u16,
        origin: &str,
        now: u64,
    ) -> Operation {
        let planner = self.planner;
        let ops = self.ops(device);
        planner.queue(ops, device, component, meta, version, weight, origin, now)
    }

    /// [`Planner::push`], within the step.
    pub fn push(
        &mut self,
        device: &str,
        component: &str,
        meta: &ImageMeta,
        weight: u16,
        origin: &str,
        now: u64,
    ) -> Operation {
        self.push_expecting(device, component, meta, &meta.version, weight, origin, now)
    }

    /// Cancels every unfinished operation of a device that `pick` chooses (a transfer under way
    /// stops at the device's next Status); returns how many.
    pub fn cancel(&mut self, device: &str, pick: impl Fn(&Operation) -> bool, why: &str, now: u64) -> usize {
        let mut n = 0;
        for o in self.ops(device).iter_mut().filter(|o| !o.state.is_terminal() && pick(o)) {
            o.end(OpState::Canceled, why.to_owned(), now);
            n += 1;
        }
        n
    }

    /// Deletes every operation of a device that is being deleted; returns how many had not
    /// ended.
    pub fn forget(&mut self, device: &str) -> usize {
        let mut ops = self.planner.ops.get(device).map(|o| o.clone()).unwrap_or_default();
        // What this step queued for it goes too.
        if let Some(staged) = self.next.remove(device) {
            ops.retain(|o| !staged.iter().any(|s| s.seq == o.seq));
            ops.extend(staged);
        }
        let open = ops.iter().filter(|o| !o.state.is_terminal()).count();
        self.forgotten.insert(device.to_owned(), ops);
        open
    }

    /// The batch the step commits: the plan adds its own records to it.
    pub fn batch(&mut self) -> &mut Batch<'p> {
        &mut self.batch
    }

    /// Writes everything in one batch, then makes it current and tells watchers of what
    /// ended. On an error nothing was written and nothing changed.
    pub fn commit(mut self) -> Result<(), PlannerError> {
        let p = self.planner;
        let mut drops = Vec::with_capacity(self.next.len());
        for (device, next) in &self.next {
            let current = p.ops.get(device).map(|o| o.clone()).unwrap_or_default();
            drops.push(p.stage(&mut self.batch, &current, next)?);
        }
        for o in self.forgotten.values().flatten() {
            self.batch.delete(Cf::Ops, op_key(o).as_bytes());
        }
        if super::rules::broken(super::rules::Rule::AtomicStep) {
            // The bug a step exists to prevent: the queue's changes, then the plan's records,
            // in two batches.
            let mut first = p.store.batch();
            for (device, next) in &self.next {
                let current = p.ops.get(device).map(|o| o.clone()).unwrap_or_default();
                p.stage(&mut first, &current, next)?;
            }
            first.commit()?;
        }
        self.batch.commit()?;
        for ((device, next), drop) in std::mem::take(&mut self.next).into_iter().zip(drops) {
            let mut current = p.ops.entry(device).or_default();
            p.apply(&mut current, next, &drop);
        }
        for (device, ops) in std::mem::take(&mut self.forgotten) {
            p.ops.remove(&device);
            p.held.remove(&device);
            p.changed(&device);
            let mut open: Vec<Operation> = ops.into_iter().filter(|o| !o.state.is_terminal()).collect();
            for o in &mut open {
                o.state = OpState::Canceled;
            }
            p.tell(&open);
        }
        Ok(())
    }
}
