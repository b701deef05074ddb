//! TUF metadata as the client reads it: parsed from the exact bytes served, checked for the
//! shape the specification requires, and verified against the canonical JSON of its `signed`
//! part. Keys are read with `tough`'s key schema (which decodes hex and PEM public keys), and
//! signatures checked with aws-lc-rs, as tough does; what `tough` could not do — keep unknown
//! hash algorithms, delegate lazily, store the bytes it verified — is the workflow's, in
//! `updater`.

use std::collections::{BTreeMap, HashMap, HashSet};

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::Value;
use sha2::Digest;
use tough::schema::key::Key;

/// The specification version this client implements; metadata of another major is refused.
const SPEC_MAJOR: &str = "1";
pub const TOP_LEVEL: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];

/// Why one metadata file, or one file it describes, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("{0}: not TUF metadata: {1}")]
    Shape(String, String),
    #[error("{role}: {signed} of the {threshold} signatures it needs")]
    Unsigned { role: String, signed: usize, threshold: u64 },
    #[error("{role}: version {got}, expected {want}")]
    Version { role: String, got: u64, want: u64 },
    #[error("{role}: version {got} is older than the trusted {trusted}")]
    Rollback { role: String, got: u64, trusted: u64 },
    #[error("{0}: expired")]
    Expired(String),
    #[error("{0}: length or hashes do not match")]
    Mismatch(String),
    #[error("{0}")]
    Repository(String),
}

fn shape(role: &str, what: impl Into<String>) -> MetaError {
    MetaError::Shape(role.into(), what.into())
}

/// A role's keys and how many of them must sign.
#[derive(Debug, Clone)]
pub struct RoleKeys {
    pub keyids: Vec<String>,
    pub threshold: u64,
}

/// A file's expected version, length and hashes, as snapshot and timestamp list them.
#[derive(Debug, Clone, Default)]
pub struct MetaFile {
    pub version: u64,
    pub length: Option<u64>,
    pub hashes: BTreeMap<String, String>,
}

/// A target as the metadata describes it.
#[derive(Debug, Clone)]
pub struct TargetFile {
    pub length: u64,
    pub hashes: BTreeMap<String, String>,
    pub custom: Value,
}

/// One delegation of a targets role.
#[derive(Debug, Clone)]
pub struct Delegated {
    pub name: String,
    pub keys: RoleKeys,
    pub terminating: bool,
    pub paths: Option<Vec<String>>,
    pub path_hash_prefixes: Option<Vec<String>>,
}

/// Hashed bins (TAP 15): `2^bit_length` roles named `{name_prefix}-{bin}`.
#[derive(Debug, Clone)]
pub struct Succinct {
    pub keys: RoleKeys,
    pub bit_length: u32,
    pub name_prefix: String,
}

#[derive(Debug, Clone, Default)]
pub struct Delegations {
    pub keys: HashMap<String, Option<Key>>,
    pub roles: Vec<Delegated>,
    pub succinct: Option<Succinct>,
}

/// What each type of role says beyond the common fields.
#[derive(Debug, Clone)]
pub enum Body {
    Root { consistent_snapshot: bool, keys: HashMap<String, Option<Key>>, roles: HashMap<String, RoleKeys> },
    Timestamp { snapshot: MetaFile },
    Snapshot { meta: HashMap<String, MetaFile> },
    Targets { targets: HashMap<String, TargetFile>, delegations: Option<Delegations> },
}

/// One parsed metadata file.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The bytes as served: what is stored once verified.
    pub bytes: Vec<u8>,
    pub version: u64,
    /// Unix seconds.
    pub expires: i64,
    pub body: Body,
    /// The canonical JSON of `signed`, the message signatures are over.
    canonical: Vec<u8>,
    signatures: HashMap<String, Vec<u8>>,
}

fn obj<'a>(v: &'a Value, role: &str, what: &str) -> Result<&'a serde_json::Map<String, Value>, MetaError> {
    v.as_object().ok_or_else(|| shape(role, format!("{what} is not an object")))
}

fn field<'a>(m: &'a serde_json::Map<String, Value>, key: &str, role: &str) -> Result<&'a Value, MetaError> {
    m.get(key).ok_or_else(|| shape(role, format!("no {key}")))
}

fn uint(v: &Value, role: &str, what: &str) -> Result<u64, MetaError> {
    v.as_u64().ok_or_else(|| shape(role, format!("{what} is not a non-negative integer")))
}

fn string<'a>(v: &'a Value, role: &str, what: &str) -> Result<&'a str, MetaError> {
    v.as_str().ok_or_else(|| shape(role, format!("{what} is not a string")))
}

