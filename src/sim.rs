//! A deterministic simulator of the whole planner (DESIGN §4, invariant 11), after
//! FoundationDB's simulation and TigerBeetle's VOPR: from one seed it drives the real store
//! (RocksDB in a temp dir), fleet, operation queue, waves, rollouts and actions, and the real
//! DFU step, with a simulated clock. Operators create, start, pause, stop and delete rollouts,
//! assign images, run and abort FAS actions, take and restore snapshots, init, roll out,
//! complete and cancel waves, register, retag and delete devices; devices ask for their
//! components, download, swap, roll back, go silent and report other versions. At random points
//! the process **crashes**: the store refuses every write from some point on (a crash between
//! two writes), everything in memory is dropped without a shutdown step, and the gateway is
//! opened again from the RocksDB directory.
//!
//! In cluster mode ([`cluster`]) two data-plane nodes serve the devices from the planner's
//! views over a simulated broker. After every step the invariants are checked ([`check`]); at
//! the end the fleet quiesces (every device asks until it is told to wait, time runs on) and
//! every plan must have ended or be waiting with a reason. A failure names its seed, step and
//! invariant; the same seed replays it exactly (randomness, time and crashes all come from the
//! seed; maps the planner iterates are fixed-hashed).
//!
//! It knows the gateway through the planner's public API and the DFU step, as the
//! transports do; it must not reach into a plan's memory except through its `audit`.

mod check;
mod cluster;
mod devices;
mod operator;
mod trust;

use std::path::Path;
use std::sync::Arc;

use crate::config::{DfuConfig, FirmwareConfig};
use crate::firmware::Firmware;
use crate::fleet::Fleet;
use crate::planner::actions::Actions;
use crate::planner::rollouts::Rollouts;
use crate::planner::waves::Waves;
use crate::planner::Planner;
use crate::store::{Disk, Store};
use crate::telemetry::Telemetry;
use crate::transport::Dfu;
use crate::tuf::{RepoConfig, Trust, Verified};

/// What one simulation runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Steps before the fleet quiesces.
    pub steps: u64,
    /// Devices registered at the start (more are registered as it runs).
    pub devices: usize,
    /// In every how many steps, on average, a crash comes (half of them a kill between two
    /// steps, half armed to strike between two writes of the steps that follow).
    pub crash_every: u64,
    /// RocksDB on the file system (a temp dir) instead of its in-memory environment: the same
    /// database code and crash recovery, slower.
    pub on_disk: bool,
    /// Cluster mode: devices are served by two simulated data-plane nodes from the views the
    /// planner's feed publishes, over a network that delays, repeats, reorders and loses.
    pub cluster: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig { seed: 1, steps: 2_000, devices: 10, crash_every: 40, on_disk: false, cluster: false }
    }
}

/// What a simulation did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub crashes: u64,
    /// Invariant checks made (each check of each invariant counts once).
    pub checks: u64,
    /// Status messages the DFU step handled.
    pub statuses: u64,
    /// Cluster mode: blocks a node served from a view the planner had already replaced (the
    /// newer one on its way) that the planner would not have served then.
    pub stale_serves: u64,
    /// Of those, blocks served while the planner had another transfer of the device in flight
    /// (from the device's side, two transfers at once while the node's view was behind).
    pub stale_overlaps: u64,
    pub failure: Option<Failure>,
}

/// A broken invariant: where, which, and what was seen.
#[derive(Debug, Clone)]
pub struct Failure {
    pub step: u64,
    pub invariant: &'static str,
    pub detail: String,
    /// The last events before it, oldest first.
    pub trail: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "step {}: invariant '{}' broken: {}", self.step, self.invariant, self.detail)?;
        for t in &self.trail {
            writeln!(f, "  … {t}")?;
        }
        Ok(())
    }
}

/// Events kept to show before a failure.
const TRAIL: usize = 40;

/// Seconds the operation queue gives a silent transfer in the simulation.
const OP_TIMEOUT: u64 = 600;

/// The DFU step's settings, the gateway's and the nodes' alike.
fn engine() -> crate::engine::EngineConfig {
    DfuConfig { max_block_size: 256, default_mtu: 256, max_window: 4, ..DfuConfig::default() }.engine()
}

/// One gateway process: everything it holds in memory, opened from the store.
struct Node {
    store: Store,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    waves: Arc<Waves>,
    rollouts: Arc<Rollouts>,
    actions: Arc<Actions>,
    dfu: Dfu,
}

