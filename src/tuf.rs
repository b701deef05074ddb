//! TUF: which firmware is a properly signed target of the production (or CI) repository, and
//! so may reach a device of that class.
//!
//! The client workflow of the TUF specification (§5.3–5.7: root rotation chain, timestamp →
//! snapshot → targets, signature thresholds counted once per key, expiry, rollback protection,
//! consistent snapshots, delegated targets searched lazily, target length and hashes) is
//! `updater`'s, which runs it as the reference client (python-tuf's ngclient) does and passes
//! the public tuf-conformance suite (`bench/tuf_conformance.sh`). `meta` reads metadata with
//! `tough`'s key schema and verifies signatures as tough does; tough's own loader was dropped
//! because it loads every delegation eagerly, requires sha256, re-serialises what it stores and
//! keeps its clock state among the role files. This module adds what the gateway needs around
//! it: a transport for `file://`, `http://` and `https://` URLs, the trusted metadata persisted
//! in a datastore directory (so a restart starts from the newest verified root and keeps
//! rejecting rolled-back versions), and the verified targets as the set of (sha256, length)
//! that are admissible, with their Foundries-style `custom.tags`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tough::async_trait;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

mod meta;
mod updater;
pub use meta::TargetFile;
pub use updater::Repository;

/// Whether `bytes` are the target `t` describes (its length and every hash).
pub fn target_matches(bytes: &[u8], t: &TargetFile) -> bool {
    meta::check_file("target", bytes, Some(t.length), &t.hashes).is_ok()
}

#[derive(Debug, thiserror::Error)]
pub enum TufError {
    #[error("{repo}: {what}: {source}")]
    Io { repo: String, what: String, source: std::io::Error },
    #[error("{repo}: invalid URL {url:?}: {message}")]
    Url { repo: String, url: String, message: String },
    #[error("{repo}: the repository does not verify: {message}")]
    Verify { repo: String, message: String },
    #[error("{repo}: no target {0}", .target)]
    NoTarget { repo: String, target: String },
    #[error("{repo}: target {target} does not verify: {message}")]
    Target { repo: String, target: String, message: String },
    #[error("{0} has no TUF repository configured")]
    NotConfigured(&'static str),
}

/// Where one repository is and what is trusted to start with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepoConfig {
    /// The trusted root.json shipped out of band. Empty: no repository.
    pub root: PathBuf,
    /// Base URL of the metadata (`file:///dir/` or `http://host/metadata/`).
    pub metadata_url: String,
    /// Base URL of the target files.
    pub targets_url: String,
}

impl RepoConfig {
    pub fn configured(&self) -> bool {
        !self.root.as_os_str().is_empty()
    }
}

/// A verified target as the gateway uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TargetInfo {
    pub name: String,
    pub length: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// `custom.tags` (Foundries): the tags the target is released for.
    pub tags: Vec<String>,
    /// `custom.version`, when the repository states one.
    pub version: Option<String>,
}

/// What one successful refresh established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verified {
    pub repo: String,
    pub root_version: u64,
    pub timestamp_version: u64,
    pub snapshot_version: u64,
    pub targets_version: u64,
    /// Unix seconds at which the first of the four roles expires; nothing is admissible after.
    pub expires: u64,
    pub targets: Vec<TargetInfo>,
}

fn url_of(repo: &str, text: &str) -> Result<Url, TufError> {
    let mut u =
        Url::parse(text).map_err(|e| TufError::Url { repo: repo.into(), url: text.into(), message: e.to_string() })?;
    if !u.path().ends_with('/') {
        // A base URL: `…/metadata` and `…/metadata/` mean the same directory.
        u.set_path(&format!("{}/", u.path()));
    }
    Ok(u)
}

/// Fetches `file://`, `http://` and `https://` URLs. A missing file (404) is reported as such: the root
/// rotation chain ends at the first version that is not there.
#[derive(Debug, Clone, Default)]
pub struct Fetch {
    http: reqwest::Client,
    timeout: Duration,
}

impl Fetch {
    /// Each HTTP fetch must connect, and then finish, within `timeout`: a repository that
    /// accepts and never answers fails the refresh instead of hanging it.
    pub fn new(timeout: Duration) -> Fetch {
        let http = reqwest::Client::builder().connect_timeout(timeout).timeout(timeout).build().unwrap_or_default();
        Fetch { http, timeout }
    }
}

