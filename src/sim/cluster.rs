//! Cluster mode: the planner's feed and two data-plane nodes, each the real [`Replica`] and
//! DFU step a node runs, joined by a simulated broker instead of MQTT.
//!
//! What the broker guarantees is what the design relies on (MQTT QoS 1, retained views): a
//! node receives the views of one device in the order they were published, each at least once
//! (a view may come twice), after any delay; a node that reconnects loses what was on its way
//! and receives every retained view again (its heartbeat tells the planner of the new
//! connection, and the planner clears the deleted devices' views again). Reports are sent at least once too, but the planner
//! may get them late, twice, in any order between the nodes and within one, or not at all (a
//! full queue drops them; nodes send again what no view confirms). Devices ask either node
//! for any message (a shared subscription). Nodes restart (their replica is lost) and
//! reconnect; the planner crashes as in single-node runs, and its feed starts again as the
//! real one does on connecting: every view published again, deleted devices' tombstones too.
//!
//! What a node serves is checked beside the planner's records: no node ever holds two
//! transfers of one device in flight; a transfer it starts is no downgrade of what the device
//! reports; a block the planner would not serve now (its operation ended, not granted,
//! another transfer of the device in flight, the device deleted, admission refused) is served
//! only by a node whose newer view is still on its way (counted: the window the design
//! accepts), and a node with nothing on its way holds the planner's newest view. When the
//! fleet has quiesced every node holds, for every device, the view the planner computes then.
//! Past the trust deadline its view carries a node serves nothing, stale view or not.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Failure, Node, Sim};
use crate::cluster::feed;
use crate::cluster::replica::Replica;
use crate::cluster::{Answer, Report, View};
use crate::engine::OpState;
use crate::firmware::version_order;
use crate::fleet::changes::Changes;
use crate::telemetry::Telemetry;
use crate::transport::Dfu;

pub(super) const NODES: usize = 2;
/// Steps a view or a report may take to arrive, at most.
const MAX_DELAY: u64 = 12;
/// The real feed computes every view again this often (`cluster::feed`'s RECHECK).
const RECHECK_SECS: u64 = 10;

/// One data-plane node: its replica, the DFU step on it, and what is on its way to it.
pub(super) struct SimNode {
    pub name: String,
    pub replica: Arc<Replica>,
    pub dfu: Dfu,
    fetch: mpsc::Receiver<String>,
    out: mpsc::Receiver<Report>,
    /// Views on their way, in publish order: (arrives at step, device, view; None clears).
    inbox: VecDeque<(u64, String, Option<View>)>,
    /// Per device, the view this node applied last (what it answers from).
    applied: HashMap<String, Option<View>>,
}

impl SimNode {
    fn new(name: String, engine: crate::engine::EngineConfig) -> SimNode {
        let telemetry = Arc::new(Telemetry::new());
        let (ftx, fetch) = mpsc::channel(64);
        let (rtx, out) = mpsc::channel(256);
        let replica = Arc::new(Replica::new(1 << 20, ftx, rtx, telemetry.clone()));
        let dfu = Dfu::with_source(replica.clone(), engine, telemetry);
        SimNode { name, replica, dfu, fetch, out, inbox: VecDeque::new(), applied: HashMap::new() }
    }
}

pub(super) struct Net {
    pub nodes: Vec<SimNode>,
    /// The broker's retained views.
    retained: BTreeMap<String, View>,
    /// What the feed last published per device (cleared when the planner starts again).
    published: HashMap<String, View>,
    changes: Arc<Changes>,
    /// Report messages on their way to the planner: (arrives at step, from node, reports).
    reports: Vec<(u64, usize, Vec<Report>)>,
    engine: crate::engine::EngineConfig,
    telemetry: Arc<Telemetry>,
    /// The network's clock: one tick per step (and per settling round).
    clock: u64,
    /// The trust generation the views were last computed under (see the real feed).
    trust: u64,
    /// When the feed last computed every view again (simulated seconds; the real feed's
    /// recheck interval).
    rechecked: u64,
    /// Until this tick the planner neither publishes nor takes reports (busy, or its bus
    /// connection down); nodes and devices go on.
    stalled_until: u64,
    /// Heartbeats telling of a node's new connection, on their way to the planner (tick).
    hellos: Vec<u64>,
    /// Blocks a node served while its view of the device was behind the planner's and the
    /// planner would not have served them then (a transfer of another component in flight,
    /// or admission refusing): the window the design accepts, counted.
    pub stale_serves: u64,
    /// Of those, blocks served while the planner had another transfer of the device in flight.
    pub stale_overlaps: u64,
}

