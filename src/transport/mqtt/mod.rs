//! The MQTT front: fwgate's own DFU-native MQTT server. One tokio task per connection, on
//! every core of the multi-threaded runtime; MQTT 3.1.1 and 5 on the same port (the CONNECT's
//! protocol level decides); packets framed and encoded by rumqttc's `mqttbytes` codecs. There
//! is no general router: a device publishes its Status on `dfu/{id}/status`, the DFU step runs
//! in that connection's task, and the answers go to the connections subscribed to
//! `dfu/{id}/command` — the same socket, usually.

mod conn;
#[doc(hidden)]
pub mod harness;
mod packets;
pub(super) mod tls;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Dfu, TransportError};
use crate::config::{DfuConfig, MqttConfig};
use crate::fleet::Fleet;
use crate::protocol::topic::valid_device_id;
use crate::telemetry::Telemetry;

/// Where the listeners are once started.
#[derive(Debug, Clone, Copy)]
pub struct MqttListeners {
    /// MQTT 3.1.1 and 5 over TCP.
    pub tcp: SocketAddr,
    /// MQTT 3.1.1 and 5 over TLS, when configured.
    pub tls: Option<SocketAddr>,
}

/// Fixed bounds of every connection, from the configuration.
pub(crate) struct Limits {
    max_connections: usize,
    /// Largest packet read from a client (payload limit plus room for the topic).
    max_packet: usize,
    connect_timeout: Duration,
    write_timeout: Duration,
    max_inflight: u16,
    /// Messages another connection's publish may queue for this one.
    inbox: usize,
}

/// A subscriber of a topic: its connection and where to leave messages for it.
pub(crate) struct Route {
    conn: u64,
    inbox: Arc<Inbox>,
}

/// Messages for a connection from other connections' tasks, bounded: when it is full, the
/// subscriber is not reading fast enough and is disconnected.
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<(Box<str>, Bytes)>>,
    notify: Notify,
    overflowed: AtomicBool,
    cap: usize,
}

impl Inbox {
    fn new(cap: usize) -> Inbox {
        Inbox { queue: Mutex::new(VecDeque::new()), notify: Notify::new(), overflowed: AtomicBool::new(false), cap }
    }

    fn push(&self, topic: &str, payloads: &[Bytes]) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() + payloads.len() > self.cap {
            self.overflowed.store(true, Ordering::Release);
        } else {
            q.extend(payloads.iter().map(|p| (Box::from(topic), p.clone())));
        }
        drop(q);
        self.notify.notify_one();
    }
}

/// At most one warning a second for refusals, so that a misbehaving client cannot flood the
/// log; every refusal is counted in `/metrics` regardless.
/// What every connection task shares.
pub(crate) struct Shared {
    dfu: Arc<Dfu>,
    fleet: Arc<Fleet>,
    telemetry: Arc<Telemetry>,
    /// The device secret when devices must authenticate.
    auth: Option<String>,
    limits: Limits,
    /// Client id → the connection holding it, to close it when another takes over.
    clients: DashMap<Box<str>, (u64, CancellationToken)>,
    /// Topic → its subscribers: only `dfu/{id}/command` (and `echo/{id}/pong`) exist.
    routes: DashMap<Box<str>, Vec<Route>>,
    sessions: AtomicUsize,
    sockets: AtomicUsize,
    next_id: AtomicU64,
    echo: Option<Bytes>,
    shutdown: CancellationToken,
}

impl Shared {
    fn new(
        cfg: &MqttConfig,
        dfu_cfg: &DfuConfig,
        dfu: Arc<Dfu>,
        fleet: Arc<Fleet>,
        telemetry: Arc<Telemetry>,
        shutdown: CancellationToken,
    ) -> Shared {
        let payload = cfg.payload_limit(dfu_cfg);
        Shared {
            dfu,
            fleet,
            telemetry,
            auth: cfg.auth.then(|| cfg.device_secret.clone()),
            limits: Limits {
                max_connections: cfg.max_connections,
                max_packet: payload + PACKET_OVERHEAD,
                connect_timeout: Duration::from_millis(cfg.connection_timeout_ms as u64),
                write_timeout: Duration::from_millis(cfg.write_timeout_ms),
                max_inflight: cfg.max_inflight.clamp(1, u16::MAX as usize) as u16,
                inbox: (dfu_cfg.max_window as usize * 4).max(16),
            },
            clients: DashMap::new(),
            routes: DashMap::new(),
            sessions: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            echo: cfg.echo.then(|| Bytes::from(vec![0u8; payload])),
            shutdown,
        }
    }

    fn drop_route(&self, topic: &str, conn: u64) {
        if let Some(mut routes) = self.routes.get_mut(topic) {
            routes.retain(|r| r.conn != conn);
        }
        self.routes.remove_if(topic, |_, r| r.is_empty());
    }
}

/// Room around a payload for the PUBLISH header and topic.
const PACKET_OVERHEAD: usize = 256;
/// Sockets accepted beyond `max_connections`, so that a refused client still gets its
/// CONNACK (server busy) instead of a reset.
const SOCKET_SLACK: usize = 1024;