#[async_trait]
impl Transport for Fetch {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "file" => tough::FilesystemTransport.fetch(url).await,
            "http" | "https" => {
                let secs = self.timeout.as_secs();
                let err = |kind, e: reqwest::Error| match e.is_timeout() {
                    true => TransportError::new_with_cause(kind, url.as_str(), format!("no answer within {secs} s")),
                    false => TransportError::new_with_cause(kind, url.as_str(), e),
                };
                let resp = self.http.get(url.clone()).send().await.map_err(|e| err(TransportErrorKind::Other, e))?;
                let status = resp.status();
                if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::FORBIDDEN {
                    return Err(TransportError::new(TransportErrorKind::FileNotFound, url.as_str()));
                }
                if !status.is_success() {
                    return Err(TransportError::new_with_cause(
                        TransportErrorKind::Other,
                        url.as_str(),
                        format!("HTTP {status}"),
                    ));
                }
                // Chunk by chunk: tough stops reading at the size limit it enforces.
                let u = url.to_string();
                let stream = futures::stream::unfold(Some(resp), move |resp| {
                    let u = u.clone();
                    async move {
                        let mut resp = resp?;
                        match resp.chunk().await {
                            Ok(Some(b)) => Some((Ok(b), Some(resp))),
                            Ok(None) => None,
                            Err(e) if e.is_timeout() => {
                                let why = format!("no answer within {secs} s");
                                Some((Err(TransportError::new_with_cause(TransportErrorKind::Other, u, why)), None))
                            }
                            Err(e) => {
                                Some((Err(TransportError::new_with_cause(TransportErrorKind::Other, u, e)), None))
                            }
                        }
                    }
                });
                Ok(Box::pin(stream))
            }
            _ => Err(TransportError::new(TransportErrorKind::UnsupportedUrlScheme, url.as_str())),
        }
    }
}

/// One repository's client: its trusted root, URLs and datastore.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    /// The trusted root used when the datastore has none yet.
    pub initial_root: PathBuf,
    pub metadata_url: String,
    pub targets_url: String,
    /// Holds root.json (the newest verified), timestamp.json, snapshot.json, targets.json.
    pub datastore: PathBuf,
    /// Connect and total limit of each HTTP fetch.
    pub fetch_timeout: Duration,
}

/// `tuf.fetch_timeout_secs`'s default.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    fn io(&self, what: String) -> impl FnOnce(std::io::Error) -> TufError + '_ {
        move |source| TufError::Io { repo: self.name.clone(), what, source }
    }

    /// Runs the TUF client workflow against the repository, starting from the newest root
    /// verified before (in the datastore), else the one shipped out of band.
    pub async fn load(&self) -> Result<Repository, TufError> {
        std::fs::create_dir_all(&self.datastore).map_err(self.io(format!("creating {}", self.datastore.display())))?;
        let stored = self.datastore.join("root.json");
        if !stored.exists() {
            let root = std::fs::read(&self.initial_root)
                .map_err(self.io(format!("reading the trusted root {}", self.initial_root.display())))?;
            std::fs::write(&stored, root).map_err(self.io(format!("writing {}", stored.display())))?;
        }
        let metadata = url_of(&self.name, &self.metadata_url)?;
        let targets = url_of(&self.name, &self.targets_url)?;
        let now = jiff::Timestamp::now().as_second();
        let fetch = Fetch::new(self.fetch_timeout);
        let mut repo = Repository::open(&self.name, &self.datastore, metadata, targets, fetch, now)?;
        // Each fetch has the limit, and so has the whole refresh (root, timestamp, snapshot,
        // targets): a repository that trickles cannot hold it either.
        let secs = self.fetch_timeout.as_secs();
        match tokio::time::timeout(self.fetch_timeout, repo.refresh()).await {
            Ok(r) => r.map(|()| repo),
            Err(_) => Err(TufError::Verify {
                repo: self.name.clone(),
                message: format!("the repository did not answer within {secs} s (tuf.fetch_timeout_secs)"),
            }),
        }
    }

    /// Refreshes and lists the verified targets.
    pub async fn refresh(&self) -> Result<Verified, TufError> {
        let mut repo = self.load().await?;
        verified(&self.name, &mut repo).await
    }

    /// Downloads one target, found by the specification's search and checked against its
    /// length and every hash listed.
    pub async fn fetch_target(&self, repo: &mut Repository, name: &str) -> Result<Vec<u8>, TufError> {
        let Some((_, t)) = repo.find(name).await? else {
            return Err(TufError::NoTarget { repo: self.name.clone(), target: name.into() });
        };
        repo.download_target(name, &t).await
    }
}

