//! The TUF client workflow (specification §5.3–5.7), as the reference client (python-tuf's
//! ngclient) runs it: the root chain one version at a time, timestamp, snapshot and targets
//! with their rollback, version and expiry rules, and delegated targets loaded only when a
//! search reaches them — a pre-order depth-first walk that honours terminating delegations and
//! path patterns. Verified metadata is stored in the metadata directory byte for byte as
//! served, under non-versioned names (a delegated role's name percent-encoded), and is what
//! the next run starts from.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tough::{Transport, TransportErrorKind};
use url::Url;

use super::meta::{check_file, Body, Meta, MetaError, RoleKeys, TargetFile};
use super::{Fetch, TufError};

/// How many newer roots one refresh follows, and how many roles a target search visits.
const MAX_ROOT_ROTATIONS: u64 = 32;
const MAX_DELEGATIONS: usize = 32;
/// Largest metadata accepted when the referring metadata states no length.
const ROOT_MAX: u64 = 512_000;
const TIMESTAMP_MAX: u64 = 16_384;
const SNAPSHOT_MAX: u64 = 2_000_000;
const TARGETS_MAX: u64 = 5_000_000;

/// Everything but the unreserved characters, as Python's `quote(name, safe="")`.
const QUOTE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub fn quote(name: &str) -> String {
    utf8_percent_encode(name, QUOTE).to_string()
}

enum Fetched {
    Bytes(Vec<u8>),
    NotFound,
}

/// One repository, loaded: the trusted metadata, and the delegated roles loaded so far.
pub struct Repository {
    name: String,
    dir: PathBuf,
    metadata_url: Url,
    targets_url: Url,
    fetch: Fetch,
    now: i64,
    root: Meta,
    timestamp: Option<Meta>,
    snapshot: Option<Meta>,
    /// `targets` and the delegated roles, by name.
    targets: HashMap<String, Meta>,
}

fn root_parts(m: &Meta) -> (&HashMap<String, Option<tough::schema::key::Key>>, &HashMap<String, RoleKeys>, bool) {
    match &m.body {
        Body::Root { keys, roles, consistent_snapshot } => (keys, roles, *consistent_snapshot),
        _ => unreachable!("parsed as root"),
    }
}

impl Repository {
    fn err(&self, e: MetaError) -> TufError {
        TufError::Verify { repo: self.name.clone(), message: e.to_string() }
    }

    fn top_keys(&self, role: &str) -> (&HashMap<String, Option<tough::schema::key::Key>>, &RoleKeys) {
        let (keys, roles, _) = root_parts(&self.root);
        (keys, &roles[role])
    }

    fn consistent(&self) -> bool {
        root_parts(&self.root).2
    }

    /// Starts from the trusted root in `dir` (`root.json`).
    pub fn open(
        name: &str,
        dir: &Path,
        metadata_url: Url,
        targets_url: Url,
        fetch: Fetch,
        now: i64,
    ) -> Result<Repository, TufError> {
        let path = dir.join("root.json");
        let bytes = std::fs::read(&path).map_err(|source| TufError::Io {
            repo: name.into(),
            what: format!("reading the trusted root {}", path.display()),
            source,
        })?;
        let verify = |e: MetaError| TufError::Verify { repo: name.into(), message: format!("the trusted root: {e}") };
        let root = Meta::parse(&bytes, "root", "root").map_err(verify)?;
        let (keys, roles, _) = root_parts(&root);
        root.verify("root", &roles["root"], keys).map_err(verify)?;
        Ok(Repository {
            name: name.into(),
            dir: dir.into(),
            metadata_url,
            targets_url,
            fetch,
            now,
            root,
            timestamp: None,
            snapshot: None,
            targets: HashMap::new(),
        })
    }

