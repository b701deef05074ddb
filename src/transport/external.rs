//! External-broker mode: fwgate as an MQTT 5 client of the broker a fleet already runs.
//!
//! Statuses arrive through a shared subscription, `$share/{group}/{prefix}dfu/+/status`, so
//! each reaches exactly one of the fwgate nodes in the group; the answers go to
//! `{prefix}dfu/{id}/command`. The broker authenticates devices and confines each to its own
//! topics (its ACL): the id in the topic is the device's. A lost connection is retried with a
//! growing pause and the subscription made again, so a broker restart costs devices one
//! unanswered Status, which they repeat.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::session::{Dfu, Shape};
use super::TransportError;
use crate::config::MqttConfig;
use crate::protocol::topic::valid_device_id;
use crate::telemetry::Telemetry;

/// Statuses waiting for a worker, per worker; beyond it a Status is dropped and counted (the
/// device asks again when its answer does not come).
const WORKER_QUEUE: usize = 1024;
/// Requests (publishes, subscribes) waiting for the connection.
pub const REQUEST_QUEUE: usize = 4096;
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);

/// The topics one node reads and writes.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    /// The shared subscription's filter.
    pub filter: String,
}

impl Topics {
    pub fn new(cfg: &MqttConfig) -> Topics {
        let prefix = cfg.topic_prefix.clone();
        Topics { filter: format!("$share/{}/{prefix}dfu/+/status", cfg.share_group), prefix }
    }

    /// The device id of a Status topic under the prefix.
    pub fn device<'a>(&self, topic: &'a [u8]) -> Option<&'a str> {
        let topic = std::str::from_utf8(topic).ok()?;
        let id = topic.strip_prefix(self.prefix.as_str())?.strip_prefix("dfu/")?.strip_suffix("/status")?;
        valid_device_id(id).then_some(id)
    }

    pub fn command(&self, device: &str) -> String {
        format!("{}dfu/{device}/command", self.prefix)
    }
}

/// The client's options from `[mqtt]` (external mode).
pub fn options(cfg: &MqttConfig, payload_limit: usize) -> Result<MqttOptions, TransportError> {
    let (host, port, tls) = cfg.broker().map_err(|e| TransportError::Broker(e.to_string()))?;
    let id = if cfg.client_id.is_empty() { format!("fwgate-{:08x}", fastrand::u32(..)) } else { cfg.client_id.clone() };
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        // No session kept at the broker: the subscription is made again on every connection,
        // and nothing queued for a node that is gone is delivered to it later.
        .set_clean_start(true)
        .set_request_channel_capacity(REQUEST_QUEUE)
        // The largest Status accepted, with room for its topic; larger ones the broker drops.
        .set_max_packet_size(Some(payload_limit.saturating_add(512).min(u32::MAX as usize) as u32));
    if !cfg.username.is_empty() || !cfg.password.is_empty() {
        o.set_credentials(cfg.username.clone(), cfg.password.clone());
    }
    if tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(client_tls(cfg)?))));
    }
    Ok(o)
}

fn client_tls(cfg: &MqttConfig) -> Result<rustls::ClientConfig, TransportError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let bad = |key: &str, why: String| TransportError::Tls(format!("{key}: {why}"));
    let mut roots = rustls::RootCertStore::empty();
    if cfg.broker_ca.as_os_str().is_empty() {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err(bad("mqtt.broker_ca", "no system root certificates found; name the broker's CA".into()));
        }
    } else {
        for c in super::mqtt::tls::certs("mqtt.broker_ca", &cfg.broker_ca)? {
            roots.add(c).map_err(|e| bad("mqtt.broker_ca", e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("mqtt.broker_url", e.to_string()))?
        .with_root_certificates(roots);
    if cfg.client_cert.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = super::mqtt::tls::certs("mqtt.client_cert", &cfg.client_cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.client_key)
        .map_err(|e| bad("mqtt.client_key", format!("{}: {e}", cfg.client_key.display())))?;
    builder.with_client_auth_cert(chain, key).map_err(|e| bad("mqtt.client_key", e.to_string()))
}

/// Runs the client until `stop`: reads Statuses, hands each to the worker its device hashes
/// to (so one device's messages stay in order), and keeps the connection up.
pub async fn run(
    opts: MqttOptions,
    topics: Topics,
    dfu: Arc<Dfu>,
    telemetry: Arc<Telemetry>,
    workers: usize,
    stop: CancellationToken,
) {
    let (client, events) = AsyncClient::new(opts, REQUEST_QUEUE);
    let mut queues = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (tx, rx) = mpsc::channel(WORKER_QUEUE);
        queues.push(tx);
        let w =
            Worker { client: client.clone(), topics: topics.clone(), dfu: dfu.clone(), telemetry: telemetry.clone() };
        tasks.spawn(w.run(rx));
    }
    let filters = [(topics.filter.clone(), QoS::AtMostOnce)];
    let on_event = |event: &'static str| {
        match event {
            "connected" => telemetry.set_broker_connected(true),
            "disconnected" | "connection_failed" => telemetry.set_broker_connected(false),
            _ => {}
        }
        telemetry.broker(event);
    };
    drive(&client, events, &filters, &stop, on_event, |p| dispatch(&queues, &topics, &telemetry, p)).await;
    telemetry.set_broker_connected(false);
    // Without the event loop (dropped by `drive`) a worker waiting for room to publish would
    // wait forever: its queue is closed, so waiting publishes fail; stop the workers. A worker
    // is never stopped inside a DFU step, which does not await.
    drop(queues);
    tasks.shutdown().await;
}

