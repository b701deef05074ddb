//! CoAP over DTLS 1.2 with pre-shared keys (RFC 7252 §9.1.3.1): the PSK identity is the
//! device id and the key its token, so a session can only act as its own device.
//!
//! One UDP socket, read and written in batches as the plain listener is. OpenSSL does the
//! record layer and the handshake over in-memory "pipes" (one datagram in, the datagrams it
//! wants to send out). A new address first goes through `DTLSv1_listen` on one shared,
//! reusable SSL object: it answers a ClientHello without a valid cookie with a
//! HelloVerifyRequest and keeps nothing, so a spoofed source costs one small answer and no
//! memory. Only a ClientHello that returns the cookie creates a session. Sessions are bounded
//! in number (and handshakes among them), handshakes in time, established sessions by idleness.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslRef, SslSessionCacheMode,
    SslStream, SslVersion,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::exchange::{Access, Exchange};
use super::proof::AddressKey;
use super::{exchange_config, send_all, udp, Gateway, REQUEST_OVERHEAD};
use crate::config::CoapConfig;
use crate::fleet::{device_token, Fleet};

/// Cipher suites offered, strongest first among those constrained devices have; the first is
/// the one RFC 7252 §9.1.3.1 makes mandatory.
const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:PSK-AES128-CBC-SHA256";
/// Largest datagram OpenSSL sends: IPv6's minimum link MTU, which a 1024-byte block fits.
const MTU: u32 = 1280;
/// Record header, explicit nonce and tag beyond a CoAP message.
const RECORD_OVERHEAD: usize = 64;
/// A cookie stays valid for this long after it was issued (two key periods).
const COOKIE_PERIOD_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    #[error("coap.dtls_listen {addr}: cannot bind")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("coap DTLS setup (OpenSSL): {0}")]
    Ssl(#[from] ErrorStack),
}

/// The OpenSSL calls the `openssl` crate does not wrap: `DTLSv1_listen` (the stateless cookie
/// exchange), `DTLSv1_handle_timeout` (handshake retransmission) and `SSL_free_buffers` (an
/// idle session's record buffers). They are part of the libssl the crate links; this is the
/// only unsafe code in fwgate.
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::{c_int, c_long, c_void};

    use foreign_types::ForeignTypeRef;
    use openssl::ssl::SslRef;

    extern "C" {
        fn DTLSv1_listen(ssl: *mut c_void, client: *mut c_void) -> c_int;
        fn BIO_ADDR_new() -> *mut c_void;
        fn BIO_ADDR_free(addr: *mut c_void);
        fn SSL_ctrl(ssl: *mut c_void, cmd: c_int, larg: c_long, parg: *mut c_void) -> c_long;
        fn SSL_free_buffers(ssl: *mut c_void) -> c_int;
    }
    /// `DTLSv1_handle_timeout` is this `SSL_ctrl` command.
    const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

    /// An owned `BIO_ADDR`, where `DTLSv1_listen` writes the client's address.
    pub struct BioAddr(*mut c_void);

    // SAFETY: a plain heap object with no thread affinity, only used through `&mut`.
    unsafe impl Send for BioAddr {}

    impl BioAddr {
        pub fn new() -> Option<BioAddr> {
            // SAFETY: an allocation; null is checked.
            let p = unsafe { BIO_ADDR_new() };
            (!p.is_null()).then_some(BioAddr(p))
        }
    }

    impl Drop for BioAddr {
        fn drop(&mut self) {
            // SAFETY: allocated by BIO_ADDR_new, freed once.
            unsafe { BIO_ADDR_free(self.0) }
        }
    }

    /// `DTLSv1_listen` on `ssl`, whose BIOs are set: 1 when the datagram read was a
    /// ClientHello with a valid cookie (the handshake goes on with `ssl`), 0 when it was
    /// answered with a HelloVerifyRequest or ignored, below 0 on error.
    pub fn listen(ssl: &SslRef, client: &mut BioAddr) -> i32 {
        // SAFETY: `ssl` is a live SSL object with BIOs; `client` a live BIO_ADDR. The call is
        // synchronous and keeps neither pointer.
        unsafe { DTLSv1_listen(ssl.as_ptr().cast(), client.0) }
    }

    /// Frees the session's read and write buffers (about 13 KiB) when nothing is pending in
    /// them. Only a read allocates them again: OpenSSL's DTLS write path writes into the
    /// write buffer as it is, so this is for established sessions, which only write after
    /// reading (a handshake's retransmission writes without a read).
    pub fn free_buffers(ssl: &SslRef) {
        // SAFETY: a live SSL object; the call only frees buffers OpenSSL owns.
        unsafe { SSL_free_buffers(ssl.as_ptr().cast()) };
    }

    /// Retransmits the last handshake flight if its timer ran out.
    pub fn handle_timeout(ssl: &SslRef) {
        // SAFETY: a live SSL object; the command takes no pointer argument.
        unsafe { SSL_ctrl(ssl.as_ptr().cast(), DTLS_CTRL_HANDLE_TIMEOUT, 0, std::ptr::null_mut()) };
    }
}

