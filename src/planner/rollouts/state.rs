//! hawkBit's two state machines: the rollout's and each deployment group's. What an operator
//! may ask in each state is [`RolloutState::apply`]; what the planner does by itself as work
//! completes is [`RolloutState::advance`]. Anything else is refused with the state named.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Its groups are being computed and written.
    Creating,
    WaitingForApproval,
    ApprovalDenied,
    Ready,
    /// Started; the first group's operations are being queued.
    Starting,
    Running,
    Paused,
    /// Stopped; queued operations are being canceled.
    Stopping,
    Stopped,
    Finished,
    Deleting,
    Deleted,
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Approve,
    Deny,
    Start,
    Pause,
    Resume,
    Stop,
    Delete,
    TriggerNextGroup,
}

/// What the planner reports as its work on a rollout completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Progress {
    /// The groups are written.
    Created { approval_required: bool },
    /// The first group's operations are queued.
    Started,
    /// The error condition of a group was met (emergency stop), or a group's success action
    /// is `pause`.
    PauseByCondition,
    /// Every group has finished or is in error and none is left to start.
    AllGroupsDone,
    /// The queued operations are canceled.
    Stopped,
    /// The rollout's records are removed.
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a rollout that is {state}")]
pub struct Illegal {
    pub action: &'static str,
    pub state: &'static str,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::Approve,
        Action::Deny,
        Action::Start,
        Action::Pause,
        Action::Resume,
        Action::Stop,
        Action::Delete,
        Action::TriggerNextGroup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Deny => "deny",
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::Delete => "delete",
            Action::TriggerNextGroup => "trigger the next group of",
        }
    }
}