impl Node {
    /// `verified`: what the start's TUF refresh verifies (`None`: it failed).
    fn open(disk: &Disk, dir: &Path, now: u64, verified: Option<Verified>) -> Result<Node, String> {
        let e = |e: &dyn std::fmt::Display| format!("opening the store again failed: {e}");
        let store = Store::open_on(disk, dir, false).map_err(|x| e(&x))?;
        let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).map_err(|x| e(&x))?);
        let fleet = Arc::new(Fleet::open(store.clone(), 10_000).map_err(|x| e(&x))?);
        // A production repository is configured (never fetched: the simulation installs what
        // a refresh verifies), before the planner and the waves open, as the gateway does.
        let repo = RepoConfig { root: "sim/root.json".into(), ..RepoConfig::default() };
        let trust = Arc::new(Trust::new(&repo, &RepoConfig::default(), dir));
        if let Some(v) = verified {
            trust.install_verified(v);
        }
        let planner = Arc::new(
            Planner::open(store.clone(), fleet.clone(), firmware.clone(), OP_TIMEOUT, now)
                .map_err(|x| e(&x))?
                .with_trust(trust, false),
        );
        let waves = Arc::new(
            Waves::open(store.clone(), fleet.clone(), firmware.clone(), planner.clone(), 3600, now)
                .map_err(|x| e(&x))?,
        );
        let rollouts = Arc::new(
            Rollouts::open(store.clone(), fleet.clone(), firmware.clone(), planner.clone(), false, now)
                .map_err(|x| e(&x))?,
        );
        let actions = Arc::new(
            Actions::open(store.clone(), fleet.clone(), firmware.clone(), planner.clone(), now).map_err(|x| e(&x))?,
        );
        let dfu = Dfu::new(planner.clone(), fleet.clone(), engine(), Arc::new(Telemetry::new()));
        crate::planner::finish_registrations(&fleet, &waves, Some(&rollouts), now).map_err(|x| e(&x))?;
        Ok(Node { store, fleet, firmware, planner, waves, rollouts, actions, dfu })
    }

    fn engine(&self) -> crate::engine::EngineConfig {
        engine()
    }

    /// Handles the outcomes the plans were told of (what their worker threads do).
    /// Acting on outcomes may end more operations (a rollout's slice replacing another's
    /// queued one, an action's time limit): pumped until nothing is left, as the workers do.
    fn pump(&self, now: u64) {
        let mut quiet = 0;
        for _ in 0..32 {
            // A store error here is a crash the step armed: the next check reopens.
            let r = self.rollouts.pump(now).unwrap_or(0);
            let a = self.actions.pump(now).unwrap_or(0);
            // A pass that handled nothing may still have ended something (timed work): one
            // more quiet pass says nothing is left.
            quiet = if r + a == 0 { quiet + 1 } else { 0 };
            if quiet == 2 || self.store.is_down() {
                return;
            }
        }
    }
}

/// The simulation's state beside the gateway: the clock, the devices (they outlive crashes)
/// and the last events.
struct Sim {
    rng: fastrand::Rng,
    now: u64,
    step: u64,
    devices: devices::Devices,
    trail: std::collections::VecDeque<String>,
    report: Report,
    names: u64,
    /// The production TUF repository (outside the gateway).
    repo: trust::Repo,
}

impl Sim {
    fn note(&mut self, event: String) {
        if self.trail.len() == TRAIL {
            self.trail.pop_front();
        }
        self.trail.push_back(event);
    }

    fn fail(&self, invariant: &'static str, detail: String) -> Failure {
        Failure { step: self.step, invariant, detail, trail: self.trail.iter().cloned().collect() }
    }
}

/// Runs one simulation to its end or its first broken invariant.
pub fn run(cfg: &SimConfig) -> Report {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            let failure = Failure { step: 0, invariant: "setup", detail: e.to_string(), trail: Vec::new() };
            return Report { seed: cfg.seed, failure: Some(failure), ..Report::default() };
        }
    };
    // Action ids come from fastrand's thread-local generator: seeded too.
    fastrand::seed(cfg.seed ^ 0x5eed);
    let mut sim = Sim {
        rng: fastrand::Rng::with_seed(cfg.seed),
        now: 1_000_000,
        step: 0,
        devices: devices::Devices::default(),
        trail: Default::default(),
        report: Report { seed: cfg.seed, ..Report::default() },
        names: 0,
        repo: trust::Repo::default(),
    };
    let disk = if cfg.on_disk { Ok(Disk::real()) } else { Disk::memory() };
    let result = match disk {
        Ok(disk) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drive(cfg, &disk, dir.path(), &mut sim))),
        Err(e) => Ok(Err(sim.fail("setup", e.to_string()))),
    };
    let failure = match result {
        Ok(r) => r.err(),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(sim.fail("no panic", what))
        }
    };
    sim.report.failure = failure;
    sim.report
}