fn strings(v: &Value, role: &str, what: &str) -> Result<Vec<String>, MetaError> {
    let a = v.as_array().ok_or_else(|| shape(role, format!("{what} is not a list")))?;
    a.iter().map(|s| string(s, role, what).map(str::to_owned)).collect()
}

fn role_keys(v: &Value, role: &str) -> Result<RoleKeys, MetaError> {
    let m = obj(v, role, "a role")?;
    let keyids = strings(field(m, "keyids", role)?, role, "keyids")?;
    if keyids.iter().collect::<HashSet<_>>().len() != keyids.len() {
        return Err(shape(role, "a role lists a keyid twice"));
    }
    let threshold = uint(field(m, "threshold", role)?, role, "threshold")?;
    if threshold < 1 {
        return Err(shape(role, "threshold below 1"));
    }
    Ok(RoleKeys { keyids, threshold })
}

/// Keys by id; a key of a type or scheme this client cannot verify is kept as `None` (it never
/// counts toward a threshold), as the reference client does.
fn keys(v: &Value, role: &str) -> Result<HashMap<String, Option<Key>>, MetaError> {
    let m = obj(v, role, "keys")?;
    Ok(m.iter().map(|(id, k)| (id.clone(), serde_json::from_value::<Key>(k.clone()).ok())).collect())
}

fn hashes(v: &Value, role: &str) -> Result<BTreeMap<String, String>, MetaError> {
    let m = obj(v, role, "hashes")?;
    if m.is_empty() {
        return Err(shape(role, "empty hashes"));
    }
    m.iter().map(|(k, h)| Ok((k.clone(), string(h, role, "a hash")?.to_owned()))).collect()
}

fn meta_file(v: &Value, role: &str) -> Result<MetaFile, MetaError> {
    let m = obj(v, role, "a meta entry")?;
    let version = uint(field(m, "version", role)?, role, "version")?;
    if version < 1 {
        return Err(shape(role, "a meta version below 1"));
    }
    let length = m.get("length").map(|l| uint(l, role, "length")).transpose()?;
    let hashes = m.get("hashes").map(|h| hashes(h, role)).transpose()?.unwrap_or_default();
    Ok(MetaFile { version, length, hashes })
}

fn delegations(v: &Value, role: &str) -> Result<Delegations, MetaError> {
    let m = obj(v, role, "delegations")?;
    let keys = keys(field(m, "keys", role)?, role)?;
    let mut d = Delegations { keys, ..Default::default() };
    match (m.get("roles"), m.get("succinct_roles")) {
        (Some(_), Some(_)) | (None, None) => return Err(shape(role, "delegations need roles or succinct_roles")),
        (Some(roles), None) => {
            let list = roles.as_array().ok_or_else(|| shape(role, "roles is not a list"))?;
            let mut names = HashSet::new();
            for r in list {
                let rm = obj(r, role, "a delegated role")?;
                let name = string(field(rm, "name", role)?, role, "name")?.to_owned();
                if TOP_LEVEL.contains(&name.as_str()) || !names.insert(name.clone()) {
                    return Err(shape(role, format!("delegated role name {name:?} is taken")));
                }
                let terminating = field(rm, "terminating", role)?
                    .as_bool()
                    .ok_or_else(|| shape(role, "terminating is not a boolean"))?;
                let paths = rm.get("paths").map(|p| strings(p, role, "paths")).transpose()?;
                let path_hash_prefixes =
                    rm.get("path_hash_prefixes").map(|p| strings(p, role, "path_hash_prefixes")).transpose()?;
                if paths.is_some() == path_hash_prefixes.is_some() {
                    return Err(shape(role, format!("{name}: exactly one of paths and path_hash_prefixes")));
                }
                d.roles.push(Delegated { name, keys: role_keys(r, role)?, terminating, paths, path_hash_prefixes });
            }
        }
        (None, Some(s)) => {
            let sm = obj(s, role, "succinct_roles")?;
            let bit_length = uint(field(sm, "bit_length", role)?, role, "bit_length")?;
            if !(1..=32).contains(&bit_length) {
                return Err(shape(role, "bit_length outside 1..=32"));
            }
            let name_prefix = string(field(sm, "name_prefix", role)?, role, "name_prefix")?.to_owned();
            d.succinct = Some(Succinct { keys: role_keys(s, role)?, bit_length: bit_length as u32, name_prefix });
        }
    }
    Ok(d)
}

fn expires(v: &Value, role: &str) -> Result<i64, MetaError> {
    let text = string(v, role, "expires")?;
    // The specification's form only: 2030-01-01T00:00:00Z.
    if text.len() != 20 || !text.ends_with('Z') {
        return Err(shape(role, format!("expires {text:?} is not YYYY-MM-DDTHH:MM:SSZ")));
    }
    let t: jiff::Timestamp = text.parse().map_err(|_| shape(role, format!("expires {text:?} is not a time")))?;
    Ok(t.as_second())
}