impl RolloutState {
    pub const ALL: [RolloutState; 12] = [
        RolloutState::Creating,
        RolloutState::WaitingForApproval,
        RolloutState::ApprovalDenied,
        RolloutState::Ready,
        RolloutState::Starting,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Stopping,
        RolloutState::Stopped,
        RolloutState::Finished,
        RolloutState::Deleting,
        RolloutState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Creating => "creating",
            RolloutState::WaitingForApproval => "waiting_for_approval",
            RolloutState::ApprovalDenied => "approval_denied",
            RolloutState::Ready => "ready",
            RolloutState::Starting => "starting",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Stopping => "stopping",
            RolloutState::Stopped => "stopped",
            RolloutState::Finished => "finished",
            RolloutState::Deleting => "deleting",
            RolloutState::Deleted => "deleted",
        }
    }

    /// Nothing more happens to it (but a delete).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::ApprovalDenied | RolloutState::Stopped | RolloutState::Finished | RolloutState::Deleted
        )
    }

    /// Whether it hands out operations: its running groups' devices get them.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutState::Starting | RolloutState::Running)
    }

    /// The state an operator's `action` leads to, or why it may not be taken now.
    pub fn apply(self, action: Action) -> Result<RolloutState, Illegal> {
        use RolloutState::*;
        let next = match (action, self) {
            (Action::Approve, WaitingForApproval) => Ready,
            (Action::Deny, WaitingForApproval) => ApprovalDenied,
            (Action::Start, Ready) => Starting,
            (Action::Pause, Running) => Paused,
            (Action::Resume, Paused) => Running,
            (Action::TriggerNextGroup, Running) => Running,
            // Stop ends whatever has not ended; a rollout that never started has nothing to
            // cancel.
            (Action::Stop, Creating | WaitingForApproval | Ready) => Stopped,
            (Action::Stop, Starting | Running | Paused) => Stopping,
            // A rollout that never handed out an operation goes at once; one that did first
            // cancels what is queued.
            (Action::Delete, Creating | WaitingForApproval | ApprovalDenied | Ready) => Deleted,
            (Action::Delete, Starting | Running | Paused | Stopping | Stopped | Finished) => Deleting,
            _ => return Err(Illegal { action: action.as_str(), state: self.as_str() }),
        };
        Ok(next)
    }

    /// The state the planner's `progress` leads to; `None` when it does not apply now (a
    /// report that arrives late, after a stop or a delete, changes nothing).
    pub fn advance(self, progress: Progress) -> Option<RolloutState> {
        use RolloutState::*;
        Some(match (progress, self) {
            (Progress::Created { approval_required: true }, Creating) => WaitingForApproval,
            (Progress::Created { approval_required: false }, Creating) => Ready,
            (Progress::Started, Starting) => Running,
            (Progress::PauseByCondition, Running | Starting) => Paused,
            (Progress::AllGroupsDone, Running | Starting) => Finished,
            (Progress::Stopped, Stopping) => Stopped,
            (Progress::Deleted, Deleting) => Deleted,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupState {
    Creating,
    Ready,
    /// Waiting for its turn.
    Scheduled,
    Running,
    Finished,
    /// Its error condition was met.
    Error,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Creating => "creating",
            GroupState::Ready => "ready",
            GroupState::Scheduled => "scheduled",
            GroupState::Running => "running",
            GroupState::Finished => "finished",
            GroupState::Error => "error",
        }
    }

    /// Its turn is over: the next group may run.
    pub fn is_done(self) -> bool {
        matches!(self, GroupState::Finished | GroupState::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (state, action) pair: the legal ones from hawkBit's rollout state machine, written
    /// out here as a table independent of `apply`, and every other pair refused with the
    /// state named.
    #[test]
    fn every_operator_transition_is_legal_exactly_as_hawkbit_allows_it() {
        use RolloutState::*;
        let legal: &[(Action, RolloutState, RolloutState)] = &[
            (Action::Approve, WaitingForApproval, Ready),
            (Action::Deny, WaitingForApproval, ApprovalDenied),
            (Action::Start, Ready, Starting),
            (Action::Pause, Running, Paused),
            (Action::Resume, Paused, Running),
            (Action::TriggerNextGroup, Running, Running),
            (Action::Stop, Creating, Stopped),
            (Action::Stop, WaitingForApproval, Stopped),
            (Action::Stop, Ready, Stopped),
            (Action::Stop, Starting, Stopping),
            (Action::Stop, Running, Stopping),
            (Action::Stop, Paused, Stopping),
            (Action::Delete, Creating, Deleted),
            (Action::Delete, WaitingForApproval, Deleted),
            (Action::Delete, ApprovalDenied, Deleted),
            (Action::Delete, Ready, Deleted),
            (Action::Delete, Starting, Deleting),
            (Action::Delete, Running, Deleting),
            (Action::Delete, Paused, Deleting),
            (Action::Delete, Stopping, Deleting),
            (Action::Delete, Stopped, Deleting),
            (Action::Delete, Finished, Deleting),
        ];
        let mut checked = 0;
        for action in Action::ALL {
            for state in RolloutState::ALL {
                let want = legal.iter().find(|(a, s, _)| *a == action && *s == state).map(|(_, _, to)| *to);
                match (state.apply(action), want) {
                    (Ok(got), Some(to)) => assert_eq!(got, to, "{} from {}", action.as_str(), state.as_str()),
                    (Err(e), None) => {
                        assert_eq!(
                            e.to_string(),
                            format!("cannot {} a rollout that is {}", action.as_str(), state.as_str())
                        );
                    }
                    (got, want) => panic!("{} from {}: got {got:?}, want {want:?}", action.as_str(), state.as_str()),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 8 * 12);
        // Final states take nothing but a delete (and deleted not even that).
        for state in RolloutState::ALL.into_iter().filter(|s| s.is_final()) {
            let allowed: Vec<Action> = Action::ALL.into_iter().filter(|a| state.apply(*a).is_ok()).collect();
            let want: &[Action] = if state == Deleted { &[] } else { &[Action::Delete] };
            assert_eq!(allowed, want, "{}", state.as_str());
        }
    }

    #[test]
    fn the_planners_progress_moves_only_the_states_it_belongs_to() {
        use RolloutState::*;
        let moves: &[(Progress, RolloutState, RolloutState)] = &[
            (Progress::Created { approval_required: true }, Creating, WaitingForApproval),
            (Progress::Created { approval_required: false }, Creating, Ready),
            (Progress::Started, Starting, Running),
            (Progress::PauseByCondition, Running, Paused),
            (Progress::PauseByCondition, Starting, Paused),
            (Progress::AllGroupsDone, Running, Finished),
            (Progress::AllGroupsDone, Starting, Finished),
            (Progress::Stopped, Stopping, Stopped),
            (Progress::Deleted, Deleting, Deleted),
        ];
        let all = [
            Progress::Created { approval_required: true },
            Progress::Created { approval_required: false },
            Progress::Started,
            Progress::PauseByCondition,
            Progress::AllGroupsDone,
            Progress::Stopped,
            Progress::Deleted,
        ];
        for p in all {
            for state in RolloutState::ALL {
                let want = moves.iter().find(|(q, s, _)| *q == p && *s == state).map(|(_, _, to)| *to);
                assert_eq!(state.advance(p), want, "{p:?} from {}", state.as_str());
            }
        }
    }
}
