//! FAS's execute phase: an action's operations through the operation queue, one action
//! running at a time (the others `blocked`, first come first served), one transfer per xname
//! at a time (the queue's own rule), the action's time limit, abort.
//!
//! The action record and its plan are written once, when it is created; where each operation
//! stands is the planner's record of it (origin `action:ID`, the target as its component), so
//! a restart loses nothing and counts nothing twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::model::{ActionRequest, ImageRecord, OperationState, PlannedOperation, Xname};
use super::plan::{plan, PlanError};
use super::snapshot::{capture, parse_time, restore_plan, Snapshot, SnapshotRequest};
use crate::engine::OpState;
use crate::firmware::Firmware;
use crate::fleet::Fleet;
use crate::planner::{Ended, Planner, PlannerError, ASSIGN_WEIGHT};
use crate::store::{Cf, Store, StoreError};

const ORIGIN_PREFIX: &str = "action:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ActionState {
    New,
    Configured,
    /// Waiting for the running action to end.
    Blocked,
    Running,
    Completed,
    AbortSignaled,
    Aborted,
}

impl ActionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionState::New => "new",
            ActionState::Configured => "configured",
            ActionState::Blocked => "blocked",
            ActionState::Running => "running",
            ActionState::Completed => "completed",
            ActionState::AbortSignaled => "abortSignaled",
            ActionState::Aborted => "aborted",
        }
    }
}

