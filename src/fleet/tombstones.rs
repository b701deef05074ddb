//! What a deletion leaves behind: a tombstone per deleted device, written in the deletion's
//! batch. Data-plane nodes hold each device's view as a retained message at the broker; a
//! planner that crashes after committing a deletion and before clearing that view would
//! otherwise leave it there for good (after a restart it republishes the views of the devices
//! it has, and the deleted one is not among them), and a node would go on serving the deleted
//! device's pending operation. The feed clears the view of every tombstone whenever it
//! (re)connects. Tombstones go when the id is registered again, or after [`KEEP_SECS`].

use std::collections::HashSet;

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

/// The ids with a tombstone in the store.
pub(super) fn load(store: &crate::store::Store) -> Result<HashSet<String>, StoreError> {
    let mut out = HashSet::new();
    store.scan(Cf::Meta, PREFIX, None, |k, _| {
        out.insert(String::from_utf8_lossy(&k[PREFIX.len()..]).into_owned());
        Ok(true)
    })?;
    Ok(out)
}

impl Fleet {
    pub(super) fn stage_tombstone(&self, b: &mut Batch<'_>, id: &str, now: u64) {
        b.put(Cf::Meta, &key(id), &now.to_be_bytes());
        // Known before the commit: at worst a registration deletes a tombstone never written.
        self.tombstoned.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned());
    }

    pub(super) fn is_tombstoned(&self, id: &str) -> bool {
        self.tombstoned.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// Devices deleted within [`KEEP_SECS`] and not registered again.
    pub fn tombstones(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        self.store.scan(Cf::Meta, PREFIX, None, |k, _| {
            if let Ok(id) = std::str::from_utf8(&k[PREFIX.len()..]) {
                if !self.contains(id) {
                    out.push(id.to_owned());
                }
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Drops tombstones older than [`KEEP_SECS`]; returns how many.
    pub fn prune_tombstones(&self, now: u64) -> Result<usize, StoreError> {
        let mut old = Vec::new();
        self.store.scan(Cf::Meta, PREFIX, None, |k, v| {
            let at = <[u8; 8]>::try_from(v).map(u64::from_be_bytes).unwrap_or(0);
            if now >= at.saturating_add(KEEP_SECS) {
                old.push(k.to_vec());
            }
            Ok(true)
        })?;
        if !old.is_empty() {
            let mut b = self.store.batch();
            for k in &old {
                b.delete(Cf::Meta, k);
            }
            b.commit()?;
            let mut set = self.tombstoned.lock().unwrap_or_else(|e| e.into_inner());
            for k in &old {
                set.remove(&*String::from_utf8_lossy(&k[PREFIX.len()..]));
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
        assert!(f.tombstones().unwrap().is_empty());
        let mut b = f.store.batch();
        assert!(f.stage_delete(&mut b, "a", 100));
        assert!(f.stage_delete(&mut b, "b", 200));
        b.commit().unwrap();
        f.finish_delete("a");
        f.finish_delete("b");
        drop(f);
        // Stored: a restart still knows both.
        let f = open();
        assert_eq!(f.tombstones().unwrap(), ["a", "b"]);
        // b comes back: its tombstone goes with its registration.
        f.upsert(vec![spec("b")], 300).unwrap();
        drop(f);
        let f = open();
        assert_eq!(f.tombstones().unwrap(), ["a"]);
        assert_eq!(load(&f.store).unwrap().len(), 1, "b's tombstone deleted from the store");
        // A week after the deletion it is pruned.
        assert_eq!(f.prune_tombstones(100 + KEEP_SECS - 1).unwrap(), 0);
        assert_eq!(f.prune_tombstones(100 + KEEP_SECS).unwrap(), 1);
        assert!(f.tombstones().unwrap().is_empty());
        assert!(!f.is_tombstoned("a"));
    }
}
