//! RocksDB: column families, key encodings, write batches. The only module that names
//! `rocksdb`; it knows nothing of waves, devices or DFU — callers hand it keys and values.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("record {key} in {cf} does not decode: {message}")]
    Corrupt { cf: &'static str, key: String, message: String },
    #[error("cannot encode a record: {0}")]
    Encode(String),
    /// A crash the simulator injected: this write, and every one after it, did not happen.
    #[error("the store is down (a simulated crash)")]
    Down,
}

/// The column families, one per kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    /// name \0 version → image metadata (JSON).
    Images,
    /// sha256 (32 bytes) ++ chunk index (u32 BE) → image bytes.
    Chunks,
    /// device id → device record (JSON).
    Devices,
    /// device id \0 component \0 sequence (hex) → operation (JSON).
    Ops,
    /// small named values.
    Meta,
    /// wave name → wave with its rollout history (JSON).
    Waves,
    /// `r` \0 rollout name → rollout with its groups' states (JSON); `g` \0 rollout name \0
    /// group index (4 hex digits) → the group's device ids, one per line.
    Rollouts,
    /// action id → FAS-style action with its plan (JSON).
    Actions,
    /// snapshot name → what each target of its xnames ran (JSON).
    Snapshots,
}

impl Cf {
    const ALL: [Cf; 9] =
        [Cf::Images, Cf::Chunks, Cf::Devices, Cf::Ops, Cf::Meta, Cf::Waves, Cf::Rollouts, Cf::Actions, Cf::Snapshots];

    fn name(self) -> &'static str {
        match self {
            Cf::Images => "images",
            Cf::Chunks => "chunks",
            Cf::Devices => "devices",
            Cf::Ops => "ops",
            Cf::Meta => "meta",
            Cf::Waves => "waves",
            Cf::Rollouts => "rollouts",
            Cf::Actions => "actions",
            Cf::Snapshots => "snapshots",
        }
    }
}

/// Where a store's files live: the machine's file system, or RocksDB's in-memory one (the
/// simulator's: its files outlive a dropped database as a disk outlives a killed process, and
/// reopening replays the write-ahead log as after a crash, without a disk's cost).
#[derive(Clone, Default)]
pub struct Disk(Option<rocksdb::Env>);

impl Disk {
    pub fn real() -> Disk {
        Disk(None)
    }

    pub fn memory() -> Result<Disk, StoreError> {
        Ok(Disk(Some(rocksdb::Env::mem_env()?)))
    }
}

/// A shared handle to the database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    sync: bool,
    /// Batches that may still be written before the store goes down, the simulator's crash
    /// between two writes; negative: no limit (always, outside the simulator).
    budget: Arc<std::sync::atomic::AtomicI64>,
}

impl Store {
    /// Opens (creating if needed) the database under `dir`. `sync` fsyncs the WAL on every
    /// write; without it, acknowledged writes survive a process crash but not power loss.
    pub fn open(dir: &Path, sync: bool) -> Result<Store, StoreError> {
        Store::open_on(&Disk::real(), dir, sync)
    }

