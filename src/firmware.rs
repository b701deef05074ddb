//! Firmware images: ingest (sha256, length), chunked storage in RocksDB, and the hot-image
//! cache that makes serving a block a slice of `Bytes` instead of a database read.
//!
//! Must not know: devices, operations, transports.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::FirmwareConfig;
use crate::store::{Cf, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("image {name}@{version} already exists with different content (sha256 {existing})")]
    Conflict { name: String, version: String, existing: String },
    #[error("image is empty")]
    Empty,
    #[error("image of {size} bytes exceeds firmware.max_image_bytes ({max})")]
    TooLarge { size: u64, max: u64 },
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: &'static str },
    #[error("no image {0}")]
    NotFound(String),
    #[error("identity: {0}")]
    BadIdentity(String),
    #[error("image {0} is damaged in the store: chunks do not match its sha256")]
    Damaged(String),
    #[error(
        "the upload is not {what}: {length} bytes with sha256 {sha256}, \
         the target is {expected_length} bytes with sha256 {expected_sha256}"
    )]
    NotExpected { what: String, length: u64, sha256: String, expected_length: u64, expected_sha256: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an upload must be when it claims to be a known file (a TUF target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// How to name it in an error, e.g. "production target app-2.1.bin".
    pub what: String,
    pub length: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// A FAS image's identity: what it is for and what a device reports when it runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageIdentity {
    #[serde(default)]
    pub device_type: String,
    #[serde(default)]
    pub manufacturer: String,
    #[serde(default, alias = "model")]
    pub models: Vec<String>,
    pub target: String,
    #[serde(default, alias = "tag")]
    pub tags: Vec<String>,
    /// Exactly what the device reports for the target when it runs this image.
    pub firmware_version: String,
    /// The image's place in the release order.
    #[serde(default)]
    pub semantic_firmware_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_speed_seconds: Option<u64>,
    /// Seconds an update to this image may take (FAS's `timeLimit` hint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<u64>,
}

/// What the gateway knows of an image; the bytes live in chunks and in the hot cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageMeta {
    pub name: String,
    pub version: String,
    pub length: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// Device types this image is for; empty means any.
    pub hardware: Vec<String>,
    pub chunk_bytes: u32,
    /// Unix seconds.
    pub created_at: u64,
    /// What FAS-style actions need to know of it (`PUT …/identity`); images without one serve
    /// waves, rollouts and assignments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<ImageIdentity>,
}

impl ImageMeta {
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn digest(&self) -> [u8; 32] {
        let mut d = [0u8; 32];
        // Validated at ingest; a record that does not parse leaves zeros, which no image has.
        let _ = hex::decode_to_slice(&self.sha256, &mut d);
        d
    }

    pub fn fits_hardware(&self, hardware: Option<&str>) -> bool {
        self.hardware.is_empty() || hardware.is_some_and(|h| self.hardware.iter().any(|x| x == h))
    }
}

