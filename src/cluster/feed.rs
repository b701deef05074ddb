//! The planner's side: publishes each changed device's view, applies the nodes' reports, and
//! keeps the list of nodes it has heard from.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{bus_event, Answer, ClusterTopics, Entry, Heartbeat, Report, Reports, View};
use crate::fleet::changes::Changes;
use crate::fleet::Fleet;
use crate::planner::{Planner, PlannerError};
use crate::telemetry::Telemetry;
use crate::transport::external::{drive, REQUEST_QUEUE};

/// Views computed and published per round.
const BATCH: usize = 512;
/// Every view is computed again this often, and published if it changed: what no write marks
/// (trust expiring or verified, an image's hints) reaches the nodes too.
const RECHECK: Duration = Duration::from_secs(10);
/// How often an idle feed looks whether a TUF refresh verified new metadata.
const TRUST_POLL: Duration = Duration::from_secs(1);
/// Report messages waiting to be applied; beyond it they are dropped and counted (nodes send
/// again what no view confirms).
const REPORT_QUEUE: usize = 1024;
/// Nodes remembered; beyond it the longest silent is forgotten.
const MAX_NODES: usize = 1024;

/// The data-plane nodes the planner has heard from.
#[derive(Default)]
pub struct Nodes {
    heard: Mutex<BTreeMap<String, (Heartbeat, u64)>>,
    /// The time of the newest change published.
    newest_change_ms: AtomicU64,
    /// Changed devices whose view is not published yet.
    backlog: AtomicU64,
}

/// A node as `fwgate nodes` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    /// Seconds since its last heartbeat reached the planner.
    pub heard_secs_ago: u64,
    /// How far the node's newest change is behind the planner's newest published one (ms;
    /// 0 when it holds it).
    pub lag_ms: u64,
    /// The planner's changed devices whose view is not published yet (the same for every node).
    pub planner_backlog: u64,
}

impl Nodes {
    /// Takes a node's heartbeat: `None` when it is refused, else whether it tells of a new
    /// bus connection of the node (its first heartbeat here, or a reconnect).
    fn heard(&self, payload: &[u8], name: &str, now_ms: u64) -> Option<bool> {
        if payload.is_empty() {
            // The retained heartbeat was cleared: the node is gone for good.
            self.heard.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
            return Some(false);
        }
        let beat = match serde_json::from_slice::<Heartbeat>(payload) {
            Ok(b) if b.node == name => b,
            _ => return None,
        };
        let mut map = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_NODES && !map.contains_key(name) {
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(n, _)| n.clone()) {
                map.remove(&oldest);
            }
        }
        let new_connection = !beat.gone
            && map.get(name).is_none_or(|(b, _)| b.connections != beat.connections || b.started_ms != beat.started_ms);
        map.insert(name.to_owned(), (beat, now_ms));
        Some(new_connection)
    }

    pub fn list(&self, now_ms: u64) -> Vec<NodeStatus> {
        let newest = self.newest_change_ms.load(Ordering::Relaxed);
        let backlog = self.backlog.load(Ordering::Relaxed);
        let map = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|(b, at)| NodeStatus {
                heartbeat: b.clone(),
                heard_secs_ago: now_ms.saturating_sub(*at) / 1000,
                lag_ms: newest.saturating_sub(b.newest_change_ms),
                planner_backlog: backlog,
            })
            .collect()
    }
}

/// Runs the planner's side until `stop`.
pub async fn run(
    opts: MqttOptions,
    topics: ClusterTopics,
    planner: Arc<Planner>,
    fleet: Arc<Fleet>,
    changes: Arc<Changes>,
    nodes: Arc<Nodes>,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) {
    let (client, events) = AsyncClient::new(opts, REQUEST_QUEUE);
    let (tx, rx) = mpsc::channel::<Reports>(REPORT_QUEUE);
    // Set on every connection: the broker may have lost the retained views (restarted
    // without persistence), so all are published again.
    let connected = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(apply(rx, planner.clone(), fleet.clone(), telemetry.clone()));
    let publisher = Publisher {
        client: client.clone(),
        topics: topics.clone(),
        planner,
        fleet: fleet.clone(),
        changes: changes.clone(),
        nodes: nodes.clone(),
        telemetry: telemetry.clone(),
        published: HashMap::new(),
        trust: 0,
    };
    tasks.spawn(publisher.run(connected.clone(), stop.clone()));
    let filters = [(topics.reports(), QoS::AtLeastOnce), (topics.nodes(), QoS::AtMostOnce)];
    let on_event = |event: &'static str| {
        if event == "subscribed" {
            connected.store(true, Ordering::Relaxed);
            changes.wake();
        }
        telemetry.cluster(bus_event(event));
    };
    let on_publish = |p: rumqttc::v5::mqttbytes::v5::Publish| {
        if let Some(name) = topics.name("node", &p.topic) {
            match nodes.heard(&p.payload, name, crate::now_millis()) {
                Some(reconnected) => {
                    telemetry.cluster("node_heard");
                    if reconnected {
                        // Its session started clean: the views cleared while it was away never
                        // reached it. Cleared again (the deleted devices' tombstones).
                        replay_tombstones(&fleet, &changes, &telemetry);
                    }
                }
                None => {}
            }
        } else if topics.name("report", &p.topic).is_some() {
            match serde_json::from_slice::<Reports>(&p.payload) {
                Ok(r) => {
                    if tx.try_send(r).is_err() {
                        telemetry.cluster("report_dropped");
                    }
                }
                Err(_) => telemetry.cluster("report_refused"),
            }
        }
    };
    drive(&client, events, &filters, &stop, on_event, on_publish).await;
    drop(tx);
    tasks.shutdown().await;
}

