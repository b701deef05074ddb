//! Who gets what and when: a queue of operations per device that every planning feature
//! feeds — an operator's direct assignment, and [`waves`] — served one at a time per device
//! by the DFU step, which moves the head through its states; a sweeper times out silent ones.
//!
//! Every transition is written to the store before it is acknowledged anywhere.

pub mod actions;
mod admission;
mod audit;
mod deletion;
mod outcomes;
mod registration;
mod remote;
pub mod rollouts;
pub mod rules;
mod step;
pub mod waves;

pub use deletion::delete_device;
pub use registration::{finish_registrations, register_devices, RegisterError};
pub use step::Step;

pub(crate) use outcomes::{next_batch, spawn_worker};
pub use outcomes::{Ended, POLL};

pub use admission::Denial;

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::engine::{timed_out, OpState};
use crate::firmware::{Firmware, FirmwareError, ImageMeta};
use crate::fleet::{Fleet, FleetError};
use crate::store::{Cf, Store, StoreError};
use crate::tuf::Trust;

#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("no device {0}")]
    UnknownDevice(String),
    #[error("no image {0}")]
    UnknownImage(String),
    #[error("image reference {0:?} is not NAME@VERSION")]
    BadImageRef(String),
    #[error("image {image} is for hardware {wanted:?}, device {device} is {actual:?}")]
    Hardware { image: String, device: String, wanted: Vec<String>, actual: Option<String> },
    #[error("{0}")]
    NotAdmissible(String),
    #[error("device {device} has an operation in flight ({state}); wait for it to finish or time out")]
    InFlight { device: String, state: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
}

/// The operations map's hasher: keys are registered device ids, not chosen by devices.
type Fixed = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Weight of an operator's direct assignment: ahead of everything a plan queued.
pub const ASSIGN_WEIGHT: u16 = 1000;
/// Where a direct assignment comes from.
pub const ASSIGN_ORIGIN: &str = "assign";
/// Finished operations kept per (device, component) as history; older ones are deleted.
pub const MAX_HISTORY: usize = 8;

fn default_weight() -> u16 {
    ASSIGN_WEIGHT
}

fn default_origin() -> String {
    ASSIGN_ORIGIN.into()
}

/// One (device, component, image) update, in its device's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    /// Unique and increasing: FIFO order among equal weights.
    #[serde(default)]
    pub seq: u64,
    pub device: String,
    pub component: String,
    /// 0–1000; the highest queued weight goes first.
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// Who queued it: `assign`, or the plan (e.g. a wave) that did.
    #[serde(default = "default_origin")]
    pub origin: String,
    /// NAME@VERSION.
    pub image: String,
    pub version: String,
    pub length: u64,
    pub state: OpState,
    /// The offset the device last reported (in memory between transitions).
    pub offset: u32,
    pub created_at: u64,
    /// When the state last changed.
    pub updated_at: u64,
    /// When the device last sent a Status for this operation.
    pub last_activity: u64,
    /// Why it ended, for failed and timed-out operations.
    #[serde(default)]
    pub detail: Option<String>,
    /// The sha256 (hex) of the image whose bytes this operation has served: a device resumes
    /// at its offset only into the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl Operation {
    /// Moves the operation to a final state at `now`, saying why.
    fn end(&mut self, state: OpState, detail: String, now: u64) {
        self.state = state;
        self.updated_at = now;
        self.detail = Some(detail);
    }

    /// Bytes written so far as a percentage of the image.
    pub fn progress_percent(&self) -> f64 {
        match self.state {
            OpState::Swapping | OpState::Succeeded => 100.0,
            _ if self.length == 0 => 0.0,
            _ => (self.offset as f64 * 100.0 / self.length as f64).min(100.0),
        }
    }
}

/// The kind of an origin: `wave` for `wave:NAME`, the whole origin when it has no `:`.
pub fn origin_kind(origin: &str) -> &str {
    origin.split_once(':').map_or(origin, |(kind, _)| kind)
}

/// A plan's name (a wave, a rollout): 1 to 64 letters, digits and `-_.`.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn op_key(op: &Operation) -> String {
    format!("{}\0{}\0{:016x}", op.device, op.component, op.seq)
}

/// The key records had before operations were queued: one per (device, component).
fn legacy_key(op: &Operation) -> String {
    format!("{}\0{}", op.device, op.component)
}

/// Which of a device's operations the DFU engine serves for `component`: the one in flight;
/// else, unless another component of the device is in flight, the queued one of the highest
/// weight, oldest first; else the latest finished one (so its outcome keeps being answered).
/// `Err(i)` when the component's queued operation `i` must wait for another one's transfer.
fn head(ops: &[Operation], component: &str) -> Result<Option<usize>, usize> {
    let mine = || ops.iter().enumerate().filter(move |(_, o)| o.component == component);
    if let Some((i, _)) = mine().find(|(_, o)| o.state.in_flight()) {
        return Ok(Some(i));
    }
    let queued = mine()
        .filter(|(_, o)| o.state == OpState::Pending)
        .max_by(|(_, a), (_, b)| a.weight.cmp(&b.weight).then(b.seq.cmp(&a.seq)));
    if let Some((i, _)) = queued {
        if ops.iter().any(|o| o.state.in_flight()) && !rules::broken(rules::Rule::OneTransfer) {
            return Err(i);
        }
        return Ok(Some(i));
    }
    Ok(mine().max_by_key(|(_, o)| o.seq).map(|(i, _)| i))
}