    /// [`Store::open`] on a given [`Disk`].
    pub fn open_on(disk: &Disk, dir: &Path, sync: bool) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        if let Some(env) = &disk.0 {
            opts.set_env(env);
        }
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Bounded log files: operators do not want RocksDB's info logs to fill the disk.
        opts.set_keep_log_file_num(4);
        opts.set_max_log_file_size(8 << 20);
        let cfs = Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Store { db: Arc::new(db), sync, budget: Arc::new((-1).into()) })
    }

    /// The simulator's crash: after `writes` more batches, every commit fails with
    /// [`StoreError::Down`] and writes nothing, as if the process had died between two
    /// writes. `None` lifts the limit.
    #[doc(hidden)]
    pub fn crash_after(&self, writes: Option<u32>) {
        self.budget.store(writes.map_or(-1, i64::from), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a crash set by [`Store::crash_after`] has happened: a commit was refused.
    #[doc(hidden)]
    pub fn is_down(&self) -> bool {
        self.budget.load(std::sync::atomic::Ordering::SeqCst) == -2
    }

    /// Takes one write from the budget; false when the store is down.
    fn spend(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let mut left = self.budget.load(SeqCst);
        loop {
            let next = match left {
                -1 => return true,
                0 | -2 => {
                    self.budget.store(-2, SeqCst);
                    return false;
                }
                n => n - 1,
            };
            match self.budget.compare_exchange(left, next, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(now) => left = now,
            }
        }
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every Cf is created at open, so the handle always exists.
        self.db.cf_handle(cf.name()).expect("column family created at open")
    }

    fn write_opts(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(self.sync);
        w
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Hands `read` the value without copying it out of RocksDB (a pinned slice).
    pub fn with_pinned<R>(&self, cf: Cf, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, StoreError> {
        Ok(self.db.get_pinned_cf(self.cf(cf), key)?.map(|v| read(&v)))
    }

    pub fn get_json<T: DeserializeOwned>(&self, cf: Cf, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(v) => decode(cf, key, &v).map(Some),
        }
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch { store: self, wb: WriteBatch::default() }
    }

    /// Calls `f` for every record whose key starts with `prefix`, in key order, from `start`
    /// (inclusive; defaults to the prefix) until `f` returns false.
    pub fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let from = start.unwrap_or(prefix);
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::From(from, rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(prefix) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Every record of a column family, decoded.
    pub fn load_all<T: DeserializeOwned>(&self, cf: Cf) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        self.scan(cf, b"", None, |k, v| {
            out.push(decode(cf, k, v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Flushes memtables to disk, for a clean shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(cf: Cf, key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        cf: cf.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

/// Changes applied together or not at all.
pub struct Batch<'s> {
    store: &'s Store,
    wb: WriteBatch,
}

impl Batch<'_> {
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.wb.put_cf(self.store.cf(cf), key, value);
    }

    pub fn put_json<T: Serialize>(&mut self, cf: Cf, key: &[u8], value: &T) -> Result<(), StoreError> {
        let v = serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))?;
        self.put(cf, key, &v);
        Ok(())
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.wb.delete_cf(self.store.cf(cf), key);
    }

    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }

    /// Writes the batch through the WAL; returns once it is durable against a process crash.
    pub fn commit(self) -> Result<(), StoreError> {
        if !self.store.spend() {
            return Err(StoreError::Down);
        }
        self.store.db.write_opt(self.wb, &self.store.write_opts())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_atomic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), false).unwrap();
            let mut b = s.batch();
            b.put_json(Cf::Devices, b"d1", &serde_json::json!({"id": "d1"})).unwrap();
            b.put(Cf::Meta, b"k", b"v");
            b.commit().unwrap();
        }
        let s = Store::open(dir.path(), false).unwrap();
        assert_eq!(s.get(Cf::Meta, b"k").unwrap().as_deref(), Some(&b"v"[..]));
        let all: Vec<serde_json::Value> = s.load_all(Cf::Devices).unwrap();
        assert_eq!(all, vec![serde_json::json!({"id": "d1"})]);
    }

    #[test]
    fn scan_respects_prefix_and_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        let mut b = s.batch();
        for k in ["a1", "a2", "a3", "b1"] {
            b.put(Cf::Meta, k.as_bytes(), b"");
        }
        b.commit().unwrap();
        let mut seen = Vec::new();
        s.scan(Cf::Meta, b"a", Some(b"a2"), |k, _| {
            seen.push(String::from_utf8(k.to_vec()).unwrap());
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, ["a2", "a3"]);
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path(), false).unwrap();
        assert!(Store::open(dir.path(), false).is_err());
    }

    #[test]
    fn corrupt_records_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        let mut b = s.batch();
        b.put(Cf::Devices, b"x", b"not json");
        b.commit().unwrap();
        let r: Result<Option<serde_json::Value>, _> = s.get_json(Cf::Devices, b"x");
        assert!(matches!(r, Err(StoreError::Corrupt { .. })));
    }
}