fn drive(cfg: &SimConfig, disk: &Disk, dir: &Path, sim: &mut Sim) -> Result<(), Failure> {
    let mut node = Node::open(disk, dir, sim.now, None).map_err(|e| sim.fail("open", e))?;
    let mut net = cfg.cluster.then(|| cluster::Net::new(node.engine()));
    if let Some(net) = &mut net {
        net.planner_started(&node, sim.now);
    }
    devices::setup(&node, sim, cfg.devices).map_err(|e| sim.fail("setup", e))?;
    trust::publish(&node, sim);
    trust::refresh(&node, sim, true);
    while sim.step < cfg.steps {
        sim.step += 1;
        sim.report.steps += 1;
        let fault = sim.rng.u64(0..cfg.crash_every.max(1)) == 0;
        if fault && sim.rng.bool() {
            let writes = sim.rng.u32(0..4);
            node.store.crash_after(Some(writes));
            sim.note(format!("a crash armed after {writes} more writes"));
        } else if fault {
            sim.note("the gateway is killed".into());
            node = restart(node, disk, dir, sim, net.as_mut())?;
        }
        let roll = sim.rng.u32(0..97);
        match roll {
            0..=39 => devices::status_round(&node, sim, net.as_mut())?,
            40..=49 => {
                let dt = sim.rng.u64(1..90);
                sim.now += dt;
                sim.note(format!("{dt} s pass; time-outs swept"));
                let _ = node.planner.sweep_timeouts(sim.now);
                if sim.rng.bool() {
                    let _ = node.fleet.flush_last_seen();
                }
            }
            50..=89 => operator::act(&node, sim, roll),
            90..=93 => devices::misbehave(sim),
            _ => trust::event(&node, sim),
        }
        node.pump(sim.now);
        if let Some(net) = &mut net {
            if sim.rng.u32(0..cfg.crash_every.max(1) as u32 * 2) == 0 {
                net.node_fault(sim);
            }
            if sim.rng.u32(0..cfg.crash_every.max(1) as u32 * 2) == 0 {
                net.stall(sim);
            }
            net.publish(&node, sim);
            net.deliver(&node, sim, true);
            node.pump(sim.now);
        }
        if node.store.is_down() {
            sim.note("the store went down: crash".into());
            node = restart(node, disk, dir, sim, net.as_mut())?;
            node.pump(sim.now);
        }
        check::all(&node, sim, sim.step % 8 == 0)?;
        if let Some(net) = &net {
            (sim.report.stale_serves, sim.report.stale_overlaps) = (net.stale_serves, net.stale_overlaps);
            cluster::audit(net, sim)?;
        }
    }
    node.store.crash_after(None);
    trust::restore(&node, sim);
    devices::quiesce(&node, sim, net.as_mut())?;
    if let Some(net) = &mut net {
        cluster::converged(net, &node, sim)?;
        (sim.report.stale_serves, sim.report.stale_overlaps) = (net.stale_serves, net.stale_overlaps);
    }
    check::settled(&node, sim)
}

/// Drops everything in memory (no shutdown step: nothing is flushed or finished) and opens
/// the gateway again from the store, then checks what it loaded.
fn restart(
    node: Node,
    disk: &Disk,
    dir: &Path,
    sim: &mut Sim,
    net: Option<&mut cluster::Net>,
) -> Result<Node, Failure> {
    sim.report.crashes += 1;
    node.store.crash_after(None);
    drop(node);
    // The start's refresh verifies what the repository serves, unless it fails.
    let verified = sim.repo.current.clone().filter(|_| sim.rng.u32(0..4) != 0);
    let node = Node::open(disk, dir, sim.now, verified).map_err(|e| sim.fail("open after a crash", e))?;
    if let Some(net) = net {
        net.planner_started(&node, sim.now);
    }
    // What open finished may have ended operations (a slice replacing a queued one): the
    // workers' first pass.
    node.pump(sim.now);
    if node.store.is_down() {
        return Err(sim.fail("open after a crash", "the store is down after a reopen".into()));
    }
    check::all(&node, sim, true)?;
    Ok(node)
}

/// Runs simulations from `first` on, one seed after another, until `seconds` have passed or
/// `seeds` ran; calls `each` with every report. Returns the reports.
pub fn soak(first: u64, seeds: u64, seconds: u64, cfg: &SimConfig, mut each: impl FnMut(&Report)) -> Vec<Report> {
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    for seed in first..first.saturating_add(seeds) {
        if start.elapsed().as_secs() >= seconds {
            break;
        }
        let r = run(&SimConfig { seed, ..cfg.clone() });
        each(&r);
        out.push(r);
    }
    out
}