/// What a transport needs to run one DFU step: the head operation and its image, hot.
pub struct ActiveOp<I = Bytes> {
    pub seq: u64,
    pub state: OpState,
    pub meta: Arc<ImageMeta>,
    /// The image's bytes; `()` in what a planner tells data-plane nodes, which fetch them by
    /// digest.
    pub image: I,
    /// Whether a device may resume at the offset it reports: the bytes it holds are this
    /// image's (the last bytes served to this component were of the same sha256).
    pub resume: bool,
    /// The last bytes served to this component were of another image (so a device's offset
    /// for this version may be another image's); false also when none were served.
    pub foreign: bool,
    /// The version the device reports once it runs the image: the image's label, or what a
    /// FAS identity says it reports (`firmwareVersion`).
    pub version: String,
}

/// The answer to "what should this device's component get now".
pub enum Lookup<I = Bytes> {
    /// Nothing queued or finished for the component.
    Nothing,
    /// The head operation's image may not reach this device (not an admissible TUF target for
    /// its class, or a downgrade): the operation has failed with this reason.
    Refused(String),
    /// Queued, but another component of the device is being transferred: at most one
    /// operation per device is in flight. With the seconds the queued image asks a waiting
    /// device to come back after (its FAS `pollingSpeedSeconds`), if it says.
    Wait(Option<u32>),
    /// The head operation's image is not admissible for a passing reason (TUF metadata
    /// expired or not verified yet): the operation stays as it is and the device waits.
    Held(String),
    Active(ActiveOp<I>),
}