/// An error with its causes, on one line; key ids as their hex text.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = readable(&e.to_string());
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = readable(&s.to_string());
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// tough prints a key id as `Decoded { bytes: [...], original: "HEX", ... }`: keep the HEX.
fn readable(text: &str) -> String {
    let (Some(start), Some(at)) = (text.find("Decoded {"), text.find("original: \"")) else { return text.into() };
    let hex_start = at + "original: \"".len();
    let Some(hex_len) = text[hex_start..].find('"') else { return text.into() };
    let end = text[hex_start..].find('}').map_or(text.len(), |e| hex_start + e + 1);
    format!("{}{}{}", &text[..start], &text[hex_start..hex_start + hex_len], &text[end..])
}

/// What a loaded repository verified; its targets as the gateway admits them (those with a
/// sha256, which is how an image is matched).
async fn verified(name: &str, repo: &mut Repository) -> Result<Verified, TufError> {
    let targets = repo
        .all_targets()
        .await?
        .into_iter()
        .filter_map(|(n, t)| {
            Some(TargetInfo {
                name: n,
                length: t.length,
                sha256: t.hashes.get("sha256")?.to_ascii_lowercase(),
                tags: t
                    .custom
                    .get("tags")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
                version: t.custom.get("version").and_then(|v| v.as_str()).map(str::to_owned),
            })
        })
        .collect();
    let (ts, snap, top) = match (repo.timestamp(), repo.snapshot(), repo.top_targets()) {
        (Some(ts), Some(s), Some(t)) => (ts, s, t),
        _ => return Err(TufError::Verify { repo: name.into(), message: "the refresh did not complete".into() }),
    };
    let expires = [repo.root().expires, ts.expires, snap.expires, top.expires].into_iter().min().unwrap_or(0);
    Ok(Verified {
        repo: name.into(),
        root_version: repo.root().version,
        timestamp_version: ts.version,
        snapshot_version: snap.version,
        targets_version: top.version,
        expires: expires.max(0) as u64,
        targets,
    })
}

/// The two repositories a gateway trusts, and what they verified last.
pub struct Trust {
    production: Option<Client>,
    ci: Option<Client>,
    verified: RwLock<HashMap<&'static str, Arc<Verified>>>,
    /// Counts verified refreshes: whoever hands trust on (the cluster feed) sees it changed.
    generation: std::sync::atomic::AtomicU64,
}

