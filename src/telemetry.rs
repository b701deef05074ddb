//! The gateway's metrics, one registry per gateway instance (so tests running several
//! gateways in one process see their own counts), rendered in Prometheus text format by the
//! admin listener.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Label = [(&'static str, &'static str); 1];

pub struct Telemetry {
    registry: Registry,
    blocks: Family<Label, Counter>,
    bytes: Family<Label, Counter>,
    statuses: Family<Label, Counter>,
    bad_input: Family<Label, Counter>,
    connected: Gauge<i64, std::sync::atomic::AtomicI64>,
    operations: Family<Label, Gauge<i64, std::sync::atomic::AtomicI64>>,
    hot_bytes: Gauge<i64, std::sync::atomic::AtomicI64>,
    store_errors: Counter<u64, AtomicU64>,
    coap: Family<Label, Counter>,
    restarts: Family<Label, Counter>,
    waiting_for_trust: Gauge<i64, std::sync::atomic::AtomicI64>,
    trust_holds: Counter<u64, AtomicU64>,
    staging_retries: Counter<u64, AtomicU64>,
    mqtt_refused: Family<Label, Counter>,
    mqtt_disconnects: Family<Label, Counter>,
    mqtt_dropped: Family<Label, Counter>,
    dtls: Family<Label, Counter>,
    admin_refused: Family<Label, Counter>,
    dtls_sessions: Gauge<i64, std::sync::atomic::AtomicI64>,
    broker: Family<Label, Counter>,
    broker_connected: Gauge<i64, std::sync::atomic::AtomicI64>,
    cluster: Family<Label, Counter>,
    cluster_views: Gauge<i64, std::sync::atomic::AtomicI64>,
    cluster_backlog: Gauge<i64, std::sync::atomic::AtomicI64>,
    view_delay: Histogram,
    faults: FaultLog,
}

/// How many faults of one kind are logged per [`FAULT_WINDOW_MS`]; the rest are counted and
/// summed up in the next line logged for that kind.
pub const FAULTS_LOGGED: u32 = 3;
pub const FAULT_WINDOW_MS: u64 = 10_000;

