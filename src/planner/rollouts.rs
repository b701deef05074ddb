//! hawkBit-style rollouts (issue 13): a filtered set of devices split into deployment groups
//! that start one after another while their success conditions hold, and stop the whole
//! rollout when a group's error condition is met. Built so far: the state machines
//! ([`state`]), and how devices are split into groups and a group's conditions evaluated
//! ([`groups`]). Not yet: the stored rollout, its operations through the queue, the API and the
//! CLI.

pub mod groups;
pub mod state;

pub use groups::{split_defined, split_evenly, Conditions, Counts, ErrorThreshold, GroupSpec, SuccessAction, Verdict};
pub use state::{Action, GroupState, Illegal, Progress, RolloutState};
