//! A data-plane node (`cluster.role = "dataplane"`): no store, no admin API; the views the
//! planner publishes, the Statuses of its share of the fleet, and `/metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::replica::Replica;
use super::{bus_event, ClusterTopics, Heartbeat, Report, Reports, View};
use crate::config::Config;
use crate::telemetry::Telemetry;
use crate::transport::external::{self, drive, REQUEST_QUEUE};
use crate::transport::{Dfu, TransportError};
use crate::{now_millis, StartError};

/// Reports waiting to be sent; beyond it they are dropped (and sent again by the sweep).
const REPORT_QUEUE: usize = 65_536;
/// Reports per message.
const REPORTS_PER_MESSAGE: usize = 512;
/// Images being fetched at once.
const FETCHES: usize = 4;

/// A running data-plane node.
pub struct DataPlane {
    pub admin: SocketAddr,
    pub node: String,
    pub telemetry: Arc<Telemetry>,
    pub replica: Arc<Replica>,
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

/// The node's bus connections: how many were made, and a wake-up for the heartbeat.
#[derive(Default)]
struct Connected {
    count: std::sync::atomic::AtomicU64,
    beat_now: tokio::sync::Notify,
}

/// How long changes took to reach this node (ms), for its heartbeat.
struct Delays {
    histogram: Mutex<hdrhistogram::Histogram<u64>>,
    newest_change_ms: std::sync::atomic::AtomicU64,
}

pub async fn start(config: Config, shutdown: CancellationToken) -> Result<DataPlane, StartError> {
    let node = config.cluster.node(&config.mqtt);
    let telemetry = Arc::new(Telemetry::new());
    let topics = ClusterTopics::new(&config.mqtt.topic_prefix);
    let (fetch_tx, fetch_rx) = mpsc::channel(256);
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    let replica = Arc::new(Replica::new(config.cluster.image_cache_bytes, fetch_tx, report_tx, telemetry.clone()));
    let delays = Arc::new(Delays {
        histogram: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid bounds")),
        newest_change_ms: 0.into(),
    });
    let mut tasks = JoinSet::new();

    // The admin listener of a data-plane node: probes and metrics.
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::AdminBind { addr: config.admin.listen, source })?;
    let admin = listener.local_addr().map_err(|source| StartError::AdminBind { addr: config.admin.listen, source })?;
    let app = axum::Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route("/metrics", get(|State(t): State<Arc<Telemetry>>| async move { t.render() }))
        .with_state(telemetry.clone());
    let stop = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
            error!(error = %e, "admin listener failed");
        }
    });

    // The bus: views in, reports and heartbeats out.
    let limit = config.mqtt.payload_limit(&config.dfu).max(1 << 20);
    let mut opts = external::options(&config.mqtt, limit)?;
    opts.set_client_id(format!("{node}-bus"));
    let gone = Heartbeat { node: node.clone(), role: "dataplane".into(), gone: true, ..Default::default() };
    opts.set_last_will(LastWill::new(
        topics.node(&node),
        serde_json::to_vec(&gone).unwrap_or_default(),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let (bus, events) = AsyncClient::new(opts, REQUEST_QUEUE);
    let connected = Arc::new(Connected::default());
    {
        let (replica, telemetry, delays, topics, stop) =
            (replica.clone(), telemetry.clone(), delays.clone(), topics.clone(), shutdown.clone());
        let connected = connected.clone();
        let bus = bus.clone();
        tasks.spawn(async move {
            let filters = [(topics.views(), QoS::AtLeastOnce)];
            let on_event = |event: &'static str| {
                if event == "connected" {
                    // The heartbeat says so at once: the planner clears deleted devices' views
                    // again, which this clean session cannot have received while it was away.
                    connected.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    connected.beat_now.notify_one();
                }
                telemetry.cluster(bus_event(event))
            };
            let on_publish = |p: Publish| take_view(&replica, &telemetry, &delays, &topics, p);
            drive(&bus, events, &filters, &stop, on_event, on_publish).await;
        });
    }
    tasks.spawn(send_reports(
        bus.clone(),
        topics.report(&node),
        node.clone(),
        report_rx,
        replica.clone(),
        Duration::from_millis(config.cluster.report_ms),
        telemetry.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(heartbeat(
        bus.clone(),
        topics.node(&node),
        node.clone(),
        Duration::from_secs(config.cluster.heartbeat_secs),
        replica.clone(),
        telemetry.clone(),
        delays.clone(),
        connected,
        shutdown.clone(),
    ));
    let fetcher = Fetcher::new(&config)?;
    tasks.spawn(fetcher.run(fetch_rx, replica.clone(), telemetry.clone(), shutdown.clone()));

    // Devices' Statuses, through the shared subscription, answered from the replica.
    let dfu = Arc::new(Dfu::with_source(replica.clone(), config.dfu.engine(), telemetry.clone()));
    let opts = external::options(&config.mqtt, config.mqtt.payload_limit(&config.dfu))?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dfu_topics = external::Topics::new(&config.mqtt);
    tasks.spawn(external::run(opts, dfu_topics, dfu, telemetry.clone(), workers, shutdown.clone()));
    info!(%admin, node, planner = %config.cluster.planner_url, "data-plane node started");
    Ok(DataPlane { admin, node, telemetry, replica, tasks, shutdown })
}

fn take_view(replica: &Replica, telemetry: &Telemetry, delays: &Delays, topics: &ClusterTopics, p: Publish) {
    let Some(device) = topics.name("view", &p.topic) else {
        telemetry.cluster("view_refused");
        return;
    };
    if p.payload.is_empty() {
        replica.apply(device, None);
        telemetry.cluster("view_removed");
    } else {
        let Ok(view) = serde_json::from_slice::<View>(&p.payload) else {
            telemetry.cluster("view_refused");
            return;
        };
        let at = view.at_ms;
        replica.apply(device, Some(view));
        telemetry.cluster("view");
        delays.newest_change_ms.fetch_max(at, std::sync::atomic::Ordering::Relaxed);
        // A retained view delivered on subscribing is old news, not a delay.
        if !p.retain {
            let ms = now_millis().saturating_sub(at);
            telemetry.view_delay(ms as f64 / 1000.0);
            let _ = delays.histogram.lock().unwrap_or_else(|e| e.into_inner()).record(ms.max(1));
        }
    }
    telemetry.set_cluster_views(replica.len());
}

#[allow(clippy::too_many_arguments)]
async fn send_reports(
    bus: AsyncClient,
    topic: String,
    node: String,
    mut rx: mpsc::Receiver<Report>,
    replica: Arc<Replica>,
    every: Duration,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.recv() => match r {
                Some(r) => batch.push(r),
                None => return,
            },
            _ = tick.tick() => batch.extend(replica.sweep(now_millis())),
        }
        while batch.len() < REPORTS_PER_MESSAGE {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        for chunk in batch.chunks(REPORTS_PER_MESSAGE) {
            let msg = Reports { node: node.clone(), reports: chunk.to_vec() };
            let payload = serde_json::to_vec(&msg).unwrap_or_default();
            if bus.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_err() {
                return;
            }
            telemetry.cluster_by("report_sent", chunk.len() as u64);
        }
        batch.clear();
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat(
    bus: AsyncClient,
    topic: String,
    node: String,
    every: Duration,
    replica: Arc<Replica>,
    telemetry: Arc<Telemetry>,
    delays: Arc<Delays>,
    connected: Arc<Connected>,
    stop: CancellationToken,
) {
    let started_ms = now_millis();
    let mut tick = tokio::time::interval(every);
    loop {
        let gone = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
            _ = connected.beat_now.notified() => false,
        };
        let (p50, p99, samples) = {
            let h = delays.histogram.lock().unwrap_or_else(|e| e.into_inner());
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.len())
        };
        let (images, bytes) = replica.cache_size();
        let beat = Heartbeat {
            node: node.clone(),
            role: "dataplane".into(),
            at_ms: now_millis(),
            started_ms,
            connections: connected.count.load(std::sync::atomic::Ordering::Relaxed),
            gone,
            views: replica.len() as u64,
            statuses: telemetry.broker_count("status"),
            blocks: telemetry.served_count("mqtt"),
            newest_change_ms: delays.newest_change_ms.load(std::sync::atomic::Ordering::Relaxed),
            delay_p50_ms: p50,
            delay_p99_ms: p99,
            delay_samples: samples,
            images_cached: images as u64,
            cache_bytes: bytes,
        };
        let payload = serde_json::to_vec(&beat).unwrap_or_default();
        let _ = bus.try_publish(topic.clone(), QoS::AtLeastOnce, true, payload);
        if gone {
            return;
        }
    }
}

/// Fetches images by digest from the planner's admin API.
struct Fetcher {
    http: reqwest::Client,
    base: String,
    token: String,
    max_bytes: u64,
}

impl Fetcher {
    fn new(config: &Config) -> Result<Fetcher, StartError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| TransportError::Broker(format!("HTTP client: {e}")))?;
        Ok(Fetcher {
            http,
            base: config.cluster.planner_url.trim_end_matches('/').to_owned(),
            token: config.cluster.planner_token.clone(),
            max_bytes: config.firmware.max_image_bytes,
        })
    }

    async fn run(
        self,
        mut rx: mpsc::Receiver<String>,
        replica: Arc<Replica>,
        telemetry: Arc<Telemetry>,
        stop: CancellationToken,
    ) {
        let this = Arc::new(self);
        let mut inflight: JoinSet<(String, Result<Bytes, String>)> = JoinSet::new();
        let mut fetching = std::collections::HashSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                want = rx.recv(), if inflight.len() < FETCHES => {
                    let Some(sha) = want else { return };
                    if !replica.wants(&sha) || !fetching.insert(sha.clone()) {
                        continue;
                    }
                    let this = this.clone();
                    inflight.spawn(async move { let r = this.fetch(&sha).await; (sha, r) });
                }
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    let Ok((sha, result)) = done else { continue };
                    fetching.remove(&sha);
                    match result {
                        Ok(bytes) => {
                            info!(sha256 = %sha, bytes = bytes.len(), "image fetched from the planner");
                            replica.insert_image(sha, bytes);
                            telemetry.cluster("image_fetched");
                        }
                        Err(e) => {
                            // Asked for again by the next Status that needs it.
                            warn!(sha256 = %sha, error = %e, "cannot fetch an image from the planner");
                            telemetry.cluster("image_fetch_failed");
                        }
                    }
                }
            }
        }
    }

    async fn fetch(&self, sha256: &str) -> Result<Bytes, String> {
        let url = format!("{}/api/v1/content/{sha256}", self.base);
        let resp = self.http.get(&url).bearer_auth(&self.token).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(format!("GET {url}: larger than firmware.max_image_bytes"));
        }
        let bytes = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(format!("GET {url}: larger than firmware.max_image_bytes"));
        }
        let got = hex::encode(Sha256::digest(&bytes));
        if got != sha256 {
            return Err(format!("GET {url}: the bytes hash to {got}"));
        }
        Ok(bytes)
    }
}

impl DataPlane {
    /// Waits for shutdown, then says goodbye on the bus and stops.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
            warn!("background tasks did not stop within 10 s");
        }
        info!(node = %self.node, "stopped");
    }
}
