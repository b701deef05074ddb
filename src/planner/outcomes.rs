//! How plans learn what became of their operations: the planner tells each watcher of an
//! origin kind (`rollout`, `action`) of every operation of that kind that ends, and each plan's
//! worker thread takes those reports in batches.

use super::{origin_kind, Operation, Planner};
use crate::engine::OpState;

/// An operation that reached a final state, as told to the plans that watch their origins'
/// outcomes ([`Planner::watch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub device: String,
    pub origin: String,
    pub seq: u64,
    pub state: OpState,
}

impl Ended {
    fn of(o: &Operation) -> Ended {
        Ended { device: o.device.clone(), origin: o.origin.clone(), seq: o.seq, state: o.state }
    }
}

/// How long a plan's worker waits for an outcome before it does its timed work anyway, and so
/// how soon it notices a shutdown.
pub const POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// The outcomes reported so far: waits up to `wait` for the first. `None` once the planner
/// is gone.
pub(crate) fn next_batch(
    events: &std::sync::Mutex<std::sync::mpsc::Receiver<Ended>>,
    wait: std::time::Duration,
) -> Option<Vec<Ended>> {
    let rx = events.lock().unwrap_or_else(|e| e.into_inner());
    match rx.recv_timeout(wait) {
        Ok(first) => Some(std::iter::once(first).chain(rx.try_iter()).collect()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Some(Vec::new()),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
    }
}

/// Runs a plan's worker on its own thread until `stop`: `step(POLL)` handles one batch of
/// outcomes (waiting up to POLL for it) and its timed work; `None` ends the worker, an error
/// is logged and the worker goes on.
pub(crate) fn spawn_worker(
    name: &'static str,
    stop: tokio_util::sync::CancellationToken,
    step: impl Fn(std::time::Duration) -> Option<Result<(), String>> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !stop.is_cancelled() {
                match step(POLL) {
                    None => return,
                    Some(Err(e)) => tracing::error!(error = %e, "{name}: handling outcomes failed"),
                    Some(Ok(())) => {}
                }
            }
        })
        .expect("a thread starts")
}

impl Planner {
    /// Tells the receiver of every operation of origin kind `kind` (e.g. `rollout`) that
    /// reaches a final state — succeeded, failed, timed out, canceled (also when its device is
    /// deleted) — once, after the state is written. Sending never blocks, so a watcher may
    /// queue operations while it handles what it is told.
    pub fn watch(&self, kind: &'static str) -> std::sync::mpsc::Receiver<Ended> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.watchers.write().unwrap_or_else(|e| e.into_inner()).push((kind, tx));
        rx
    }

    /// Tells the watchers of each of `ended`'s kinds.
    pub(super) fn tell<'a>(&self, ended: impl IntoIterator<Item = &'a Operation>) {
        let watchers = self.watchers.read().unwrap_or_else(|e| e.into_inner());
        if watchers.is_empty() {
            return;
        }
        for o in ended {
            let kind = origin_kind(&o.origin);
            for (_, tx) in watchers.iter().filter(|(k, _)| *k == kind) {
                // A watcher that has gone away has nothing left to learn.
                let _ = tx.send(Ended::of(o));
            }
        }
    }
}
