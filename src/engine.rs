//! The DFU session step of DESIGN.md §2.2: (device Status, its operation, the image) →
//! commands to send and the operation's next state.
//!
//! Pure: no IO, no clock (time is a parameter), no allocation proportional to the image — a
//! WRITE borrows its block from the image the caller holds. The gateway side is stateless
//! about the transfer itself: the device says where it is, we answer from there.

use serde::{Deserialize, Serialize};

use crate::protocol::{Command, Status};

/// Where one (device, component, image) update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Assigned; the device has not asked for it yet.
    Pending,
    /// Blocks are being written.
    Downloading,
    /// SWAP sent; waiting for the device to come back.
    Swapping,
    /// The device came back on the assigned version.
    Succeeded,
    /// The device came back on its old version after SWAP (it rolled back).
    Failed,
    /// The device went silent for longer than the operation's time limit.
    TimedOut,
    /// Withdrawn by the planner (a canceled wave); a transfer under way stops at the next
    /// Status, which is answered SYNC on the version the device runs.
    Canceled,
}

impl OpState {
    pub const ALL: [OpState; 7] = [
        OpState::Pending,
        OpState::Downloading,
        OpState::Swapping,
        OpState::Succeeded,
        OpState::Failed,
        OpState::TimedOut,
        OpState::Canceled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, OpState::Succeeded | OpState::Failed | OpState::TimedOut | OpState::Canceled)
    }

    /// How far along an operation in this state is: pending 0, downloading 1, swapping 2,
    /// finished 3. Operations only move up.
    pub fn stage(self) -> u8 {
        match self {
            OpState::Pending => 0,
            OpState::Downloading => 1,
            OpState::Swapping => 2,
            _ => 3,
        }
    }

    /// Started but not finished: what the time limit applies to.
    pub fn in_flight(self) -> bool {
        matches!(self, OpState::Downloading | OpState::Swapping)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Pending => "pending",
            OpState::Downloading => "downloading",
            OpState::Swapping => "swapping",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::TimedOut => "timed_out",
            OpState::Canceled => "canceled",
        }
    }
}

/// The engine's knobs, validated by the config module.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Largest block sent, whatever the device's mtu.
    pub max_block: u32,
    /// Block size for a device that states no mtu (the protocol's default).
    pub default_mtu: u32,
    /// Most WRITE commands answered to one Status.
    pub max_window: u32,
    /// `poll` in a SYNC.
    pub sync_poll: u32,
    /// `poll` in a WAIT.
    pub wait_poll: u32,
}

/// What the device should end up running, and the bytes of it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub version: &'a str,
    pub image: &'a [u8],
    pub sha256: [u8; 32],
}

/// The result of one step: commands in the form of the request, and what changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step<'a> {
    pub commands: Vec<Command<'a>>,
    /// The operation's new state, when it changes.
    pub transition: Option<OpState>,
    /// The offset the device reported for the assigned version, when it reported one.
    pub progress: Option<u32>,
}

/// Answers a device that has no operation, or is not known: nothing to do, ask again later.
/// `poll` overrides the configured interval (an image's own hint).
pub fn wait<'a>(cfg: &EngineConfig, status: &Status<'a>, poll: Option<u32>) -> Command<'a> {
    Command::Wait { correlation_id: status.correlation_id, poll: Some(poll.unwrap_or(cfg.wait_poll)) }
}

/// One DFU step. `op` is the device's current operation for the Status's component and the
/// target it installs, or `None` when nothing is assigned.
pub fn handle_status<'a>(cfg: &EngineConfig, status: &Status<'a>, op: Option<(OpState, Target<'a>)>) -> Step<'a> {
    let cid = status.correlation_id;
    let sync = |version| Command::Sync { version, correlation_id: cid, poll: Some(cfg.sync_poll) };
    let Some((state, target)) = op else {
        return Step { commands: vec![sync(status.version)], ..Step::default() };
    };

    if status.version == target.version {
        // Running the target: done, whether it just swapped or already ran it when assigned.
        let transition = match state {
            OpState::Pending | OpState::Downloading | OpState::Swapping => Some(OpState::Succeeded),
            OpState::Succeeded | OpState::Failed | OpState::TimedOut | OpState::Canceled => None,
        };
        return Step { commands: vec![sync(target.version)], transition, progress: None };
    }
    if state.is_terminal() {
        // A finished operation is not retried behind the operator's back.
        return Step { commands: vec![sync(status.version)], ..Step::default() };
    }

    let len = target.image.len() as u64;
    let reported = status.update.filter(|u| u.version == target.version).map(|u| u.offset);
    if state == OpState::Swapping && reported.is_none() {
        // Back on another version with no transfer under way: the swap was rolled back.
        return Step { commands: vec![sync(status.version)], transition: Some(OpState::Failed), progress: None };
    }
    // Resume where the device says it is; anything else (another version, an offset past the
    // end) starts over at 0.
    let offset = reported.map(u64::from).filter(|&o| o <= len).unwrap_or(0);
    if offset == len {
        let swap = Command::Swap { version: target.version, correlation_id: cid, checksum: target.sha256 };
        let transition = (state != OpState::Swapping).then_some(OpState::Swapping);
        return Step { commands: vec![swap], transition, progress: Some(offset as u32) };
    }

    let block = status.mtu.unwrap_or(cfg.default_mtu).clamp(1, cfg.max_block) as u64;
    let window = status.window.unwrap_or(1).clamp(1, cfg.max_window) as u64;
    let mut commands = Vec::with_capacity(window as usize);
    let mut at = offset;
    while at < len && (commands.len() as u64) < window {
        let end = (at + block).min(len);
        commands.push(Command::Write {
            version: target.version,
            correlation_id: cid,
            offset: at as u32,
            data: &target.image[at as usize..end as usize],
        });
        at = end;
    }
    let transition = (state != OpState::Downloading).then_some(OpState::Downloading);
    Step { commands, transition, progress: Some(offset as u32) }
}

/// An in-flight operation silent since `last_activity` has timed out at `now` (seconds).
pub fn timed_out(state: OpState, last_activity: u64, now: u64, limit_secs: u64) -> bool {
    state.in_flight() && now.saturating_sub(last_activity) >= limit_secs
}

#[cfg(test)]
mod tests;
