//! The device registry: ids, the tag a device follows, groups, the production flag, hardware
//! type, running versions and last-seen times. An in-memory index over the store.
//!
//! Must not know: DFU, operations, transports.

use litemap::LiteMap;

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub mod changes;
pub mod filter;
mod registration;
pub mod select;
pub mod tombstones;

pub use registration::Registration;

use self::select::{DeviceFacts, FleetIndex, Idx, Rejection, Selection, MAX_TAGS};
use crate::protocol::topic::valid_device_id;
use crate::store::{Cf, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid device id {0:?}: 1 to 64 of letters, digits and -_.:")]
    InvalidId(String),
    #[error("invalid {field} {value:?}: {message}")]
    Invalid { field: &'static str, value: String, message: &'static str },
    #[error("no device {0}")]
    NotFound(String),
    #[error("the registry is full: fleet.max_devices is {0} (devices deleted since the last start still count)")]
    Full(usize),
    #[error("device {0} appears twice in one request")]
    Duplicate(String),
    #[error(transparent)]
    Index(#[from] select::IndexError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The main firmware target, when a Status names no component.
pub const MAIN_COMPONENT: &str = "main";

/// What an operator says about a device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub id: String,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub production: bool,
    #[serde(default)]
    pub hardware: Option<String>,
    /// What the hardware says it is, for FAS-style actions (boxed: most fleets have none, and
    /// the registry holds a million of these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<Box<Inventory>>,
}

/// A device's FAS inventory: its type, manufacturer and model (FAS's field names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    #[serde(default)]
    pub device_type: Option<String>,
    #[serde(default)]
    pub manufacturer: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
}

/// A device as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Device {
    #[serde(flatten)]
    pub spec: DeviceSpec,
    /// Running version per component, as last reported. A sorted vector, not a tree: most
    /// devices report one component, and a tree node costs ~500 bytes per device.
    #[serde(default, serialize_with = "as_map")]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub running: LiteMap<String, String>,
    /// Unix seconds of the last Status, if any.
    #[serde(default)]
    pub last_seen: Option<u64>,
    pub created_at: u64,
}

/// A JSON object always (litemap writes an empty map as a list).
fn as_map<S: serde::Serializer>(m: &LiteMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(m.iter())
}

/// Checks a tag, group or hardware name: 1 to 64 printable characters, no comma.
pub fn check_text(field: &'static str, v: &str) -> Result<(), FleetError> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(FleetError::Invalid { field, value: v.into(), message: "1 to 64 printable characters, no comma" });
    }
    Ok(())
}

impl DeviceSpec {
    pub fn validate(&self) -> Result<(), FleetError> {
        if !valid_device_id(&self.id) {
            return Err(FleetError::InvalidId(self.id.clone()));
        }
        if let Some(t) = &self.tag {
            check_text("tag", t)?;
        }
        if let Some(h) = &self.hardware {
            check_text("hardware", h)?;
        }
        if let Some(i) = &self.inventory {
            for (field, v) in [("deviceType", &i.device_type), ("manufacturer", &i.manufacturer), ("model", &i.model)] {
                if let Some(v) = v {
                    check_text(field, v)?;
                }
            }
        }
        if self.groups.len() > 32 {
            return Err(FleetError::Invalid {
                field: "groups",
                value: self.groups.len().to_string(),
                message: "at most 32",
            });
        }
        self.groups.iter().try_for_each(|g| check_text("group", g))
    }
}

/// Outcome of an upsert batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Upserted {
    pub created: usize,
    pub updated: usize,
}

struct Entry {
    device: Device,
    /// `last_seen` (or a running version) moved since the record was last written.
    dirty: bool,
    /// `last_seen` moved since the selection index last took it.
    fresh: bool,
    /// Changed running versions written at once in the minute that started at `window`.
    version_writes: u8,
    window: u64,
    /// Its deletion is being committed: nothing writes its record any more, and it is no
    /// longer a device to plan for.
    deleting: bool,
}