/// Binds the listeners and serves them on `tasks` until `shutdown`.
pub async fn start(
    cfg: &MqttConfig,
    dfu_cfg: &DfuConfig,
    dfu: Arc<Dfu>,
    fleet: Arc<Fleet>,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<MqttListeners, TransportError> {
    let tls = cfg.tls_listen().map(|addr| tls::acceptor(cfg).map(|a| (addr, a))).transpose()?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| TransportError::Bind { addr, source })
    };
    let tcp = bind(cfg.listen).await?;
    let tcp_addr = tcp.local_addr().map_err(|source| TransportError::Bind { addr: cfg.listen, source })?;
    let tls = match tls {
        Some((addr, acceptor)) => {
            let l = bind(addr).await?;
            let local = l.local_addr().map_err(|source| TransportError::Bind { addr, source })?;
            Some((l, local, acceptor))
        }
        None => None,
    };
    let shared = Arc::new(Shared::new(cfg, dfu_cfg, dfu, fleet, telemetry, shutdown));
    if !cfg.auth && cfg.tls_client_ca.as_os_str().is_empty() {
        warn!("mqtt.auth is off: any MQTT client can act as any device (publish its Status, read its commands)");
    }
    tasks.spawn(accept_loop(tcp, None, shared.clone()));
    let tls_addr = tls.map(|(l, addr, acceptor)| {
        tasks.spawn(accept_loop(l, Some(acceptor), shared.clone()));
        addr
    });
    info!(tcp = %tcp_addr, tls = ?tls_addr, "mqtt listening (3.1.1 and 5)");
    Ok(MqttListeners { tcp: tcp_addr, tls: tls_addr })
}

async fn accept_loop(listener: TcpListener, tls: Option<(tokio_rustls::TlsAcceptor, bool)>, sh: Arc<Shared>) {
    let cap = sh.limits.max_connections + SOCKET_SLACK;
    loop {
        let accepted = tokio::select! {
            _ = sh.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                if let Some(suppressed) = sh.telemetry.log_fault("mqtt_accept") {
                    warn!(error = %e, suppressed, "mqtt accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if sh.sockets.fetch_add(1, Ordering::AcqRel) >= cap {
            sh.sockets.fetch_sub(1, Ordering::AcqRel);
            sh.telemetry.mqtt_refused("over_capacity");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let sh = sh.clone();
        // One spawn per kind: a task is as large as its future, and a plain connection's must
        // not be sized for a TLS session it does not have.
        match tls.clone() {
            None => tokio::spawn(async move {
                conn::serve(stream, sh.clone(), peer, None).await;
                sh.sockets.fetch_sub(1, Ordering::AcqRel);
            }),
            Some((acceptor, client_certs)) => tokio::spawn(async move {
                serve_tls(stream, acceptor, client_certs, sh.clone(), peer).await;
                sh.sockets.fetch_sub(1, Ordering::AcqRel);
            }),
        };
    }
}

async fn serve_tls(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    client_certs: bool,
    sh: Arc<Shared>,
    peer: SocketAddr,
) {
    let handshake = tokio::time::timeout(sh.limits.connect_timeout, acceptor.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            sh.telemetry.mqtt_refused("tls_handshake");
            if let Some(suppressed) = sh.telemetry.log_fault("mqtt_tls_handshake") {
                warn!(%peer, error = %e, suppressed, "mqtt TLS handshake failed");
            }
            return;
        }
        Err(_) => {
            sh.telemetry.mqtt_refused("tls_handshake");
            debug!(%peer, "mqtt TLS handshake timed out");
            return;
        }
    };
    let cert_id = if client_certs {
        let cn = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| tls::subject_cn(c));
        match cn {
            Some(cn) => Some(cn),
            None => {
                sh.telemetry.mqtt_refused("certificate_without_cn");
                return;
            }
        }
    } else {
        None
    };
    conn::serve(stream, sh, peer, cert_id).await;
}

/// The answer to an echo ping: the device, and the asked number of bytes, a slice of a
/// zeroed buffer.
fn echo_reply<'t>(topic: &'t [u8], payload: &[u8], zeros: &Bytes) -> Option<(&'t str, Bytes)> {
    let id = std::str::from_utf8(topic).ok()?.strip_prefix("echo/")?.strip_suffix("/ping")?;
    if !valid_device_id(id) {
        return None;
    }
    let size = payload.get(..2).map_or(0, |s| u16::from_be_bytes([s[0], s[1]]) as usize).min(zeros.len());
    Some((id, zeros.slice(..size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_replies_the_asked_size_on_the_pong_topic() {
        let zeros = Bytes::from(vec![0u8; 1000]);
        let (id, b) = echo_reply(b"echo/dev-1/ping", &[0x02, 0x00], &zeros).unwrap();
        assert_eq!((id, b.len()), ("dev-1", 512));
        assert_eq!(echo_reply(b"echo/dev-1/ping", &[0xff, 0xff], &zeros).unwrap().1.len(), 1000, "capped");
        assert_eq!(echo_reply(b"echo/dev-1/ping", &[], &zeros).unwrap().1.len(), 0);
        assert!(echo_reply(b"echo/a+b/ping", &[0, 1], &zeros).is_none());
        assert!(echo_reply(b"dfu/dev-1/status", &[0, 1], &zeros).is_none());
    }
}