/// Keeps a client connected until `stop`, subscribing to `filters` again on every connection
/// (no session is kept at the broker), and hands every message received to `on_publish`.
/// Tells `on_event` of `connected`, `subscribed`, `subscribe_refused`, `disconnected` and
/// `connection_failed`. A lost connection is retried after a growing, jittered pause.
pub async fn drive(
    client: &AsyncClient,
    mut events: EventLoop,
    filters: &[(String, QoS)],
    stop: &CancellationToken,
    mut on_event: impl FnMut(&'static str),
    mut on_publish: impl FnMut(Publish),
) {
    let broker = format!("{}:{}", events.options.broker_address().0, events.options.broker_address().1);
    let mut pause = FIRST_PAUSE;
    let mut failures = 0u64;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = events.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => on_publish(p),
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                pause = FIRST_PAUSE;
                on_event("connected");
                info!(%broker, filters = ?filters.iter().map(|f| &f.0).collect::<Vec<_>>(), "connected to the MQTT broker");
                for (filter, qos) in filters {
                    if let Err(e) = client.try_subscribe(filter.clone(), *qos) {
                        error!(error = %e, filter, "cannot subscribe at the broker");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(a))) => {
                let refused: Vec<_> =
                    a.return_codes.iter().filter(|c| !matches!(c, SubscribeReasonCode::Success(_))).collect();
                if refused.is_empty() {
                    on_event("subscribed");
                } else {
                    // Nothing will arrive: say so loudly, and try again on a fresh connection.
                    on_event("subscribe_refused");
                    error!(reason = ?refused, "the broker refused a subscription");
                    let _ = client.try_disconnect();
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                on_event("disconnected");
                warn!(%broker, reason = ?d.reason_code, "the broker closed the connection");
            }
            Ok(_) => {}
            Err(e) => {
                on_event("connection_failed");
                failures += 1;
                // Logged at the first failure and then sparsely while the broker stays away.
                if failures.is_power_of_two() {
                    warn!(%broker, error = %e, failures, retry_in = ?pause, "MQTT broker connection failed");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause + Duration::from_millis(fastrand::u64(..=pause.as_millis() as u64 / 2))) => {}
                }
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
    let _ = client.try_disconnect();
}

fn dispatch(queues: &[mpsc::Sender<(String, Bytes)>], topics: &Topics, telemetry: &Telemetry, p: Publish) {
    let Some(device) = topics.device(&p.topic) else {
        telemetry.broker("bad_topic");
        return;
    };
    // Same device, same worker, so its messages stay in order.
    let at = BuildHasherDefault::<DefaultHasher>::default().hash_one(device) as usize % queues.len();
    if queues[at].try_send((device.to_owned(), p.payload)).is_err() {
        telemetry.broker("dropped_overload");
    }
}

struct Worker {
    client: AsyncClient,
    topics: Topics,
    dfu: Arc<Dfu>,
    telemetry: Arc<Telemetry>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<(String, Bytes)>) {
        let mut out = Vec::new();
        while let Some((device, payload)) = rx.recv().await {
            out.clear();
            self.telemetry.broker("status");
            self.dfu.handle("mqtt", &device, &payload, crate::now_secs(), Shape::Window, &mut out);
            if out.is_empty() {
                continue;
            }
            let topic = self.topics.command(&device);
            for reply in out.drain(..) {
                // Waits for room in the connection's queue; gone only when the client is.
                if self.client.publish(topic.clone(), QoS::AtMostOnce, false, reply).await.is_err() {
                    self.telemetry.broker("publish_failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_under_a_prefix_name_the_device_and_nothing_else() {
        let cfg = MqttConfig { topic_prefix: "tenant-a/".into(), share_group: "g1".into(), ..MqttConfig::default() };
        let t = Topics::new(&cfg);
        assert_eq!(t.filter, "$share/g1/tenant-a/dfu/+/status");
        assert_eq!(t.device(b"tenant-a/dfu/dev-1/status"), Some("dev-1"));
        assert_eq!(t.command("dev-1"), "tenant-a/dfu/dev-1/command");
        for refused in
            [&b"dfu/dev-1/status"[..], b"tenant-a/dfu/a/b/status", b"tenant-a/dfu//status", b"tenant-a/dfu/\xff/status"]
        {
            assert_eq!(t.device(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn broker_urls_are_checked() {
        let url = |u: &str| MqttConfig { broker_url: u.into(), ..MqttConfig::default() }.broker();
        assert_eq!(url("mqtt://127.0.0.1").unwrap(), ("127.0.0.1".into(), 1883, false));
        assert_eq!(url("mqtts://broker.example:8884").unwrap(), ("broker.example".into(), 8884, true));
        assert_eq!(url("mqtt://[::1]:1884").unwrap(), ("::1".into(), 1884, false));
        for bad in ["http://h:1883", "mqtt://", "mqtt://h:1883/topic", "h:1883", "mqtt://u:p@h:1883?x=1"] {
            assert!(url(bad).is_err(), "{bad}");
        }
    }
}