/// Applies reports, on the blocking pool (they write the store).
async fn apply(mut rx: mpsc::Receiver<Reports>, planner: Arc<Planner>, fleet: Arc<Fleet>, telemetry: Arc<Telemetry>) {
    while let Some(batch) = rx.recv().await {
        let (planner, fleet, telemetry) = (planner.clone(), fleet.clone(), telemetry.clone());
        let done = tokio::task::spawn_blocking(move || {
            let now = crate::now_secs();
            for r in batch.reports {
                let result = apply_report(&planner, &fleet, r, now);
                match result {
                    Ok(true) => telemetry.cluster("report_applied"),
                    Ok(false) => telemetry.cluster("report_unchanged"),
                    Err(e) => {
                        telemetry.store_error();
                        warn!(node = %batch.node, error = %e, "could not apply a node's report");
                    }
                }
            }
        })
        .await;
        if let Err(e) = done {
            error!(error = %e, "applying reports panicked");
        }
    }
}

/// Marks every tombstoned (deleted) device, so that its cleared view is published again: on
/// the planner's own (re)connection, and when a node tells of a new connection.
pub fn replay_tombstones(fleet: &Fleet, changes: &Changes, telemetry: &Telemetry) {
    if crate::planner::rules::broken(crate::planner::rules::Rule::TombstoneReplay) {
        return;
    }
    let gone = fleet.tombstones();
    telemetry.cluster_by("tombstone_cleared", gone.len() as u64);
    changes.mark_all(gone.iter().map(String::as_str));
}

/// A device's view as the planner publishes it at `now` (`at_ms`: when the change it carries
/// was made); `None` when the device is no longer registered (its retained view is cleared).
pub fn view(
    planner: &Planner,
    fleet: &Fleet,
    device: &str,
    at_ms: u64,
    now: u64,
) -> Result<Option<View>, PlannerError> {
    if !fleet.contains(device) {
        return Ok(None);
    }
    let facts = planner.trust_facts(device);
    let components = planner
        .view_of(device, now)?
        .into_iter()
        .map(|(component, l)| Entry { component, answer: Answer::from(l).with_trust(facts) })
        .collect();
    Ok(Some(View { at_ms, components }))
}

/// Applies one report of a node at the planner's time `now`: whether it changed anything.
/// Times are the planner's: a node's clock (the report's `at`) may be off, and activity
/// times decide who is online and when operations time out.
pub fn apply_report(planner: &Planner, fleet: &Fleet, r: Report, now: u64) -> Result<bool, String> {
    match r {
        Report::Step { device, seq, to, progress, served, reported, at: _ } => planner
            .advance(&device, seq, to, progress, served.as_deref(), reported.as_deref(), now)
            .map_err(|e| e.to_string()),
        Report::Seen { device, component, version, at: _ } => {
            planner.touch(&device, now);
            fleet.observe(&device, &component, &version, now).map_err(|e| e.to_string())
        }
    }
}

struct Publisher {
    client: AsyncClient,
    topics: ClusterTopics,
    planner: Arc<Planner>,
    fleet: Arc<Fleet>,
    changes: Arc<Changes>,
    nodes: Arc<Nodes>,
    telemetry: Arc<Telemetry>,
    /// Per device, a hash of the view last published (without its time).
    published: HashMap<String, u64>,
    /// The trust generation the views were last computed under.
    trust: u64,
}

