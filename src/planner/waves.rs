//! Foundries-style waves (`../shared/seeds/000_…`, `001_…`): a version promoted to the devices
//! of one tag and production class — `init` (Active, nothing delivered), `rollout` (repeatable:
//! a group, a sample, a list of devices), `complete` (every device of the tag, including ones
//! that join it later; the version becomes the tag's production version), `cancel` (queued
//! operations withdrawn, updated devices stay).
//!
//! A wave delivers through the per-device operation queue: each staged device gets an
//! operation of origin `wave:NAME` and weight [`WAVE_WEIGHT`] for its main component. The
//! operations are the record of who is in a wave; the wave record (in the store's `waves`
//! column family) holds its state and rollout history. Every change is written before it is
//! answered; on open, a canceled wave's leftovers are canceled again and a complete wave's
//! missing devices are staged, so a crash between the two writes loses nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::info;

mod book;
mod model;
mod staging;
mod status;

use book::{at_least, not_reached, Book, Members};
pub use model::*;

use super::{valid_name, Denial, Planner, PlannerError};
use crate::engine::OpState;
use crate::firmware::{pick, version_order, Firmware, ImageMeta};
use crate::fleet::select::{Idx, Selection};
use crate::fleet::{check_text, Fleet, FleetError, MAIN_COMPONENT};
use crate::store::{Cf, Store, StoreError};

/// Weight of a wave's operations: after an operator's direct assignment (1000).
pub const WAVE_WEIGHT: u16 = 500;
/// Rollouts kept in a wave's history; one more is refused.
pub const MAX_ROLLOUTS: usize = 1000;
const ORIGIN_PREFIX: &str = "wave:";

