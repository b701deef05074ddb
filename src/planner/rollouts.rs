//! hawkBit-style rollouts (`../shared/seeds/002_…`): the devices an RSQL filter matches, split
//! into deployment groups that start one after another while each group's success condition
//! holds, and pause the whole rollout when a group's error condition is met.
//!
//! A rollout delivers through the per-device operation queue: a running group's devices get
//! an operation of origin `rollout:NAME/N` (N the group, from 1) for their main component. The
//! planner tells the rollouts of every such operation that ends ([`Planner::watch`]); the
//! conditions are evaluated then, not polled. The rollout record (groups' states included) is
//! written before any operation of a newly started group is queued, and the outcome counts
//! are rebuilt from the operations on open, so a crash loses nothing and counts nothing twice:
//! open finishes what the crash interrupted (a group marked running whose devices were not
//! all queued, a condition met but not acted on, a stop or delete half done).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::info;

mod audit;
mod cascade;
pub mod groups;
mod leaving;
mod model;
pub mod state;
mod status;

pub use groups::{split_defined, split_evenly, Conditions, Counts, ErrorThreshold, GroupSpec, SuccessAction, Verdict};
pub use leaving::RolloutsLeaving;
pub use model::*;
pub use state::{Action, GroupState, Illegal, Progress, RolloutState};

use super::{valid_name, Ended, Planner};
use crate::engine::OpState;
use crate::firmware::{pick, Firmware, ImageMeta};
use crate::fleet::filter::Filter;
use crate::fleet::Fleet;
use crate::store::{Cf, Store};

/// A rollout in memory: its record, its groups' devices, and what became of them.
struct Live {
    r: Rollout,
    filter: Option<Filter>,
    /// Per group, its device ids in the order they are handed out.
    members: Vec<Vec<String>>,
    /// Per group, the outcomes so far.
    counts: Vec<Counts>,
    /// Per group, how many of `members` have been handed to the planner.
    released: Vec<usize>,
    /// Per group, when devices were handed out within the last minute (rate-limited rollouts).
    window: Vec<VecDeque<u64>>,
    /// Every device in the rollout: kept for dynamic rollouts, to tell a newcomer.
    joined: Option<HashSet<String>>,
    /// Per group, members that left it and why (deleted, or no image fits them): stored, so
    /// a group's total is its members less these, after a restart as before.
    left: Vec<HashMap<String, String>>,
}

impl Live {
    fn new(r: Rollout, members: Vec<Vec<String>>, left: Vec<HashMap<String, String>>) -> Live {
        let filter = Filter::parse(&r.filter).ok().filter(|_| !r.filter.is_empty());
        let mut left = left;
        left.resize_with(members.len(), HashMap::new);
        let counts = members
            .iter()
            .zip(&left)
            .map(|(m, l)| Counts { total: (m.len() - l.len().min(m.len())) as u64, ..Counts::default() })
            .collect();
        let n = members.len();
        let joined = r.dynamic_group_size.map(|_| members.iter().flatten().cloned().collect());
        Live { r, filter, members, counts, released: vec![0; n], window: vec![VecDeque::new(); n], joined, left }
    }

    /// Every member of group `g` has been handed out (or left) and has ended (or left): the
    /// group has nothing more to do, whatever its conditions decided earlier.
    fn settled(&self, g: usize) -> bool {
        let c = &self.counts[g];
        self.released[g] >= self.members[g].len() && c.succeeded + c.failed + c.canceled >= c.total
    }
}

#[derive(Default)]
struct Book {
    live: BTreeMap<String, Live>,
    /// Deleted rollouts: their names stay taken (their operations' origins are in history).
    deleted: BTreeMap<String, Rollout>,
}

/// A device's latest operation of a rollout group: see [`Rollouts::latest_ops`].
#[derive(Debug, Clone, Copy)]
struct Latest {
    seq: u64,
    state: OpState,
    created: u64,
}

pub struct Rollouts {
    store: Store,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    approval_required: bool,
    book: Mutex<Book>,
    events: Mutex<Receiver<Ended>>,
    /// Outcome events handled since start.
    outcomes: AtomicU64,
}

fn rollout_key(name: &str) -> Vec<u8> {
    format!("r\0{name}").into_bytes()
}

fn group_key(name: &str, group: usize) -> Vec<u8> {
    format!("g\0{name}\0{group:04x}").into_bytes()
}

