//! What a rollout is, as stored and as the API shows it, what an operator sends to create
//! one, and what can go wrong.

use serde::{Deserialize, Serialize};

use super::groups::{Conditions, Counts, ErrorThreshold, SuccessAction};
use super::state::{GroupState, Illegal, RolloutState};
use crate::fleet::filter::FilterError;
use crate::fleet::FleetError;
use crate::planner::PlannerError;
use crate::store::StoreError;

/// Groups a rollout may have; one more is refused.
pub const MAX_GROUPS: usize = 1000;
/// Weight of a rollout's operations unless it names one: as an operator's assignment.
pub const DEFAULT_WEIGHT: u16 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("invalid rollout name {0:?}: 1 to 64 of letters, digits and -_.")]
    InvalidName(String),
    #[error("no rollout {0}")]
    NotFound(String),
    #[error("rollout {0} already exists")]
    Exists(String),
    #[error("filter: {0}")]
    BadFilter(#[from] FilterError),
    #[error("{0}")]
    Invalid(String),
    #[error("no image {0}")]
    NoImage(String),
    #[error("the filter matches no device (a dynamic rollout may start empty: give dynamic_group_size)")]
    NoDevices,
    #[error("{count} of the {total} matching devices may not receive {image}: {reason} (e.g. device {example})")]
    NotAdmissible { image: String, count: usize, total: usize, reason: String, example: String },
    #[error(transparent)]
    Illegal(#[from] Illegal),
    #[error("rollout {name} is {state}: retry a finished or stopped rollout")]
    NotRetryable { name: String, state: &'static str },
    #[error("rollout {0} has no failed devices to retry")]
    NothingToRetry(String),
    #[error(transparent)]
    Planner(#[from] PlannerError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// At most `per_minute` of a group's devices get their operation in any minute; with `factor`,
/// the rate is multiplied by it after every `every` successes of the group (AWS IoT Jobs'
/// exponential rollout).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<u64>,
}

impl Rate {
    /// The rate after `successes` successes of the group (at most a million a minute).
    pub fn now(&self, successes: u64) -> u64 {
        let base = self.per_minute as f64;
        let grown = match (self.factor, self.every) {
            (Some(f), Some(m)) if m > 0 => base * f.powi((successes / m).min(64) as i32),
            _ => base,
        };
        grown.clamp(1.0, 1e6) as u64
    }

    pub fn check(&self) -> Result<(), String> {
        if self.per_minute == 0 {
            return Err("rate: per_minute must be 1 or more".into());
        }
        match (self.factor, self.every) {
            (None, None) => Ok(()),
            (Some(f), Some(m)) if (1.0..=100.0).contains(&f) && m > 0 => Ok(()),
            _ => Err("rate: growth needs a factor from 1 to 100 and every ≥ 1 successes".into()),
        }
    }
}

/// One deployment group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Group {
    /// `group-1`, `group-2`, …
    pub name: String,
    pub state: GroupState,
    pub conditions: Conditions,
    /// Devices in it (they are stored beside the rollout).
    pub total: u64,
    /// Made while the rollout ran, for devices that matched its filter later.
    #[serde(default)]
    pub dynamic: bool,
    /// How many of its members (in order) have been handed to the planner: written in the
    /// same batch as their operations.
    #[serde(default)]
    pub released: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rollout {
    pub name: String,
    /// The RSQL filter that chose its devices (empty for a retry, which names them).
    pub filter: String,
    /// As given: NAME@VERSION, or a version whose image is picked per device hardware.
    pub image: String,
    pub weight: u16,
    pub state: RolloutState,
    pub groups: Vec<Group>,
    /// Unix seconds at which it starts by itself once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<u64>,
    /// Devices that match the filter later join trailing groups of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_group_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// The rollout whose failed devices this one retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// What the approver or denier said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// Creation order.
    pub order: u64,
}

impl Rollout {
    /// The origin of a group's operations: `rollout:NAME/N`, N from 1.
    pub fn origin(&self, group: usize) -> String {
        format!("{ORIGIN_PREFIX}{}/{}", self.name, group + 1)
    }

    pub fn total(&self) -> u64 {
        self.groups.iter().map(|g| g.total).sum()
    }
}

pub(crate) const ORIGIN_PREFIX: &str = "rollout:";

/// The rollout name and group index of an origin `rollout:NAME/N`.
pub(crate) fn parse_origin(origin: &str) -> Option<(&str, usize)> {
    let (name, n) = origin.strip_prefix(ORIGIN_PREFIX)?.rsplit_once('/')?;
    let n: usize = n.parse().ok()?;
    Some((name, n.checked_sub(1)?))
}

/// An explicit group: a sub-filter and/or a percentage of the devices not in an earlier
/// group, with its own conditions where given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub percent: Option<u8>,
    #[serde(default)]
    pub success: Option<u8>,
    #[serde(default)]
    pub success_action: Option<SuccessAction>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /api/v1/rollouts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub filter: String,
    /// NAME@VERSION, or VERSION (the image of that version for each device's hardware).
    pub image: String,
    #[serde(default)]
    pub weight: Option<u16>,
    /// Split the devices into this many groups (default 1 when no explicit groups).
    #[serde(default)]
    pub groups: Option<usize>,
    /// Explicit groups, in order (instead of `groups`).
    #[serde(default)]
    pub group_defs: Vec<GroupDef>,
    /// Default success threshold, percent (50).
    #[serde(default)]
    pub success: Option<u8>,
    #[serde(default)]
    pub success_action: Option<SuccessAction>,
    /// Default error threshold: `5%` or a count `5` (50%).
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub start_at: Option<u64>,
    #[serde(default)]
    pub dynamic_group_size: Option<u64>,
    #[serde(default)]
    pub rate: Option<Rate>,
}

impl CreateRequest {
    /// The conditions of a group: its own where given, else the request's, else hawkBit's.
    pub(super) fn conditions(&self, def: Option<&GroupDef>) -> Result<Conditions, RolloutError> {
        let base = Conditions::default();
        let success = def.and_then(|d| d.success).or(self.success).unwrap_or(base.success_percent);
        if success > 100 {
            return Err(RolloutError::Invalid(format!("success threshold {success}: a percentage from 0 to 100")));
        }
        let error = match def.and_then(|d| d.error.as_deref()).or(self.error.as_deref()) {
            Some(t) => ErrorThreshold::parse(t).map_err(RolloutError::Invalid)?,
            None => base.error,
        };
        Ok(Conditions {
            success_percent: success,
            success_action: def.and_then(|d| d.success_action).or(self.success_action).unwrap_or_default(),
            error,
        })
    }
}

/// `rollouts status`: a row per group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = RolloutGroupStatus)]
pub struct GroupStatus {
    pub name: String,
    pub state: GroupState,
    /// Not handed to the planner yet (group not started, or held back by the rate).
    pub waiting: u64,
    /// Queued in the planner, not started by the device.
    pub scheduled: u64,
    pub running: u64,
    #[serde(flatten)]
    pub counts: Counts,
    /// Percent of the way to the success threshold, and to the error threshold.
    pub toward_success: f64,
    pub toward_error: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutStatus {
    pub name: String,
    pub state: RolloutState,
    pub image: String,
    pub total: u64,
    pub groups: Vec<GroupStatus>,
}