pub struct Planner {
    store: Store,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    /// Per device, its operations (queued, in flight, and recent history); the map entry is
    /// the device's lock. A fixed hasher and shard count: the order of a pass over every
    /// device is the same in every run, so a simulation replays exactly from its seed.
    ops: DashMap<String, Vec<Operation>, Fixed>,
    op_timeout_secs: u64,
    next_seq: std::sync::atomic::AtomicU64,
    /// Which images may reach which class of device.
    trust: Arc<Trust>,
    allow_downgrade: bool,
    /// Devices whose head operation waits for trust: the operation's seq and why.
    held: DashMap<String, (u64, String)>,
    /// Operations that started waiting for trust, since start.
    holds: std::sync::atomic::AtomicU64,
    /// Who is told when an operation of an origin kind ends (see [`Planner::watch`]).
    watchers: std::sync::RwLock<Vec<(&'static str, std::sync::mpsc::Sender<Ended>)>>,
    /// Told of every device whose operations changed, when data-plane nodes are fed.
    changes: std::sync::OnceLock<Arc<crate::fleet::changes::Changes>>,
    /// Writers of one device's operations hold it shared, taken before the device's entry; a
    /// [`Step`] over many devices holds it exclusively, so its one batch is never interleaved
    /// with another writer's change of a device it touches.
    gate: parking_lot::RwLock<()>,
    /// Plans whose operations' outcomes are still counted (`rollout:NAME`, `action:ID`):
    /// their operations are kept beyond [`MAX_HISTORY`], so a recount after a restart finds
    /// every one (see [`Planner::pin`]).
    pinned: std::sync::RwLock<std::collections::HashSet<String>>,
    /// No sequence number below this is ever handed out again: stored (`Meta`, [`SEQ_KEY`])
    /// in the batch of any commit that uses one at or above it.
    seq_mark: std::sync::atomic::AtomicU64,
}

/// Where the sequence numbers' high-water mark is stored: a deleted device's or trimmed
/// operation's number is never reused after a restart.
const SEQ_KEY: &[u8] = b"ops.next_seq";
/// How far ahead of the sequence numbers in use the stored mark is moved, so it is written
/// once per this many operations.
const SEQ_STRIDE: u64 = 1024;

impl Planner {
    /// Loads operations. In-flight ones get a fresh time limit from `now`: while the gateway
    /// was down their devices could not report.
    pub fn open(
        store: Store,
        fleet: Arc<Fleet>,
        firmware: Arc<Firmware>,
        op_timeout_secs: u64,
        now: u64,
    ) -> Result<Planner, PlannerError> {
        let ops: DashMap<String, Vec<Operation>, Fixed> = DashMap::with_hasher_and_shard_amount(Fixed::default(), 64);
        let mut loaded = store.load_all::<Operation>(Cf::Ops)?;
        let mark = store
            .get(Cf::Meta, SEQ_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut next_seq = (loaded.iter().map(|o| o.seq).max().unwrap_or(0) + 1).max(mark);
        // Records from before the queue have no sequence number: give them one, under the
        // new key, in one batch with the removal of the old key.
        let mut migrate = store.batch();
        for op in loaded.iter_mut().filter(|o| o.seq == 0) {
            migrate.delete(Cf::Ops, legacy_key(op).as_bytes());
            op.seq = next_seq;
            next_seq += 1;
            migrate.put_json(Cf::Ops, op_key(op).as_bytes(), &*op)?;
        }
        if !migrate.is_empty() {
            migrate.commit()?;
        }
        for mut op in loaded {
            if op.state.in_flight() {
                op.last_activity = op.last_activity.max(now);
            }
            ops.entry(op.device.clone()).or_default().push(op);
        }
        for mut e in ops.iter_mut() {
            e.sort_by(|a, b| (&a.component, a.seq).cmp(&(&b.component, b.seq)));
        }
        Ok(Planner {
            store,
            fleet,
            firmware,
            ops,
            op_timeout_secs,
            next_seq: next_seq.into(),
            trust: Arc::new(Trust::none()),
            allow_downgrade: false,
            held: DashMap::new(),
            holds: 0.into(),
            watchers: Default::default(),
            changes: Default::default(),
            gate: Default::default(),
            pinned: Default::default(),
            seq_mark: mark.max(next_seq).into(),
        })
    }

    /// Sets which TUF targets are admissible (default: none for production devices, anything
    /// for CI devices) and whether downgrades are served.
    pub fn with_trust(mut self, trust: Arc<Trust>, allow_downgrade: bool) -> Planner {
        self.trust = trust;
        self.allow_downgrade = allow_downgrade;
        self
    }

    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// Assigns `image` (NAME@VERSION) to a device's component: an operation at the head of its
    /// queue (weight [`ASSIGN_WEIGHT`]) that replaces an earlier queued assignment. Refused
    /// while an operation of the device is in flight: at most one at a time.
    pub fn assign(&self, device: &str, component: &str, image: &str, now: u64) -> Result<Operation, PlannerError> {
        if let Some(ops) = self.ops.get(device) {
            if let Some(busy) = ops.iter().find(|o| o.state.in_flight()) {
                return Err(PlannerError::InFlight { device: device.into(), state: busy.state.as_str() });
            }
        }
        self.enqueue(device, component, image, ASSIGN_WEIGHT, ASSIGN_ORIGIN, now)
    }

    /// Queues `image` (NAME@VERSION) for a device's component with a weight and an origin,
    /// after checking the device, the image, its hardware and its admission (see
    /// [`Planner::push`]): an image that may not reach the device for a definitive reason (not
    /// a verified target of its class, not released for its tag) is refused; one waiting for
    /// trust (metadata expired) is queued and waits.
    pub fn enqueue(
        &self,
        device: &str,
        component: &str,
        image: &str,
        weight: u16,
        origin: &str,
        now: u64,
    ) -> Result<Operation, PlannerError> {
        let (name, version) = image.split_once('@').ok_or_else(|| PlannerError::BadImageRef(image.into()))?;
        let hardware = self.fleet.hardware(device).ok_or_else(|| PlannerError::UnknownDevice(device.into()))?;
        let meta = self.firmware.get(name, version).ok_or_else(|| PlannerError::UnknownImage(image.into()))?;
        if !meta.fits_hardware(hardware.as_deref()) {
            return Err(PlannerError::Hardware {
                image: image.into(),
                device: device.into(),
                wanted: meta.hardware.clone(),
                actual: hardware,
            });
        }
        if let Some(Err(d)) = self.fleet.with_class(device, |production, tag| self.admit(production, &meta, tag, now)) {
            if !d.transient {
                return Err(PlannerError::NotAdmissible(d.reason));
            }
        }
        self.push(device, component, &meta, weight, origin, now)
    }

    /// Queues `meta` for a device's component, the caller having checked that it fits. A
    /// queued operation of the same component and the same kind of origin (the part before
    /// `:` — `assign`, `wave`) is replaced: it is canceled. An operation in flight is left
    /// alone; the new one waits behind it.
    pub fn push(
        &self,
        device: &str,
        component: &str,
        meta: &ImageMeta,
        weight: u16,
        origin: &str,
        now: u64,
    ) -> Result<Operation, PlannerError> {
        self.push_expecting(device, component, meta, &meta.version, weight, origin, now)
    }

    /// [`Planner::push`], where the device reports `version` (not the image's label) once it
    /// runs the image — a FAS image's `firmwareVersion`.
    #[allow(clippy::too_many_arguments)]
    pub fn push_expecting(
        &self,
        device: &str,
        component: &str,
        meta: &ImageMeta,
        version: &str,
        weight: u16,
        origin: &str,
        now: u64,
    ) -> Result<Operation, PlannerError> {
        let _g = self.gate.read_recursive();
        // Checked under the gate: a device being deleted (its deletion is a step) is gone.
        if !self.fleet.contains(device) {
            return Err(PlannerError::UnknownDevice(device.into()));
        }
        let mut ops = self.ops.entry(device.to_owned()).or_default();
        let mut next = ops.clone();
        let op = self.queue(&mut next, device, component, meta, version, weight, origin, now);
        self.commit(&mut ops, next)?;
        Ok(op)
    }

    /// Adds a new pending operation to `next` (a device's operations), canceling a queued one
    /// of the same component and the same kind of origin, which it replaces.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        next: &mut Vec<Operation>,
        device: &str,
        component: &str,
        meta: &ImageMeta,
        version: &str,
        weight: u16,
        origin: &str,
        now: u64,
    ) -> Operation {
        let op = Operation {
            seq: self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            device: device.into(),
            component: component.into(),
            weight: weight.min(ASSIGN_WEIGHT),
            origin: origin.into(),
            image: meta.id(),
            version: version.to_owned(),
            length: meta.length,
            state: OpState::Pending,
            offset: 0,
            created_at: now,
            updated_at: now,
            last_activity: now,
            detail: None,
            digest: None,
        };
        let kind = origin_kind(origin);
        for o in next
            .iter_mut()
            .filter(|o| o.component == component && origin_kind(&o.origin) == kind && o.state == OpState::Pending)
        {
            o.end(OpState::Canceled, format!("replaced by operation {} ({})", op.seq, op.origin), now);
        }
        next.push(op.clone());
        op
    }

