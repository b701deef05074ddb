//! The CoAP shell: one tokio receive loop per UDP socket; each datagram goes through the pure
//! [`exchange`] layer, whose answers come from the DFU session (`POST /dfu/{id}`) and the
//! planner's assignments (`GET /fw/{id}`, Block2 slices of the hot image).

pub mod dtls;
pub mod exchange;
mod proof;
mod udp;

pub use dtls::{bind as bind_dtls, serve as serve_dtls, DtlsError};

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::exchange::{Access, DfuAnswer, Exchange, ExchangeConfig, FirmwareAnswer, Image, Resources};
use super::{Dfu, Handled, Shape, TransportError};
use crate::config::CoapConfig;
use crate::engine::OpState;
use crate::fleet::MAIN_COMPONENT;
use crate::planner::{Lookup, Planner};
use crate::telemetry::Telemetry;

/// The gateway behind the CoAP resources.
pub struct Gateway {
    pub dfu: Arc<Dfu>,
    pub planner: Arc<Planner>,
    pub telemetry: Arc<Telemetry>,
    /// Largest WRITE in a Command (`coap.max_block_size`).
    pub max_block: u32,
}

impl Resources for Gateway {
    fn dfu(&self, device: &str, status: &[u8], now_secs: u64) -> DfuAnswer {
        let mut out = Vec::with_capacity(1);
        // `window` is an MQTT feature: over CoAP one request gets one WRITE.
        let shape = Shape::One { max_block: self.max_block };
        match self.dfu.handle("coap", device, status, now_secs, shape, &mut out) {
            Handled::Replied | Handled::UnknownDevice => match out.pop() {
                Some(c) => DfuAnswer::Command(c),
                None => DfuAnswer::Unavailable,
            },
            Handled::BadInput => DfuAnswer::BadInput,
            Handled::Stale | Handled::Failed => DfuAnswer::Unavailable,
        }
    }

    fn firmware(&self, device: &str) -> FirmwareAnswer {
        match self.planner.lookup(device, MAIN_COMPONENT, crate::now_secs()) {
            Ok(Lookup::Active(op)) => FirmwareAnswer::Image(Image { bytes: op.image, digest: op.meta.digest() }),
            Ok(Lookup::Nothing) => FirmwareAnswer::NotAssigned,
            Ok(Lookup::Refused(why)) => {
                if let Some(suppressed) = self.telemetry.log_fault("refused_image") {
                    warn!(device, reason = %why, suppressed, "refused to serve an image");
                }
                FirmwareAnswer::NotAssigned
            }
            // Another component of the device is being transferred, or the image waits for
            // trust (TUF metadata expired): ask again later.
            Ok(Lookup::Wait(_) | Lookup::Held(_)) => FirmwareAnswer::Unavailable,
            Err(e) => {
                warn!(device, error = %e, "cannot serve firmware");
                self.telemetry.store_error();
                FirmwareAnswer::Unavailable
            }
        }
    }

    fn block_served(&self, device: &str, offset: u64, len: u64, now_secs: u64) -> bool {
        // A Block2 download is a download: the operation starts, and progress is the end of the
        // block sent (asking for a block is the only acknowledgement a stock client gives).
        if let Some((seq, state)) = self.planner.head_state(device, MAIN_COMPONENT) {
            if matches!(state, OpState::Pending | OpState::Downloading) {
                let to = (state == OpState::Pending).then_some(OpState::Downloading);
                let at = Some((offset + len).min(u32::MAX as u64) as u32);
                // Ok(false): the operation moved on meanwhile; the block is still the image's.
                if let Err(e) = self.planner.record(device, seq, state, to, at, None, now_secs) {
                    warn!(device, error = %e, "cannot record progress");
                    self.telemetry.store_error();
                    return false;
                }
            }
        }
        self.telemetry.served("coap-block2", 1, len);
        true
    }
}

pub(crate) fn exchange_config(cfg: &CoapConfig) -> ExchangeConfig {
    ExchangeConfig {
        max_block: cfg.max_block_size,
        max_request: cfg.max_request_bytes,
        dedup_per_peer: cfg.dedup_per_peer,
        dedup_lifetime_ms: cfg.dedup_lifetime_secs * 1000,
        max_peers: cfg.max_peers,
        amplification_limit: true,
        echo_lifetime_ms: cfg.echo_lifetime_secs * 1000,
    }
}