    async fn download(&self, url: Url, max: u64) -> Result<Fetched, TufError> {
        let fail = |message: String| TufError::Verify { repo: self.name.clone(), message };
        let mut stream = match self.fetch.fetch(url.clone()).await {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), TransportErrorKind::FileNotFound) => return Ok(Fetched::NotFound),
            Err(e) => return Err(fail(super::error_chain(&e))),
        };
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(super::error_chain(&e)))?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > max {
                return Err(fail(format!("{url}: longer than the {max} bytes allowed")));
            }
        }
        Ok(Fetched::Bytes(out))
    }

    async fn metadata(&self, role: &str, version: Option<u64>, max: u64) -> Result<Fetched, TufError> {
        let file = match version {
            Some(v) => format!("{v}.{}.json", quote(role)),
            None => format!("{}.json", quote(role)),
        };
        let url = self.metadata_url.join(&file).map_err(|e| TufError::Url {
            repo: self.name.clone(),
            url: file.clone(),
            message: e.to_string(),
        })?;
        self.download(url, max).await
    }

    async fn required(&self, role: &str, version: Option<u64>, max: u64) -> Result<Vec<u8>, TufError> {
        match self.metadata(role, version, max).await? {
            Fetched::Bytes(b) => Ok(b),
            Fetched::NotFound => Err(self.err(MetaError::Repository(format!("{role}: not found in the repository")))),
        }
    }

    fn local(&self, role: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(format!("{}.json", quote(role)))).ok()
    }

    fn persist(&self, role: &str, bytes: &[u8]) -> Result<(), TufError> {
        // Two refreshes at once (the periodic one and an operator's) each write their own
        // temporary file; the last rename wins, and both wrote verified metadata.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("{}.json", quote(role)));
        let tmp = self.dir.join(format!(".{}.json.{}-{n}.part", quote(role), std::process::id()));
        let io = |source| TufError::Io { repo: self.name.clone(), what: format!("writing {}", path.display()), source };
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// Refreshes the top-level metadata: root chain, timestamp, snapshot, targets.
    pub async fn refresh(&mut self) -> Result<(), TufError> {
        self.load_root().await?;
        self.load_timestamp().await?;
        self.load_snapshot().await?;
        self.load_targets("targets", "root").await?;
        Ok(())
    }

    async fn load_root(&mut self) -> Result<(), TufError> {
        let first = self.root.version + 1;
        for v in first..first + MAX_ROOT_ROTATIONS {
            let Fetched::Bytes(bytes) = self.metadata("root", Some(v), ROOT_MAX).await? else { break };
            let new = Meta::parse(&bytes, "root", "root").map_err(|e| self.err(e))?;
            let (keys, roles, _) = root_parts(&self.root);
            new.verify("root", &roles["root"], keys).map_err(|e| self.err(e))?;
            if new.version != v {
                return Err(self.err(MetaError::Version { role: "root".into(), got: new.version, want: v }));
            }
            let (keys, roles, _) = root_parts(&new);
            new.verify("root", &roles["root"], keys).map_err(|e| self.err(e))?;
            self.root = new;
            self.persist("root", &bytes)?;
        }
        Ok(())
    }

    /// Checks a timestamp against the root and the trusted timestamp, and trusts it. `Ok(false)`:
    /// the same version as the trusted one, which stays.
    fn update_timestamp(&mut self, bytes: &[u8]) -> Result<bool, MetaError> {
        if self.root.expired(self.now) {
            return Err(MetaError::Expired("root".into()));
        }
        let new = Meta::parse(bytes, "timestamp", "timestamp")?;
        let (keys, role) = self.top_keys("timestamp");
        new.verify("timestamp", role, keys)?;
        if let Some(old) = &self.timestamp {
            if new.version < old.version {
                return Err(MetaError::Rollback { role: "timestamp".into(), got: new.version, trusted: old.version });
            }
            if new.version == old.version {
                return Ok(false);
            }
            let (n, o) = (snapshot_meta(&new).version, snapshot_meta(old).version);
            if n < o {
                return Err(MetaError::Rollback { role: "snapshot".into(), got: n, trusted: o });
            }
        }
        let expired = new.expired(self.now);
        self.timestamp = Some(new);
        if expired {
            return Err(MetaError::Expired("timestamp".into()));
        }
        Ok(true)
    }

    async fn load_timestamp(&mut self) -> Result<(), TufError> {
        if let Some(local) = self.local("timestamp") {
            // A stored timestamp that no longer verifies is only not used.
            let _ = self.update_timestamp(&local);
        }
        let bytes = self.required("timestamp", None, TIMESTAMP_MAX).await?;
        if self.update_timestamp(&bytes).map_err(|e| self.err(e))? {
            self.persist("timestamp", &bytes)?;
        }
        Ok(())
    }

    fn update_snapshot(&mut self, bytes: &[u8], stored: bool) -> Result<(), MetaError> {
        let ts = self.timestamp.as_ref().ok_or_else(|| MetaError::Repository("no timestamp".into()))?;
        if ts.expired(self.now) {
            return Err(MetaError::Expired("timestamp".into()));
        }
        let want = snapshot_meta(ts).clone();
        if !stored {
            check_file("snapshot", bytes, want.length, &want.hashes)?;
        }
        let new = Meta::parse(bytes, "snapshot", "snapshot")?;
        let (keys, role) = self.top_keys("snapshot");
        new.verify("snapshot", role, keys)?;
        if let Some(old) = &self.snapshot {
            let (Body::Snapshot { meta: o }, Body::Snapshot { meta: n }) = (&old.body, &new.body) else {
                unreachable!("parsed as snapshot")
            };
            for (file, info) in o {
                let Some(ni) = n.get(file) else {
                    return Err(MetaError::Repository(format!("the new snapshot lacks {file}")));
                };
                if ni.version < info.version {
                    return Err(MetaError::Rollback { role: file.clone(), got: ni.version, trusted: info.version });
                }
            }
        }
        let (expired, version) = (new.expired(self.now), new.version);
        self.snapshot = Some(new);
        if expired {
            return Err(MetaError::Expired("snapshot".into()));
        }
        if version != want.version {
            return Err(MetaError::Version { role: "snapshot".into(), got: version, want: want.version });
        }
        Ok(())
    }

    async fn load_snapshot(&mut self) -> Result<(), TufError> {
        if let Some(local) = self.local("snapshot") {
            if self.update_snapshot(&local, true).is_ok() {
                return Ok(());
            }
        }
        let want = self.timestamp.as_ref().map(|t| snapshot_meta(t).clone()).unwrap_or_default();
        let version = self.consistent().then_some(want.version);
        let bytes = self.required("snapshot", version, want.length.unwrap_or(SNAPSHOT_MAX)).await?;
        self.update_snapshot(&bytes, false).map_err(|e| self.err(e))?;
        self.persist("snapshot", &bytes)
    }

    /// The keys and threshold `delegator` gives `role`.
    fn delegation(
        &self,
        role: &str,
        delegator: &str,
    ) -> Result<(&HashMap<String, Option<tough::schema::key::Key>>, RoleKeys), MetaError> {
        if delegator == "root" {
            let (keys, role) = self.top_keys(role);
            return Ok((keys, role.clone()));
        }
        let parent =
            self.targets.get(delegator).ok_or_else(|| MetaError::Repository(format!("{delegator} is not loaded")))?;
        let Body::Targets { delegations: Some(d), .. } = &parent.body else {
            return Err(MetaError::Repository(format!("{delegator} delegates nothing")));
        };
        if let Some(r) = d.roles.iter().find(|r| r.name == role) {
            return Ok((&d.keys, r.keys.clone()));
        }
        match &d.succinct {
            Some(s) if s.is_bin(role) => Ok((&d.keys, s.keys.clone())),
            _ => Err(MetaError::Repository(format!("{delegator} does not delegate to {role}"))),
        }
    }

    fn update_targets(&mut self, bytes: &[u8], role: &str, delegator: &str) -> Result<(), MetaError> {
        if self.snapshot.as_ref().is_some_and(|s| s.expired(self.now)) {
            return Err(MetaError::Expired("snapshot".into()));
        }
        let info = self.listed(role)?;
        check_file(role, bytes, info.length, &info.hashes)?;
        let new = Meta::parse(bytes, "targets", role)?;
        let (keys, delegation) = self.delegation(role, delegator)?;
        new.verify(role, &delegation, keys)?;
        if new.version != info.version {
            return Err(MetaError::Version { role: role.into(), got: new.version, want: info.version });
        }
        if new.expired(self.now) {
            return Err(MetaError::Expired(role.into()));
        }
        self.targets.insert(role.into(), new);
        Ok(())
    }

    /// What the trusted snapshot says of `role`'s metadata.
    fn listed(&self, role: &str) -> Result<super::meta::MetaFile, MetaError> {
        let snap = self.snapshot.as_ref().ok_or_else(|| MetaError::Repository("no snapshot".into()))?;
        let Body::Snapshot { meta } = &snap.body else { unreachable!("parsed as snapshot") };
        meta.get(&format!("{role}.json"))
            .cloned()
            .ok_or_else(|| MetaError::Repository(format!("{role} is delegated but not in the snapshot")))
    }

    async fn load_targets(&mut self, role: &str, delegator: &str) -> Result<(), TufError> {
        if self.targets.contains_key(role) {
            return Ok(());
        }
        if let Some(local) = self.local(role) {
            if self.update_targets(&local, role, delegator).is_ok() {
                return Ok(());
            }
        }
        let info = self.listed(role).map_err(|e| self.err(e))?;
        let version = self.consistent().then_some(info.version);
        let bytes = self.required(role, version, info.length.unwrap_or(TARGETS_MAX)).await?;
        self.update_targets(&bytes, role, delegator).map_err(|e| self.err(e))?;
        self.persist(role, &bytes)
    }

    /// The specification's search for `path`: a pre-order depth-first walk from `targets`,
    /// loading each delegated role as it is reached; `None` when no role reached lists it.
    pub async fn find(&mut self, path: &str) -> Result<Option<(String, TargetFile)>, TufError> {
        let mut to_visit: Vec<(String, String)> = vec![("targets".into(), "root".into())];
        let mut visited = HashSet::new();
        while visited.len() <= MAX_DELEGATIONS {
            let Some((role, delegator)) = to_visit.pop() else { break };
            if visited.contains(&role) {
                continue;
            }
            self.load_targets(&role, &delegator).await?;
            let Body::Targets { targets, delegations } = &self.targets[&role].body else { unreachable!("targets") };
            if let Some(t) = targets.get(path) {
                return Ok(Some((role, t.clone())));
            }
            visited.insert(role.clone());
            let mut children = Vec::new();
            if let Some(d) = delegations {
                for r in &d.roles {
                    if r.covers(path) {
                        children.push((r.name.clone(), role.clone()));
                        if r.terminating {
                            to_visit.clear();
                            break;
                        }
                    }
                }
                if let Some(s) = &d.succinct {
                    children.push((s.role_for(path), role.clone()));
                }
            }
            to_visit.extend(children.into_iter().rev());
        }
        Ok(None)
    }

    /// Every target the search admits: the paths listed by any role reachable from `targets`
    /// (at most [`MAX_DELEGATIONS`] roles), each kept only where the search for it ends.
    pub async fn all_targets(&mut self) -> Result<Vec<(String, TargetFile)>, TufError> {
        let mut paths = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = vec![("targets".to_string(), "root".to_string())];
        while let Some((role, delegator)) = queue.pop() {
            if !seen.insert(role.clone()) || seen.len() > MAX_DELEGATIONS + 1 {
                continue;
            }
            // A role that does not verify admits nothing.
            let _ = self.load_targets(&role, &delegator).await;
            let Some(Body::Targets { targets, delegations }) = self.targets.get(&role).map(|m| &m.body) else {
                continue;
            };
            paths.extend(targets.keys().cloned());
            if let Some(d) = delegations {
                queue.extend(d.roles.iter().rev().map(|r| (r.name.clone(), role.clone())));
            }
        }
        paths.sort();
        paths.dedup();
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            if let Ok(Some((_, t))) = self.find(&p).await {
                out.push((p, t));
            }
        }
        Ok(out)
    }

    /// Downloads `path` (found by [`Repository::find`]) and checks its length and hashes.
    pub async fn download_target(&self, path: &str, t: &TargetFile) -> Result<Vec<u8>, TufError> {
        let fail = |message: String| TufError::Target { repo: self.name.clone(), target: path.into(), message };
        let file = match (self.consistent(), t.hashes.values().next()) {
            (true, Some(h)) => match path.rsplit_once('/') {
                Some((dir, base)) => format!("{dir}/{h}.{base}"),
                None => format!("{h}.{path}"),
            },
            _ => path.to_owned(),
        };
        let url = self.targets_url.join(&file).map_err(|e| fail(e.to_string()))?;
        let bytes = match self.download(url, t.length).await? {
            Fetched::Bytes(b) => b,
            Fetched::NotFound => return Err(TufError::NoTarget { repo: self.name.clone(), target: path.into() }),
        };
        check_file(path, &bytes, Some(t.length), &t.hashes).map_err(|e| fail(e.to_string()))?;
        Ok(bytes)
    }

    pub fn root(&self) -> &Meta {
        &self.root
    }

    pub fn timestamp(&self) -> Option<&Meta> {
        self.timestamp.as_ref()
    }

    pub fn snapshot(&self) -> Option<&Meta> {
        self.snapshot.as_ref()
    }

    pub fn top_targets(&self) -> Option<&Meta> {
        self.targets.get("targets")
    }
}

fn snapshot_meta(ts: &Meta) -> &super::meta::MetaFile {
    match &ts.body {
        Body::Timestamp { snapshot } => snapshot,
        _ => unreachable!("parsed as timestamp"),
    }
}