    /// From now on, marks in `changes` every device whose operations change (committed).
    pub fn report_changes(&self, changes: Arc<crate::fleet::changes::Changes>) {
        let _ = self.changes.set(changes);
    }

    fn changed(&self, device: &str) {
        if let Some(c) = self.changes.get() {
            c.mark(device);
        }
    }

    fn commit(&self, current: &mut Vec<Operation>, next: Vec<Operation>) -> Result<(), PlannerError> {
        let mut b = self.store.batch();
        let drop = self.stage(&mut b, current, &next)?;
        b.commit()?;
        self.apply(current, next, &drop);
        Ok(())
    }

    /// Adds to `b` what turns a device's `current` operations into `next` (and the deletion of
    /// the history beyond [`MAX_HISTORY`]); returns the sequence numbers of that history.
    fn stage(
        &self,
        b: &mut crate::store::Batch<'_>,
        current: &[Operation],
        next: &[Operation],
    ) -> Result<std::collections::HashSet<u64>, PlannerError> {
        // Per component, the newest MAX_HISTORY finished operations stay, and every one a
        // live plan still counts.
        let pinned = self.pinned.read().unwrap_or_else(|e| e.into_inner());
        let counted = |o: &Operation| !pinned.is_empty() && pinned.contains(o.origin.split('/').next().unwrap_or(""));
        let mut finished: Vec<&Operation> = next.iter().filter(|o| o.state.is_terminal() && !counted(o)).collect();
        finished
            .sort_by(|a, b| (&a.component, std::cmp::Reverse(a.seq)).cmp(&(&b.component, std::cmp::Reverse(b.seq))));
        let drop: std::collections::HashSet<u64> = finished
            .chunk_by(|a, b| a.component == b.component)
            .flat_map(|same| same.iter().skip(MAX_HISTORY).map(|o| o.seq))
            .collect();
        std::mem::drop(pinned);
        for o in next {
            if drop.contains(&o.seq) {
                b.delete(Cf::Ops, op_key(o).as_bytes());
            } else if current.iter().find(|c| c.seq == o.seq) != Some(o) {
                b.put_json(Cf::Ops, op_key(o).as_bytes(), o)?;
            }
        }
        self.stage_seq_mark(b, next.iter().map(|o| o.seq).max().unwrap_or(0));
        Ok(drop)
    }

    /// Keeps the operations of a plan (`rollout:NAME` for every group of a rollout,
    /// `action:ID`) out of history trimming while the plan counts them: a device's later
    /// operations must not push its outcome of a live plan out of the store.
    pub fn pin(&self, plan: &str) {
        self.pinned.write().unwrap_or_else(|e| e.into_inner()).insert(plan.to_owned());
    }

    /// The plan no longer counts its operations (deleted, ended): they are history again.
    pub fn unpin(&self, plan: &str) {
        self.pinned.write().unwrap_or_else(|e| e.into_inner()).remove(plan);
    }

    /// Moves the stored high-water mark of sequence numbers past `used`, in `b`, when `used`
    /// reaches it.
    fn stage_seq_mark(&self, b: &mut crate::store::Batch<'_>, used: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mark = self.seq_mark.load(Relaxed);
        if used >= mark {
            let to = used + SEQ_STRIDE;
            if self.seq_mark.fetch_max(to, Relaxed) < to {
                b.put(Cf::Meta, SEQ_KEY, &to.to_be_bytes());
            }
        }
    }

    /// Makes a committed `next` a device's current operations, less the trimmed history, and
    /// tells who watches of the operations that ended.
    fn apply(&self, current: &mut Vec<Operation>, mut next: Vec<Operation>, drop: &std::collections::HashSet<u64>) {
        if let Some(o) = next.first().or(current.first()) {
            self.changed(&o.device);
        }
        self.tell(
            next.iter()
                .filter(|o| o.state.is_terminal() && !current.iter().any(|c| c.seq == o.seq && c.state.is_terminal())),
        );
        next.retain(|o| !drop.contains(&o.seq));
        next.sort_by(|a, b| (&a.component, a.seq).cmp(&(&b.component, b.seq)));
        // A queue is short and held for every device of a rollout: no spare capacity (a push
        // onto a one-element clone would otherwise keep room for four).
        next.shrink_to_fit();
        *current = next;
    }

    /// Cancels every unfinished operation queued by `origin` (e.g. a wave); a transfer under
    /// way stops at its device's next Status. Returns how many were canceled.
    pub fn cancel_origin(&self, origin: &str, now: u64) -> Result<usize, PlannerError> {
        self.cancel_origins(|o| o == origin, now)
    }