/// A device's changed running version is written at once this many times a minute (an
/// update changes it once or twice); more changes are written by the next last-seen flush,
/// so a device reporting ever new versions costs the store one write per flush, not one per
/// Status.
const VERSION_WRITES_PER_MINUTE: u8 = 4;

impl Entry {
    fn new(device: Device) -> Entry {
        Entry { device, dirty: false, fresh: false, version_writes: 0, window: 0, deleting: false }
    }
}

/// A rollout selection, with ids.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// In sample order.
    pub devices: Vec<String>,
    pub rejected: Vec<(String, Rejection)>,
    /// Devices the rollout could reach before its limit.
    pub population: usize,
}

pub struct Fleet {
    store: Store,
    devices: DashMap<String, Entry>,
    max_devices: usize,
    /// The compact index rollouts select from; recency is refreshed by
    /// [`Fleet::flush_last_seen`], not on every Status.
    index: std::sync::RwLock<FleetIndex>,
    /// Told of every device registered, changed or deleted, when a planner feeds data-plane
    /// nodes (see [`Fleet::report_changes`]).
    changes: std::sync::OnceLock<std::sync::Arc<changes::Changes>>,
    /// Held by the last-seen flush from gathering records to committing them, and by a
    /// deletion while it marks its device: a flush never writes back a device deleted after
    /// it gathered it.
    flushing: std::sync::Mutex<()>,
    /// The key of the next registration intent (see [`Fleet::register`]).
    next_registration: std::sync::atomic::AtomicU64,
    /// The stored tombstones, id → when deleted (see [`tombstones`]): read from here, and a
    /// registration deletes one only if it is there, so registering new devices writes
    /// nothing more.
    tombstoned: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

fn facts(d: &Device) -> DeviceFacts<'_> {
    DeviceFacts {
        id: &d.spec.id,
        tag: d.spec.tag.as_deref(),
        groups: &d.spec.groups,
        production: d.spec.production,
        last_seen: d.last_seen,
        version: d.running.get(MAIN_COMPONENT).map(String::as_str),
    }
}

impl Fleet {
    pub fn open(store: Store, max_devices: usize) -> Result<Fleet, FleetError> {
        let devices = DashMap::new();
        let mut index = FleetIndex::default();
        for d in store.load_all::<Device>(Cf::Devices)? {
            index.upsert(facts(&d))?;
            devices.insert(d.spec.id.clone(), Entry::new(d));
        }
        let next_registration = registration::next_key(&store)?.into();
        let tombstoned = tombstones::load(&store)?.into();
        Ok(Fleet {
            store,
            devices,
            max_devices,
            index: std::sync::RwLock::new(index),
            changes: Default::default(),
            flushing: Default::default(),
            next_registration,
            tombstoned,
        })
    }

    /// Runs `f` over the selection index (read-locked: keep it short).
    pub fn with_index<R>(&self, f: impl FnOnce(&FleetIndex) -> R) -> R {
        f(&self.index())
    }