impl Meta {
    /// Parses `bytes` as metadata of type `want` (`root`, `timestamp`, `snapshot` or
    /// `targets`). `role` names it in errors.
    pub fn parse(bytes: &[u8], want: &str, role: &str) -> Result<Meta, MetaError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| shape(role, format!("not JSON: {e}")))?;
        let top = obj(&v, role, "the document")?;
        let signed = field(top, "signed", role)?;
        let s = obj(signed, role, "signed")?;
        let typ = string(field(s, "_type", role)?, role, "_type")?;
        if typ != want {
            return Err(shape(role, format!("type {typ}, expected {want}")));
        }
        let spec = string(field(s, "spec_version", role)?, role, "spec_version")?;
        let parts: Vec<&str> = spec.split('.').collect();
        if !(2..=3).contains(&parts.len())
            || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
            || parts[0] != SPEC_MAJOR
        {
            return Err(shape(role, format!("unsupported spec_version {spec:?}")));
        }
        let version = uint(field(s, "version", role)?, role, "version")?;
        if version < 1 {
            return Err(shape(role, "version below 1"));
        }
        let expires = expires(field(s, "expires", role)?, role)?;
        let body = match typ {
            "root" => {
                // Optional, as the reference client reads it: absent is false.
                let consistent_snapshot = match s.get("consistent_snapshot") {
                    None => false,
                    Some(v) => v.as_bool().ok_or_else(|| shape(role, "consistent_snapshot is not a boolean"))?,
                };
                let roles_v = obj(field(s, "roles", role)?, role, "roles")?;
                let mut names: Vec<&str> = roles_v.keys().map(String::as_str).collect();
                names.sort_unstable();
                let mut top = TOP_LEVEL;
                top.sort_unstable();
                if names != top {
                    return Err(shape(role, "roles must be exactly root, timestamp, snapshot and targets"));
                }
                let roles =
                    roles_v.iter().map(|(n, r)| Ok((n.clone(), role_keys(r, role)?))).collect::<Result<_, _>>()?;
                Body::Root { consistent_snapshot, keys: keys(field(s, "keys", role)?, role)?, roles }
            }
            "timestamp" => {
                let meta = obj(field(s, "meta", role)?, role, "meta")?;
                let snap = meta.get("snapshot.json").ok_or_else(|| shape(role, "no snapshot.json in meta"))?;
                Body::Timestamp { snapshot: meta_file(snap, role)? }
            }
            "snapshot" => {
                let meta = obj(field(s, "meta", role)?, role, "meta")?;
                let meta = meta.iter().map(|(n, m)| Ok((n.clone(), meta_file(m, role)?))).collect::<Result<_, _>>()?;
                Body::Snapshot { meta }
            }
            "targets" => {
                let t = obj(field(s, "targets", role)?, role, "targets")?;
                let mut targets = HashMap::with_capacity(t.len());
                for (name, f) in t {
                    let fm = obj(f, role, "a target")?;
                    let length = uint(field(fm, "length", role)?, role, "length")?;
                    let hashes = hashes(field(fm, "hashes", role)?, role)?;
                    let custom = fm.get("custom").cloned().unwrap_or(Value::Null);
                    targets.insert(name.clone(), TargetFile { length, hashes, custom });
                }
                let delegations = s.get("delegations").map(|d| delegations(d, role)).transpose()?;
                Body::Targets { targets, delegations }
            }
            _ => return Err(shape(role, format!("unknown type {typ}"))),
        };
        let mut canonical = Vec::new();
        let mut ser = serde_json::Serializer::with_formatter(&mut canonical, olpc_cjson::CanonicalFormatter::new());
        serde::Serialize::serialize(signed, &mut ser).map_err(|e| shape(role, format!("canonical JSON: {e}")))?;
        let sigs = field(top, "signatures", role)?.as_array().ok_or_else(|| shape(role, "signatures is not a list"))?;
        let mut signatures = HashMap::with_capacity(sigs.len());
        for sig in sigs {
            let sm = obj(sig, role, "a signature")?;
            let keyid = string(field(sm, "keyid", role)?, role, "keyid")?;
            let bytes = hex::decode(string(field(sm, "sig", role)?, role, "sig")?)
                .map_err(|_| shape(role, "a signature is not hex"))?;
            if signatures.insert(keyid.to_owned(), bytes).is_some() {
                return Err(shape(role, format!("duplicate key id {keyid} among the signatures")));
            }
        }
        Ok(Meta { bytes: bytes.to_vec(), version, expires, body, canonical, signatures })
    }

    pub fn expired(&self, now: i64) -> bool {
        now >= self.expires
    }

    /// Checks that `keys` (a threshold of `role`'s key ids) signed this metadata. Each key id
    /// counts once.
    pub fn verify(
        &self,
        role: &str,
        delegation: &RoleKeys,
        keys: &HashMap<String, Option<Key>>,
    ) -> Result<(), MetaError> {
        let signed = delegation
            .keyids
            .iter()
            .filter(|id| {
                let (Some(Some(key)), Some(sig)) = (keys.get(*id), self.signatures.get(*id)) else { return false };
                verify_signature(key, &self.canonical, sig)
            })
            .count();
        if (signed as u64) < delegation.threshold {
            return Err(MetaError::Unsigned { role: role.into(), signed, threshold: delegation.threshold });
        }
        Ok(())
    }
}