/// The image of a version (and name) a device of `hardware` gets, among `images`: one naming its
/// hardware wins over one for any hardware; several that fit equally are ambiguous.
pub fn pick<'a>(images: &'a [Arc<ImageMeta>], hardware: Option<&str>) -> Result<&'a Arc<ImageMeta>, String> {
    let named: Vec<&Arc<ImageMeta>> =
        images.iter().filter(|m| hardware.is_some_and(|h| m.hardware.iter().any(|x| x == h))).collect();
    let any: Vec<&Arc<ImageMeta>> = images.iter().filter(|m| m.hardware.is_empty()).collect();
    let best = if named.is_empty() { any } else { named };
    match best.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no image of this version for hardware {}", hardware.unwrap_or("(none)"))),
        many => Err(format!(
            "several images fit hardware {}: {}; name the image as NAME@VERSION",
            hardware.unwrap_or("(none)"),
            many.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// A version's place in the release order: semver, with `v` prefixes and one- or two-part
/// numeric cores accepted (`2` and `2.0` are `2.0.0`, `v2.1-rc1` is `2.1.0-rc1`). `None`
/// for versions with no order (e.g. `nightly`).
pub fn version_order(v: &str) -> Option<semver::Version> {
    let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
    if let Ok(x) = semver::Version::parse(v) {
        return Some(x);
    }
    let at = v.find(['-', '+']).unwrap_or(v.len());
    let (core, rest) = v.split_at(at);
    let parts: Vec<&str> = core.split('.').collect();
    if parts.is_empty()
        || parts.len() > 3
        || !parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let mut padded = parts.join(".");
    for _ in parts.len()..3 {
        padded.push_str(".0");
    }
    semver::Version::parse(&format!("{padded}{rest}")).ok()
}

/// Validates an image name or version: printable, no separators the CLI or topics use.
pub fn check_label(field: &'static str, s: &str) -> Result<(), FirmwareError> {
    if s.is_empty() || s.len() > crate::protocol::MAX_TEXT_LEN {
        return Err(FirmwareError::Invalid { field, message: "must be 1 to 128 characters" });
    }
    if !s.bytes().all(|b| b.is_ascii_graphic() && b != b'@' && b != b'/') {
        return Err(FirmwareError::Invalid { field, message: "printable ascii without '@' or '/'" });
    }
    Ok(())
}

fn meta_key(name: &str, version: &str) -> Vec<u8> {
    [name.as_bytes(), b"\0", version.as_bytes()].concat()
}

fn chunk_key(digest: &[u8; 32], index: u32) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(digest);
    k[32..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Images held whole in memory, bounded by total bytes, least recently used dropped first.
struct HotCache {
    entries: DashMap<[u8; 32], (Bytes, AtomicU64)>,
    bytes: AtomicUsize,
    budget: usize,
    clock: AtomicU64,
    /// Serializes inserts and evictions; lookups never take it.
    admit: Mutex<()>,
}

impl HotCache {
    fn get(&self, digest: &[u8; 32]) -> Option<Bytes> {
        let e = self.entries.get(digest)?;
        e.1.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(e.0.clone())
    }

    fn insert(&self, digest: [u8; 32], data: Bytes) {
        let _guard = self.admit.lock().unwrap_or_else(|p| p.into_inner());
        if self.entries.contains_key(&digest) {
            return;
        }
        while self.bytes.load(Ordering::Relaxed) + data.len() > self.budget {
            let oldest = self.entries.iter().min_by_key(|e| e.value().1.load(Ordering::Relaxed)).map(|e| *e.key());
            let Some(k) = oldest else { break };
            if let Some((_, (b, _))) = self.entries.remove(&k) {
                self.bytes.fetch_sub(b.len(), Ordering::Relaxed);
            }
        }
        self.bytes.fetch_add(data.len(), Ordering::Relaxed);
        let tick = AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed));
        self.entries.insert(digest, (data, tick));
    }
}

pub struct Firmware {
    store: Store,
    cfg: FirmwareConfig,
    index: DashMap<String, Arc<ImageMeta>>,
    hot: HotCache,
    /// Identity changes one at a time: the check for a second `default` image and the write
    /// are one step.
    identities: Mutex<()>,
}

impl Firmware {
    /// Loads the image index from the store. Bytes are read on first use.
    pub fn open(store: Store, cfg: FirmwareConfig) -> Result<Firmware, FirmwareError> {
        let index = DashMap::new();
        for meta in store.load_all::<ImageMeta>(Cf::Images)? {
            index.insert(meta.id(), Arc::new(meta));
        }
        let hot = HotCache {
            entries: DashMap::new(),
            bytes: AtomicUsize::new(0),
            budget: cfg.hot_cache_bytes as usize,
            clock: AtomicU64::new(0),
            admit: Mutex::new(()),
        };
        Ok(Firmware { store, cfg, index, hot, identities: Mutex::new(()) })
    }

    /// Stores an image. The same name@version with the same bytes is accepted again
    /// (`Ok((meta, false))`); with other bytes it is refused.
    pub fn add(
        &self,
        name: &str,
        version: &str,
        hardware: Vec<String>,
        data: Bytes,
        now: u64,
    ) -> Result<(Arc<ImageMeta>, bool), FirmwareError> {
        self.add_expecting(name, version, hardware, data, None, now)
    }

    /// [`Firmware::add`], refusing bytes that are not `expected` (checked with the one hash
    /// the upload needs anyway, before anything is stored).
    pub fn add_expecting(
        &self,
        name: &str,
        version: &str,
        hardware: Vec<String>,
        data: Bytes,
        expected: Option<&Expected>,
        now: u64,
    ) -> Result<(Arc<ImageMeta>, bool), FirmwareError> {
        check_label("name", name)?;
        check_label("version", version)?;
        for h in &hardware {
            check_label("hardware", h)?;
        }
        if data.is_empty() {
            return Err(FirmwareError::Empty);
        }
        if data.len() as u64 > self.cfg.max_image_bytes {
            return Err(FirmwareError::TooLarge { size: data.len() as u64, max: self.cfg.max_image_bytes });
        }
        let digest: [u8; 32] = Sha256::digest(&data).into();
        let sha256 = hex::encode(digest);
        if let Some(e) = expected.filter(|e| e.length != data.len() as u64 || e.sha256 != sha256) {
            return Err(FirmwareError::NotExpected {
                what: e.what.clone(),
                length: data.len() as u64,
                sha256,
                expected_length: e.length,
                expected_sha256: e.sha256.clone(),
            });
        }
        let id = format!("{name}@{version}");
        if let Some(existing) = self.index.get(&id) {
            if existing.sha256 == sha256 {
                return Ok((existing.clone(), false));
            }
            return Err(FirmwareError::Conflict {
                name: name.into(),
                version: version.into(),
                existing: existing.sha256.clone(),
            });
        }
        let meta = ImageMeta {
            name: name.into(),
            version: version.into(),
            length: data.len() as u64,
            sha256,
            hardware,
            chunk_bytes: self.cfg.chunk_bytes,
            created_at: now,
            identity: None,
        };
        let mut batch = self.store.batch();
        for (i, chunk) in data.chunks(self.cfg.chunk_bytes as usize).enumerate() {
            batch.put(Cf::Chunks, &chunk_key(&digest, i as u32), chunk);
        }
        batch.put_json(Cf::Images, &meta_key(name, version), &meta)?;
        batch.commit()?;
        let meta = Arc::new(meta);
        // Two uploads of the same id racing: the first one indexed wins, as if sequential.
        let winner = self.index.entry(id).or_insert_with(|| meta.clone()).clone();
        if winner.sha256 != meta.sha256 {
            return Err(FirmwareError::Conflict {
                name: name.into(),
                version: version.into(),
                existing: winner.sha256.clone(),
            });
        }
        self.hot.insert(digest, data);
        Ok((meta, true))
    }

    /// Gives an image its FAS identity (replacing one it had). Refused when a target or firmware
    /// version is missing, or when another image of the same device type, manufacturer, model,
    /// target and version is already tagged `default`.
    pub fn set_identity(
        &self,
        name: &str,
        version: &str,
        identity: ImageIdentity,
    ) -> Result<Arc<ImageMeta>, FirmwareError> {
        let id = format!("{name}@{version}");
        let bad = |m: String| Err(FirmwareError::BadIdentity(m));
        if identity.target.trim().is_empty() || identity.firmware_version.trim().is_empty() {
            return bad("target and firmwareVersion are required".into());
        }
        let texts = [&identity.device_type, &identity.manufacturer, &identity.target, &identity.firmware_version];
        if texts.into_iter().chain(&identity.models).chain(&identity.tags).any(|t| t.len() > 128) {
            return bad("each field at most 128 characters".into());
        }
        if identity.models.len() > 64 || identity.tags.len() > 64 {
            return bad("at most 64 models and 64 tags".into());
        }
        let _one_at_a_time = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        let default = |i: &ImageIdentity| i.tags.iter().any(|t| t.eq_ignore_ascii_case("default"));
        if default(&identity) {
            let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
            let clash = self.index.iter().find(|e| {
                e.key() != &id
                    && e.identity.as_ref().is_some_and(|o| {
                        default(o)
                            && same(&o.device_type, &identity.device_type)
                            && same(&o.manufacturer, &identity.manufacturer)
                            && same(&o.target, &identity.target)
                            && o.firmware_version == identity.firmware_version
                            && (o.models.is_empty() && identity.models.is_empty()
                                || o.models.iter().any(|m| identity.models.iter().any(|n| same(m, n))))
                    })
            });
            if let Some(other) = clash {
                return bad(format!(
                    "image {} is already tagged default for this device type, manufacturer, model, target and version",
                    other.key()
                ));
            }
        }
        let mut meta = (*self.get(name, version).ok_or_else(|| FirmwareError::NotFound(id.clone()))?).clone();
        meta.identity = Some(identity);
        let mut batch = self.store.batch();
        batch.put_json(Cf::Images, &meta_key(name, version), &meta)?;
        batch.commit()?;
        let meta = Arc::new(meta);
        self.index.insert(id, meta.clone());
        Ok(meta)
    }

    pub fn get(&self, name: &str, version: &str) -> Option<Arc<ImageMeta>> {
        self.index.get(&format!("{name}@{version}")).map(|m| m.clone())
    }

    /// The images of one version (of one name, when given), ordered by name.
    pub fn of_version(&self, name: Option<&str>, version: &str) -> Vec<Arc<ImageMeta>> {
        let mut v: Vec<_> = self
            .index
            .iter()
            .filter(|e| e.version == version && name.is_none_or(|n| e.name == n))
            .map(|e| e.value().clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// All images, ordered by name then version.
    pub fn list(&self) -> Vec<Arc<ImageMeta>> {
        let mut v: Vec<_> = self.index.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        v
    }

    /// The whole image. A hot image is a reference-count bump; a cold one is assembled from
    /// its chunks once, checked against its sha256 and kept hot.
    pub fn bytes(&self, meta: &ImageMeta) -> Result<Bytes, FirmwareError> {
        let digest = meta.digest();
        if let Some(b) = self.hot.get(&digest) {
            return Ok(b);
        }
        let mut buf = BytesMut::with_capacity(meta.length as usize);
        let chunks = meta.length.div_ceil(meta.chunk_bytes as u64) as u32;
        for i in 0..chunks {
            let chunk =
                self.store.get(Cf::Chunks, &chunk_key(&digest, i))?.ok_or_else(|| FirmwareError::Damaged(meta.id()))?;
            buf.extend_from_slice(&chunk);
        }
        if buf.len() as u64 != meta.length || <[u8; 32]>::from(Sha256::digest(&buf)) != digest {
            return Err(FirmwareError::Damaged(meta.id()));
        }
        let b = buf.freeze();
        self.hot.insert(digest, b.clone());
        Ok(b)
    }

    pub fn hot_bytes(&self) -> usize {
        self.hot.bytes.load(Ordering::Relaxed)
    }

    /// Appends `len` bytes at `offset` of an image to `out`, straight from its chunks in the
    /// store (pinned, no whole-image copy) — what serving a block costs when the image is not
    /// hot. `len` is cut at the image's end.
    pub fn read_cold(&self, meta: &ImageMeta, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<(), FirmwareError> {
        let digest = meta.digest();
        let chunk = meta.chunk_bytes as u64;
        let end = (offset + len as u64).min(meta.length);
        let mut at = offset;
        while at < end {
            let (i, within) = ((at / chunk) as u32, (at % chunk) as usize);
            let take = ((end - at) as usize).min(chunk as usize - within);
            let copied = self.store.with_pinned(Cf::Chunks, &chunk_key(&digest, i), |c| {
                c.get(within..within + take).map(|b| out.extend_from_slice(b)).is_some()
            })?;
            if copied != Some(true) {
                return Err(FirmwareError::Damaged(meta.id()));
            }
            at += take as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_as_semver_with_short_numeric_cores() {
        let o = |v: &str| version_order(v).map(|x| x.to_string());
        assert_eq!(o("2").as_deref(), Some("2.0.0"));
        assert_eq!(o("v2.1-rc1").as_deref(), Some("2.1.0-rc1"));
        assert_eq!(o("1.2.3+build7").as_deref(), Some("1.2.3+build7"));
        assert_eq!(o("nightly"), None);
        assert_eq!(o("1..2"), None);
        assert_eq!(o("1.2.3.4"), None);
        assert!(version_order("2.0").unwrap() > version_order("1.10").unwrap());
        assert!(version_order("2.0.0-rc1").unwrap() < version_order("2.0").unwrap());
    }

    fn fw(dir: &std::path::Path, cache: u64) -> Firmware {
        let cfg = FirmwareConfig { max_image_bytes: 1 << 20, hot_cache_bytes: cache, chunk_bytes: 1024 };
        Firmware::open(Store::open(dir, false).unwrap(), cfg).unwrap()
    }

    fn data(n: usize, seed: u8) -> Bytes {
        Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
    }

    #[test]
    fn ingest_hashes_chunks_and_reloads_cold() {
        let dir = tempfile::tempdir().unwrap();
        let img = data(5000, 1);
        let (meta, created) = fw(dir.path(), 1 << 20).add("app", "1.0.0", vec![], img.clone(), 7).unwrap();
        assert!(created);
        assert_eq!(meta.sha256, hex::encode(Sha256::digest(&img)));
        assert_eq!(meta.length, 5000);
        // A fresh process has the image in its index but not in memory: it reloads the chunks.
        let fw = fw(dir.path(), 1 << 20);
        assert_eq!(fw.hot_bytes(), 0);
        let m = fw.get("app", "1.0.0").unwrap();
        assert_eq!(fw.bytes(&m).unwrap(), img);
        assert_eq!(fw.hot_bytes(), 5000);
    }

    #[test]
    fn same_bytes_again_is_fine_other_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fw = fw(dir.path(), 1 << 20);
        fw.add("app", "1.0.0", vec![], data(100, 1), 0).unwrap();
        assert!(!fw.add("app", "1.0.0", vec![], data(100, 1), 0).unwrap().1);
        assert!(matches!(fw.add("app", "1.0.0", vec![], data(100, 2), 0), Err(FirmwareError::Conflict { .. })));
        assert!(matches!(fw.add("app", "1.0.1", vec![], Bytes::new(), 0), Err(FirmwareError::Empty)));
        assert!(matches!(fw.add("a@b", "1", vec![], data(1, 1), 0), Err(FirmwareError::Invalid { field: "name", .. })));
        assert!(matches!(fw.add("app", "2", vec![], data(2 << 20, 1), 0), Err(FirmwareError::TooLarge { .. })));
        assert_eq!(fw.list().len(), 1);
    }

    #[test]
    fn hot_cache_stays_within_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let fw = fw(dir.path(), 10_000);
        for v in 0..5u8 {
            fw.add("app", &v.to_string(), vec![], data(4000, v), 0).unwrap();
            assert!(fw.hot_bytes() <= 10_000);
        }
        // Every image still serves, evicting others as needed.
        for v in 0..5u8 {
            let m = fw.get("app", &v.to_string()).unwrap();
            assert_eq!(fw.bytes(&m).unwrap(), data(4000, v));
            assert!(fw.hot_bytes() <= 10_000);
        }
    }

    #[test]
    fn cold_reads_cross_chunk_boundaries_and_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let fw = fw(dir.path(), 0);
        let img = data(5000, 3);
        let (meta, _) = fw.add("app", "1.0.0", vec![], img.clone(), 0).unwrap();
        for (offset, len) in [(0, 512), (1000, 100), (4900, 512), (0, 5000), (2047, 2)] {
            let mut out = Vec::new();
            fw.read_cold(&meta, offset as u64, len, &mut out).unwrap();
            assert_eq!(out, img[offset..(offset + len).min(5000)], "{offset}+{len}");
        }
    }

    #[test]
    fn hardware_compatibility() {
        let m = ImageMeta {
            name: "a".into(),
            version: "1".into(),
            length: 1,
            sha256: String::new(),
            hardware: vec!["nrf52".into()],
            chunk_bytes: 1024,
            created_at: 0,
            identity: None,
        };
        assert!(m.fits_hardware(Some("nrf52")));
        assert!(!m.fits_hardware(Some("esp32")));
        assert!(!m.fits_hardware(None));
    }
}