/// The bound socket and the TLS context, ready to [`serve`].
pub struct Listener {
    socket: UdpSocket,
    ctx: SslContext,
    pub addr: SocketAddr,
}

thread_local! {
    /// The address whose ClientHello `DTLSv1_listen` is reading: the cookie callbacks bind
    /// the cookie to it. Set and used within one synchronous call on one thread.
    static COOKIE_PEER: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

/// fwgate's DTLS context before its cookie callbacks: DTLS 1.2, the PSK suites of
/// [`CIPHERS`] and no certificates, cookies on, no session cache or tickets (a device's state
/// is its session). `key` gives the key of a PSK identity, or `None`: unknown, unreadable and
/// absent identities fail the handshake with unknown_psk_identity, and nothing is kept.
/// Public for the engine benchmark (`bench/dtls_engines.rs`), which sets its own cookies.
pub fn psk_context(
    key: impl Fn(&[u8]) -> Option<String> + Send + Sync + 'static,
) -> Result<SslContextBuilder, ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_options(SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_psk_server_callback(move |_ssl, identity, psk| {
        let Some(k) = identity.and_then(&key) else { return Ok(0) };
        let n = k.len().min(psk.len());
        psk[..n].copy_from_slice(&k.as_bytes()[..n]);
        Ok(n)
    });
    Ok(b)
}

/// Frees an idle session's record buffers, as the listener does after every datagram.
/// Public for the engine benchmark.
pub fn release_buffers(ssl: &SslRef) {
    ffi::free_buffers(ssl);
}

/// Binds the DTLS socket and builds the context ([`psk_context`] with the address-bound
/// cookies).
pub async fn bind(
    cfg: &CoapConfig,
    listen: SocketAddr,
    fleet: Arc<Fleet>,
    device_secret: Arc<str>,
) -> Result<Listener, DtlsError> {
    let mut b = psk_context(move |identity| {
        let id = std::str::from_utf8(identity).ok().filter(|id| fleet.contains(id))?;
        Some(device_token(&device_secret, id))
    })?;
    let cookies = Arc::new(Cookies::new());
    let c = cookies.clone();
    b.set_cookie_generate_cb(move |_ssl, buf| {
        let cookie = c.make(COOKIE_PEER.get(), now_unix());
        let n = cookie.len().min(buf.len());
        buf[..n].copy_from_slice(&cookie[..n]);
        Ok(n)
    });
    b.set_cookie_verify_cb(move |_ssl, cookie| cookies.check(COOKIE_PEER.get(), cookie, now_unix()));
    let ctx = b.build();
    let socket = UdpSocket::bind(listen).await.map_err(|source| DtlsError::Bind { addr: listen, source })?;
    let addr = socket.local_addr().map_err(|source| DtlsError::Bind { addr: listen, source })?;
    let buffer = udp::set_buffers(&socket, cfg.socket_buffer_bytes);
    info!(%addr, socket_buffer = ?buffer, ciphers = CIPHERS, "coap DTLS (PSK) listening");
    Ok(Listener { socket, ctx, addr })
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Stateless cookies: a MAC of the address and the period it was issued in.
struct Cookies {
    key: AddressKey,
}

impl Cookies {
    fn new() -> Cookies {
        Cookies { key: AddressKey::new() }
    }

    fn mac(&self, peer: Option<SocketAddr>, period: u64) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.key.mac(peer, period)[..16]);
        out
    }

    fn make(&self, peer: Option<SocketAddr>, now: u64) -> [u8; 16] {
        self.mac(peer, now / COOKIE_PERIOD_SECS)
    }

    fn check(&self, peer: Option<SocketAddr>, cookie: &[u8], now: u64) -> bool {
        let period = now / COOKIE_PERIOD_SECS;
        peer.is_some() && [period, period.saturating_sub(1)].iter().any(|p| self.mac(peer, *p)[..] == *cookie)
    }
}