/// A member that left a group, and why: `x` \0 rollout \0 group \0 device → reason.
fn left_key(name: &str, group: usize, device: &str) -> Vec<u8> {
    format!("x\0{name}\0{group:04x}\0{device}").into_bytes()
}

/// A group's device ids as stored: one per line (an id has no white space), which writes a
/// million ids several times faster than a JSON array.
fn encode_members(ids: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.iter().map(|i| i.len() + 1).sum());
    for id in ids {
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out
}

fn decode_members(bytes: &[u8]) -> Vec<String> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| String::from_utf8_lossy(l).into_owned()).collect()
}

impl Rollouts {
    /// Loads rollouts, rebuilds each group's counts from the operations, and finishes what a
    /// crash interrupted.
    pub fn open(
        store: Store,
        fleet: Arc<Fleet>,
        firmware: Arc<Firmware>,
        planner: Arc<Planner>,
        approval_required: bool,
        now: u64,
    ) -> Result<Rollouts, RolloutError> {
        // Told of every ending from here on; what ended before is in the operations.
        let events = planner.watch("rollout");
        let mut book = Book::default();
        let mut records: Vec<Rollout> = Vec::new();
        store.scan(Cf::Rollouts, b"r\0", None, |_, v| {
            let r: Rollout = serde_json::from_slice(v)
                .map_err(|e| crate::store::StoreError::Encode(format!("a stored rollout does not decode: {e}")))?;
            records.push(r);
            Ok(true)
        })?;
        for r in records {
            if r.state == RolloutState::Deleted {
                book.deleted.insert(r.name.clone(), r);
                continue;
            }
            let mut members = Vec::with_capacity(r.groups.len());
            let mut left = vec![HashMap::new(); r.groups.len()];
            for g in 0..r.groups.len() {
                members.push(
                    store.get(Cf::Rollouts, &group_key(&r.name, g))?.map(|v| decode_members(&v)).unwrap_or_default(),
                );
                let prefix = format!("x\0{}\0{g:04x}\0", r.name);
                store.scan(Cf::Rollouts, prefix.as_bytes(), None, |k, v| {
                    let device = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    left[g].insert(device, String::from_utf8_lossy(v).into_owned());
                    Ok(true)
                })?;
            }
            planner.pin(&format!("{ORIGIN_PREFIX}{}", r.name));
            book.live.insert(r.name.clone(), Live::new(r, members, left));
        }
        let rollouts = Rollouts {
            store,
            fleet,
            firmware,
            planner,
            approval_required,
            book: Mutex::new(book),
            events: Mutex::new(events),
            outcomes: 0.into(),
        };
        let mut book = rollouts.lock();
        rollouts.recount(&mut book, now);
        let names: Vec<String> = book.live.keys().cloned().collect();
        for name in names {
            rollouts.settle(&mut book, &name, now)?;
        }
        let dynamic = book.live.values().any(|l| l.r.dynamic_group_size.is_some() && !l.r.state.is_final());
        drop(book);
        // A registration or a tag change is written before the dynamic rollouts hear of it: a
        // crash in between is finished here (joining is idempotent: members stay members).
        if dynamic {
            let ids = rollouts.fleet.ids_where(|_| true);
            rollouts.devices_changed(&ids, now)?;
        }
        Ok(rollouts)
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds every group's counts, how far it was handed out, and its rate window from the
    /// operations: each device counts once, by its latest operation of the group.
    fn recount(&self, book: &mut Book, now: u64) {
        let latest = self.latest_ops(|name| book.live.contains_key(name));
        let mut staged: HashMap<(String, usize), HashSet<String>> = HashMap::new();
        for ((name, g, device), Latest { state, created, .. }) in latest {
            let Some(live) = book.live.get_mut(&name) else { continue };
            if live.left.get(g).is_some_and(|l| l.contains_key(&device)) {
                continue;
            }
            let Some(c) = live.counts.get_mut(g) else { continue };
            count(c, state);
            if live.r.rate.is_some() && created + 60 > now {
                live.window[g].push_back(created);
            }
            staged.entry((name, g)).or_default().insert(device);
        }
        for (name, live) in book.live.iter_mut() {
            for g in 0..live.members.len() {
                // Handed out: as the group's record says (written with the operations), or as
                // far as its members have operations (records from before it said).
                let set = staged.get(&(name.clone(), g));
                let by_ops =
                    live.members[g].iter().rposition(|d| set.is_some_and(|s| s.contains(d))).map_or(0, |i| i + 1);
                live.released[g] = by_ops.max(live.r.groups[g].released as usize).min(live.members[g].len());
                live.window[g].make_contiguous().sort_unstable();
            }
        }
    }

    /// Each device's latest operation in each group of the rollouts `wanted` names, from the
    /// planner's records, keyed by (rollout, group, device).
    fn latest_ops(&self, wanted: impl Fn(&str) -> bool) -> HashMap<(String, usize, String), Latest> {
        let mut latest: HashMap<(String, usize, String), Latest> = HashMap::new();
        self.planner.scan(|o| {
            let Some((name, g)) = parse_origin(&o.origin).filter(|(n, _)| wanted(n)) else { return };
            let now = Latest { seq: o.seq, state: o.state, created: o.created_at };
            let e = latest.entry((name.to_owned(), g, o.device.clone())).or_insert(now);
            if o.seq >= e.seq {
                *e = now;
            }
        });
        latest
    }

    /// Finishes what a crash may have interrupted for one rollout.
    fn settle(&self, book: &mut Book, name: &str, now: u64) -> Result<(), RolloutError> {
        let state = book.live[name].r.state;
        match state {
            RolloutState::Starting | RolloutState::Running => self.advance(book, name, now),
            RolloutState::Stopping => self.finish_stop(book, name, now),
            RolloutState::Deleting => self.finish_delete(book, name, now),
            _ => Ok(()),
        }
    }

    fn put(&self, r: &Rollout) -> Result<(), RolloutError> {
        let mut b = self.store.batch();
        b.put_json(Cf::Rollouts, &rollout_key(&r.name), r)?;
        b.commit()?;
        Ok(())
    }

    /// The images a rollout's `image` names: NAME@VERSION, or every image of VERSION.
    fn images(&self, image: &str) -> Result<Vec<Arc<ImageMeta>>, RolloutError> {
        let (name, version) = match image.split_once('@') {
            Some((n, v)) => (Some(n), v),
            None => (None, image),
        };
        let found = self.firmware.of_version(name, version);
        if found.is_empty() {
            return Err(RolloutError::NoImage(image.into()));
        }
        Ok(found)
    }

    /// Creates a rollout: its devices chosen, checked (each gets an image fitting its hardware
    /// that may reach its class), split into groups and written with it. It waits for approval
    /// when `rollouts.approval_required` is set, else it is ready.
    pub fn create(&self, req: CreateRequest, now: u64) -> Result<Rollout, RolloutError> {
        if !valid_name(&req.name) {
            return Err(RolloutError::InvalidName(req.name));
        }
        let filter = Filter::parse(&req.filter)?;
        let invalid = |m: String| Err(RolloutError::Invalid(m));
        if req.weight.is_some_and(|w| w > 1000) {
            return invalid("weight: 0 to 1000".into());
        }
        let n_groups = if req.group_defs.is_empty() { req.groups.unwrap_or(1) } else { req.group_defs.len() };
        if req.groups.is_some() && !req.group_defs.is_empty() {
            return invalid("give either a number of groups or explicit groups, not both".into());
        }
        if !(1..=MAX_GROUPS).contains(&n_groups) {
            return invalid(format!("groups: 1 to {MAX_GROUPS}"));
        }
        if let Some(rate) = &req.rate {
            rate.check().map_err(RolloutError::Invalid)?;
        }
        if req.dynamic_group_size == Some(0) {
            return invalid("dynamic_group_size: 1 or more".into());
        }
        let mut specs = Vec::new();
        for d in &req.group_defs {
            if d.percent.is_some_and(|p| !(1..=100).contains(&p)) {
                return invalid("group percent: 1 to 100".into());
            }
            let filter = d.filter.as_deref().map(Filter::parse).transpose()?;
            specs.push(GroupSpec { filter, percent: d.percent });
        }
        let mut conditions = Vec::with_capacity(n_groups);
        for g in 0..n_groups {
            conditions.push(req.conditions(req.group_defs.get(g))?);
        }
        let images = self.images(&req.image)?;
        {
            let book = self.lock();
            if book.live.contains_key(&req.name) || book.deleted.contains_key(&req.name) {
                return Err(RolloutError::Exists(req.name));
            }
        }
        let ids = self.choose(&req.image, &images, now, |d| filter.matches(d))?;
        if ids.is_empty() && req.dynamic_group_size.is_none() {
            return Err(RolloutError::NoDevices);
        }
        let members = if specs.is_empty() {
            split_evenly(ids, n_groups)
        } else {
            let devices: Vec<_> = ids.iter().filter_map(|id| self.fleet.get(id)).collect();
            split_defined(&devices, &specs)
        };
        let mut r = Rollout {
            name: req.name.clone(),
            filter: req.filter.clone(),
            image: req.image.clone(),
            weight: req.weight.unwrap_or(DEFAULT_WEIGHT),
            state: RolloutState::Creating,
            groups: members
                .iter()
                .zip(conditions)
                .enumerate()
                .map(|(i, (m, c))| Group {
                    name: format!("group-{}", i + 1),
                    state: GroupState::Ready,
                    conditions: c,
                    total: m.len() as u64,
                    dynamic: false,
                    released: 0,
                    started_at: None,
                    ended_at: None,
                })
                .collect(),
            start_at: req.start_at,
            dynamic_group_size: req.dynamic_group_size,
            rate: req.rate,
            retry_of: None,
            remark: None,
            created_at: now,
            updated_at: now,
            order: 0,
        };
        self.insert(&mut r, members)
    }

    /// The ids of the devices `keep` accepts, having checked that each may receive `image`:
    /// an image of it fits its hardware and may reach its class (a refusal that may pass by
    /// itself, such as expired metadata, is not a refusal here: its operation waits for trust).
    fn choose(
        &self,
        image: &str,
        images: &[Arc<ImageMeta>],
        now: u64,
        mut keep: impl FnMut(&crate::fleet::Device) -> bool,
    ) -> Result<Vec<String>, RolloutError> {
        // Verdicts per (production, tag, hardware): a fleet has few such classes.
        let mut verdicts: Vec<((bool, Option<String>, Option<String>), Option<String>)> = Vec::new();
        let (mut refused, mut first): (usize, Option<(String, String)>) = (0, None);
        let mut total = 0;
        let ids = self.fleet.ids_where(|d| {
            if !keep(d) {
                return false;
            }
            total += 1;
            let (production, tag, hw) = (d.spec.production, d.spec.tag.as_deref(), d.spec.hardware.as_deref());
            let known =
                verdicts.iter().find(|((p, t, h), _)| *p == production && t.as_deref() == tag && h.as_deref() == hw);
            let why = match known {
                Some((_, why)) => why.clone(),
                None => {
                    let why = match pick(images, hw) {
                        Err(e) => Some(e),
                        Ok(meta) => match self.planner.admit(production, meta, tag, now) {
                            Err(d) if !d.transient => Some(d.reason),
                            _ => None,
                        },
                    };
                    verdicts.push(((production, tag.map(str::to_owned), hw.map(str::to_owned)), why.clone()));
                    why
                }
            };
            if let Some(why) = why {
                refused += 1;
                first.get_or_insert_with(|| (d.spec.id.clone(), why));
                return false;
            }
            true
        });
        if let Some((example, reason)) = first {
            return Err(RolloutError::NotAdmissible { image: image.into(), count: refused, total, reason, example });
        }
        Ok(ids)
    }

    /// Writes a new rollout and its groups in one batch, ready or waiting for approval.
    fn insert(&self, r: &mut Rollout, members: Vec<Vec<String>>) -> Result<Rollout, RolloutError> {
        let mut book = self.lock();
        if book.live.contains_key(&r.name) || book.deleted.contains_key(&r.name) {
            return Err(RolloutError::Exists(r.name.clone()));
        }
        r.order = book.live.values().map(|l| &l.r).chain(book.deleted.values()).map(|x| x.order).max().unwrap_or(0) + 1;
        r.state = r
            .state
            .advance(Progress::Created { approval_required: self.approval_required })
            .expect("a new rollout is creating");
        let mut b = self.store.batch();
        for (g, m) in members.iter().enumerate() {
            b.put(Cf::Rollouts, &group_key(&r.name, g), &encode_members(m));
        }
        b.put_json(Cf::Rollouts, &rollout_key(&r.name), &*r)?;
        b.commit()?;
        info!(rollout = %r.name, devices = r.total(), groups = r.groups.len(), state = r.state.as_str(), "rollout created");
        self.planner.pin(&format!("{ORIGIN_PREFIX}{}", r.name));
        book.live.insert(r.name.clone(), Live::new(r.clone(), members, Vec::new()));
        Ok(r.clone())
    }

    /// An operator's action. `remark` goes with an approval or a denial.
    pub fn act(&self, name: &str, action: Action, remark: Option<String>, now: u64) -> Result<Rollout, RolloutError> {
        let mut book = self.lock();
        let live = book.live.get_mut(name).ok_or_else(|| RolloutError::NotFound(name.into()))?;
        let next = live.r.state.apply(action)?;
        live.r.state = next;
        live.r.updated_at = now;
        if matches!(action, Action::Approve | Action::Deny) {
            live.r.remark = remark;
        }
        match action {
            Action::TriggerNextGroup => {
                // The running group is done with: its devices keep their operations (and their
                // outcomes are still counted), and the next group starts now.
                if let Some(g) = live.r.groups.iter_mut().find(|g| g.state == GroupState::Running) {
                    g.state = GroupState::Finished;
                    g.ended_at = Some(now);
                }
            }
            Action::Start => {
                for g in live.r.groups.iter_mut().filter(|g| g.state == GroupState::Ready) {
                    g.state = GroupState::Scheduled;
                }
            }
            _ => {}
        }
        let r = live.r.clone();
        self.put(&r)?;
        info!(rollout = name, action = action.as_str(), state = r.state.as_str(), "rollout action");
        match r.state {
            RolloutState::Starting | RolloutState::Running => self.advance(&mut book, name, now)?,
            RolloutState::Stopping => self.finish_stop(&mut book, name, now)?,
            RolloutState::Deleting | RolloutState::Deleted => self.finish_delete(&mut book, name, now)?,
            _ => {}
        }
        Ok(book.live.get(name).map(|l| l.r.clone()).or_else(|| book.deleted.get(name).cloned()).expect("kept"))
    }

    /// Cancels a stopping rollout's unfinished operations, then marks it stopped.
    fn finish_stop(&self, book: &mut Book, name: &str, now: u64) -> Result<(), RolloutError> {
        let prefix = format!("{ORIGIN_PREFIX}{name}/");
        let n = self.planner.cancel_origins(|o| o.starts_with(&prefix), now)?;
        let live = book.live.get_mut(name).expect("caller checked");
        if let Some(next) = live.r.state.advance(Progress::Stopped) {
            live.r.state = next;
            live.r.updated_at = now;
            let r = live.r.clone();
            self.put(&r)?;
        }
        info!(rollout = name, operations = n, "rollout stopped");
        Ok(())
    }

    /// Cancels a deleted rollout's unfinished operations and removes its groups; the record
    /// stays as a tombstone, state deleted, so its name is not reused.
    fn finish_delete(&self, book: &mut Book, name: &str, now: u64) -> Result<(), RolloutError> {
        let prefix = format!("{ORIGIN_PREFIX}{name}/");
        self.planner.cancel_origins(|o| o.starts_with(&prefix), now)?;
        let mut live = book.live.remove(name).expect("caller checked");
        live.r.state = live.r.state.advance(Progress::Deleted).unwrap_or(RolloutState::Deleted);
        live.r.updated_at = now;
        let mut b = self.store.batch();
        for g in 0..live.r.groups.len() {
            b.delete(Cf::Rollouts, &group_key(name, g));
            for device in live.left[g].keys() {
                b.delete(Cf::Rollouts, &left_key(name, g, device));
            }
        }
        b.put_json(Cf::Rollouts, &rollout_key(name), &live.r)?;
        b.commit()?;
        info!(rollout = name, "rollout deleted");
        self.planner.unpin(&format!("{ORIGIN_PREFIX}{name}"));
        book.deleted.insert(name.to_owned(), live.r);
        Ok(())
    }

    /// Rollouts in creation order; deleted ones only when asked for.
    pub fn list(&self, deleted: bool) -> Vec<Rollout> {
        let book = self.lock();
        let mut v: Vec<Rollout> = book.live.values().map(|l| l.r.clone()).collect();
        if deleted {
            v.extend(book.deleted.values().cloned());
        }
        v.sort_by_key(|r| r.order);
        v
    }

    pub fn get(&self, name: &str) -> Option<Rollout> {
        let book = self.lock();
        book.live.get(name).map(|l| l.r.clone()).or_else(|| book.deleted.get(name).cloned())
    }

    /// Outcome events handled since start.
    pub fn outcomes(&self) -> u64 {
        self.outcomes.load(Ordering::Relaxed)
    }
}

/// Adds an operation's final state to its group's counts (a time-out is a failure).
fn count(c: &mut Counts, state: OpState) {
    match state {
        OpState::Succeeded => c.succeeded += 1,
        OpState::Failed | OpState::TimedOut => c.failed += 1,
        OpState::Canceled => c.canceled += 1,
        _ => {}
    }
}

#[cfg(test)]
mod tests;