    /// Cancels every unfinished operation whose origin `pick` chooses, in one pass.
    pub fn cancel_origins(&self, pick: impl Fn(&str) -> bool, now: u64) -> Result<usize, PlannerError> {
        let _g = self.gate.read_recursive();
        let mut n = 0;
        for mut e in self.ops.iter_mut() {
            if !e.iter().any(|o| !o.state.is_terminal() && pick(&o.origin)) {
                continue;
            }
            let mut next = e.clone();
            for o in next.iter_mut().filter(|o| !o.state.is_terminal() && pick(&o.origin)) {
                o.end(OpState::Canceled, format!("canceled while {}", o.state.as_str()), now);
                n += 1;
            }
            self.commit(&mut e, next)?;
        }
        Ok(n)
    }

    /// Cancels a device's queued (not yet started) operations that `pick` chooses, saying
    /// why. Returns how many were canceled.
    pub fn withdraw(
        &self,
        device: &str,
        pick: impl Fn(&Operation) -> bool,
        why: &str,
        now: u64,
    ) -> Result<usize, PlannerError> {
        let _g = self.gate.read_recursive();
        let Some(mut e) = self.ops.get_mut(device) else { return Ok(0) };
        let n = e.iter().filter(|o| o.state == OpState::Pending && pick(o)).count();
        if n > 0 {
            let mut next = e.clone();
            for o in next.iter_mut().filter(|o| o.state == OpState::Pending && pick(o)) {
                o.end(OpState::Canceled, why.to_owned(), now);
            }
            self.commit(&mut e, next)?;
        }
        Ok(n)
    }

    /// Deletes every operation of a deleted device (queued ones included: there is no one
    /// left to serve); returns how many unfinished ones there were.
    pub fn forget(&self, device: &str) -> Result<usize, PlannerError> {
        let mut step = self.step();
        let open = step.forget(device);
        step.commit()?;
        Ok(open)
    }

    /// Visits every operation (queued, in flight, recent history), device by device.
    pub fn scan(&self, mut f: impl FnMut(&Operation)) {
        for e in self.ops.iter() {
            e.iter().for_each(&mut f);
        }
    }

    /// The operation the engine serves for a device's component now (see [`head`]).
    pub fn operation(&self, device: &str, component: &str) -> Option<Operation> {
        let ops = self.ops.get(device)?;
        head(&ops, component).ok().flatten().map(|i| ops[i].clone())
    }

    /// All operations of a device — queued, in flight and recent history — by component, then
    /// in the order they were queued.
    pub fn operations_of(&self, device: &str) -> Vec<Operation> {
        self.ops.get(device).map(|v| v.clone()).unwrap_or_default()
    }

    pub fn counts(&self) -> Vec<(OpState, usize)> {
        let mut n = [0usize; OpState::ALL.len()];
        for e in self.ops.iter() {
            for o in e.iter() {
                n[OpState::ALL.iter().position(|s| *s == o.state).unwrap_or(0)] += 1;
            }
        }
        OpState::ALL.iter().copied().zip(n).collect()
    }

    /// How often a device waiting for an image should ask again, if the image's FAS identity
    /// says (`pollingSpeedSeconds`).
    fn polling_hint(&self, image: &str) -> Option<u32> {
        let (name, version) = image.split_once('@').unwrap_or((image, ""));
        let secs = self.firmware.get(name, version)?.identity.as_ref()?.polling_speed_seconds?;
        Some(secs.clamp(1, u32::MAX as u64) as u32)
    }

    /// The head operation and its image, ready for a DFU step. An image that may not reach the
    /// device is refused here, before a block of it is served (an unfinished operation fails
    /// with the reason): production devices get only verified production targets, whatever
    /// planned the operation.
    pub fn lookup(&self, device: &str, component: &str, now: u64) -> Result<Lookup, PlannerError> {
        Ok(match self.lookup_meta(device, component, now, true)? {
            Lookup::Active(a) => {
                let image = self.firmware.bytes(&a.meta)?;
                Lookup::Active(ActiveOp {
                    image,
                    seq: a.seq,
                    state: a.state,
                    meta: a.meta,
                    resume: a.resume,
                    foreign: a.foreign,
                    version: a.version,
                })
            }
            Lookup::Nothing => Lookup::Nothing,
            Lookup::Refused(why) => Lookup::Refused(why),
            Lookup::Wait(poll) => Lookup::Wait(poll),
            Lookup::Held(why) => Lookup::Held(why),
        })
    }

    /// [`Planner::lookup`] without the image's bytes (with the same effects: a refused image
    /// fails its operation, a held one is counted): what a data-plane node is told.
    /// `asked`: a device asked now, so an operation held for trust is not silent.
    pub fn lookup_meta(
        &self,
        device: &str,
        component: &str,
        now: u64,
        asked: bool,
    ) -> Result<Lookup<()>, PlannerError> {
        let (seq, state, meta, resume, foreign, version) = {
            let Some(ops) = self.ops.get(device) else { return Ok(Lookup::Nothing) };
            let o = match head(&ops, component) {
                Err(i) => return Ok(Lookup::Wait(self.polling_hint(&ops[i].image))),
                Ok(None) => return Ok(Lookup::Nothing),
                Ok(Some(i)) => &ops[i],
            };
            let (name, version) = o.image.split_once('@').unwrap_or((o.image.as_str(), ""));
            let meta = self.firmware.get(name, version).ok_or_else(|| PlannerError::UnknownImage(o.image.clone()))?;
            // The bytes the device holds: this operation's, else the ones the last operation of
            // the component that served any sent.
            let held = o.digest.as_deref().or_else(|| {
                ops.iter()
                    .filter(|p| p.component == component && p.digest.is_some())
                    .max_by_key(|p| p.seq)
                    .and_then(|p| p.digest.as_deref())
            });
            let resume = held == Some(meta.sha256.as_str());
            (o.seq, o.state, meta, resume, held.is_some() && !resume, o.version.clone())
        };
        let refused = self.refusal(device, component, state, &meta, &version, now);
        if let Some(d) = refused.filter(|_| !rules::broken(rules::Rule::Admission)) {
            if d.transient && !state.is_terminal() {
                self.hold(device, seq, &d.reason, now, asked);
                return Ok(Lookup::Held(d.to_string()));
            }
            if !state.is_terminal() {
                self.fail(device, seq, state, &d.reason, now)?;
            }
            self.held.remove(device);
            return Ok(Lookup::Refused(d.reason));
        }
        if self.held.contains_key(device) {
            self.held.remove(device);
        }
        Ok(Lookup::Active(ActiveOp { seq, state, meta, image: (), resume, foreign, version }))
    }