/// Who may use the device resources on the plain listener: nobody when devices must
/// authenticate (unless `coap.plain` says otherwise), else anyone.
pub fn plain_access(cfg: &CoapConfig, mqtt_auth: bool) -> Access<'static> {
    if cfg.auth(mqtt_auth) && !cfg.plain {
        Access::Refused
    } else {
        Access::Open
    }
}

/// Binds the CoAP socket; serving starts with [`serve`].
pub async fn bind(cfg: &CoapConfig) -> Result<(UdpSocket, SocketAddr), TransportError> {
    let socket =
        UdpSocket::bind(cfg.listen).await.map_err(|source| TransportError::Bind { addr: cfg.listen, source })?;
    let addr = socket.local_addr().map_err(|source| TransportError::Bind { addr: cfg.listen, source })?;
    let buffer = udp::set_buffers(&socket, cfg.socket_buffer_bytes);
    info!(%addr, socket_buffer = ?buffer, "coap listening");
    Ok((socket, addr))
}

/// The receive loop: runs until `shutdown`. Datagrams are read and answered in batches of up
/// to [`udp::BATCH`]: one `recvmmsg` takes what is waiting, each datagram goes through the
/// exchange, one `sendmmsg` sends the answers.
pub async fn serve(
    socket: UdpSocket,
    cfg: CoapConfig,
    access: Access<'static>,
    gateway: Gateway,
    shutdown: CancellationToken,
) {
    let mut exchange = Exchange::new(exchange_config(&cfg));
    let started = Instant::now();
    // Room for the largest accepted request with its header and options; a longer datagram is
    // cut by the kernel and refused as too large.
    let buf_len = cfg.max_request_bytes + REQUEST_OVERHEAD;
    let mut bufs = vec![vec![0u8; buf_len]; udp::BATCH];
    let mut received = Vec::with_capacity(udp::BATCH);
    let mut outs: Vec<Vec<u8>> = (0..udp::BATCH).map(|_| Vec::with_capacity(1280)).collect();
    let mut peers = Vec::with_capacity(udp::BATCH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.readable() => if let Err(e) = r {
                warn!(error = %e, "coap socket failed");
                return;
            },
        }
        let n = match udp::try_recv(&socket, &mut bufs, &mut received) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!(error = %e, "coap receive error");
                continue;
            }
        };
        let (now_ms, now_secs) = (started.elapsed().as_millis() as u64, crate::now_secs());
        peers.clear();
        for (r, buf) in received.iter().zip(&bufs).take(n) {
            let Some(peer) = r.peer else { continue };
            let out = &mut outs[peers.len()];
            let datagram = &buf[..r.len.min(buf.len())];
            let outcome = if r.truncated {
                exchange.refuse_oversized(peer, datagram, now_ms, out)
            } else {
                exchange.handle(peer, datagram, now_ms, now_secs, access, &gateway, out)
            };
            gateway.telemetry.coap(outcome.label());
            if !out.is_empty() {
                peers.push(peer);
            }
        }
        send_all(&socket, &outs[..peers.len()], &peers).await;
    }
}

/// Header, token and options a request may carry beyond `coap.max_request_bytes` of payload.
const REQUEST_OVERHEAD: usize = 512;

/// Sends every answer, waiting for room in the socket's send buffer when it is full. An
/// answer the kernel refuses is dropped (the device retransmits its request).
pub(crate) async fn send_all(socket: &UdpSocket, outs: &[Vec<u8>], peers: &[SocketAddr]) {
    let datagrams: Vec<&[u8]> = outs.iter().map(Vec::as_slice).collect();
    let mut at = 0;
    while at < peers.len() {
        match udp::try_send(socket, &datagrams[at..], &peers[at..]) {
            Ok(sent) => at += sent.max(1),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(peer = %peers[at], error = %e, "coap send error");
                at += 1;
            }
        }
    }
}