/// Per kind of client fault: the window's start, lines logged in it, lines suppressed.
#[derive(Default)]
struct FaultLog {
    kinds: std::sync::Mutex<std::collections::HashMap<&'static str, (u64, u32, u64)>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("fwgate");
        let t = Telemetry {
            blocks: Family::default(),
            bytes: Family::default(),
            statuses: Family::default(),
            bad_input: Family::default(),
            connected: Gauge::default(),
            operations: Family::default(),
            hot_bytes: Gauge::default(),
            store_errors: Counter::default(),
            coap: Family::default(),
            restarts: Family::default(),
            waiting_for_trust: Gauge::default(),
            trust_holds: Counter::default(),
            staging_retries: Counter::default(),
            mqtt_refused: Family::default(),
            mqtt_disconnects: Family::default(),
            mqtt_dropped: Family::default(),
            dtls: Family::default(),
            admin_refused: Family::default(),
            dtls_sessions: Gauge::default(),
            broker: Family::default(),
            broker_connected: Gauge::default(),
            cluster: Family::default(),
            cluster_views: Gauge::default(),
            cluster_backlog: Gauge::default(),
            view_delay: Histogram::new([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]),
            faults: FaultLog::default(),
            registry: Registry::default(),
        };
        registry.register("blocks_served", "WRITE blocks sent to devices, by transport", t.blocks.clone());
        registry.register("bytes_served", "Firmware bytes sent in WRITE blocks, by transport", t.bytes.clone());
        registry.register(
            "status_messages",
            "Device Status messages handled, by outcome (write, swap, sync, wait, unknown_device, bad_input, error)",
            t.statuses.clone(),
        );
        registry.register("bad_input", "Device messages refused, by kind of error", t.bad_input.clone());
        registry.register("connected_devices", "MQTT sessions open (CONNECT accepted)", t.connected.clone());
        registry.register(
            "mqtt_refused",
            "MQTT requests refused, by reason (CONNECT: bad_credentials, not_authorized, identifier_rejected, \
             server_busy, protocol_version; publish_not_authorized, publish_topic, subscribe_not_authorized, \
             subscribe_wildcard, tls_handshake, ...)",
            t.mqtt_refused.clone(),
        );
        registry.register(
            "mqtt_disconnects",
            "MQTT connections closed, by why (client_disconnect, closed, keep_alive, connect_timeout, taken_over, \
             slow_reader, slow_subscriber, malformed, too_large, refused, ...)",
            t.mqtt_disconnects.clone(),
        );
        registry.register(
            "mqtt_dropped",
            "MQTT messages to a client not sent, by why (inflight_full, client_max_packet, inbox_full)",
            t.mqtt_dropped.clone(),
        );
        registry.register("operations", "Operations by state", t.operations.clone());
        registry.register("hot_cache_bytes", "Bytes of images held in memory", t.hot_bytes.clone());
        registry.register("store_errors", "Store failures while handling device messages", t.store_errors.clone());
        registry.register(
            "coap_datagrams",
            "CoAP datagrams by result (block, dfu, duplicate, malformed, bad_option, not_found, ...)",
            t.coap.clone(),
        );
        registry.register(
            "transfer_restarts",
            "Transfers started again at offset 0, by reason (image_changed: the device held another image's bytes)",
            t.restarts.clone(),
        );
        registry.register(
            "operations_waiting_for_trust",
            "Operations held because TUF trust is missing for a passing reason (metadata expired, not verified yet)",
            t.waiting_for_trust.clone(),
        );
        registry.register("trust_holds", "Operations that started waiting for trust", t.trust_holds.clone());
        registry.register(
            "wave_staging_retries",
            "Devices whose wave staging, refused while trust was missing, was retried after a TUF refresh",
            t.staging_retries.clone(),
        );
        registry.register(
            "coap_dtls_events",
            "CoAP DTLS events (hello_verify, not_hello, handshake_ok, handshake_failed, refused_full, expired_handshake, expired_idle, closed, failed, too_large)",
            t.dtls.clone(),
        );
        registry.register(
            "coap_dtls_sessions",
            "CoAP DTLS sessions held (established or in handshake)",
            t.dtls_sessions.clone(),
        );
        registry.register(
            "admin_refused",
            "Admin API requests refused, by reason (host, no_token, wrong_token, read_only)",
            t.admin_refused.clone(),
        );
        registry.register(
            "broker_events",
            "External-broker mode: client events (connected, connection_failed, disconnected, subscribed, \
             subscribe_refused, status, dropped_overload, bad_topic, publish_failed)",
            t.broker.clone(),
        );
        registry.register(
            "broker_connected",
            "External-broker mode: 1 while connected to the broker",
            t.broker_connected.clone(),
        );
        registry.register(
            "cluster_events",
            "Cluster: planner (view_published, view_removed, report_applied, report_unchanged, report_refused, \
             node_heard) and data-plane node (view, view_removed, view_refused, report_sent, report_dropped, \
             image_fetched, image_fetch_failed, image_not_ready) events",
            t.cluster.clone(),
        );
        registry.register(
            "cluster_views",
            "Cluster: devices' views published (planner) or held (data-plane node)",
            t.cluster_views.clone(),
        );
        registry.register(
            "cluster_backlog",
            "Planner: devices changed whose view is not published yet",
            t.cluster_backlog.clone(),
        );
        registry.register(
            "cluster_view_delay_seconds",
            "Data-plane node: from the planner's change to the node holding it (clocks of both)",
            t.view_delay.clone(),
        );
        Telemetry { registry, ..t }
    }

    pub fn cluster(&self, event: &'static str) {
        self.cluster.get_or_create(&[("event", event)]).inc();
    }

    pub fn cluster_by(&self, event: &'static str, n: u64) {
        self.cluster.get_or_create(&[("event", event)]).inc_by(n);
    }

    pub fn set_cluster_views(&self, n: usize) {
        self.cluster_views.set(n as i64);
    }

    pub fn set_cluster_backlog(&self, n: usize) {
        self.cluster_backlog.set(n as i64);
    }

    pub fn view_delay(&self, secs: f64) {
        self.view_delay.observe(secs);
    }

    pub fn served_count(&self, transport: &'static str) -> u64 {
        self.blocks.get_or_create(&[("transport", transport)]).get()
    }

    pub fn broker(&self, event: &'static str) {
        self.broker.get_or_create(&[("event", event)]).inc();
    }

    pub fn broker_count(&self, event: &'static str) -> u64 {
        self.broker.get_or_create(&[("event", event)]).get()
    }

    pub fn set_broker_connected(&self, up: bool) {
        self.broker_connected.set(up as i64);
    }

    pub fn served(&self, transport: &'static str, blocks: u64, bytes: u64) {
        self.blocks.get_or_create(&[("transport", transport)]).inc_by(blocks);
        self.bytes.get_or_create(&[("transport", transport)]).inc_by(bytes);
    }

    pub fn status(&self, outcome: &'static str) {
        self.statuses.get_or_create(&[("outcome", outcome)]).inc();
    }

    pub fn bad_input(&self, kind: &'static str) {
        self.bad_input.get_or_create(&[("kind", kind)]).inc();
        self.status("bad_input");
    }

    pub fn store_error(&self) {
        self.store_errors.inc();
        self.status("error");
    }

    pub fn coap(&self, result: &'static str) {
        self.coap.get_or_create(&[("result", result)]).inc();
    }

    /// Whether a fault caused by a client (a bad packet, a refused request) of `kind` may be
    /// logged now: `Some(n)` with the number of lines of that kind suppressed since the last
    /// one logged, `None` when this one is only counted (in the kind's own metric).
    pub fn log_fault(&self, kind: &'static str) -> Option<u64> {
        let now = crate::now_millis();
        let mut kinds = self.faults.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let (start, logged, suppressed) = kinds.entry(kind).or_insert((now, 0, 0));
        if now.saturating_sub(*start) >= FAULT_WINDOW_MS {
            (*start, *logged) = (now, 0);
        }
        if *logged < FAULTS_LOGGED {
            *logged += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }

    pub fn admin_refused(&self, reason: &'static str) {
        self.admin_refused.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn dtls(&self, event: &'static str) {
        self.dtls.get_or_create(&[("event", event)]).inc();
    }

    pub fn dtls_count(&self, event: &'static str) -> u64 {
        self.dtls.get_or_create(&[("event", event)]).get()
    }

    pub fn set_dtls_sessions(&self, n: i64) {
        self.dtls_sessions.set(n);
    }

    pub fn coap_count(&self, result: &'static str) -> u64 {
        self.coap.get_or_create(&[("result", result)]).get()
    }

    pub fn set_connected(&self, n: i64) {
        self.connected.set(n);
    }

    pub fn mqtt_refused(&self, reason: &'static str) {
        self.mqtt_refused.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn mqtt_refused_count(&self, reason: &'static str) -> u64 {
        self.mqtt_refused.get_or_create(&[("reason", reason)]).get()
    }

    pub fn mqtt_closed(&self, why: &'static str) {
        self.mqtt_disconnects.get_or_create(&[("why", why)]).inc();
    }

    pub fn mqtt_closed_count(&self, why: &'static str) -> u64 {
        self.mqtt_disconnects.get_or_create(&[("why", why)]).get()
    }

    pub fn mqtt_dropped(&self, why: &'static str) {
        self.mqtt_dropped.get_or_create(&[("why", why)]).inc();
    }

    pub fn set_operations(&self, state: &'static str, n: i64) {
        self.operations.get_or_create(&[("state", state)]).set(n);
    }

    pub fn transfer_restart(&self, reason: &'static str) {
        self.restarts.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn transfer_restarts(&self, reason: &'static str) -> u64 {
        self.restarts.get_or_create(&[("reason", reason)]).get()
    }

    /// Operations waiting for trust now; holds and staging retries since the start (the
    /// planner counts them; the counters catch up at each scrape).
    pub fn set_trust(&self, waiting: usize, holds: u64, staging_retries: u64) {
        self.waiting_for_trust.set(waiting as i64);
        self.trust_holds.inc_by(holds.saturating_sub(self.trust_holds.get()));
        self.staging_retries.inc_by(staging_retries.saturating_sub(self.staging_retries.get()));
    }

    pub fn set_hot_bytes(&self, n: i64) {
        self.hot_bytes.set(n);
    }

    /// Counter value, for tests and the CLI's summaries.
    pub fn status_count(&self, outcome: &'static str) -> u64 {
        self.statuses.get_or_create(&[("outcome", outcome)]).get()
    }

    pub fn bad_input_count(&self, kind: &'static str) -> u64 {
        self.bad_input.get_or_create(&[("kind", kind)]).get()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