impl Net {
    pub fn new(engine: crate::engine::EngineConfig) -> Net {
        Net {
            nodes: (0..NODES).map(|i| SimNode::new(format!("n{}", i + 1), engine.clone())).collect(),
            retained: BTreeMap::new(),
            published: HashMap::new(),
            changes: Arc::new(Changes::default()),
            reports: Vec::new(),
            engine,
            telemetry: Arc::new(Telemetry::new()),
            clock: 0,
            trust: 0,
            rechecked: 0,
            stalled_until: 0,
            hellos: Vec::new(),
            stale_serves: 0,
            stale_overlaps: 0,
        }
    }

    /// The planner (re)started: its feed connects and publishes every view again, the
    /// deleted devices' empty ones included.
    pub fn planner_started(&mut self, node: &Node, now: u64) {
        self.changes = Arc::new(Changes::default());
        node.fleet.report_changes(self.changes.clone());
        node.planner.report_changes(self.changes.clone());
        self.published.clear();
        self.trust = node.planner.trust().generation();
        let _ = node.fleet.prune_tombstones(now);
        let ids = node.fleet.ids_where(|_| true);
        self.changes.mark_all(ids.iter().map(String::as_str));
        feed::replay_tombstones(&node.fleet, &self.changes, &self.telemetry);
    }

    /// One round of the feed: the changed devices' views (all of them on a recheck) are
    /// computed, and those that changed published.
    pub fn publish(&mut self, node: &Node, sim: &mut Sim) {
        // A refresh verified new metadata: every view's trust facts with it. A busy feed marks
        // them too (as the real one does on every turn), and publishes them once it can.
        let trust = node.planner.trust().generation();
        let recheck = sim.now >= self.rechecked + RECHECK_SECS;
        if recheck || trust != self.trust {
            self.trust = trust;
            self.rechecked = sim.now;
            let ids = node.fleet.ids_where(|_| true);
            self.changes.mark_all(ids.iter().map(String::as_str).chain(self.published.keys().map(String::as_str)));
        }
        if self.clock < self.stalled_until {
            return;
        }
        let mut batch = self.changes.take(usize::MAX);
        batch.sort();
        for (device, _) in batch {
            let view = match feed::view(&node.planner, &node.fleet, &device, 0, sim.now) {
                Ok(v) => v,
                // Computed again at the next recheck.
                Err(e) => {
                    sim.note(format!("feed: no view of {device}: {e}"));
                    continue;
                }
            };
            // As the real feed: a view equal to the one published is skipped; a cleared one is
            // always published again (its subscribers drop the device).
            let same = match (&view, self.published.get(&device)) {
                (Some(v), Some(p)) => v.components == p.components,
                _ => false,
            };
            if same {
                continue;
            }
            match &view {
                Some(v) => {
                    self.published.insert(device.clone(), v.clone());
                    self.retained.insert(device.clone(), v.clone());
                }
                None => {
                    self.published.remove(&device);
                    self.retained.remove(&device);
                }
            }
            for n in 0..self.nodes.len() {
                let at = self.clock + sim.rng.u64(0..=MAX_DELAY);
                // Behind what is already on its way: one device's views stay in order.
                let at = self.nodes[n].inbox.back().map_or(at, |(b, ..)| at.max(*b));
                self.nodes[n].inbox.push_back((at, device.clone(), view.clone()));
            }
        }
    }

