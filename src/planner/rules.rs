//! Rules the simulator can break on purpose (`fwgate sim --break RULE`), to show that each
//! invariant it checks catches the bug that breaking its rule makes — FoundationDB's
//! "buggify", switched off unless a simulation asks. Process-wide: only `fwgate sim` and the
//! simulator's own test binary turn one on.

use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rule {
    /// At most one transfer per device: a second component starts while one is in flight.
    OneTransfer,
    /// Admission where blocks are served: an image refused for the device is served anyway.
    Admission,
    /// One batch per plan step: a step writes its operations and its plan's records in two
    /// batches.
    AtomicStep,
    /// A deleted member's leaving is stored with its deletion: it is only remembered.
    LeftStored,
    /// A rollout finishes only when every member has ended: it finishes when no group is left
    /// to start.
    FinishSettled,
    /// Cluster mode: the planner clears deleted devices' views again when it or a node
    /// (re)connects — it does not (a node that was away keeps a deleted device's view).
    TombstoneReplay,
    /// Cluster mode: a node answers WAIT past its view's trust deadline — it serves on.
    TrustDeadline,
}

impl Rule {
    pub const ALL: [Rule; 7] = [
        Rule::OneTransfer,
        Rule::Admission,
        Rule::AtomicStep,
        Rule::LeftStored,
        Rule::FinishSettled,
        Rule::TombstoneReplay,
        Rule::TrustDeadline,
    ];

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

static BROKEN: AtomicU32 = AtomicU32::new(0);

/// Whether `rule` is broken now (never, outside a simulation that asked).
#[inline]
pub fn broken(rule: Rule) -> bool {
    BROKEN.load(Ordering::Relaxed) & rule.bit() != 0
}

/// Breaks `rule` (or mends it) for the whole process.
#[doc(hidden)]
pub fn set_broken(rule: Rule, on: bool) {
    if on {
        BROKEN.fetch_or(rule.bit(), Ordering::SeqCst);
    } else {
        BROKEN.fetch_and(!rule.bit(), Ordering::SeqCst);
    }
}
