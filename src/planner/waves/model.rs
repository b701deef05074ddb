//! What waves are made of, as stored and as the API speaks them: the wave record and its
//! rollout history, the requests, and the reports and counts.

use serde::{Deserialize, Serialize};

use super::{WaveError, ORIGIN_PREFIX};
use crate::fleet::select::{Limit, Rejection};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    Active,
    Complete,
    Canceled,
}

impl WaveState {
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Active => "active",
            WaveState::Complete => "complete",
            WaveState::Canceled => "canceled",
        }
    }
}

pub(super) fn class(production: bool) -> &'static str {
    if production {
        "production"
    } else {
        "ci"
    }
}

/// One `rollout` (or the `complete`) as the wave's history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutRecord {
    pub at: u64,
    #[serde(default)]
    pub complete: bool,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub limit: Option<String>,
    /// How many devices `--uuids` named.
    #[serde(default)]
    pub uuids: usize,
    pub seed: u64,
    pub staged: usize,
    pub rejected: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Wave {
    pub name: String,
    pub tag: String,
    /// The class of devices it is for: production devices, or test (CI) devices.
    pub production: bool,
    pub version: String,
    /// When the wave was given NAME@VERSION: only that image; else any image of the version
    /// that fits a device's hardware.
    #[serde(default)]
    pub image_name: Option<String>,
    /// Production versions of the tag this wave withdraws when it completes.
    #[serde(default)]
    pub prune: Vec<String>,
    pub state: WaveState,
    /// Creation order: on one tag, waves complete in this order.
    pub order: u64,
    pub created_at: u64,
    #[serde(default)]
    pub ended_at: Option<u64>,
    #[serde(default)]
    pub rollouts: Vec<RolloutRecord>,
    /// Devices a rollout chose while no image of the wave could be admitted for a passing
    /// reason (TUF metadata expired, not verified yet): staged after the next successful
    /// refresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
}

impl Wave {
    pub fn origin(&self) -> String {
        format!("{ORIGIN_PREFIX}{}", self.name)
    }
}

/// `waves init`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    pub name: String,
    /// VERSION, or NAME@VERSION for one image.
    pub version: String,
    pub tag: String,
    /// Production devices (the default) or test devices.
    #[serde(default = "yes")]
    pub production: bool,
    #[serde(default)]
    pub prune: Vec<String>,
    #[serde(default)]
    pub dry_run: bool,
}

fn yes() -> bool {
    true
}

/// `--limit` as given: a count or text (`20`, `10%`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum LimitArg {
    Count(u64),
    Text(String),
}

/// `--uuids` as given: a list, or text with any of `,` `;` `|` and white space between ids.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum UuidsArg {
    List(Vec<String>),
    Text(String),
}

/// `waves rollout`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub limit: Option<LimitArg>,
    #[serde(default)]
    pub uuids: Option<UuidsArg>,
    /// The sample's seed; a random one when absent (reported, so the sample can be replayed).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub dry_run: bool,
    /// Answer with the selected device ids.
    #[serde(default)]
    pub print_uuids: bool,
}

/// Parses `--limit`: `N` devices or `N%` of the devices the rollout could reach.
pub fn parse_limit(arg: &LimitArg) -> Result<Limit, WaveError> {
    let text = match arg {
        LimitArg::Count(n) => n.to_string(),
        LimitArg::Text(t) => t.trim().to_owned(),
    };
    let bad = || WaveError::BadLimit(text.clone());
    if let Some(p) = text.strip_suffix('%') {
        // Decimal, to four places, read exactly: no float to round 8.8% of 375 up to 34.
        let (int, frac) = p.trim().split_once('.').unwrap_or((p.trim(), ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(int) || (!frac.is_empty() && !digits(frac)) || frac.len() > 4 || int.len() > 3 {
            return Err(bad());
        }
        let int: u32 = int.parse().map_err(|_| bad())?;
        let frac: u32 = format!("{frac:0<4}").parse().map_err(|_| bad())?;
        let ppm = int * 10_000 + frac;
        return if (1..=1_000_000).contains(&ppm) { Ok(Limit::PartsPerMillion(ppm)) } else { Err(bad()) };
    }
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Limit::Count(n)),
        _ => Err(bad()),
    }
}

/// Splits a `--uuids` text on `,` `;` `|` and white space; empty pieces are dropped.
pub fn split_uuids(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c == ';' || c == '|' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A device a rollout did not stage, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Refused {
    pub device: String,
    pub reason: String,
}

pub(super) fn rejection_text(r: Rejection) -> &'static str {
    match r {
        Rejection::Unknown => "unknown device",
        Rejection::OtherTag => "follows another tag",
        Rejection::OtherClass => "of the other production class",
        Rejection::NotInGroup => "not in the group",
        Rejection::AlreadyInWave => "already in the wave (staged or updated)",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutReport {
    pub wave: String,
    pub dry_run: bool,
    pub seed: u64,
    /// Devices the rollout could reach (tag, class, group, list), before the limit.
    pub population: usize,
    /// Devices chosen.
    pub selected: usize,
    /// Devices given an operation (0 on a dry run).
    pub staged: usize,
    pub rejected: Vec<Refused>,
    /// The chosen devices, with `print_uuids`.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
}

/// A production version of a tag and the complete wave that made it one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionSource {
    pub version: String,
    pub wave: String,
    pub completed_at: u64,
}

/// Counts for one group, as `waves status` prints them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = WaveGroupStatus)]
pub struct GroupStatus {
    pub group: String,
    pub total: usize,
    pub updated: usize,
    pub need_update: usize,
    pub scheduled: usize,
    pub online: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WaveStatus {
    pub name: String,
    pub tag: String,
    pub production: bool,
    pub version: String,
    pub state: WaveState,
    /// Devices following the tag, in the wave's class.
    pub total: usize,
    /// Of those, running the wave's version (as they last reported).
    pub updated: usize,
    pub need_update: usize,
    /// Staged by the wave, not yet updated: queued or in progress.
    pub scheduled: usize,
    pub in_progress: usize,
    /// The wave's operations that failed (rolled back) or timed out.
    pub failed: usize,
    pub canceled: usize,
    /// Sent a Status in the last `fleet.online_secs`.
    pub online: usize,
    pub groups: Vec<GroupStatus>,
    /// Why the wave's operations wait instead of proceeding ("waiting for trust: …"), when no
    /// image of it is admissible now for a passing reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Devices chosen by a rollout while trust was missing, staged after the next refresh.
    #[serde(default)]
    pub deferred: usize,
}