    /// Ends operation `seq` of a device as timed out, saying why, unless it has ended already
    /// (a plan's own time limit; a transfer under way is answered SYNC at its next Status).
    /// Returns whether it ended it.
    pub fn expire(&self, device: &str, seq: u64, why: &str, now: u64) -> Result<bool, PlannerError> {
        let _g = self.gate.read_recursive();
        let Some(mut ops) = self.ops.get_mut(device) else { return Ok(false) };
        let Some(at) = ops.iter().position(|o| o.seq == seq && !o.state.is_terminal()) else { return Ok(false) };
        let mut next = ops.clone();
        next[at].end(OpState::TimedOut, why.to_owned(), now);
        self.commit(&mut ops, next)?;
        Ok(true)
    }

    /// Fails operation `seq` of a device (if it is still in `from`), saying why.
    fn fail(&self, device: &str, seq: u64, from: OpState, why: &str, now: u64) -> Result<(), PlannerError> {
        let _g = self.gate.read_recursive();
        let Some(mut ops) = self.ops.get_mut(device) else { return Ok(()) };
        let Some(at) = ops.iter().position(|o| o.seq == seq && o.state == from) else { return Ok(()) };
        let mut next = ops.clone();
        next[at].end(OpState::Failed, why.to_owned(), now);
        self.commit(&mut ops, next)
    }

    /// The sequence number and state of the operation the engine serves for a component now,
    /// without copying it.
    pub fn head_state(&self, device: &str, component: &str) -> Option<(u64, OpState)> {
        let ops = self.ops.get(device)?;
        head(&ops, component).ok().flatten().map(|i| (ops[i].seq, ops[i].state))
    }

    /// Applies what a DFU step observed to operation `seq` of a device. A transition is
    /// written to the store before this returns (and so before the reply goes out); progress
    /// alone stays in memory. A step computed from a state that has changed meanwhile is
    /// dropped (`Ok(false)`).
    /// `served` is the sha256 of the image whose bytes the step sent, recorded on the
    /// operation with the transition that starts the transfer.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        device: &str,
        seq: u64,
        from: OpState,
        to: Option<OpState>,
        progress: Option<u32>,
        served: Option<&str>,
        now: u64,
    ) -> Result<bool, PlannerError> {
        self.record_reported(device, seq, from, to, progress, served, None, now)
    }

    /// [`Planner::record`], with the version the device reported: a failure's reason names
    /// both it and the version expected.
    #[allow(clippy::too_many_arguments)]
    pub fn record_reported(
        &self,
        device: &str,
        seq: u64,
        from: OpState,
        to: Option<OpState>,
        progress: Option<u32>,
        served: Option<&str>,
        reported: Option<&str>,
        now: u64,
    ) -> Result<bool, PlannerError> {
        let _g = self.gate.read_recursive();
        let Some(mut ops) = self.ops.get_mut(device) else { return Ok(false) };
        let Some(at) = ops.iter().position(|o| o.seq == seq) else { return Ok(false) };
        if ops[at].state != from {
            return Ok(false);
        }
        // At most one transfer per device: a start computed while another component's
        // transfer was starting (two Statuses at once, or two data-plane nodes) loses.
        let starts = !from.in_flight() && !from.is_terminal() && to.is_some_and(OpState::in_flight);
        if starts && ops.iter().any(|o| o.seq != seq && o.state.in_flight()) && !rules::broken(rules::Rule::OneTransfer)
        {
            return Ok(false);
        }
        let new_digest = served.filter(|d| ops[at].digest.as_deref() != Some(*d));
        if to.is_some() || new_digest.is_some() {
            let mut next = ops.clone();
            let op = &mut next[at];
            op.state = to.unwrap_or(from);
            op.updated_at = if to.is_some() { now } else { op.updated_at };
            op.last_activity = now;
            if let Some(p) = progress {
                op.offset = p;
            }
            if let Some(d) = new_digest {
                op.digest = Some(d.to_owned());
            }
            if to == Some(OpState::Failed) {
                op.detail = Some(match reported {
                    Some(r) => format!("device came back on {r} after SWAP, not on {}", op.version),
                    None => format!("device came back on another version than {} after SWAP", op.version),
                });
            }
            self.commit(&mut ops, next)?;
        } else {
            let op = &mut ops[at];
            op.last_activity = now;
            if let Some(p) = progress {
                op.offset = p;
            }
        }
        Ok(true)
    }