/// OpenSSL's view of the network: at most one datagram to read, and the datagrams it wrote.
#[derive(Default)]
struct Pipe {
    inbox: Vec<u8>,
    unread: bool,
    outbox: Vec<Vec<u8>>,
}

impl Pipe {
    fn feed(&mut self, scratch: &mut Vec<u8>, datagram: &[u8]) {
        // The buffer moves between the loop and the pipe so an idle session holds none.
        self.inbox = std::mem::take(scratch);
        self.inbox.clear();
        self.inbox.extend_from_slice(datagram);
        self.unread = true;
    }

    fn drain(&mut self, scratch: &mut Vec<u8>, peer: SocketAddr, outs: &mut Vec<(SocketAddr, Vec<u8>)>) {
        *scratch = std::mem::take(&mut self.inbox);
        self.unread = false;
        outs.extend(self.outbox.drain(..).map(|d| (peer, d)));
        self.outbox = Vec::new();
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.unread {
            return Err(ErrorKind::WouldBlock.into());
        }
        self.unread = false;
        let n = self.inbox.len().min(buf.len());
        buf[..n].copy_from_slice(&self.inbox[..n]);
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Session {
    stream: SslStream<Pipe>,
    /// The device this session proved to be; `None` while the handshake runs.
    device: Option<Box<str>>,
    started: Instant,
    last: Instant,
}

/// Why a session ended: its `fwgate_coap_dtls_events_total` event.
type End = &'static str;

fn new_stream(ctx: &SslContext) -> Result<SslStream<Pipe>, ErrorStack> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_mtu(MTU)?;
    SslStream::new(ssl, Pipe::default())
}

struct Dtls {
    ctx: SslContext,
    /// Reused by `DTLSv1_listen` for every datagram from an address without a session; it
    /// becomes that address's session when its cookie checks.
    listener: SslStream<Pipe>,
    sessions: HashMap<SocketAddr, Session>,
    handshaking: usize,
    exchange: Exchange,
    scratch: Vec<u8>,
    plain: Vec<u8>,
    answer: Vec<u8>,
    client: ffi::BioAddr,
}

impl Dtls {
    fn new(ctx: SslContext, cfg: &CoapConfig) -> Result<Dtls, ErrorStack> {
        let listener = new_stream(&ctx)?;
        let mut xc = exchange_config(cfg);
        // The cookie exchange verified the address already.
        xc.amplification_limit = false;
        xc.max_peers = cfg.dtls_max_sessions;
        let client = ffi::BioAddr::new().ok_or_else(ErrorStack::get)?;
        Ok(Dtls {
            ctx,
            listener,
            sessions: HashMap::new(),
            handshaking: 0,
            exchange: Exchange::new(xc),
            scratch: Vec::new(),
            plain: vec![0u8; cfg.max_request_bytes + REQUEST_OVERHEAD],
            answer: Vec::new(),
            client,
        })
    }

