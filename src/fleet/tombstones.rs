//! What a deletion leaves behind: a tombstone per deleted device, written in the deletion's
//! batch. Data-plane nodes hold each device's view as a retained message at the broker; a
//! planner that crashes after committing a deletion and before clearing that view would
//! otherwise leave it there for good (after a restart it republishes the views of the devices
//! it has, and the deleted one is not among them), and a node would go on serving the deleted
//! device's pending operation. The feed clears the view of every tombstone whenever it
//! (re)connects. Tombstones go when the id is registered again, or after [`KEEP_SECS`].

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

pub(super) fn stage(b: &mut Batch<'_>, id: &str, now: u64) {
    b.put(Cf::Meta, &key(id), &now.to_be_bytes());
}

pub(super) fn unstage(b: &mut Batch<'_>, id: &str) {
    b.delete(Cf::Meta, &key(id));
}

impl Fleet {
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
        }
        Ok(old.len())
    }
}