/// An action as stored: its request, its plan, where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    #[serde(rename = "actionID")]
    pub action_id: String,
    pub state: ActionState,
    /// Planned and reported, nothing changed.
    pub dryrun: bool,
    pub request: ActionRequest,
    /// The plan, as made at creation (live states: [`Actions::operations`]).
    pub operations: Vec<PlannedOperation>,
    pub create_time: u64,
    /// The snapshot a restore puts back: its plan is made from it again when it starts after
    /// waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<u64>,
    pub order: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("no action {0}")]
    NotFound(String),
    #[error("action {id} is {state}: only a blocked or running action can be aborted")]
    NotAbortable { id: String, state: &'static str },
    #[error("action {id} is {state}: only a completed or aborted action can be deleted (abort it first)")]
    NotDeletable { id: String, state: &'static str },
    #[error("{0}")]
    Invalid(String),
    #[error("no snapshot {0}")]
    NoSnapshot(String),
    #[error("no operation {0}")]
    NoOperation(String),
    #[error("snapshot {0} already exists")]
    SnapshotExists(String),
    #[error("snapshot {0} has expired and may not be restored")]
    Expired(String),
    #[error(transparent)]
    Planner(#[from] PlannerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn origin(id: &str) -> String {
    format!("{ORIGIN_PREFIX}{id}")
}

/// The FAS state of a pushed operation, from the planner's state of it.
fn live_state(op: &crate::planner::Operation, sibling_in_flight: bool) -> OperationState {
    match op.state {
        OpState::Pending if sibling_in_flight => OperationState::Blocked,
        OpState::Pending => OperationState::Configured,
        OpState::Downloading => OperationState::InProgress,
        OpState::Swapping => OperationState::Verifying,
        OpState::Succeeded => OperationState::Succeeded,
        OpState::Failed | OpState::TimedOut => OperationState::Failed,
        OpState::Canceled => OperationState::Aborted,
    }
}

#[derive(Default)]
struct Book {
    actions: BTreeMap<String, Action>,
    /// Per running action, how many of its pushed operations have not ended.
    open: HashMap<String, usize>,
    /// Actions waiting to run (configured or blocked), by creation order: what runs next is
    /// found without walking every action ever made.
    waiting: BTreeSet<(u64, String)>,
}

fn waits(a: &Action) -> bool {
    matches!(a.state, ActionState::Configured | ActionState::Blocked)
}

pub struct Actions {
    store: Store,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    book: Mutex<Book>,
    events: Mutex<Receiver<Ended>>,
    /// The second the image time limits were last checked: limits are in seconds, so once a
    /// second is enough (the worker wakes five times a second).
    stages_checked: std::sync::atomic::AtomicU64,
    /// How long a dry run is kept after it was made (seconds).
    keep_dry_runs: u64,
    /// The minute dry runs were last looked at for expiry.
    dry_runs_checked: std::sync::atomic::AtomicU64,
}

impl Actions {
    /// Loads actions, counts what each running one still waits for from the operations, and
    /// moves on what a crash interrupted (an ended action's successor, an abort).
    pub fn open(
        store: Store,
        fleet: Arc<Fleet>,
        firmware: Arc<Firmware>,
        planner: Arc<Planner>,
        now: u64,
    ) -> Result<Actions, ActionError> {
        let events = planner.watch("action");
        let mut book = Book::default();
        for a in store.load_all::<Action>(Cf::Actions)? {
            if !a.dryrun && !matches!(a.state, ActionState::Completed | ActionState::Aborted) {
                planner.pin(&origin(&a.action_id));
            }
            if waits(&a) {
                book.waiting.insert((a.order, a.action_id.clone()));
            }
            book.actions.insert(a.action_id.clone(), a);
        }
        let actions = Actions {
            store,
            fleet,
            firmware,
            planner,
            book: Mutex::new(book),
            events: Mutex::new(events),
            stages_checked: Default::default(),
            keep_dry_runs: retention::DRY_RUN_KEEP_SECS,
            dry_runs_checked: Default::default(),
        };
        let mut book = actions.lock();
        let running: Vec<String> = book
            .actions
            .values()
            .filter(|a| matches!(a.state, ActionState::Running | ActionState::AbortSignaled))
            .map(|a| a.action_id.clone())
            .collect();
        for id in running {
            let open = actions.unfinished(&id);
            book.open.insert(id.clone(), open);
            if book.actions[&id].state == ActionState::AbortSignaled {
                actions.abort_now(&mut book, &id, now)?;
            }
        }
        actions.settle(&mut book, now)?;
        drop(book);
        Ok(actions)
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, a: &Action) -> Result<(), ActionError> {
        let mut b = self.store.batch();
        b.put_json(Cf::Actions, a.action_id.as_bytes(), a)?;
        b.commit()?;
        Ok(())
    }

    /// How many of an action's operations in the planner have not ended.
    fn unfinished(&self, id: &str) -> usize {
        let origin = origin(id);
        let mut n = 0;
        self.planner.scan(|o| {
            if o.origin == origin && !o.state.is_terminal() {
                n += 1;
            }
        });
        n
    }

    /// The registry's xnames and the images with a FAS identity, as the planner reads them.
    fn inputs(&self) -> (Vec<Xname>, Vec<ImageRecord>) {
        let images: Vec<ImageRecord> = self.firmware.list().iter().filter_map(|m| ImageRecord::of(m)).collect();
        let devices = self.fleet.list(None, usize::MAX).iter().map(Xname::of).collect::<Vec<_>>();
        (devices, images)
    }

    /// Plans an action over the registry and the images with a FAS identity; a dry run ends
    /// there (completed, its plan the answer), a live one runs now or waits for the running
    /// one.
    pub fn create(&self, req: ActionRequest, now: u64) -> Result<Action, ActionError> {
        let (devices, images) = self.inputs();
        let operations = plan(&req, devices, &images)?;
        self.create_planned(req, operations, None, now)
    }

    fn create_planned(
        &self,
        req: ActionRequest,
        mut operations: Vec<PlannedOperation>,
        restore: Option<String>,
        now: u64,
    ) -> Result<Action, ActionError> {
        let mut book = self.lock();
        let order = book.actions.values().map(|a| a.order).max().unwrap_or(0) + 1;
        let dryrun = !req.command.override_dryrun;
        let action_id = new_id();
        for (i, op) in operations.iter_mut().enumerate() {
            op.operation_id = format!("{action_id}-{i}");
        }
        let mut a = Action {
            action_id,
            state: if dryrun { ActionState::Completed } else { ActionState::Configured },
            dryrun,
            request: req,
            operations,
            create_time: now,
            restore,
            start_time: None,
            end_time: dryrun.then_some(now),
            order,
        };
        if !dryrun && book.actions.values().any(|o| matches!(o.state, ActionState::Running | ActionState::Blocked)) {
            a.state = ActionState::Blocked;
        }
        if !dryrun {
            // Its operations' outcomes are counted until it ends: kept out of trimming.
            self.planner.pin(&origin(&a.action_id));
        }
        self.put(&a)?;
        info!(action = %a.action_id, operations = a.operations.len(), dryrun, state = a.state.as_str(), "action created");
        let id = a.action_id.clone();
        if waits(&a) {
            book.waiting.insert((a.order, id.clone()));
        }
        book.actions.insert(id.clone(), a);
        self.settle(&mut book, now)?;
        Ok(book.actions[&id].clone())
    }

    /// Records what every target of the chosen xnames runs now.
    pub fn snapshot(&self, req: SnapshotRequest, now: u64) -> Result<Snapshot, ActionError> {
        if !crate::planner::valid_name(&req.name) {
            return Err(ActionError::Invalid(format!(
                "snapshot name {:?}: 1 to 64 of letters, digits and -_.",
                req.name
            )));
        }
        let expiration_time =
            req.expiration_time.as_deref().map(parse_time).transpose().map_err(ActionError::Invalid)?;
        if self.store.get(Cf::Snapshots, req.name.as_bytes())?.is_some() {
            return Err(ActionError::SnapshotExists(req.name));
        }
        let (devices, images) = self.inputs();
        let snap = Snapshot {
            name: req.name.clone(),
            capture_time: now,
            expiration_time,
            devices: capture(&req, devices, &images),
        };
        let mut b = self.store.batch();
        b.put_json(Cf::Snapshots, snap.name.as_bytes(), &snap)?;
        b.commit()?;
        info!(snapshot = %snap.name, devices = snap.devices.len(), "snapshot taken");
        Ok(snap)
    }

    pub fn snapshots(&self) -> Result<Vec<Snapshot>, ActionError> {
        Ok(self.store.load_all::<Snapshot>(Cf::Snapshots)?)
    }

    pub fn get_snapshot(&self, name: &str) -> Result<Snapshot, ActionError> {
        self.store.get_json(Cf::Snapshots, name.as_bytes())?.ok_or_else(|| ActionError::NoSnapshot(name.into()))
    }

    pub fn delete_snapshot(&self, name: &str) -> Result<(), ActionError> {
        self.get_snapshot(name)?;
        let mut b = self.store.batch();
        b.delete(Cf::Snapshots, name.as_bytes());
        b.commit()?;
        Ok(())
    }

    /// An action that puts a snapshot back (a dry run unless `override_dryrun`), and the
    /// xnames skipped because they were removed since.
    pub fn restore(
        &self,
        name: &str,
        override_dryrun: bool,
        time_limit: Option<u64>,
        now: u64,
    ) -> Result<(Action, Vec<String>), ActionError> {
        let snap = self.get_snapshot(name)?;
        if snap.expiration_time.is_some_and(|t| t <= now) {
            return Err(ActionError::Expired(name.into()));
        }
        let (devices, _) = self.inputs();
        let (operations, skipped) = restore_plan(&snap, &devices);
        let mut req = ActionRequest::default();
        req.command.override_dryrun = override_dryrun;
        req.command.time_limit = time_limit.unwrap_or(req.command.time_limit);
        req.command.description = format!("restore snapshot {name}");
        req.state_component_filter.xnames = snap.devices.iter().map(|d| d.xname.clone()).collect();
        let a = self.create_planned(req, operations, Some(name.to_owned()), now)?;
        Ok((a, skipped))
    }

    /// Starts the oldest waiting action when none runs, and ends a running one whose
    /// operations have all ended (then starts the next).
    fn settle(&self, book: &mut Book, now: u64) -> Result<(), ActionError> {
        loop {
            let running = book.open.keys().find(|id| book.actions[*id].state == ActionState::Running).cloned();
            if let Some(id) = running {
                if book.open.get(&id).copied().unwrap_or(0) > 0 {
                    return Ok(());
                }
                let a = book.actions.get_mut(&id).expect("listed");
                a.state = ActionState::Completed;
                a.end_time = Some(now);
                let a = a.clone();
                self.put(&a)?;
                book.open.remove(&id);
                self.planner.unpin(&origin(&id));
                info!(action = %id, "action completed");
                continue;
            }
            let Some((_, id)) = book.waiting.first().cloned() else { return Ok(()) };
            self.start(book, &id, now)?;
        }
    }

    /// Runs an action: its state and every operation that may run queued in one step (the
    /// queue lets one transfer per device go at a time, so siblings wait their turn). A crash
    /// before the step's commit leaves the action waiting, and open starts it again; after it,
    /// running with all its operations queued.
    /// An action that waited for another is planned again first: FAS plans against what the
    /// devices run when it starts, and the action before it may have changed that.
    fn start(&self, book: &mut Book, id: &str, now: u64) -> Result<(), ActionError> {
        let mut a = book.actions.get(id).expect("caller checked").clone();
        if a.state == ActionState::Blocked {
            a.operations = self.replan(&a)?;
        }
        a.state = ActionState::Running;
        a.start_time = Some(now);
        let origin = origin(id);
        let mut step = self.planner.step();
        let mut pushed = 0;
        for op in
            a.operations.iter().filter(|o| matches!(o.state, OperationState::Configured | OperationState::Blocked))
        {
            let Some(image) = op.to_image_id.as_deref() else { continue };
            let (name, version) = image.split_once('@').unwrap_or((image, ""));
            let Some(meta) = self.firmware.get(name, version) else {
                warn!(action = id, image, "the planned image is gone: operation not queued");
                continue;
            };
            let expect = op.to_firmware_version.as_deref().unwrap_or(&meta.version);
            if !self.fleet.contains(&op.xname) {
                warn!(action = id, xname = %op.xname, "the device was deleted: operation not queued");
                continue;
            }
            step.push_expecting(&op.xname, &op.target, &meta, expect, ASSIGN_WEIGHT, &origin, now);
            pushed += 1;
        }
        step.batch().put_json(Cf::Actions, a.action_id.as_bytes(), &a)?;
        step.commit()?;
        book.waiting.remove(&(a.order, id.to_owned()));
        book.actions.insert(id.to_owned(), a);
        book.open.insert(id.to_owned(), pushed);
        info!(action = id, operations = pushed, "action running");
        Ok(())
    }

    /// An action's plan made again over the registry as it is now: a restore from its
    /// snapshot, any other from its request. Operation ids stay of the form `ACTIONID-N`.
    fn replan(&self, a: &Action) -> Result<Vec<PlannedOperation>, ActionError> {
        let (devices, images) = self.inputs();
        let mut operations = match &a.restore {
            Some(name) => restore_plan(&self.get_snapshot(name)?, &devices).0,
            None => plan(&a.request, devices, &images)?,
        };
        for (i, op) in operations.iter_mut().enumerate() {
            op.operation_id = format!("{}-{i}", a.action_id);
        }
        Ok(operations)
    }

    /// Counts ended operations; an action whose last one ended completes and the next starts.
    /// Then ends the operations of a running action whose time limit has passed.
    pub fn handle_outcomes(&self, batch: &[Ended], now: u64) -> Result<(), ActionError> {
        let mut book = self.lock();
        for e in batch {
            if let Some(n) = e.origin.strip_prefix(ORIGIN_PREFIX).and_then(|id| book.open.get_mut(id)) {
                *n = n.saturating_sub(1);
            }
        }
        let late: Vec<(String, u64)> = book
            .open
            .keys()
            .map(|id| &book.actions[id])
            .filter(|a| a.state == ActionState::Running)
            .filter(|a| a.start_time.is_some_and(|t| now >= t + a.request.command.time_limit))
            .map(|a| (a.action_id.clone(), a.request.command.time_limit))
            .collect();
        for (id, limit) in late {
            let origin = origin(&id);
            let mut open = Vec::new();
            self.planner.scan(|o| {
                if o.origin == origin && !o.state.is_terminal() {
                    open.push((o.device.clone(), o.seq));
                }
            });
            // Each one ended here is reported like any other ending, and counted when that
            // report is handled.
            for (device, seq) in open {
                self.planner.expire(&device, seq, &format!("the action's time limit of {limit} s passed"), now)?;
            }
        }
        self.expire_slow_stages(&book, now)?;
        self.settle(&mut book, now)?;
        self.expire_dry_runs(&mut book, now)
    }

    /// Ends the operations of running actions that have spent longer than their image's
    /// `timeLimit` in the stage they are in: downloading (since the first WRITE), or waiting
    /// for the device to come back on the new version (since SWAP). Ended like any other
    /// operation: counted when the report of it is handled.
    fn expire_slow_stages(&self, book: &Book, now: u64) -> Result<(), ActionError> {
        if self.stages_checked.swap(now, std::sync::atomic::Ordering::Relaxed) == now {
            return Ok(());
        }
        let limits: HashMap<String, u64> =
            self.firmware.list().iter().filter_map(|m| Some((m.id(), m.identity.as_ref()?.time_limit?))).collect();
        let running: HashSet<String> = book
            .open
            .keys()
            .filter(|id| book.actions[*id].state == ActionState::Running)
            .map(|id| origin(id))
            .collect();
        if limits.is_empty() || running.is_empty() {
            return Ok(());
        }
        let mut late = Vec::new();
        self.planner.scan(|o| {
            let stage = match o.state {
                OpState::Downloading => "while downloading",
                OpState::Swapping => "while waiting for the device to come back after SWAP",
                _ => return,
            };
            let Some(&limit) = limits.get(&o.image) else { return };
            if running.contains(&o.origin) && now >= o.updated_at.saturating_add(limit) {
                late.push((o.device.clone(), o.seq, format!("{}'s time limit of {limit} s passed {stage}", o.image)));
            }
        });
        for (device, seq, why) in late {
            self.planner.expire(&device, seq, &why, now)?;
        }
        Ok(())
    }

    /// Handles what the planner reported so far (the gateway's worker does this as outcomes
    /// arrive; tests call it).
    pub fn pump(&self, now: u64) -> Result<usize, ActionError> {
        let batch: Vec<Ended> = self.events.lock().unwrap_or_else(|e| e.into_inner()).try_iter().collect();
        self.handle_outcomes(&batch, now)?;
        Ok(batch.len())
    }

    /// Runs the actions' worker on its own thread until `stop`: outcomes handled as they
    /// arrive, time limits checked at least every [`crate::planner::POLL`].
    pub fn spawn(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        crate::planner::spawn_worker("actions", stop, move |wait| {
            let batch = crate::planner::next_batch(&me.events, wait)?;
            Some(me.handle_outcomes(&batch, crate::now_secs()).map_err(|e| e.to_string()))
        })
    }

    /// Aborts a blocked or running action: what has not started is withdrawn, devices
    /// mid-transfer are told SYNC at their next Status.
    pub fn abort(&self, id: &str, now: u64) -> Result<Action, ActionError> {
        let mut book = self.lock();
        let a = book.actions.get_mut(id).ok_or_else(|| ActionError::NotFound(id.into()))?;
        if !matches!(a.state, ActionState::Blocked | ActionState::Running | ActionState::Configured) {
            return Err(ActionError::NotAbortable { id: id.into(), state: a.state.as_str() });
        }
        a.state = ActionState::AbortSignaled;
        let a = a.clone();
        self.put(&a)?;
        book.waiting.remove(&(a.order, id.to_owned()));
        self.abort_now(&mut book, id, now)?;
        self.settle(&mut book, now)?;
        Ok(book.actions[id].clone())
    }

    fn abort_now(&self, book: &mut Book, id: &str, now: u64) -> Result<(), ActionError> {
        let origin = origin(id);
        let n = self.planner.cancel_origins(|o| o == origin, now)?;
        let a = book.actions.get_mut(id).expect("caller checked");
        a.state = ActionState::Aborted;
        a.end_time = Some(now);
        let a = a.clone();
        self.put(&a)?;
        book.open.remove(id);
        self.planner.unpin(&origin);
        info!(action = id, operations = n, "action aborted");
        Ok(())
    }

    /// One operation as it stands now, by its id (`ACTIONID-N`).
    pub fn operation(&self, operation_id: &str) -> Result<PlannedOperation, ActionError> {
        let missing = || ActionError::NoOperation(operation_id.into());
        let (action, n) = operation_id.rsplit_once('-').ok_or_else(missing)?;
        let n: usize = n.parse().map_err(|_| missing())?;
        let ops = self.operations(action).map_err(|_| missing())?;
        ops.into_iter().nth(n).ok_or_else(missing)
    }

    pub fn get(&self, id: &str) -> Option<Action> {
        self.lock().actions.get(id).cloned()
    }

    /// Actions in creation order.
    pub fn list(&self) -> Vec<Action> {
        let mut v: Vec<Action> = self.lock().actions.values().cloned().collect();
        v.sort_by_key(|a| a.order);
        v
    }

    /// An action's operations as they stand now: planned states for what was never queued,
    /// the planner's record for the rest (an operation waiting behind a sibling in flight is
    /// `blocked`).
    pub fn operations(&self, id: &str) -> Result<Vec<PlannedOperation>, ActionError> {
        let a = self.get(id).ok_or_else(|| ActionError::NotFound(id.into()))?;
        if a.dryrun || a.start_time.is_none() {
            return Ok(a.operations);
        }
        let origin = origin(id);
        let mut out = a.operations;
        for op in out.iter_mut().filter(|o| matches!(o.state, OperationState::Configured | OperationState::Blocked)) {
            let ops = self.planner.operations_of(&op.xname);
            let mine = ops.iter().filter(|o| o.origin == origin && o.component == op.target).max_by_key(|o| o.seq);
            match mine {
                Some(o) => {
                    let busy = ops.iter().any(|s| s.state.in_flight() && s.seq != o.seq);
                    op.state = live_state(o, busy);
                    op.state_helper = o.detail.clone().unwrap_or_default();
                }
                // Never queued (its image or device went away), or its record aged out of
                // the queue's history.
                None if a.state == ActionState::Aborted => op.state = OperationState::Aborted,
                None => {}
            }
        }
        Ok(out)
    }
}

/// A random id shaped like FAS's UUIDs.
fn new_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[path = "audit.rs"]
mod audit;

#[path = "retention.rs"]
mod retention;
pub use retention::DRY_RUN_KEEP_SECS;