    /// Reserves `version` in the index's version table, so devices reporting it are told
    /// apart from all others even when the table is otherwise full.
    pub fn reserve_version(&self, version: &str) -> Result<(), FleetError> {
        self.index_mut().reserve_version(version)?;
        Ok(())
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, FleetIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, FleetIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The devices a rollout reaches (see [`FleetIndex::select`]); `in_wave` names devices
    /// already updated or staged in the wave, which are never selected again.
    pub fn select(&self, s: &Selection<'_>, in_wave: impl Fn(Idx) -> bool) -> Selected {
        let index = self.index();
        let sel = index.select(s, in_wave);
        Selected {
            devices: sel.devices.iter().map(|&i| index.id(i).to_owned()).collect(),
            rejected: sel.rejected,
            population: sel.population,
        }
    }

    /// Adds devices or updates what an operator says of existing ones (tag, groups,
    /// production, hardware), all in one write: every spec is checked before anything changes.
    /// From now on, marks in `changes` every device registered, changed or deleted.
    pub fn report_changes(&self, changes: std::sync::Arc<changes::Changes>) {
        let _ = self.changes.set(changes);
    }

    pub fn upsert(&self, specs: Vec<DeviceSpec>, now: u64) -> Result<Upserted, FleetError> {
        self.upsert_noting(specs, now, None)
    }

    /// [`Fleet::upsert`], writing `note` (a registration intent) in the same batch.
    fn upsert_noting(
        &self,
        specs: Vec<DeviceSpec>,
        now: u64,
        note: Option<(&[u8], &[u8])>,
    ) -> Result<Upserted, FleetError> {
        let mut seen = std::collections::HashSet::new();
        for s in &specs {
            s.validate()?;
            if !seen.insert(s.id.as_str()) {
                return Err(FleetError::Duplicate(s.id.clone()));
            }
        }
        let new = specs.iter().filter(|s| !self.devices.contains_key(&s.id)).count();
        // Positions of devices deleted since the start count until the index is rebuilt.
        if self.devices.len() + self.index().retired() + new > self.max_devices {
            return Err(FleetError::Full(self.max_devices));
        }
        {
            let index = self.index();
            let new_tags: std::collections::HashSet<&str> =
                specs.iter().filter_map(|s| s.tag.as_deref()).filter(|t| !index.has_tag(t)).collect();
            if index.tag_count() + new_tags.len() > MAX_TAGS {
                return Err(FleetError::Invalid {
                    field: "tag",
                    value: new_tags.iter().next().map(|t| t.to_string()).unwrap_or_default(),
                    message: "the fleet already has the most distinct tags it can hold",
                });
            }
        }
        let mut out = Upserted::default();
        let mut batch = self.store.batch();
        let mut records = Vec::with_capacity(specs.len());
        let mut revived = Vec::new();
        for spec in specs {
            let (device, created) = match self.devices.get(&spec.id) {
                Some(e) => {
                    out.updated += 1;
                    (Device { spec, ..e.device.clone() }, false)
                }
                None => {
                    out.created += 1;
                    (Device { spec, running: LiteMap::new(), last_seen: None, created_at: now }, true)
                }
            };
            batch.put_json(Cf::Devices, device.spec.id.as_bytes(), &device)?;
            if created && self.is_tombstoned(&device.spec.id) {
                // Registered again: no longer a deleted device.
                tombstones::unstage(&mut batch, &device.spec.id);
                revived.push(device.spec.id.clone());
            }
            records.push(device);
        }
        if let Some((key, value)) = note {
            batch.put(Cf::Meta, key, value);
        }
        batch.commit()?;
        for id in &revived {
            self.unstage_tombstone(id);
        }
        let mut index = self.index_mut();
        for d in records {
            // Checked above: the tags fit and the registry is bounded below u32::MAX.
            let _ = index.upsert(facts(&d));
            if let Some(c) = self.changes.get() {
                c.mark(&d.spec.id);
            }
            self.devices.insert(d.spec.id.clone(), Entry::new(d));
        }
        Ok(out)
    }

    /// Deletes a device's record (alone: a device with operations or plan memberships is
    /// deleted by `planner::delete_device`, in one step with them). Returns whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool, FleetError> {
        let mut b = self.store.batch();
        if !self.stage_delete(&mut b, id, crate::now_secs()) {
            return Ok(false);
        }
        if let Err(e) = b.commit() {
            self.cancel_delete(id);
            return Err(e.into());
        }
        self.finish_delete(id);
        Ok(true)
    }

