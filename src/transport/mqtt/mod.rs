//! The MQTT shell: an embedded rumqttd broker and one local link that subscribes to every
//! device's Status topic and publishes Commands to `dfu/{id}/command`.
//!
//! rumqttd's link calls block on bounded channels, so the link runs on its own OS thread and
//! never on a tokio worker. Its broker threads have no shutdown hook; they end with the
//! process, after the store has been flushed.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, ConnectionSettings, Meter, Notification, RouterConfig, SegmentConfig, ServerSettings};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Dfu, TransportError};
use crate::config::{DfuConfig, MqttConfig};
use crate::fleet::{token_ok, Fleet};
use crate::protocol::topic::{command_topic, parse_status_topic, valid_device_id, STATUS_FILTER};
use crate::telemetry::Telemetry;

/// The link's own topic, published once a second so the broker reports connection counts.
const HEARTBEAT_TOPIC: &str = "fwgate/internal/heartbeat";
const METER_INTERVAL: Duration = Duration::from_secs(1);

/// Where the broker listens once started.
#[derive(Debug, Clone, Copy)]
pub struct MqttListeners {
    pub v4: SocketAddr,
    pub v5: Option<SocketAddr>,
}

/// Checks the address is free (a clear error now beats a broker thread failing to bind
/// later) and turns port 0 into a free ephemeral port, since rumqttd binds by address.
fn resolve(addr: SocketAddr) -> Result<SocketAddr, TransportError> {
    let l = TcpListener::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    l.local_addr().map_err(|source| TransportError::Bind { addr, source })
}

/// Whether some socket listens on `port`, read from /proc/net/tcp{,6} so that checking does
/// not open a connection the broker would log as a failed client.
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| {
        std::fs::read_to_string(path).is_ok_and(|table| {
            table.lines().skip(1).any(|line| {
                let mut cols = line.split_whitespace();
                // Columns: sl, local_address, rem_address, st (0A = LISTEN), ...
                let local = cols.nth(1).unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                state == "0A" && format!("{local} ").ends_with(&want)
            })
        })
    })
}

fn wait_listening(addr: SocketAddr) -> Result<(), TransportError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if listening(addr.port()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(TransportError::NotListening(addr))
}

fn server(name: &str, listen: SocketAddr, cfg: &MqttConfig, dfu: &DfuConfig, fleet: &Arc<Fleet>) -> ServerSettings {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: cfg.connection_timeout_ms,
        max_payload_size: cfg.payload_limit(dfu),
        max_inflight_count: cfg.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    if cfg.auth {
        let secret = cfg.device_secret.clone();
        let fleet = fleet.clone();
        connections.set_auth_handler(move |client_id: String, _user: String, password: String| {
            let ok = valid_device_id(&client_id) && fleet.contains(&client_id) && token_ok(&secret, &client_id, &password);
            if !ok {
                warn!(client_id = %client_id.chars().take(64).collect::<String>(), "mqtt CONNECT refused: unknown device or wrong token");
            }
            async move { ok }
        });
    }
    ServerSettings { name: name.into(), listen, tls: None, next_connection_delay_ms: 0, connections }
}

/// Starts the broker and the DFU link. Returns once the listeners accept connections.
pub fn start(
    cfg: &MqttConfig,
    dfu_cfg: &DfuConfig,
    dfu: Arc<Dfu>,
    fleet: Arc<Fleet>,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> Result<MqttListeners, TransportError> {
    let v4 = resolve(cfg.listen)?;
    let v5 = cfg.v5_listen().map(resolve).transpose()?;
    let command_log = cfg.command_log_limit(dfu_cfg);
    let mut custom = HashMap::new();
    custom.insert(
        STATUS_FILTER.to_owned(),
        SegmentConfig { max_segment_size: cfg.status_log_bytes, max_segment_count: 2 },
    );
    // rumqttd's metrics timer unwraps both intervals (it panics when only meters are set),
    // so alerts get one too; nothing subscribes to them.
    let metrics: HashMap<rumqttd::MetricType, rumqttd::MetricSettings> = serde_json::from_value(serde_json::json!({
        "meters": {"push_interval": METER_INTERVAL.as_secs()},
        "alerts": {"push_interval": 3600},
    }))
    .map_err(|e| TransportError::Broker(e.to_string()))?;
    let config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            // +1: the gateway's own link is a connection too.
            max_connections: cfg.max_connections + 1,
            max_outgoing_packet_count: 200,
            max_segment_size: command_log,
            max_segment_count: 2,
            custom_segment: Some(custom),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server("mqtt-v4", v4, cfg, dfu_cfg, &fleet))])),
        v5: v5.map(|a| HashMap::from([("v5".to_owned(), server("mqtt-v5", a, cfg, dfu_cfg, &fleet))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: Some(metrics),
    };
    let mut broker = Broker::new(config);
    let (mut tx, rx) = broker.link("fwgate-dfu").map_err(|e| TransportError::Broker(e.to_string()))?;
    for filter in [STATUS_FILTER, HEARTBEAT_TOPIC] {
        tx.subscribe(filter).map_err(|e| TransportError::Broker(e.to_string()))?;
    }
    if cfg.echo {
        tx.subscribe(ECHO_FILTER).map_err(|e| TransportError::Broker(e.to_string()))?;
    }
    let echo = cfg.echo.then(|| Bytes::from(vec![0u8; cfg.payload_limit(dfu_cfg)]));
    let meters = broker.meters().map_err(|e| TransportError::Broker(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "mqtt broker stopped");
            }
        })
        .map_err(|e| TransportError::Broker(e.to_string()))?;
    wait_listening(v4)?;
    if let Some(a) = v5 {
        wait_listening(a)?;
    }
    std::thread::Builder::new()
        .name("mqtt-dfu".into())
        .spawn(move || link_loop(tx, rx, meters, dfu, telemetry, echo, shutdown))
        .map_err(|e| TransportError::Broker(e.to_string()))?;
    info!(%v4, v5 = ?v5, "mqtt listening");
    Ok(MqttListeners { v4, v5 })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `echo/{id}/ping` → `echo/{id}/pong`: the benchmark of the broker's bare round trip.