#[derive(Debug, thiserror::Error)]
pub enum WaveError {
    #[error("invalid wave name {0:?}: 1 to 64 of letters, digits and -_.")]
    InvalidName(String),
    #[error("no wave {0}")]
    NotFound(String),
    #[error("wave {0} already exists")]
    Exists(String),
    #[error("tag {tag} ({class}) already has an active wave: {active}; complete or cancel it first")]
    ActiveWave { tag: String, class: &'static str, active: String },
    #[error("version {version} is not newer than {current}, the production version of tag {tag} ({class})")]
    NotNewer { version: String, current: String, tag: String, class: &'static str },
    #[error("version {0:?} has no release order: use semver (1.2.3, 1.2 or 7 are fine)")]
    Unordered(String),
    #[error("no image of version {0}")]
    NoImage(String),
    #[error("no image of version {version} may reach the {class} devices of tag {tag}: {reason}")]
    NotAdmissible { version: String, tag: String, class: &'static str, reason: String },
    #[error("--prune {version}: not a production version of tag {tag} ({class}); it has {have:?}")]
    NotProduction { version: String, tag: String, class: &'static str, have: Vec<String> },
    #[error(
        "image {image} is labeled version {label}, but its signed custom.version is {signed}; upload it under {signed}"
    )]
    LabelMismatch { image: String, label: String, signed: String },
    #[error("wave {name} is {state}, not active")]
    NotActive { name: String, state: &'static str },
    #[error("wave {0} is complete and cannot be canceled; init and complete a new wave with --prune {1} to withdraw its version")]
    CancelComplete(String, String),
    #[error("invalid --limit {0:?}: a count of 1 or more, or a percentage above 0 and at most 100 (e.g. 10%)")]
    BadLimit(String),
    #[error("wave {0} has had {MAX_ROLLOUTS} rollouts; complete it or roll out to whole groups")]
    TooManyRollouts(String),
    #[error(transparent)]
    Planner(#[from] PlannerError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Waves {
    store: Store,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    online_secs: u64,
    /// Wave commands run one at a time.
    book: Mutex<Book>,
    retries: std::sync::atomic::AtomicU64,
}

impl Waves {
    /// Loads waves; finishes what a crash may have interrupted (a cancel's withdrawals, a
    /// complete's staging) and rebuilds who is in each wave from the operations.
    pub fn open(
        store: Store,
        fleet: Arc<Fleet>,
        firmware: Arc<Firmware>,
        planner: Arc<Planner>,
        online_secs: u64,
        now: u64,
    ) -> Result<Waves, WaveError> {
        let mut book = Book::default();
        for w in store.load_all::<Wave>(Cf::Waves)? {
            book.waves.insert(w.name.clone(), w);
        }
        let canceled: HashSet<String> =
            book.waves.values().filter(|w| w.state == WaveState::Canceled).map(Wave::origin).collect();
        if !canceled.is_empty() {
            planner.cancel_origins(|o| canceled.contains(o), now)?;
        }
        let waves = Waves { store, fleet, firmware, planner, online_secs, book: Mutex::new(book), retries: 0.into() };
        let mut book = waves.lock();
        let mut live: Vec<(String, bool)> =
            book.waves.values().filter(|w| w.state == WaveState::Active).map(|w| (w.name.clone(), true)).collect();
        live.extend(book.latest_complete_each().into_iter().map(|w| (w.name, false)));
        let names: HashSet<&str> = live.iter().map(|(n, _)| n.as_str()).collect();
        let staged = waves.staged_of(&book, &names);
        for (name, active) in &live {
            book.members.insert(name.clone(), staged.get(name.as_str()).cloned().unwrap_or_default());
            let w = book.waves[name].clone();
            waves.fleet.reserve_version(&w.version)?;
            if !active {
                let n = waves.reconcile(&mut book, &w, now)?;
                if n > 0 {
                    info!(wave = %w.name, devices = n, "staged devices a complete wave had not reached");
                }
            }
        }
        // The gateway refreshes TUF before it opens the waves: what waited for trust when it
        // stopped is staged now if it may be.
        let retried = waves.retry_deferred(&mut book, now)?;
        waves.retries.fetch_add(retried as u64, std::sync::atomic::Ordering::Relaxed);
        drop(book);
        Ok(waves)
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who each of the named waves has staged (any operation of the wave that was not
    /// canceled) among the devices that still follow its tag and class, by fleet index
    /// position.
    fn staged_of(&self, book: &Book, names: &HashSet<&str>) -> HashMap<String, Members> {
        let mut ids: Vec<(String, String)> = Vec::new();
        self.planner.scan(|o| {
            if let Some(name) = o.origin.strip_prefix(ORIGIN_PREFIX) {
                if o.state != OpState::Canceled && names.contains(name) {
                    ids.push((name.to_owned(), o.device.clone()));
                }
            }
        });
        let mut out: HashMap<String, Members> = HashMap::new();
        self.fleet.with_index(|x| {
            for (name, id) in ids {
                let Some(w) = book.waves.get(&name) else { continue };
                if let Some(i) = x.lookup(&id).filter(|&i| x.following(&w.tag, w.production)(i)) {
                    out.entry(name).or_default().insert(i);
                }
            }
        });
        out
    }

    fn put(&self, w: &Wave) -> Result<(), WaveError> {
        let mut b = self.store.batch();
        b.put_json(Cf::Waves, w.name.as_bytes(), w)?;
        b.commit()?;
        Ok(())
    }

    /// The wave's images that may reach its devices: for production devices, verified
    /// production TUF targets released for the tag (CI devices likewise when a CI repository
    /// is configured). The first refusal says why when none may.
    fn images(&self, w: &Wave, now: u64) -> (Vec<Arc<ImageMeta>>, Option<Denial>) {
        let mut why = None;
        let ok = self
            .firmware
            .of_version(w.image_name.as_deref(), &w.version)
            .into_iter()
            .filter(|m| match self.planner.admit(w.production, m, Some(&w.tag), now) {
                Ok(()) => true,
                Err(r) => {
                    why.get_or_insert(r);
                    false
                }
            })
            .collect();
        (ok, why)
    }

    /// Refuses an image of the wave whose label is not its signed `custom.version`: the wave
    /// would promote a version the signed metadata does not say it installs.
    fn check_labels(&self, w: &Wave) -> Result<(), WaveError> {
        for m in self.firmware.of_version(w.image_name.as_deref(), &w.version) {
            let signed = self.planner.signed_version(w.production, &m);
            if signed != m.version {
                return Err(WaveError::LabelMismatch { image: m.id(), label: m.version.clone(), signed });
            }
        }
        Ok(())
    }

    pub fn init(&self, req: InitRequest, now: u64) -> Result<Wave, WaveError> {
        if !valid_name(&req.name) {
            return Err(WaveError::InvalidName(req.name));
        }
        check_text("tag", &req.tag)?;
        let (image_name, version) = match req.version.split_once('@') {
            Some((n, v)) => (Some(n.to_owned()), v.to_owned()),
            None => (None, req.version.clone()),
        };
        let mut book = self.lock();
        if book.waves.contains_key(&req.name) {
            return Err(WaveError::Exists(req.name));
        }
        let cls = class(req.production);
        if let Some(a) = book.active_on(&req.tag, req.production) {
            return Err(WaveError::ActiveWave { tag: req.tag, class: cls, active: a.name.clone() });
        }
        let order = version_order(&version).ok_or_else(|| WaveError::Unordered(version.clone()))?;
        if self.firmware.of_version(image_name.as_deref(), &version).is_empty() {
            return Err(WaveError::NoImage(req.version));
        }
        let have = book.production_versions(&req.tag, req.production);
        for p in &req.prune {
            if !have.contains(p) {
                return Err(WaveError::NotProduction { version: p.clone(), tag: req.tag, class: cls, have });
            }
        }
        let current = have
            .iter()
            .filter(|v| !req.prune.contains(v))
            .filter_map(|v| version_order(v).map(|o| (o, v)))
            .max_by(|a, b| a.0.cmp(&b.0));
        if let Some((cur, text)) = current {
            if order <= cur {
                return Err(WaveError::NotNewer { version, current: text.clone(), tag: req.tag, class: cls });
            }
        }
        let wave = Wave {
            name: req.name.clone(),
            tag: req.tag,
            production: req.production,
            version,
            image_name,
            prune: req.prune,
            state: WaveState::Active,
            order: book.waves.values().map(|w| w.order).max().unwrap_or(0) + 1,
            created_at: now,
            ended_at: None,
            rollouts: Vec::new(),
            deferred: Vec::new(),
        };
        self.check_labels(&wave)?;
        let (admissible, why) = self.images(&wave, now);
        if admissible.is_empty() {
            return Err(WaveError::NotAdmissible {
                version: req.version,
                tag: wave.tag,
                class: cls,
                reason: why.map(|d| d.to_string()).unwrap_or_default(),
            });
        }
        if req.dry_run {
            return Ok(wave);
        }
        self.fleet.reserve_version(&wave.version)?;
        self.put(&wave)?;
        book.members.insert(wave.name.clone(), Members::default());
        book.waves.insert(wave.name.clone(), wave.clone());
        info!(wave = %wave.name, tag = %wave.tag, version = %wave.version, "wave initialized");
        Ok(wave)
    }

    fn active(book: &Book, name: &str) -> Result<Wave, WaveError> {
        let w = book.waves.get(name).ok_or_else(|| WaveError::NotFound(name.into()))?;
        if w.state != WaveState::Active {
            return Err(WaveError::NotActive { name: name.into(), state: w.state.as_str() });
        }
        Ok(w.clone())
    }

    /// Selects devices for a rollout and, unless it is a dry run, stages them.
    pub fn rollout(&self, name: &str, req: RolloutRequest, now: u64) -> Result<RolloutReport, WaveError> {
        let limit = req.limit.as_ref().map(parse_limit).transpose()?;
        let uuids = req.uuids.map(|u| match u {
            UuidsArg::List(v) => v.iter().flat_map(|s| split_uuids(s)).collect::<Vec<_>>(),
            UuidsArg::Text(t) => split_uuids(&t),
        });
        if let Some(g) = &req.group {
            check_text("group", g)?;
        }
        let seed = req.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        let mut book = self.lock();
        let wave = Self::active(&book, name)?;
        if !req.dry_run && wave.rollouts.len() >= MAX_ROLLOUTS {
            return Err(WaveError::TooManyRollouts(wave.name));
        }
        let members = book.members.get(name).cloned().unwrap_or_default();
        let sel = Selection {
            tag: &wave.tag,
            production: wave.production,
            group: req.group.as_deref(),
            uuids: uuids.as_deref(),
            limit,
            seed,
            now,
        };
        let (chosen, rejected, population) = self.fleet.with_index(|x| {
            let updated = x.running(&wave.version);
            let s = x.select(&sel, |i| members.contains(i) || updated(i));
            let chosen: Vec<(Idx, String)> = s.devices.iter().map(|&i| (i, x.id(i).to_owned())).collect();
            (chosen, s.rejected, s.population)
        });
        let mut report = RolloutReport {
            wave: wave.name.clone(),
            dry_run: req.dry_run,
            seed,
            population,
            selected: chosen.len(),
            staged: 0,
            rejected: rejected
                .into_iter()
                .map(|(device, r)| Refused { device, reason: rejection_text(r).into() })
                .collect(),
            devices: req.print_uuids.then(|| chosen.iter().map(|(_, id)| id.clone()).collect()),
        };
        if req.dry_run {
            return Ok(report);
        }
        // The operations and the wave's record of this rollout (with the devices deferred
        // until trust is back) are one step (see `staging`).
        let plan = self.plan_stage(&wave, &chosen, now);
        let staged = plan.planned.len();
        report.staged = staged;
        report.rejected.extend(plan.refused.iter().cloned());
        let mut w = book.waves.get(name).expect("checked active above").clone();
        w.deferred.extend(plan.deferred.iter().cloned());
        w.deferred.sort();
        w.deferred.dedup();
        w.rollouts.push(RolloutRecord {
            at: now,
            complete: false,
            group: req.group,
            limit: req.limit.map(|l| match l {
                LimitArg::Count(n) => n.to_string(),
                LimitArg::Text(t) => t,
            }),
            uuids: uuids.map_or(0, |u| u.len()),
            seed,
            staged,
            rejected: report.rejected.len(),
        });
        self.commit_stage(&mut book, &wave, &plan, Some(&w), now)?;
        book.waves.insert(w.name.clone(), w.clone());
        info!(wave = %w.name, staged, population, "wave rolled out");
        Ok(report)
    }

    /// Stages every device of a complete wave's tag and class that is neither in the wave
    /// nor running its version or a newer one.
    fn reconcile(&self, book: &mut Book, wave: &Wave, now: u64) -> Result<usize, WaveError> {
        let chosen: Vec<(Idx, String)> = self.fleet.with_index(|x| {
            let pending = not_reached(x, wave, book);
            x.on_tag(&wave.tag, wave.production).filter(|&i| pending(i)).map(|i| (i, x.id(i).to_owned())).collect()
        });
        let chosen = self.not_staged_newer(chosen, &wave.version);
        Ok(self.stage(book, wave, &chosen, now)?.0)
    }

    /// Leaves out devices with a live operation of their main component for `version` or a
    /// newer one (an assignment, say): a complete wave never stages what would go backwards
    /// from what a device is already to get.
    fn not_staged_newer(&self, chosen: Vec<(Idx, String)>, version: &str) -> Vec<(Idx, String)> {
        let at_least = at_least(version);
        chosen
            .into_iter()
            .filter(|(_, id)| {
                !self
                    .planner
                    .operations_of(id)
                    .iter()
                    .any(|o| o.component == MAIN_COMPONENT && !o.state.is_terminal() && at_least(&o.version))
            })
            .collect()
    }

    /// Completes a wave: its version becomes the tag's production version and every device
    /// of the tag gets it, now and when it joins later.
    pub fn complete(&self, name: &str, now: u64) -> Result<(Wave, usize), WaveError> {
        let mut book = self.lock();
        let mut wave = Self::active(&book, name)?;
        wave.state = WaveState::Complete;
        wave.ended_at = Some(now);
        self.put(&wave)?;
        // Only the latest complete wave of a tag stages joiners.
        let older: Vec<String> = book.complete_on(&wave.tag, wave.production).iter().map(|w| w.name.clone()).collect();
        for o in older {
            book.members.remove(&o);
        }
        book.waves.insert(wave.name.clone(), wave.clone());
        let staged = self.reconcile(&mut book, &wave, now)?;
        let w = book.waves.get_mut(name).expect("inserted above");
        w.rollouts.push(RolloutRecord {
            at: now,
            complete: true,
            group: None,
            limit: None,
            uuids: 0,
            seed: 0,
            staged,
            rejected: 0,
        });
        let w = w.clone();
        self.put(&w)?;
        info!(wave = %w.name, tag = %w.tag, version = %w.version, staged, "wave complete");
        Ok((w, staged))
    }

    /// Cancels an active wave: its queued operations are withdrawn and transfers under way
    /// stop at the device's next Status; devices already updated stay, and the tag's devices
    /// its latest complete wave has not reached are staged with that wave's version again.
    /// Canceling a canceled wave again changes nothing.
    pub fn cancel(&self, name: &str, now: u64) -> Result<(Wave, usize), WaveError> {
        let mut book = self.lock();
        let w = book.waves.get(name).ok_or_else(|| WaveError::NotFound(name.into()))?.clone();
        match w.state {
            WaveState::Complete => return Err(WaveError::CancelComplete(w.name, w.version)),
            WaveState::Canceled => return Ok((w, 0)),
            WaveState::Active => {}
        }
        let mut wave = w;
        wave.state = WaveState::Canceled;
        wave.ended_at = Some(now);
        self.put(&wave)?;
        book.waves.insert(wave.name.clone(), wave.clone());
        book.members.remove(name);
        let n = self.planner.cancel_origin(&wave.origin(), now)?;
        // The devices the canceled wave took from the tag's complete wave get its version
        // back now (a restart would stage them too: `open` reconciles every complete wave).
        let restaged = match book.latest_complete(&wave.tag, wave.production).cloned() {
            Some(complete) => {
                // Its members as the operations say: the ones the canceled wave replaced are
                // no longer staged in it.
                let names = HashSet::from([complete.name.as_str()]);
                let members = self.staged_of(&book, &names).remove(&complete.name).unwrap_or_default();
                book.members.insert(complete.name.clone(), members);
                self.reconcile(&mut book, &complete, now)?
            }
            None => 0,
        };
        info!(wave = %wave.name, operations = n, restaged, "wave canceled");
        Ok((wave, n))
    }

    /// Waves, optionally of one state and one tag, in creation order.
    /// What the simulator checks of waves after every step (`crate::sim`): the waves in
    /// memory are the stored ones (`stored`), and every wave that can still stage devices has
    /// its members loaded.
    pub fn audit(&self, stored: bool) -> Result<(), String> {
        let book = self.lock();
        if stored {
            let loaded = self.store.load_all::<Wave>(Cf::Waves).map_err(|e| e.to_string())?;
            let mem: Vec<&Wave> = book.waves.values().collect();
            if loaded.iter().collect::<Vec<_>>() != mem {
                return Err(format!("waves in memory {mem:?} are not the stored {loaded:?}"));
            }
        }
        for w in book.waves.values().filter(|w| w.state == WaveState::Active) {
            if !book.members.contains_key(&w.name) {
                return Err(format!("active wave {} has no members loaded", w.name));
            }
        }
        Ok(())
    }

    pub fn list(&self, state: Option<WaveState>, tag: Option<&str>) -> Vec<Wave> {
        let book = self.lock();
        let mut v: Vec<Wave> = book
            .waves
            .values()
            .filter(|w| state.is_none_or(|s| w.state == s) && tag.is_none_or(|t| w.tag == t))
            .cloned()
            .collect();
        v.sort_by_key(|w| w.order);
        v
    }

    pub fn get(&self, name: &str) -> Option<Wave> {
        self.lock().waves.get(name).cloned()
    }

    /// The production versions of a tag and class, oldest first.
    pub fn production_versions(&self, tag: &str, production: bool) -> Vec<String> {
        self.lock().production_versions(tag, production)
    }

    /// The production versions of a tag and class with the complete wave each comes from,
    /// oldest first; the last one stages devices that join the tag.
    pub fn version_sources(&self, tag: &str, production: bool) -> Vec<VersionSource> {
        let book = self.lock();
        let have = book.production_versions(tag, production);
        let mut out: Vec<VersionSource> = Vec::new();
        for w in book.complete_on(tag, production) {
            if have.contains(&w.version) {
                out.retain(|s| s.version != w.version);
                out.push(VersionSource {
                    version: w.version.clone(),
                    wave: w.name.clone(),
                    completed_at: w.ended_at.unwrap_or(0),
                });
            }
        }
        out
    }

    /// After a successful TUF refresh: stages, for the latest complete wave of every tag and
    /// class, the devices it has not reached (e.g. devices that joined while its image was not
    /// admissible), and for every active wave the devices its rollouts chose while trust was
    /// missing. Runs after the periodic refresh and `POST /api/v1/tuf/{repo}/refresh`.
    /// Returns how many were staged (also counted in `staging_retries`).
    pub fn after_refresh(&self, now: u64) -> Result<usize, WaveError> {
        let mut book = self.lock();
        let mut staged = 0;
        for w in book.latest_complete_each() {
            staged += self.reconcile(&mut book, &w, now)?;
        }
        staged += self.retry_deferred(&mut book, now)?;
        self.retries.fetch_add(staged as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(staged)
    }

    /// Stages, for every active wave, the devices its rollouts chose while trust was missing
    /// and that still follow its tag and class; the ones still refused stay deferred.
    fn retry_deferred(&self, book: &mut Book, now: u64) -> Result<usize, WaveError> {
        let mut staged = 0;
        let waiting: Vec<Wave> =
            book.waves.values().filter(|w| w.state == WaveState::Active && !w.deferred.is_empty()).cloned().collect();
        for w in waiting {
            let members = book.members.get(&w.name).cloned().unwrap_or_default();
            let chosen: Vec<(Idx, String)> = self.fleet.with_index(|x| {
                let (follows, updated) = (x.following(&w.tag, w.production), x.running(&w.version));
                w.deferred
                    .iter()
                    .filter_map(|id| x.lookup(id).map(|i| (i, id)))
                    .filter(|&(i, _)| follows(i) && !members.contains(i) && !updated(i))
                    .map(|(i, id)| (i, id.clone()))
                    .collect()
            });
            let (n, _, still) = self.stage(book, &w, &chosen, now)?;
            staged += n;
            let rec = book.waves.get_mut(&w.name).expect("listed above");
            rec.deferred = still;
            let rec = rec.clone();
            self.put(&rec)?;
            if n > 0 {
                info!(wave = %w.name, devices = n, "staged devices chosen while trust was missing");
            }
        }
        Ok(staged)
    }

    /// Devices staged by [`Waves::after_refresh`] since the start.
    pub fn staging_retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes a device: out of every wave's members (counts stay exact; registered again, it
    /// is staged like any joiner), its operations, its record. Returns how many unfinished
    /// operations it had, or `None` for an unknown device.
    /// Locks the waves for a device's deletion (see `planner::delete_device`): before the
    /// step opens, as every plan takes its own lock before the planner's.
    pub fn leaving(&self) -> WavesLeaving<'_> {
        WavesLeaving { book: self.lock(), index: None, deferred: Vec::new() }
    }

    /// After devices were registered or changed: a device now following a tag with a
    /// complete wave gets that wave's version, and a device's queued operations of waves for
    /// a tag or class it no longer follows are withdrawn. Returns how many were staged.
    pub fn devices_changed(&self, ids: &[String], now: u64) -> Result<usize, WaveError> {
        let mut book = self.lock();
        if book.waves.is_empty() {
            return Ok(0);
        }
        // Per complete wave, the devices that now follow its tag and class.
        let mut by_wave: BTreeMap<String, Vec<&String>> = BTreeMap::new();
        for id in ids {
            let Some(d) = self.fleet.get(id) else { continue };
            let (tag, production) = (d.spec.tag.as_deref(), d.spec.production);
            let foreign = |o: &super::Operation| {
                o.origin
                    .strip_prefix(ORIGIN_PREFIX)
                    .and_then(|n| book.waves.get(n))
                    .is_some_and(|w| Some(w.tag.as_str()) != tag || w.production != production)
            };
            self.planner.withdraw(id, foreign, "the device no longer follows the wave's tag and class", now)?;
            // It leaves the members of waves of another tag or class: their counts stay exact,
            // and if it comes back it is staged again.
            if let Some(i) = self.fleet.with_index(|x| x.lookup(id)) {
                let left: Vec<String> = book
                    .members
                    .keys()
                    .filter(|n| {
                        book.waves.get(*n).is_some_and(|w| Some(w.tag.as_str()) != tag || w.production != production)
                    })
                    .cloned()
                    .collect();
                for n in left {
                    if let Some(m) = book.members.get_mut(&n) {
                        m.remove(i);
                    }
                }
            }
            if let Some(w) = tag.and_then(|t| book.latest_complete(t, production)) {
                by_wave.entry(w.name.clone()).or_default().push(id);
            }
        }
        let mut staged = 0;
        for (name, ids) in by_wave {
            let w = book.waves[&name].clone();
            let chosen: Vec<(Idx, String)> = self.fleet.with_index(|x| {
                let pending = not_reached(x, &w, &book);
                ids.into_iter().filter_map(|id| x.lookup(id).filter(|&i| pending(i)).map(|i| (i, id.clone()))).collect()
            });
            let chosen = self.not_staged_newer(chosen, &w.version);
            staged += self.stage(&mut book, &w, &chosen, now)?.0;
        }
        Ok(staged)
    }
}

#[cfg(test)]
mod tests;

/// The waves' part in a device's deletion: the waves that deferred it are written without it
/// in the deletion's step; once it is committed, its memberships are forgotten.
pub struct WavesLeaving<'a> {
    book: MutexGuard<'a, Book>,
    index: Option<Idx>,
    deferred: Vec<Wave>,
}

impl WavesLeaving<'_> {
    pub fn stage(&mut self, step: &mut super::Step<'_>, fleet: &Fleet, id: &str) -> Result<(), StoreError> {
        self.index = fleet.with_index(|x| x.lookup(id));
        for w in self.book.waves.values().filter(|w| w.deferred.iter().any(|d| d == id)) {
            let mut w = w.clone();
            w.deferred.retain(|d| d != id);
            step.batch().put_json(Cf::Waves, w.name.as_bytes(), &w)?;
            self.deferred.push(w);
        }
        Ok(())
    }

    pub fn apply(mut self) {
        if let Some(i) = self.index {
            for m in self.book.members.values_mut() {
                m.remove(i);
            }
        }
        for w in std::mem::take(&mut self.deferred) {
            self.book.waves.insert(w.name.clone(), w);
        }
    }
}