impl Publisher {
    async fn run(mut self, connected: Arc<AtomicBool>, stop: CancellationToken) {
        let mut recheck = tokio::time::interval(RECHECK);
        let mut trust_poll = tokio::time::interval(TRUST_POLL);
        loop {
            if self.changes.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.changes.marked() => {}
                    _ = recheck.tick() => self.mark_all(),
                    _ = trust_poll.tick() => {}
                }
            } else if futures::FutureExt::now_or_never(recheck.tick()).is_some() {
                // A busy planner rechecks too: trust that expired or came back reaches the
                // nodes within the recheck interval, not after the backlog.
                self.mark_all();
            }
            let trust = self.planner.trust().generation();
            if trust != self.trust {
                // Verified metadata changed (a refresh): every view's trust deadline with it,
                // at once rather than at the next recheck.
                self.trust = trust;
                self.mark_all();
            }
            if connected.swap(false, Ordering::Relaxed) {
                self.published.clear();
                self.mark_all();
                // Deleted devices' views are cleared again: a deletion committed just before a
                // crash may never have reached the broker.
                if let Err(e) = self.fleet.prune_tombstones(crate::now_secs()) {
                    warn!(error = %e, "cannot prune the deleted devices' tombstones");
                }
                replay_tombstones(&self.fleet, &self.changes, &self.telemetry);
                info!(devices = self.changes.len(), "publishing every device's view");
            }
            let batch = self.changes.take(BATCH);
            self.nodes.backlog.store((self.changes.len() + batch.len()) as u64, Ordering::Relaxed);
            let (planner, fleet) = (self.planner.clone(), self.fleet.clone());
            let views = tokio::task::spawn_blocking(move || {
                let now = crate::now_secs();
                batch
                    .into_iter()
                    .map(|(device, at_ms)| {
                        let view = view(&planner, &fleet, &device, at_ms, now);
                        (device, at_ms, view)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(views) = views else {
                error!("computing views panicked");
                continue;
            };
            for (device, at_ms, view) in views {
                let payload = match view {
                    Ok(None) => Vec::new(),
                    Err(e) => {
                        // Tried again at the next recheck.
                        warn!(device, error = %e, "cannot compute a device's view");
                        continue;
                    }
                    Ok(Some(view)) => serde_json::to_vec(&view).unwrap_or_default(),
                };
                let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(without_time(&payload));
                if self.published.get(&device) == Some(&hash) {
                    continue;
                }
                // An empty retained message clears the device's view at the broker.
                let removed = payload.is_empty();
                // Waits for room in the connection's queue; gone only when the client is.
                if self.client.publish(self.topics.view(&device), QoS::AtLeastOnce, true, payload).await.is_err() {
                    return;
                }
                self.nodes.newest_change_ms.fetch_max(at_ms, Ordering::Relaxed);
                if removed {
                    self.published.remove(&device);
                    self.telemetry.cluster("view_removed");
                } else {
                    self.published.insert(device, hash);
                    self.telemetry.cluster("view_published");
                }
            }
            self.telemetry.set_cluster_views(self.published.len());
            self.telemetry.set_cluster_backlog(self.changes.len());
            self.nodes.backlog.store(self.changes.len() as u64, Ordering::Relaxed);
        }
    }

    /// Every registered device, and every device a view was published for.
    fn mark_all(&self) {
        let ids = self.fleet.ids_where(|_| true);
        self.changes.mark_all(ids.iter().map(String::as_str).chain(self.published.keys().map(String::as_str)));
    }
}

/// A view's JSON without its leading `{"at_ms":N,`: what is compared to decide whether a view
/// changed.
fn without_time(payload: &[u8]) -> &[u8] {
    match payload.iter().position(|b| *b == b',') {
        Some(i) if payload.starts_with(br#"{"at_ms":"#) => &payload[i..],
        _ => payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_views_time_is_not_part_of_what_is_compared() {
        let a = serde_json::to_vec(&View { at_ms: 1, components: vec![] }).unwrap();
        let b = serde_json::to_vec(&View { at_ms: 22, components: vec![] }).unwrap();
        assert_eq!(without_time(&a), without_time(&b));
        assert_eq!(without_time(b""), b"");
    }

    #[test]
    fn nodes_are_listed_with_their_lag_and_forgotten_when_cleared() {
        let nodes = Nodes::default();
        nodes.newest_change_ms.store(1_000, Ordering::Relaxed);
        let beat = Heartbeat { node: "n1".into(), newest_change_ms: 400, ..Default::default() };
        assert_eq!(nodes.heard(&serde_json::to_vec(&beat).unwrap(), "n1", 5_000), Some(true), "first heard");
        assert_eq!(nodes.heard(&serde_json::to_vec(&beat).unwrap(), "n1", 5_000), Some(false));
        // A heartbeat naming another node than its topic is not taken.
        assert_eq!(nodes.heard(&serde_json::to_vec(&beat).unwrap(), "n2", 5_000), None);
        assert_eq!(nodes.heard(b"not json", "n3", 5_000), None);
        let l = nodes.list(7_000);
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].lag_ms, l[0].heard_secs_ago), (600, 2));
        // The node reconnected: its next heartbeat says so.
        let again = Heartbeat { connections: 1, ..beat.clone() };
        assert_eq!(nodes.heard(&serde_json::to_vec(&again).unwrap(), "n1", 7_000), Some(true));
        assert_eq!(nodes.heard(b"", "n1", 8_000), Some(false));
        assert!(nodes.list(8_000).is_empty());
    }
}
