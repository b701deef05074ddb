//! What the simulator checks of the operation queue after every step (`crate::sim`).

use super::{Operation, Planner};
use crate::store::Cf;

/// An operation as stored: its progress and last activity are kept in memory between
/// transitions, so they are left out of the comparison.
fn durable(o: &Operation) -> Operation {
    Operation { offset: 0, last_activity: 0, ..o.clone() }
}

impl Planner {
    /// At most one transfer per device, across its components; and what a plan queued for a
    /// device's component it queued once (an action's or a rollout group's origin appears on
    /// one operation per device and component: a step replayed after a crash would repeat it).
    pub fn audit_transfers(&self) -> Result<(), String> {
        for e in self.ops.iter() {
            let planned = e.iter().filter(|o| matches!(super::origin_kind(&o.origin), "action" | "rollout"));
            let mut seen = std::collections::HashSet::new();
            for o in planned {
                if !seen.insert((&o.origin, &o.component)) {
                    return Err(format!("{} has two operations of {} for {}", e.key(), o.origin, o.component));
                }
            }
            let busy: Vec<&Operation> = e.iter().filter(|o| o.state.in_flight()).collect();
            if busy.len() > 1 {
                let what: Vec<String> =
                    busy.iter().map(|o| format!("{}#{} {}", o.component, o.seq, o.state.as_str())).collect();
                return Err(format!("device {} has {} transfers at once: {}", e.key(), busy.len(), what.join(", ")));
            }
        }
        Ok(())
    }

    /// The operations in memory are exactly the stored ones (what a restart would load), and
    /// none belongs to a device that is not registered.
    pub fn audit_store(&self) -> Result<(), String> {
        let mut stored: Vec<Operation> = self.store.load_all(Cf::Ops).map_err(|e| e.to_string())?;
        stored.sort_by_key(|o| o.seq);
        let mut memory: Vec<Operation> = Vec::new();
        self.scan(|o| memory.push(o.clone()));
        memory.sort_by_key(|o| o.seq);
        let (stored, memory): (Vec<Operation>, Vec<Operation>) =
            (stored.iter().map(durable).collect(), memory.iter().map(durable).collect());
        if stored != memory {
            let only_memory: Vec<&Operation> = memory.iter().filter(|o| !stored.contains(o)).collect();
            let only_store: Vec<&Operation> = stored.iter().filter(|o| !memory.contains(o)).collect();
            return Err(format!(
                "operations in memory differ from the store: memory only {only_memory:?}, store only {only_store:?}"
            ));
        }
        if let Some(o) = memory.iter().find(|o| !self.fleet.contains(&o.device)) {
            return Err(format!("operation {} outlives its device {}", o.seq, o.device));
        }
        let used = memory.iter().map(|o| o.seq).max().unwrap_or(0);
        if used >= self.next_seq.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!("sequence number {used} is in use, the next one handed out would be lower"));
        }
        Ok(())
    }
}
