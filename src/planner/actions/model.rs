//! A FAS action as its users write it (`../shared/seeds/003_…`): five filters, all ANDed, and a
//! command; FAS's field names (camelCase) so a FAS user's JSON works unchanged. As FAS's own
//! decoder does, fields it does not know are ignored, not refused.

use serde::{Deserialize, Serialize};

pub use crate::firmware::ImageIdentity;

/// Which image a target gets among the applicable ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VersionChoice {
    /// The highest `semanticFirmwareVersion` with the command's tag.
    #[default]
    Latest,
    /// The lowest.
    Earliest,
    /// The image `imageFilter.imageID` names.
    Explicit,
}

/// Seconds an action's operations may take before they time out, as FAS's default.
pub const DEFAULT_TIME_LIMIT: u64 = 10_000;

fn default_tag() -> String {
    "default".into()
}

fn default_time_limit() -> u64 {
    DEFAULT_TIME_LIMIT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    #[serde(default)]
    pub version: VersionChoice,
    #[serde(default = "default_tag")]
    pub tag: String,
    /// `false` (the default): plan and report, change nothing.
    #[serde(default)]
    pub override_dryrun: bool,
    /// Update a target even when no image of the version it runs now exists (it could not be
    /// put back).
    #[serde(default)]
    pub restore_not_possible_override: bool,
    /// Update a target that already runs the chosen image's version.
    #[serde(default)]
    pub overwrite_same_image: bool,
    /// Seconds each operation may take.
    #[serde(default = "default_time_limit")]
    pub time_limit: u64,
    #[serde(default)]
    pub description: String,
}

impl Default for Command {
    fn default() -> Command {
        Command {
            version: VersionChoice::Latest,
            tag: default_tag(),
            override_dryrun: false,
            restore_not_possible_override: false,
            overwrite_same_image: false,
            time_limit: DEFAULT_TIME_LIMIT,
            description: String::new(),
        }
    }
}

/// Which devices: by xname, group or device type (empty lists: every device).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateComponentFilter {
    #[serde(default)]
    pub xnames: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub device_types: Vec<String>,
    /// FAS's partition filter: not supported, and refused when given (see `PlanError`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
}

/// Which devices, by what their hardware says of itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryHardwareFilter {
    #[serde(default)]
    pub manufacturer: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetFilter {
    #[serde(default)]
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageFilter {
    #[serde(default, rename = "imageID")]
    pub image_id: Option<String>,
    /// Apply the image even where its device type, manufacturer or models do not match.
    #[serde(default)]
    pub override_image: bool,
}

/// `POST /api/v1/actions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionRequest {
    #[serde(default)]
    pub state_component_filter: StateComponentFilter,
    #[serde(default)]
    pub inventory_hardware_filter: InventoryHardwareFilter,
    #[serde(default)]
    pub target_filter: TargetFilter,
    #[serde(default)]
    pub image_filter: ImageFilter,
    #[serde(default)]
    pub command: Command,
}

/// An image as the planner sees it: its id (NAME@VERSION) and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub id: String,
    pub identity: ImageIdentity,
}

/// A device (an xname) as the planner sees it: what it is and what each target runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Xname {
    pub xname: String,
    pub device_type: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub groups: Vec<String>,
    /// (target, running firmware version), in target order.
    pub targets: Vec<(String, String)>,
}

/// Where an operation stands, as FAS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum OperationState {
    Initial,
    Configured,
    Blocked,
    InProgress,
    NeedsVerified,
    Verifying,
    Succeeded,
    Failed,
    Aborted,
    NoOperation,
    NoSolution,
}

impl OperationState {
    pub const ALL: [OperationState; 11] = [
        OperationState::Initial,
        OperationState::Configured,
        OperationState::Blocked,
        OperationState::InProgress,
        OperationState::NeedsVerified,
        OperationState::Verifying,
        OperationState::Succeeded,
        OperationState::Failed,
        OperationState::Aborted,
        OperationState::NoOperation,
        OperationState::NoSolution,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Initial => "initial",
            OperationState::Configured => "configured",
            OperationState::Blocked => "blocked",
            OperationState::InProgress => "inProgress",
            OperationState::NeedsVerified => "needsVerified",
            OperationState::Verifying => "verifying",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
            OperationState::Aborted => "aborted",
            OperationState::NoOperation => "noOperation",
            OperationState::NoSolution => "noSolution",
        }
    }

    /// Nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OperationState::Succeeded
                | OperationState::Failed
                | OperationState::Aborted
                | OperationState::NoOperation
                | OperationState::NoSolution
        )
    }
}

/// One planned (xname, target) update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedOperation {
    /// `ACTIONID-N`, once the plan belongs to an action.
    #[serde(rename = "operationID", default, skip_serializing_if = "String::is_empty")]
    pub operation_id: String,
    pub xname: String,
    pub target: String,
    pub state: OperationState,
    /// What the target runs now.
    pub from_firmware_version: String,
    /// The chosen image, if any.
    #[serde(rename = "toImageID", skip_serializing_if = "Option::is_none")]
    pub to_image_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_firmware_version: Option<String>,
    /// The image of the version the target runs now, to restore it with.
    #[serde(rename = "fromImageID", skip_serializing_if = "Option::is_none")]
    pub from_image_id: Option<String>,
    /// Why it is in this state (noSolution, noOperation, blocked, failed at planning).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state_helper: String,
}
