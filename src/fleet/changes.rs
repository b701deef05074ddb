//! Which devices' planned state changed since a reader last looked: the planner's change
//! stream to data-plane nodes (`cluster`) is fed from it. Writers mark a device after their
//! change is committed; one reader takes what is marked. A set, not a log: a device changed
//! ten times before the reader looks is read once, in its newest state, so it never holds
//! more than one entry per device, with the moment it was first marked (the change's age when
//! it reaches a node is what the cluster measures).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Changes {
    marked: Mutex<HashMap<String, u64>>,
    wake: Notify,
}

impl Changes {
    pub fn mark(&self, device: &str) {
        let mut m = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(device) {
            m.insert(device.to_owned(), crate::now_millis());
        }
        drop(m);
        self.wake.notify_one();
    }

    pub fn mark_all<'a>(&self, devices: impl IntoIterator<Item = &'a str>) {
        let mut m = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::now_millis();
        for d in devices {
            if !m.contains_key(d) {
                m.insert(d.to_owned(), now);
            }
        }
        drop(m);
        self.wake.notify_one();
    }

    /// Takes up to `limit` marked devices, each with when it was first marked (milliseconds
    /// since the epoch); they are unmarked.
    pub fn take(&self, limit: usize) -> Vec<(String, u64)> {
        let mut m = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        let out: Vec<(String, u64)> = m.iter().take(limit).map(|(d, at)| (d.clone(), *at)).collect();
        for (d, _) in &out {
            m.remove(d);
        }
        out
    }

    /// Whether a device is marked (its view not read since its last change).
    pub fn contains(&self, device: &str) -> bool {
        self.marked.lock().unwrap_or_else(|e| e.into_inner()).contains_key(device)
    }

    pub fn len(&self) -> usize {
        self.marked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the reader without marking anything (it has something else to look at).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves once something is marked (or was marked since the last take).
    pub async fn marked(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_marked_twice_is_read_once() {
        let c = Changes::default();
        c.mark("a");
        c.mark("b");
        c.mark("a");
        let mut got: Vec<String> = c.take(10).into_iter().map(|(d, _)| d).collect();
        got.sort();
        assert_eq!(got, ["a", "b"]);
        assert!(c.is_empty());
        c.mark_all(["x", "y", "z"]);
        assert_eq!(c.take(2).len(), 2);
        assert_eq!(c.len(), 1);
    }
}
