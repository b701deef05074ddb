//! What a deletion leaves behind: a tombstone per deleted device, written in the deletion's
//! batch. Data-plane nodes hold each device's view as a retained message at the broker; a
//! planner that crashes after committing a deletion and before clearing that view would
//! otherwise leave it there for good (after a restart it republishes the views of the devices
//! it has, and the deleted one is not among them), and a node would go on serving the deleted
//! device's pending operation. The feed clears the view of every tombstone whenever it
//! (re)connects. Tombstones go when the id is registered again, or after [`KEEP_SECS`].

use std::collections::HashMap;

use super::Fleet;
use crate::store::{Batch, Cf, StoreError};

const PREFIX: &[u8] = b"deleted\0";

/// A tombstone is kept a week: a planner down longer than that has its broker's retained
/// views cleared by the operator (the README's cluster page says how).
pub const KEEP_SECS: u64 = 7 * 24 * 3600;

fn key(id: &str) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn unstage(b: &mut Batch<'_>, id: &str) {
    b.delete(Cf::Meta, &key(id));
}

/// The tombstones in the store: id → when it was deleted.
pub(super) fn load(store: &crate::store::Store) -> Result<HashMap<String, u64>, StoreError> {
    let mut out = HashMap::new();
    store.scan(Cf::Meta, PREFIX, None, |k, v| {
        let at = <[u8; 8]>::try_from(v).map(u64::from_be_bytes).unwrap_or(0);
        out.insert(String::from_utf8_lossy(&k[PREFIX.len()..]).into_owned(), at);
        Ok(true)
    })?;
    Ok(out)
}

impl Fleet {
    fn tombstoned(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.tombstoned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a deletion's tombstone to its batch. Known in memory before the commit: a
    /// deletion that is not committed takes it back ([`Fleet::cancel_delete`]).
    pub(super) fn stage_tombstone(&self, b: &mut Batch<'_>, id: &str, now: u64) {
        b.put(Cf::Meta, &key(id), &now.to_be_bytes());
        self.tombstoned().insert(id.to_owned(), now);
    }

    pub(super) fn unstage_tombstone(&self, id: &str) {
        self.tombstoned().remove(id);
    }

    pub(super) fn is_tombstoned(&self, id: &str) -> bool {
        self.tombstoned().contains_key(id)
    }

    /// Devices deleted within [`KEEP_SECS`] and not registered again, in id order.
    pub fn tombstones(&self) -> Vec<String> {
        let mut out: Vec<String> = self.tombstoned().keys().filter(|id| !self.contains(id)).cloned().collect();
        out.sort();
        out
    }

    /// Drops tombstones older than [`KEEP_SECS`]; returns how many.
    pub fn prune_tombstones(&self, now: u64) -> Result<usize, StoreError> {
        let mut tombstoned = self.tombstoned();
        let old: Vec<String> =
            tombstoned.iter().filter(|(_, at)| now >= at.saturating_add(KEEP_SECS)).map(|(id, _)| id.clone()).collect();
        if !old.is_empty() {
            let mut b = self.store.batch();
            for id in &old {
                unstage(&mut b, id);
            }
            b.commit()?;
            for id in &old {
                tombstoned.remove(id);
            }
        }
        Ok(old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::DeviceSpec;
    use crate::store::Store;

    fn spec(id: &str) -> DeviceSpec {
        DeviceSpec { id: id.into(), ..Default::default() }
    }

    #[test]
    fn a_deletion_leaves_a_tombstone_until_the_id_is_registered_again_or_a_week_passes() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
        let f = open();
        f.upsert(vec![spec("a"), spec("b")], 0).unwrap();
        assert!(f.tombstones().is_empty());
        let mut b = f.store.batch();
        assert!(f.stage_delete(&mut b, "a", 100));
        assert!(f.stage_delete(&mut b, "b", 200));
        b.commit().unwrap();
        f.finish_delete("a");
        f.finish_delete("b");
        drop(f);
        // Stored: a restart still knows both.
        let f = open();
        assert_eq!(f.tombstones(), ["a", "b"]);
        // b comes back: its tombstone goes with its registration.
        f.upsert(vec![spec("b")], 300).unwrap();
        drop(f);
        let f = open();
        assert_eq!(f.tombstones(), ["a"]);
        assert_eq!(load(&f.store).unwrap().len(), 1, "b's tombstone deleted from the store");
        // A week after the deletion it is pruned.
        assert_eq!(f.prune_tombstones(100 + KEEP_SECS - 1).unwrap(), 0);
        assert_eq!(f.prune_tombstones(100 + KEEP_SECS).unwrap(), 1);
        assert!(f.tombstones().is_empty());
        assert!(!f.is_tombstoned("a"));
    }
}