    /// One datagram from `peer`; what goes back is appended to `outs`.
    #[allow(clippy::too_many_arguments)]
    fn datagram(
        &mut self,
        peer: SocketAddr,
        d: &[u8],
        cfg: &CoapConfig,
        now: Instant,
        now_ms: u64,
        gw: &Gateway,
        outs: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) {
        // A new handshake from an address with a session (the device restarted): it goes
        // through the cookie exchange like any other, and the old session is replaced only
        // once the cookie checks (RFC 6347 §4.2.8), so a spoofed hello cannot end it.
        let restart = self.sessions.get(&peer).is_some_and(|s| s.device.is_some() && is_initial_client_hello(d));
        if restart || !self.sessions.contains_key(&peer) {
            if !self.listen(peer, d, cfg, now, gw, outs) {
                return;
            }
        } else if let Some(s) = self.sessions.get_mut(&peer) {
            s.stream.get_mut().feed(&mut self.scratch, d);
        }
        let Some(s) = self.sessions.get_mut(&peer) else { return };
        s.last = now;
        // The handshake checks the cookie of the ClientHello that `listen` accepted once more.
        COOKIE_PEER.set(Some(peer));
        let was_handshaking = s.device.is_none();
        let result = drive(s, &mut self.exchange, peer, now_ms, gw, &mut self.plain, &mut self.answer);
        COOKIE_PEER.set(None);
        // Between datagrams an established session keeps its keys, not its record buffers:
        // 10,000 idle sessions would otherwise hold some 13 KiB more each. Not while it
        // handshakes: a retransmission from the sweep writes without reading first, and
        // OpenSSL's DTLS write path does not allocate the buffer it writes into again.
        if s.device.is_some() {
            ffi::free_buffers(s.stream.ssl());
        }
        s.stream.get_mut().drain(&mut self.scratch, peer, outs);
        match result {
            Ok(()) => {
                if was_handshaking && s.device.is_some() {
                    self.handshaking -= 1;
                    gw.telemetry.dtls("handshake_ok");
                    debug!(%peer, device = s.device.as_deref(), "dtls session established");
                }
            }
            Err(end) => self.end(peer, end, gw),
        }
    }

    /// A datagram from an address without a session: a HelloVerifyRequest goes back, or —
    /// when it is a ClientHello with a valid cookie and there is room — a session starts.
    fn listen(
        &mut self,
        peer: SocketAddr,
        d: &[u8],
        cfg: &CoapConfig,
        now: Instant,
        gw: &Gateway,
        outs: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) -> bool {
        self.listener.get_mut().feed(&mut self.scratch, d);
        COOKIE_PEER.set(Some(peer));
        let r = ffi::listen(self.listener.ssl(), &mut self.client);
        COOKIE_PEER.set(None);
        self.listener.get_mut().drain(&mut self.scratch, peer, outs);
        if r <= 0 {
            // Clears this thread's error queue; r < 0 is a datagram that was not DTLS.
            let errors = ErrorStack::get();
            let sent = outs.last().is_some_and(|(p, _)| *p == peer);
            gw.telemetry.dtls(if sent { "hello_verify" } else { "not_hello" });
            if r < 0 {
                debug!(%peer, error = %errors, "dtls datagram without a session dropped");
            }
            return false;
        }
        if self.sessions.len() >= cfg.dtls_max_sessions || self.handshaking >= cfg.dtls_max_handshakes {
            // The cookie proved the address; there is no room now. The device's retransmitted
            // ClientHello tries again. The listener is reused as it is (DTLSv1_listen clears it).
            gw.telemetry.dtls("refused_full");
            return false;
        }
        let fresh = match new_stream(&self.ctx) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot make a DTLS session");
                return false;
            }
        };
        let stream = std::mem::replace(&mut self.listener, fresh);
        self.end(peer, "closed", gw);
        self.sessions.insert(peer, Session { stream, device: None, started: now, last: now });
        self.handshaking += 1;
        gw.telemetry.set_dtls_sessions(self.sessions.len() as i64);
        true
    }

    fn end(&mut self, peer: SocketAddr, why: End, gw: &Gateway) {
        if let Some(s) = self.sessions.remove(&peer) {
            if s.device.is_none() {
                self.handshaking -= 1;
            }
            self.exchange.forget(peer);
            gw.telemetry.dtls(why);
            gw.telemetry.set_dtls_sessions(self.sessions.len() as i64);
        }
    }

    /// Retransmits handshake flights whose timer ran out; ends handshakes past their time and
    /// sessions idle too long.
    fn sweep(&mut self, cfg: &CoapConfig, now: Instant, gw: &Gateway, outs: &mut Vec<(SocketAddr, Vec<u8>)>) {
        let handshake = Duration::from_secs(cfg.dtls_handshake_timeout_secs);
        let idle = Duration::from_secs(cfg.dtls_idle_secs);
        let mut expired = Vec::new();
        for (peer, s) in self.sessions.iter_mut() {
            if s.device.is_none() {
                if now.duration_since(s.started) > handshake {
                    expired.push((*peer, "expired_handshake"));
                    continue;
                }
                ffi::handle_timeout(s.stream.ssl());
                let _ = ErrorStack::get();
                s.stream.get_mut().drain(&mut self.scratch, *peer, outs);
            } else if now.duration_since(s.last) > idle {
                expired.push((*peer, "expired_idle"));
            }
        }
        for (peer, why) in expired {
            self.end(peer, why, gw);
        }
    }
}