fn verify_signature(key: &Key, msg: &[u8], sig: &[u8]) -> bool {
    use tough::schema::key::{EcdsaScheme, Ed25519Scheme, RsaScheme};
    let (alg, public): (&'static dyn VerificationAlgorithm, &[u8]) = match key {
        Key::Ecdsa { scheme: EcdsaScheme::EcdsaSha2Nistp256, keyval, .. }
        | Key::EcdsaOld { scheme: EcdsaScheme::EcdsaSha2Nistp256, keyval, .. } => {
            (&signature::ECDSA_P256_SHA256_ASN1, &keyval.public)
        }
        Key::Ed25519 { scheme: Ed25519Scheme::Ed25519, keyval, .. } => (&signature::ED25519, &keyval.public),
        Key::Rsa { scheme: RsaScheme::RsassaPssSha256, keyval, .. } => {
            (&signature::RSA_PSS_2048_8192_SHA256, &keyval.public)
        }
    };
    UnparsedPublicKey::new(alg, public).verify(msg, sig).is_ok()
}

/// Checks `data` against an expected length and hashes (every algorithm listed must be
/// known and match).
pub fn check_file(
    what: &str,
    data: &[u8],
    length: Option<u64>,
    hashes: &BTreeMap<String, String>,
) -> Result<(), MetaError> {
    if length.is_some_and(|l| l != data.len() as u64) {
        return Err(MetaError::Mismatch(what.into()));
    }
    for (alg, want) in hashes {
        let got = match alg.as_str() {
            "sha224" => hex::encode(sha2::Sha224::digest(data)),
            "sha256" => hex::encode(sha2::Sha256::digest(data)),
            "sha384" => hex::encode(sha2::Sha384::digest(data)),
            "sha512" => hex::encode(sha2::Sha512::digest(data)),
            _ => return Err(MetaError::Mismatch(format!("{what} (hash algorithm {alg} unsupported)"))),
        };
        if !got.eq_ignore_ascii_case(want) {
            return Err(MetaError::Mismatch(what.into()));
        }
    }
    Ok(())
}

impl Delegated {
    /// Whether this role is trusted for `path` (fnmatch per `/`-separated part, or a prefix of
    /// the path's sha256).
    pub fn covers(&self, path: &str) -> bool {
        if let Some(prefixes) = &self.path_hash_prefixes {
            let h = hex::encode(sha2::Sha256::digest(path.as_bytes()));
            return prefixes.iter().any(|p| h.starts_with(p.as_str()));
        }
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.paths.iter().flatten().any(|pattern| {
            let (t, p): (Vec<&str>, Vec<&str>) = (path.split('/').collect(), pattern.split('/').collect());
            t.len() == p.len()
                && t.iter().zip(&p).all(|(t, p)| glob::Pattern::new(p).is_ok_and(|g| g.matches_with(t, opts)))
        })
    }
}

impl Succinct {
    /// The bin role responsible for `path`.
    pub fn role_for(&self, path: &str) -> String {
        let h = sha2::Sha256::digest(path.as_bytes());
        let first = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let bin = if self.bit_length == 32 { first } else { first >> (32 - self.bit_length) };
        let width = self.suffix_width();
        format!("{}-{bin:0width$x}", self.name_prefix)
    }

    pub fn is_bin(&self, name: &str) -> bool {
        let Some(suffix) = name.strip_prefix(&self.name_prefix).and_then(|s| s.strip_prefix('-')) else { return false };
        suffix.len() == self.suffix_width() && u64::from_str_radix(suffix, 16).is_ok_and(|b| b < self.bins())
    }

    fn bins(&self) -> u64 {
        1u64 << self.bit_length
    }

    /// Hex digits of a bin's number: those of the last bin's.
    fn suffix_width(&self) -> usize {
        format!("{:x}", self.bins() - 1).len()
    }
}