    /// Times out in-flight operations silent for longer than the limit; returns how many.
    pub fn sweep_timeouts(&self, now: u64) -> Result<usize, PlannerError> {
        let _g = self.gate.read_recursive();
        let mut n = 0;
        for mut e in self.ops.iter_mut() {
            // Each device is written under its own entry lock, so a Status racing the sweep
            // either lands first (and the op is no longer silent) or sees TimedOut.
            let mut b = self.store.batch();
            let mut next = e.clone();
            let mut ended = Vec::new();
            for op in next.iter_mut().filter(|o| timed_out(o.state, o.last_activity, now, self.op_timeout_secs)) {
                op.end(OpState::TimedOut, format!("no Status for {} s", now - op.last_activity), now);
                b.put_json(Cf::Ops, op_key(op).as_bytes(), &*op)?;
                ended.push(op.seq);
                n += 1;
            }
            if !b.is_empty() {
                b.commit()?;
                self.changed(e.key());
                self.tell(next.iter().filter(|o| ended.contains(&o.seq)));
                *e = next;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod queue_tests;
#[cfg(test)]
mod trust_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FirmwareConfig;
    use crate::fleet::{DeviceSpec, MAIN_COMPONENT};

    pub(super) struct World {
        _dir: tempfile::TempDir,
        pub(super) planner: Planner,
    }

    pub(super) fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
        let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
        fleet
            .upsert(
                vec![
                    DeviceSpec { id: "d1".into(), hardware: Some("nrf52".into()), ..Default::default() },
                    DeviceSpec { id: "d2".into(), hardware: Some("esp32".into()), ..Default::default() },
                ],
                0,
            )
            .unwrap();
        firmware.add("app", "2.0", vec!["nrf52".into()], Bytes::from_static(b"0123456789"), 0).unwrap();
        World { planner: Planner::open(store, fleet, firmware, 100, 0).unwrap(), _dir: dir }
    }

    fn active(p: &Planner, device: &str, component: &str) -> ActiveOp {
        match p.lookup(device, component, 0).unwrap() {
            Lookup::Active(a) => a,
            Lookup::Refused(why) => panic!("{device}/{component}: refused: {why}"),
            Lookup::Wait(_) => panic!("{device}/{component}: wait"),
            Lookup::Held(why) => panic!("{device}/{component}: held: {why}"),
            Lookup::Nothing => panic!("{device}/{component}: nothing"),
        }
    }

    #[test]
    fn assign_checks_device_image_and_hardware() {
        let w = world();
        let p = &w.planner;
        assert!(matches!(p.assign("nope", MAIN_COMPONENT, "app@2.0", 1), Err(PlannerError::UnknownDevice(_))));
        assert!(matches!(p.assign("d1", MAIN_COMPONENT, "app@9", 1), Err(PlannerError::UnknownImage(_))));
        assert!(matches!(p.assign("d1", MAIN_COMPONENT, "app", 1), Err(PlannerError::BadImageRef(_))));
        assert!(matches!(p.assign("d2", MAIN_COMPONENT, "app@2.0", 1), Err(PlannerError::Hardware { .. })));
        let op = p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap();
        assert_eq!((op.state, op.weight, op.origin.as_str()), (OpState::Pending, ASSIGN_WEIGHT, ASSIGN_ORIGIN));
        assert_eq!(active(p, "d1", MAIN_COMPONENT).image.len(), 10);
    }

    #[test]
    fn one_operation_in_flight_per_device_and_stale_steps_are_dropped() {
        let w = world();
        let p = &w.planner;
        let seq = p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap().seq;
        assert!(p.record("d1", seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 2).unwrap());
        assert!(matches!(p.assign("d1", "bios", "app@2.0", 3), Err(PlannerError::InFlight { .. })));
        // A step computed from Pending, arriving after the move to Downloading, changes nothing.
        assert!(!p.record("d1", seq, OpState::Pending, Some(OpState::Downloading), Some(5), None, 3).unwrap());
        assert!(p.record("d1", seq, OpState::Downloading, None, Some(4), None, 4).unwrap());
        assert_eq!(p.operation("d1", MAIN_COMPONENT).unwrap().offset, 4);
    }

    #[test]
    fn silent_operations_time_out_and_fresh_ones_do_not() {
        let w = world();
        let p = &w.planner;
        let seq = p.assign("d1", MAIN_COMPONENT, "app@2.0", 0).unwrap().seq;
        p.record("d1", seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 10).unwrap();
        assert_eq!(p.sweep_timeouts(109).unwrap(), 0);
        assert_eq!(p.sweep_timeouts(110).unwrap(), 1);
        let op = p.operation("d1", MAIN_COMPONENT).unwrap();
        assert_eq!(op.state, OpState::TimedOut);
        assert!(op.detail.unwrap().contains("no Status"));
    }

    #[test]
    fn the_queue_serves_the_heaviest_then_the_oldest_one_at_a_time_per_device() {
        let w = world();
        let p = &w.planner;
        let a = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 10, "wave-a", 1).unwrap().seq;
        let b = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 500, "wave-b", 2).unwrap().seq;
        let c = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 500, "wave-c", 3).unwrap().seq;
        let bios = p.enqueue("d1", "bios", "app@2.0", 10, "wave-a", 3).unwrap().seq;
        assert_eq!(active(p, "d1", MAIN_COMPONENT).seq, b, "weight first, then FIFO");
        p.record("d1", b, OpState::Pending, Some(OpState::Downloading), Some(0), None, 4).unwrap();
        assert!(matches!(p.lookup("d1", "bios", 4).unwrap(), Lookup::Wait(None)), "one transfer per device at a time");
        p.record("d1", b, OpState::Downloading, Some(OpState::Succeeded), None, None, 5).unwrap();
        assert_eq!(active(p, "d1", MAIN_COMPONENT).seq, c);
        assert_eq!(active(p, "d1", "bios").seq, bios);
        // An assignment goes ahead of every plan and replaces an earlier queued assignment.
        let first = p.assign("d1", MAIN_COMPONENT, "app@2.0", 6).unwrap().seq;
        let second = p.assign("d1", MAIN_COMPONENT, "app@2.0", 7).unwrap().seq;
        assert_eq!(active(p, "d1", MAIN_COMPONENT).seq, second);
        let replaced = p.operations_of("d1").into_iter().find(|o| o.seq == first).unwrap();
        assert_eq!(replaced.state, OpState::Canceled);
        // Canceling a plan withdraws its queued operations, and nothing else.
        assert_eq!(p.cancel_origin("wave-a", 8).unwrap(), 2);
        let states: Vec<(u64, OpState)> = p.operations_of("d1").iter().map(|o| (o.seq, o.state)).collect();
        assert!(states.contains(&(a, OpState::Canceled)) && states.contains(&(bios, OpState::Canceled)));
        assert!(states.contains(&(c, OpState::Pending)) && states.contains(&(b, OpState::Succeeded)));
    }

    #[test]
    fn a_queued_operation_is_replaced_by_a_newer_one_of_the_same_kind_only() {
        let w = world();
        let p = &w.planner;
        let assigned = p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap().seq;
        let older = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 10, "wave:a", 2).unwrap().seq;
        let bios = p.enqueue("d1", "bios", "app@2.0", 10, "wave:a", 3).unwrap().seq;
        let newer = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 10, "wave:b", 4).unwrap().seq;
        let state = |seq| p.operations_of("d1").into_iter().find(|o| o.seq == seq).unwrap();
        // wave:b replaces wave:a's queued operation of the same component...
        assert_eq!(state(older).state, OpState::Canceled);
        assert_eq!(state(older).detail.unwrap(), format!("replaced by operation {newer} (wave:b)"));
        assert_eq!(state(newer).state, OpState::Pending);
        // ...and nothing of another kind or another component.
        assert_eq!(state(assigned).state, OpState::Pending);
        assert_eq!(state(bios).state, OpState::Pending);
    }

    #[test]
    fn records_from_before_the_queue_are_given_a_sequence_number_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let legacy = serde_json::json!({"device": "d1", "component": "main", "image": "app@2.0", "version": "2.0",
            "length": 10, "state": "downloading", "offset": 4, "created_at": 1, "updated_at": 2, "last_activity": 2});
        let mut b = store.batch();
        b.put_json(Cf::Ops, b"d1\0main", &legacy).unwrap();
        b.commit().unwrap();
        let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
        let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
        let p = Planner::open(store.clone(), fleet, firmware, 100, 50).unwrap();
        let op = p.operation("d1", "main").unwrap();
        assert_eq!((op.seq, op.state, op.offset, op.weight), (1, OpState::Downloading, 4, ASSIGN_WEIGHT));
        assert_eq!(op.last_activity, 50, "in flight: a fresh time limit from the restart");
        assert!(store.get(Cf::Ops, b"d1\0main").unwrap().is_none(), "the old key is gone");
        assert!(store.get(Cf::Ops, op_key(&op).as_bytes()).unwrap().is_some());
    }

    #[test]
    fn the_queue_survives_a_restart_and_history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = Store::open(dir.path(), false).unwrap();
            let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
            let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
            (Planner::open(store.clone(), fleet.clone(), firmware.clone(), 100, 0).unwrap(), fleet, firmware, store)
        };
        let (p, fleet, firmware, _store) = open();
        fleet.upsert(vec![DeviceSpec { id: "d1".into(), ..Default::default() }], 0).unwrap();
        firmware.add("app", "2.0", vec![], Bytes::from_static(b"0123456789"), 0).unwrap();
        for t in 0..(MAX_HISTORY as u64 + 5) {
            let seq = p.assign("d1", MAIN_COMPONENT, "app@2.0", t).unwrap().seq;
            p.record("d1", seq, OpState::Pending, Some(OpState::Succeeded), None, None, t).unwrap();
        }
        let queued = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 3, "wave-x", 99).unwrap();
        assert_eq!(p.operations_of("d1").len(), MAX_HISTORY + 1, "history is bounded");
        let before = p.operations_of("d1");
        drop((p, fleet, firmware, _store));
        let (p, ..) = open();
        assert_eq!(p.operations_of("d1"), before, "every operation and state is restored");
        assert_eq!(p.operation("d1", MAIN_COMPONENT).unwrap().seq, queued.seq);
        assert!(p.assign("d1", MAIN_COMPONENT, "app@2.0", 100).unwrap().seq > queued.seq, "sequence numbers go on");
    }
}