    /// Adds a device's deletion to `b` and marks it deleting: from now on nothing writes its
    /// record (a Status, a last-seen flush) and it is no longer found. After `b` is committed,
    /// [`Fleet::finish_delete`]; if that failed, [`Fleet::cancel_delete`]. False for an
    /// unknown device.
    pub fn stage_delete(&self, b: &mut crate::store::Batch<'_>, id: &str, now: u64) -> bool {
        let _flush = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut e) = self.devices.get_mut(id) else { return false };
        if e.deleting {
            return false;
        }
        e.deleting = true;
        b.delete(Cf::Devices, id.as_bytes());
        self.stage_tombstone(b, id, now);
        true
    }

    /// The deletion staged by [`Fleet::stage_delete`] is committed: the device goes.
    pub fn finish_delete(&self, id: &str) {
        self.devices.remove(id);
        self.index_mut().remove(id);
        if let Some(c) = self.changes.get() {
            c.mark(id);
        }
    }

    /// The deletion staged by [`Fleet::stage_delete`] was not committed: the device stays.
    pub fn cancel_delete(&self, id: &str) {
        if let Some(mut e) = self.devices.get_mut(id) {
            e.deleting = false;
        }
        self.unstage_tombstone(id);
    }

    /// The registered devices are exactly the stored ones (what a restart would load): a
    /// check of the simulator's (`crate::sim`).
    pub fn audit_store(&self) -> Result<(), String> {
        let mut stored: Vec<String> = self
            .store
            .load_all::<Device>(Cf::Devices)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|d| d.spec.id)
            .collect();
        stored.sort();
        let memory = self.ids_where(|_| true);
        let memory: Vec<String> = memory.into_iter().filter(|id| self.contains(id)).collect();
        if stored != memory {
            return Err(format!("registered devices {memory:?}, stored {stored:?}"));
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Device> {
        self.devices.get(id).filter(|e| !e.deleting).map(|e| e.device.clone())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.devices.get(id).is_some_and(|e| !e.deleting)
    }

    /// Whether a device is a production device (`None`: unknown device).
    pub fn is_production(&self, id: &str) -> Option<bool> {
        self.devices.get(id).map(|e| e.device.spec.production)
    }

    /// Runs `f` on a device's class and tag (what TUF admission checks), without copying them.
    pub fn with_class<R>(&self, id: &str, f: impl FnOnce(bool, Option<&str>) -> R) -> Option<R> {
        self.devices.get(id).map(|e| f(e.device.spec.production, e.device.spec.tag.as_deref()))
    }

    /// The version a device last reported running on a component.
    pub fn running(&self, id: &str, component: &str) -> Option<String> {
        self.devices.get(id)?.device.running.get(component).cloned()
    }

    pub fn hardware(&self, id: &str) -> Option<Option<String>> {
        self.devices.get(id).filter(|e| !e.deleting).map(|e| e.device.spec.hardware.clone())
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Devices in id order, at most `limit`, starting after `after`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<Device> {
        self.list_where(after, limit, |_| true)
    }

    /// Devices that `keep` accepts, in id order, at most `limit`, starting after `after`.
    /// Only the ids are gathered and sorted; the `limit` devices listed are then copied.
    pub fn list_where(&self, after: Option<&str>, limit: usize, keep: impl Fn(&Device) -> bool) -> Vec<Device> {
        let mut ids = self.ids_where(|d| after.is_none_or(|a| d.spec.id.as_str() > a) && keep(d));
        ids.truncate(limit);
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    /// The ids of the devices that `keep` accepts, in id order. `keep` sees each device once,
    /// one after another.
    pub fn ids_where(&self, mut keep: impl FnMut(&Device) -> bool) -> Vec<String> {
        let mut ids: Vec<String> = self.devices.iter().filter(|e| keep(&e.device)).map(|e| e.key().clone()).collect();
        ids.sort_unstable();
        ids
    }

    /// Records a Status from a known device. A changed running version is written at once;
    /// last-seen is only marked dirty and written by [`Fleet::flush_last_seen`].
    /// Returns false for an unknown device.
    pub fn observe(&self, id: &str, component: &str, version: &str, now: u64) -> Result<bool, FleetError> {
        let Some(mut e) = self.devices.get_mut(id).filter(|e| !e.deleting) else { return Ok(false) };
        e.device.last_seen = Some(now);
        e.fresh = true;
        if e.device.running.get(component).map(String::as_str) == Some(version) {
            e.dirty = true;
            return Ok(true);
        }
        if e.device.running.len() >= 16 && !e.device.running.contains_key(component) {
            // Components come from devices: keep their number bounded.
            return Ok(true);
        }
        e.device.running.insert(component.to_owned(), version.to_owned());
        tracing::debug!(device = id, component, version, "running version changed");
        if now.saturating_sub(e.window) >= 60 {
            (e.window, e.version_writes) = (now, 0);
        }
        if e.version_writes < VERSION_WRITES_PER_MINUTE {
            let mut b = self.store.batch();
            b.put_json(Cf::Devices, id.as_bytes(), &e.device)?;
            b.commit()?;
            e.dirty = false;
            e.version_writes += 1;
        } else {
            e.dirty = true;
        }
        drop(e);
        if component == MAIN_COMPONENT {
            // The record just written holds last-seen too: the index gets both, so it never
            // knows less than the store. Its lock is taken after the entry's is released
            // (upsert takes them in the other order); whoever gets it last writes what the
            // entry holds then.
            let mut index = self.index_mut();
            if let (Some(i), Some(e)) = (index.lookup(id), self.devices.get(id)) {
                index.set_version(i, e.device.running.get(MAIN_COMPONENT).map(String::as_str));
                index.seen(i, e.device.last_seen.unwrap_or(0));
            }
        }
        Ok(true)
    }

    /// Writes last-seen times that changed since the last flush, in one batch, and hands
    /// them to the selection index.
    pub fn flush_last_seen(&self) -> Result<usize, FleetError> {
        let _flush = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let mut b = self.store.batch();
        let mut n = 0;
        let mut seen = Vec::new();
        for mut e in self.devices.iter_mut() {
            if e.fresh {
                e.fresh = false;
                if let Some(t) = e.device.last_seen {
                    seen.push((e.key().clone(), t));
                }
            }
            if e.dirty && !e.deleting {
                b.put_json(Cf::Devices, e.key().as_bytes(), &e.device)?;
                e.dirty = false;
                n += 1;
            }
        }
        if !seen.is_empty() {
            let mut index = self.index_mut();
            for (id, t) in seen {
                if let Some(i) = index.lookup(&id) {
                    index.seen(i, t);
                }
            }
        }
        if n > 0 {
            b.commit()?;
        }
        Ok(n)
    }
}

/// The per-device MQTT password: hex HMAC-SHA256 of the device id under the configured secret.
pub fn device_token(secret: &str, device_id: &str) -> String {
    hex::encode(token_mac(secret, device_id).finalize().into_bytes())
}

fn token_mac(secret: &str, device_id: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("hmac accepts any key length");
    mac.update(device_id.as_bytes());
    mac
}

pub fn token_ok(secret: &str, device_id: &str, password: &str) -> bool {
    match hex::decode(password) {
        Ok(tag) => token_mac(secret, device_id).verify_slice(&tag).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_tokens_verify_only_for_their_device_and_secret() {
        let t = device_token("0123456789abcdef", "dev1");
        assert_eq!(t.len(), 64);
        assert!(token_ok("0123456789abcdef", "dev1", &t));
        assert!(!token_ok("0123456789abcdef", "dev2", &t));
        assert!(!token_ok("0123456789abcdeX", "dev1", &t));
        assert!(!token_ok("0123456789abcdef", "dev1", "not hex"));
    }

    fn spec(id: &str) -> DeviceSpec {
        DeviceSpec { id: id.into(), ..Default::default() }
    }

    #[test]
    fn upsert_validates_everything_first_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
            assert_eq!(f.upsert(vec![spec("a"), spec("b")], 1).unwrap(), Upserted { created: 2, updated: 0 });
            // One bad spec and nothing of the batch is written.
            assert!(matches!(f.upsert(vec![spec("c"), spec("bad/id")], 1), Err(FleetError::InvalidId(_))));
            assert!(!f.contains("c"));
            assert!(matches!(f.upsert(vec![spec("d"), spec("d")], 1), Err(FleetError::Duplicate(_))));
            let prod = DeviceSpec { production: true, tag: Some("prod".into()), ..spec("a") };
            assert_eq!(f.upsert(vec![prod], 2).unwrap(), Upserted { created: 0, updated: 1 });
            assert!(f.observe("a", MAIN_COMPONENT, "1.0.0", 5).unwrap());
            assert!(!f.observe("zz", MAIN_COMPONENT, "1.0.0", 5).unwrap());
        }
        let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
        let a = f.get("a").unwrap();
        assert!(a.spec.production);
        // `running` is a JSON object, empty or not, and reads back.
        let b = serde_json::to_value(f.get("b").unwrap()).unwrap();
        assert_eq!(b["running"], serde_json::json!({}));
        assert_eq!(serde_json::to_value(&a).unwrap()["running"], serde_json::json!({"main": "1.0.0"}));
        assert_eq!(a.running.get(MAIN_COMPONENT).map(String::as_str), Some("1.0.0"));
        assert_eq!(a.created_at, 1);
        assert_eq!(f.list(Some("a"), 10).iter().map(|d| d.spec.id.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    /// Finding 7 of issue 28: a last-seen flush gathered a device's record, the device was
    /// deleted, and the flush then wrote the record back: after a restart the device was there
    /// again. Deletion now waits for a flush in progress and marks the device first.
    #[test]
    fn a_deleted_device_never_comes_back_from_a_last_seen_flush() {
        let dir = tempfile::tempdir().unwrap();
        {
            let f = std::sync::Arc::new(Fleet::open(Store::open(dir.path(), false).unwrap(), 1000).unwrap());
            let ids: Vec<String> = (0..300).map(|i| format!("d{i:03}")).collect();
            f.upsert(ids.iter().map(|i| spec(i)).collect(), 0).unwrap();
            let seen = {
                let (f, ids) = (f.clone(), ids.clone());
                std::thread::spawn(move || {
                    for round in 1..40u64 {
                        for id in &ids {
                            f.observe(id, MAIN_COMPONENT, "1.0.0", round).unwrap();
                        }
                        f.flush_last_seen().unwrap();
                    }
                })
            };
            for id in &ids {
                assert!(f.delete(id).unwrap());
                std::thread::yield_now();
            }
            seen.join().unwrap();
            f.flush_last_seen().unwrap();
            assert!(f.is_empty());
        }
        let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 1000).unwrap();
        assert_eq!(f.ids_where(|_| true), Vec::<String>::new(), "no deleted device came back");
    }

    #[test]
    fn the_registry_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 2).unwrap();
        f.upsert(vec![spec("a"), spec("b")], 0).unwrap();
        assert!(matches!(f.upsert(vec![spec("c")], 0), Err(FleetError::Full(2))));
        // Updating existing devices is still fine when full.
        assert!(f.upsert(vec![spec("a")], 0).is_ok());
    }

    #[test]
    fn selection_sees_registrations_and_recency_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
        let on = |id: &str| DeviceSpec { tag: Some("prod".into()), production: true, ..spec(id) };
        f.upsert(vec![on("a"), on("b"), on("c"), spec("x")], 0).unwrap();
        let sel = Selection {
            tag: "prod",
            production: true,
            group: None,
            uuids: None,
            limit: Some(select::Limit::Count(1)),
            seed: 1,
            now: 100,
        };
        f.observe("b", MAIN_COMPONENT, "1", 99).unwrap();
        f.flush_last_seen().unwrap();
        assert_eq!(f.select(&sel, |_| false).devices, ["b"], "the recently seen device first");
        let b = f.with_index(|x| x.lookup("b")).unwrap();
        assert_eq!(f.select(&sel, |i| i == b).population, 3);
        assert_ne!(f.select(&sel, |i| i == b).devices, ["b"]);
        // Restarted: the index is rebuilt from the store, recency included.
        drop(f);
        let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
        assert_eq!(f.select(&sel, |_| false).devices, ["b"]);
    }

    #[test]
    fn last_seen_is_flushed_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        {
            let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
            f.upsert(vec![spec("a")], 0).unwrap();
            f.observe("a", MAIN_COMPONENT, "1", 10).unwrap();
            f.observe("a", MAIN_COMPONENT, "1", 20).unwrap();
            assert_eq!(f.flush_last_seen().unwrap(), 1);
            assert_eq!(f.flush_last_seen().unwrap(), 0);
        }
        let f = Fleet::open(Store::open(dir.path(), false).unwrap(), 10).unwrap();
        assert_eq!(f.get("a").unwrap().last_seen, Some(20));
    }
}