/// Runs the handshake on, or reads the CoAP requests out of, the datagram fed to `s`.
fn drive(
    s: &mut Session,
    exchange: &mut Exchange,
    peer: SocketAddr,
    now_ms: u64,
    gw: &Gateway,
    plain: &mut [u8],
    answer: &mut Vec<u8>,
) -> Result<(), End> {
    if s.device.is_none() {
        match s.stream.do_handshake() {
            Ok(()) => {
                let id = s.stream.ssl().psk_identity().and_then(|i| std::str::from_utf8(i).ok());
                match id {
                    Some(id) => s.device = Some(id.into()),
                    None => return Err("handshake_failed"),
                }
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
            Err(e) => {
                debug!(%peer, error = %e, "dtls handshake failed");
                return Err("handshake_failed");
            }
        }
    }
    let Some(device) = s.device.as_deref() else { return Ok(()) };
    loop {
        match s.stream.ssl_read(plain) {
            Ok(n) => {
                let outcome =
                    exchange.handle(peer, &plain[..n], now_ms, crate::now_secs(), Access::Device(device), gw, answer);
                gw.telemetry.coap(outcome.label());
                if !answer.is_empty() && s.stream.ssl_write(answer).is_err() {
                    return Err("failed");
                }
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                // close_notify: answer it, then forget the session.
                let _ = s.stream.shutdown();
                return Err("closed");
            }
            Err(e) => {
                debug!(%peer, error = %e, "dtls record refused");
                return Err("failed");
            }
        }
    }
}

/// A handshake record of epoch 0 carrying a ClientHello: a new handshake from this address.
fn is_initial_client_hello(d: &[u8]) -> bool {
    // Record: type(1) version(2) epoch(2) seq(6) length(2); handshake: msg_type(1) ...
    d.len() > 13 && d[0] == 22 && d[3] == 0 && d[4] == 0 && d[13] == 1
}

/// The receive loop: runs until `shutdown`.
pub async fn serve(listener: Listener, cfg: CoapConfig, gateway: Gateway, shutdown: CancellationToken) {
    let Listener { socket, ctx, .. } = listener;
    let mut dtls = match Dtls::new(ctx, &cfg) {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "coap DTLS cannot start");
            return;
        }
    };
    let started = Instant::now();
    let buf_len = cfg.max_request_bytes + REQUEST_OVERHEAD + RECORD_OVERHEAD;
    let mut bufs = vec![vec![0u8; buf_len]; udp::BATCH];
    let mut received = Vec::with_capacity(udp::BATCH);
    let mut outs: Vec<(SocketAddr, Vec<u8>)> = Vec::with_capacity(udp::BATCH * 2);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        outs.clear();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => dtls.sweep(&cfg, Instant::now(), &gateway, &mut outs),
            r = socket.readable() => {
                if let Err(e) = r {
                    warn!(error = %e, "coap DTLS socket failed");
                    return;
                }
                let n = match udp::try_recv(&socket, &mut bufs, &mut received) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        debug!(error = %e, "coap DTLS receive error");
                        continue;
                    }
                };
                let now = Instant::now();
                let now_ms = started.elapsed().as_millis() as u64;
                for (r, buf) in received.iter().zip(&bufs).take(n) {
                    let Some(peer) = r.peer else { continue };
                    if r.truncated {
                        gateway.telemetry.dtls("too_large");
                        continue;
                    }
                    dtls.datagram(peer, &buf[..r.len], &cfg, now, now_ms, &gateway, &mut outs);
                }
            }
        }
        if !outs.is_empty() {
            let (peers, datagrams): (Vec<SocketAddr>, Vec<Vec<u8>>) = outs.drain(..).unzip();
            send_all(&socket, &datagrams, &peers).await;
        }
    }
}