const ECHO_FILTER: &str = "echo/+/ping";

/// The answer to an echo ping: the asked number of bytes, a slice of a zeroed buffer.
fn echo_reply(topic: &[u8], payload: &[u8], zeros: &Bytes) -> Option<(String, Bytes)> {
    let id = std::str::from_utf8(topic).ok()?.strip_prefix("echo/")?.strip_suffix("/ping")?;
    if !valid_device_id(id) {
        return None;
    }
    let size = payload.get(..2).map_or(0, |s| u16::from_be_bytes([s[0], s[1]]) as usize).min(zeros.len());
    Some((format!("echo/{id}/pong"), zeros.slice(..size)))
}

fn link_loop(
    mut tx: LinkTx,
    mut rx: LinkRx,
    meters: rumqttd::meters::MetersLink,
    dfu: Arc<Dfu>,
    telemetry: Arc<Telemetry>,
    echo: Option<Bytes>,
    shutdown: CancellationToken,
) {
    let mut replies = Vec::with_capacity(8);
    let mut next_beat = Instant::now();
    while !shutdown.is_cancelled() {
        if Instant::now() >= next_beat {
            next_beat = Instant::now() + METER_INTERVAL;
            let _ = tx.try_publish(HEARTBEAT_TOPIC, &b""[..]);
            while let Ok(batch) = meters.recv() {
                for m in batch {
                    if let Meter::Router(_, r) = m {
                        telemetry.set_connected(r.total_connections.saturating_sub(1) as i64);
                    }
                }
            }
        }
        let notification = match rx.recv_deadline(Instant::now() + Duration::from_millis(200)) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(rumqttd::local::LinkError::RecvTimeout(_)) => continue,
            Err(e) => {
                error!(error = %e, "mqtt link to the broker closed");
                return;
            }
        };
        match notification {
            Notification::Forward(f) => {
                let topic = f.publish.topic;
                if topic.as_ref() == HEARTBEAT_TOPIC.as_bytes() {
                    continue;
                }
                if let Some(zeros) = &echo {
                    if let Some((to, reply)) = echo_reply(&topic, &f.publish.payload, zeros) {
                        if let Err(e) = tx.publish(to, reply) {
                            error!(error = %e, "mqtt link to the broker closed");
                            return;
                        }
                        continue;
                    }
                }
                let Some(device) = parse_status_topic(&topic) else {
                    telemetry.bad_input("bad_topic");
                    warn!(topic = %String::from_utf8_lossy(&topic[..topic.len().min(128)]), "Status on a malformed topic");
                    continue;
                };
                replies.clear();
                dfu.handle("mqtt", device, &f.publish.payload, now_secs(), true, &mut replies);
                let to = command_topic(device);
                for payload in replies.drain(..) {
                    if let Err(e) = tx.publish(to.clone(), payload) {
                        error!(error = %e, "mqtt link to the broker closed");
                        return;
                    }
                }
            }
            // The router paused us because our buffer filled; tell it we are ready again.
            Notification::Unschedule => {
                if let Err(e) = rx.ready() {
                    error!(error = %e, "mqtt link to the broker closed");
                    return;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_replies_the_asked_size_on_the_pong_topic() {
        let zeros = Bytes::from(vec![0u8; 1000]);
        let (to, b) = echo_reply(b"echo/dev-1/ping", &[0x02, 0x00], &zeros).unwrap();
        assert_eq!((to.as_str(), b.len()), ("echo/dev-1/pong", 512));
        assert_eq!(echo_reply(b"echo/dev-1/ping", &[0xff, 0xff], &zeros).unwrap().1.len(), 1000, "capped");
        assert_eq!(echo_reply(b"echo/dev-1/ping", &[], &zeros).unwrap().1.len(), 0);
        assert!(echo_reply(b"echo/a+b/ping", &[0, 1], &zeros).is_none());
        assert!(echo_reply(b"dfu/dev-1/status", &[0, 1], &zeros).is_none());
    }

    #[test]
    fn listening_sockets_are_found_in_proc() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(port));
        drop(l);
        assert!(!listening(port));
    }

    #[test]
    fn a_taken_port_is_a_bind_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = l.local_addr().unwrap();
        assert!(matches!(resolve(taken), Err(TransportError::Bind { .. })));
        assert_ne!(resolve("127.0.0.1:0".parse().unwrap()).unwrap().port(), 0);
    }
}