    /// Views arrive at the nodes, nodes fetch images and send reports, reports arrive at the
    /// planner; with the network's faults.
    /// `faults`: reports may be lost (not while the fleet quiesces).
    pub fn deliver(&mut self, node: &Node, sim: &mut Sim, faults: bool) {
        self.clock += 1;
        for n in 0..self.nodes.len() {
            while self.nodes[n].inbox.front().is_some_and(|(at, ..)| *at <= self.clock) {
                let Some((_, device, view)) = self.nodes[n].inbox.pop_front() else { break };
                let times = if sim.rng.u32(0..20) == 0 { 2 } else { 1 };
                for _ in 0..times {
                    self.nodes[n].replica.apply(&device, view.clone());
                }
                self.nodes[n].applied.insert(device, view);
            }
            // Images are fetched by digest from the planner.
            while let Ok(sha) = self.nodes[n].fetch.try_recv() {
                if !self.nodes[n].replica.wants(&sha) {
                    continue;
                }
                let meta = node.firmware.list().into_iter().find(|m| m.sha256 == sha);
                if let Some(bytes) = meta.and_then(|m| node.firmware.bytes(&m).ok()) {
                    self.nodes[n].replica.insert_image(sha, bytes);
                }
            }
            let mut batch = Vec::new();
            while let Ok(r) = self.nodes[n].out.try_recv() {
                batch.push(r);
            }
            let mut swept = self.nodes[n].replica.sweep(sim.now * 1000);
            swept.sort_by(|a, b| key(a).cmp(&key(b)));
            batch.extend(swept);
            if batch.is_empty() {
                continue;
            }
            match sim.rng.u32(0..16) {
                0 if faults => sim.note(format!("{}: {} reports lost", self.nodes[n].name, batch.len())),
                1 => {
                    let at = self.clock + sim.rng.u64(0..=MAX_DELAY);
                    self.reports.push((at, n, batch.clone()));
                    self.reports.push((sim.step + sim.rng.u64(0..=MAX_DELAY), n, batch));
                }
                _ => self.reports.push((sim.step + sim.rng.u64(0..=MAX_DELAY), n, batch)),
            }
        }
        // A node's new connection: the planner clears deleted devices' views again (taken
        // by its event loop even while the feed is busy).
        let before = self.hellos.len();
        self.hellos.retain(|at| *at > self.clock);
        if self.hellos.len() < before {
            feed::replay_tombstones(&node.fleet, &self.changes, &self.telemetry);
        }
        // Due reports, in any order.
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.reports.len() {
            if self.reports[i].0 <= self.clock {
                due.push(self.reports.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if self.clock < self.stalled_until {
            // The planner takes them once it is back.
            self.reports.extend(due);
            return;
        }
        sim.rng.shuffle(&mut due);
        for (_, _, batch) in due {
            for r in batch {
                // A store error is a crash the step armed: the next check reopens.
                let _ = feed::apply_report(&node.planner, &node.fleet, r, sim.now);
            }
        }
    }

    /// A node restarts (its replica and what was on its way to it are lost), or only
    /// reconnects (what was on its way is lost); either way the broker sends it every retained
    /// view again.
    pub fn node_fault(&mut self, sim: &mut Sim) {
        let n = sim.rng.usize(0..self.nodes.len());
        let restart = sim.rng.bool();
        if restart {
            let name = self.nodes[n].name.clone();
            self.nodes[n] = SimNode::new(name, self.engine.clone());
        } else {
            // Its views stay; what was on its way is lost.
            self.nodes[n].inbox.clear();
        }
        // Its heartbeat tells the planner of the new connection, a little later.
        self.hellos.push(self.clock + sim.rng.u64(0..=MAX_DELAY));
        sim.note(format!("{}: {}", self.nodes[n].name, if restart { "restarts" } else { "reconnects" }));
        let node = &mut self.nodes[n];
        let devices: Vec<(String, View)> = self.retained.iter().map(|(d, v)| (d.clone(), v.clone())).collect();
        for (d, v) in devices {
            let at = self.clock + sim.rng.u64(0..=MAX_DELAY);
            let at = node.inbox.back().map_or(at, |(b, ..)| at.max(*b));
            node.inbox.push_back((at, d, Some(v)));
        }
    }

    /// The planner stops publishing and taking reports for a while (busy, or its connection
    /// to the broker down): nodes go on from the views they hold, by their own clocks.
    pub fn stall(&mut self, sim: &mut Sim) {
        let ticks = sim.rng.u64(10..80);
        self.stalled_until = self.clock + ticks;
        sim.note(format!("the planner's feed stalls for {ticks} steps"));
    }

    /// Whether anything is still on its way (views, reports, or marked changes).
    pub fn busy(&self) -> bool {
        !self.changes.is_empty() || !self.reports.is_empty() || self.nodes.iter().any(|n| !n.inbox.is_empty())
    }

    /// Runs the feed and the network, without faults, until nothing is on its way (the
    /// nodes' re-sends of unconfirmed states included: time passes for them).
    pub fn settle(&mut self, node: &Node, sim: &mut Sim) {
        self.stalled_until = 0;
        self.rechecked = 0;
        for round in 0..4 * MAX_DELAY {
            self.publish(node, sim);
            self.deliver(node, sim, false);
            node.pump(sim.now);
            if !self.busy() && round > MAX_DELAY {
                return;
            }
            if round % 4 == 3 {
                sim.now += 1;
            }
        }
    }
}

/// A node served a WRITE of `version` at `offset` for a device's component (`starting`: the
/// transfer started here, and the version the device reported). The node's own rules hold
/// always; what the planner would not serve now is served only while the node's newer view of
/// the device is on its way (counted), and a node with nothing on its way holds the planner's
/// view.
#[allow(clippy::too_many_arguments)]
pub(super) fn served(
    net: &mut Net,
    k: usize,
    node: &Node,
    sim: &mut Sim,
    device: &str,
    component: &str,
    version: &str,
    offset: u32,
    starting: Option<&str>,
) -> Result<(), Failure> {
    sim.report.checks += 1;
    let name = net.nodes[k].name.clone();
    let fail = |sim: &Sim, invariant: &'static str, why: String| {
        Err(sim.fail(invariant, format!("{name} served {device}/{component} a WRITE of {version} at {offset}: {why}")))
    };
    let Some((seq, state)) = net.nodes[k].replica.state(device, component) else {
        return fail(sim, "admission (node)", "the node holds no operation for it".into());
    };
    if !state.in_flight() {
        return fail(sim, "admission (node)", format!("the node holds operation {seq} {}", state.as_str()));
    }
    if let Some(from) = starting {
        if let (Some(a), Some(b)) = (version_order(from), version_order(version)) {
            if b < a {
                return fail(sim, "admission (node)", format!("a downgrade from {from}, started by the node"));
            }
        }
    }
    // Past its view's trust deadline a node serves nothing, whatever it has heard since.
    let deadline = net.nodes[k].applied.get(device).cloned().flatten().and_then(|v| {
        v.components.into_iter().find_map(|e| match e.answer {
            Answer::Active { seq: s, trusted_until, .. } if e.component == component && s == seq => trusted_until,
            _ => None,
        })
    });
    if let Some(t) = deadline.filter(|t| sim.now >= *t) {
        return fail(sim, "admission (node)", format!("its view's trust deadline {t} has passed (now {})", sim.now));
    }
    let Some(why) = planner_refuses(node, device, component, seq, sim.now) else { return Ok(()) };
    let on_its_way = net.changes.contains(device) || net.nodes[k].inbox.iter().any(|(_, d, _)| d == device);
    if on_its_way {
        net.stale_serves += 1;
        // The planner has another transfer of this device in flight: from the device's side,
        // two at once for as long as this node's view is behind.
        if node.planner.operations_of(device).iter().any(|o| o.seq != seq && o.state.in_flight()) {
            net.stale_overlaps += 1;
        }
        sim.note(format!("{name} served {device}/{component} from a replaced view: {why}"));
        return Ok(());
    }
    let held = net.nodes[k].applied.get(device).cloned().flatten().map(|v| v.components);
    let newest = net.retained.get(device).map(|v| v.components.clone());
    if held != newest {
        return fail(
            sim,
            "views converge",
            format!("{why}; the node's view is not the planner's and none is on its way"),
        );
    }
    fail(sim, "admission", format!("{why}, and the node holds the planner's newest view"))
}

/// Why the planner would not serve a block of operation `seq` of a device's component now.
fn planner_refuses(node: &Node, device: &str, component: &str, seq: u64, now: u64) -> Option<String> {
    if node.fleet.get(device).is_none() {
        return Some("the device is not registered".into());
    }
    let ops = node.planner.operations_of(device);
    let Some(op) = ops.iter().find(|o| o.seq == seq) else {
        return Some(format!("the planner has no operation {seq}"));
    };
    if op.component != component {
        return Some(format!("operation {seq} is for {}", op.component));
    }
    if op.state.is_terminal() {
        return Some(format!("operation {seq} is {} at the planner", op.state.as_str()));
    }
    if op.state == OpState::Pending && node.planner.grant(device) != Some(seq) {
        let other = ops.iter().find(|o| o.state.in_flight());
        return Some(format!(
            "the planner does not grant it (grants {:?}; in flight: {:?})",
            node.planner.grant(device),
            other.map(|o| (o.seq, o.component.clone()))
        ));
    }
    super::check::image_refused(node, device, &op.image, now)
}

/// After the fleet quiesced: every node holds the planner's view of every device, and that
/// is what the planner computes now.
pub(super) fn converged(net: &mut Net, node: &Node, sim: &mut Sim) -> Result<(), Failure> {
    net.settle(node, sim);
    for n in &net.nodes {
        sim.report.checks += 1;
        let mut devices: Vec<&String> = n.applied.keys().chain(net.retained.keys()).collect();
        devices.sort();
        devices.dedup();
        for d in devices {
            let held = n.applied.get(d).cloned().flatten().map(|v| v.components);
            let newest = match feed::view(&node.planner, &node.fleet, d, 0, sim.now) {
                Ok(v) => v.map(|v| v.components),
                Err(e) => return Err(sim.fail("views converge", format!("no view of {d}: {e}"))),
            };
            if held != newest {
                return Err(sim.fail(
                    "views converge",
                    format!("after the fleet quiesced {} holds {held:?} for {d}, the planner {newest:?}", n.name),
                ));
            }
        }
    }
    Ok(())
}

fn key(r: &Report) -> (String, u64) {
    match r {
        Report::Step { device, seq, .. } => (device.clone(), *seq),
        Report::Seen { device, at, .. } => (device.clone(), *at),
    }
}

/// Every node's own rule: no two transfers of one device in flight in its replica.
pub(super) fn audit(net: &Net, sim: &mut Sim) -> Result<(), Failure> {
    for n in &net.nodes {
        sim.report.checks += 1;
        if let Err(e) = n.replica.audit() {
            return Err(sim.fail("one transfer per device (node)", format!("{}: {e}", n.name)));
        }
    }
    Ok(())
}