/// Why an image may not reach a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no production TUF repository is configured, so nothing is admissible for production devices")]
    NoProductionRepo,
    #[error("the {0} TUF repository has not been verified yet (or its last refresh failed)")]
    NotVerified(&'static str),
    #[error("the verified {0} TUF metadata has expired; refresh it")]
    Expired(&'static str),
    #[error("sha256 {sha256}, {length} bytes: not a verified {repo} target")]
    NotATarget { sha256: String, length: u64, repo: &'static str },
    #[error("a verified {repo} target, but not for tag {tag}")]
    OtherTag { repo: &'static str, tag: String },
}

impl Refusal {
    /// Whether the refusal may pass by itself: the metadata has expired or was never verified
    /// (a repository unreachable so far), so the next successful refresh can admit the image.
    /// Every other refusal is a fact of verified metadata or of the configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::NotVerified(_) | Refusal::Expired(_))
    }
}

pub const PRODUCTION: &str = "production";
pub const CI: &str = "ci";

impl Trust {
    /// `data_dir/tuf/<repo>/` holds each repository's trusted metadata.
    pub fn new(production: &RepoConfig, ci: &RepoConfig, data_dir: &Path) -> Trust {
        let client = |name: &str, c: &RepoConfig| {
            c.configured().then(|| Client {
                name: name.into(),
                initial_root: c.root.clone(),
                metadata_url: c.metadata_url.clone(),
                targets_url: c.targets_url.clone(),
                datastore: data_dir.join("tuf").join(name),
                fetch_timeout: FETCH_TIMEOUT,
            })
        };
        Trust {
            production: client(PRODUCTION, production),
            ci: client(CI, ci),
            verified: RwLock::new(HashMap::new()),
            generation: Default::default(),
        }
    }

    /// Sets the connect and total limit of each HTTP fetch (`tuf.fetch_timeout_secs`).
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Trust {
        for c in [&mut self.production, &mut self.ci].into_iter().flatten() {
            c.fetch_timeout = timeout;
        }
        self
    }

    /// No repository at all: production devices get nothing, CI devices anything.
    pub fn none() -> Trust {
        Trust { production: None, ci: None, verified: RwLock::new(HashMap::new()), generation: Default::default() }
    }

    fn client(&self, repo: &str) -> Result<(&'static str, &Client), TufError> {
        match repo {
            PRODUCTION => self.production.as_ref().map(|c| (PRODUCTION, c)).ok_or(TufError::NotConfigured(PRODUCTION)),
            CI => self.ci.as_ref().map(|c| (CI, c)).ok_or(TufError::NotConfigured(CI)),
            _ => Err(TufError::NotConfigured("this repository")),
        }
    }

    pub fn configured(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.production.is_some() {
            v.push(PRODUCTION);
        }
        if self.ci.is_some() {
            v.push(CI);
        }
        v
    }

    /// Refreshes one repository. On failure the previous verified state stays (until it
    /// expires) and nothing changes.
    pub async fn refresh(&self, repo: &str) -> Result<Arc<Verified>, TufError> {
        let (name, client) = self.client(repo)?;
        let v = Arc::new(client.refresh().await?);
        self.verified.write().unwrap_or_else(|e| e.into_inner()).insert(name, v.clone());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(v)
    }

    /// Takes `v` as what a refresh of its repository verified, as [`Trust::refresh`] does once
    /// the metadata passed every check. The planner's simulator (`crate::sim`) sets trust this
    /// way to drive expiry and changing targets through the plans at simulated times; the
    /// verification itself is proven against real repositories (python-tuf fixtures,
    /// tuf-conformance).
    #[doc(hidden)]
    pub fn install_verified(&self, v: Verified) {
        let name = if v.repo == CI { CI } else { PRODUCTION };
        self.verified.write().unwrap_or_else(|e| e.into_inner()).insert(name, Arc::new(v));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// How many refreshes have verified new metadata since start.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn verified(&self, repo: &str) -> Option<Arc<Verified>> {
        self.verified.read().unwrap_or_else(|e| e.into_inner()).get(repo).cloned()
    }

    /// Whether an image (by its sha256 and length) may reach a device of a class: production
    /// devices only verified production targets; CI devices verified CI targets, or anything
    /// when no CI repository is configured. With `tag`, the target must be released for it.
    /// Allocates nothing when the image is admissible: it runs on every Status.
    pub fn admit(
        &self,
        production: bool,
        sha256: &str,
        length: u64,
        tag: Option<&str>,
        now: u64,
    ) -> Result<(), Refusal> {
        let repo = if production {
            if self.production.is_none() {
                return Err(Refusal::NoProductionRepo);
            }
            PRODUCTION
        } else {
            if self.ci.is_none() {
                return Ok(());
            }
            CI
        };
        let verified = self.verified.read().unwrap_or_else(|e| e.into_inner());
        let v = verified.get(repo).ok_or(Refusal::NotVerified(repo))?;
        if now >= v.expires {
            return Err(Refusal::Expired(repo));
        }
        let t = v
            .targets
            .iter()
            .find(|t| t.length == length && t.sha256 == sha256)
            .ok_or_else(|| Refusal::NotATarget { sha256: sha256.into(), length, repo })?;
        match tag {
            Some(tag) if !t.tags.iter().any(|x| x == tag) => Err(Refusal::OtherTag { repo, tag: tag.into() }),
            _ => Ok(()),
        }
    }

    /// Until when anything is admissible for a class by TUF: the expiry of the verified
    /// metadata of the repository that decides for it (0 when it is configured but not
    /// verified); `None` when no repository decides (CI devices without a CI repository,
    /// production devices without one, which get nothing anyway).
    pub fn deadline(&self, production: bool) -> Option<u64> {
        let configured = if production { self.production.is_some() } else { self.ci.is_some() };
        if !configured {
            return None;
        }
        let repo = if production { PRODUCTION } else { CI };
        let verified = self.verified.read().unwrap_or_else(|e| e.into_inner());
        Some(verified.get(repo).map_or(0, |v| v.expires))
    }

    /// The signed `custom.version` of the verified target with these bytes, in the repository
    /// that decides for a class (`None`: not a target there, or it states no version).
    pub fn signed_version(&self, production: bool, sha256: &str, length: u64) -> Option<String> {
        let repo = if production { PRODUCTION } else { CI };
        let verified = self.verified.read().unwrap_or_else(|e| e.into_inner());
        verified.get(repo)?.targets.iter().find(|t| t.length == length && t.sha256 == sha256)?.version.clone()
    }

    /// The verified target of `repo` named `name`, for checking an upload against it.
    pub fn named_target(&self, repo: &str, name: &str) -> Result<TargetInfo, TufError> {
        let (repo, client) = self.client(repo)?;
        let v = self.verified(repo).ok_or_else(|| TufError::Verify {
            repo: client.name.clone(),
            message: "not verified yet: run `fwgate tuf refresh`".into(),
        })?;
        v.targets
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or_else(|| TufError::NoTarget { repo: repo.into(), target: name.into() })
    }
}

#[cfg(test)]
pub(crate) mod tests;
