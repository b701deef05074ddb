//! One MQTT connection, start to end, in its own task: CONNECT, then packets until either
//! side closes. A Status is handed to the DFU step here and its replies are written straight
//! back on this socket when this connection subscribed to the device's command topic; other
//! subscribers (another connection of a client without auth, as `mosquitto_sub` beside
//! `mosquitto_pub`) get them through their bounded inbox.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::packets::{self, Closing, Connect, Granted, Inbound, PubOutcome, ReadError, Refused, ServerLimits, Version};
use super::{echo_reply, Inbox, Route, Shared};
use crate::fleet::token_ok;
use crate::protocol::topic::{parse_command_topic, parse_status_topic, valid_device_id};

/// Bytes read from the socket at a time; the buffer grows beyond this only while a packet
/// needs it, and is given back when it is empty.
const READ_CHUNK: usize = 512;
/// A read buffer larger than this is given back once it is empty.
const KEEP_READ: usize = 2 * 1024;
/// A write buffer larger than this is given back once it has been written.
const KEEP_WRITE: usize = 16 * 1024;
/// Subscriptions one connection may hold.
pub(super) const MAX_SUBSCRIPTIONS: usize = 8;

/// Why a connection ended, as counted in `fwgate_mqtt_disconnects`.
pub(super) type End = &'static str;

/// What ended a wait for the client.
enum Woke {
    Read,
    Delivery,
    TakenOver,
    Shutdown,
    KeepAlive,
    Ended(End),
}

struct Sub {
    topic: Box<str>,
    qos: u8,
}

pub(super) struct Conn<S> {
    io: S,
    sh: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    version: Version,
    rbuf: BytesMut,
    wbuf: BytesMut,
    client_id: Option<Box<str>>,
    /// The device this connection proved it is (token or certificate); `None` without auth.
    identity: Option<Box<str>>,
    subs: Vec<Sub>,
    inbox: Option<Arc<Inbox>>,
    kill: CancellationToken,
    inflight: u16,
    max_inflight: u16,
    next_pkid: u16,
    /// MQTT 5: the largest packet the client takes.
    client_max_packet: usize,
    keep_alive: Option<Duration>,
    session: bool,
    /// The client id given to a client that sent none (no auth only).
    assigned_id: Option<String>,
}

/// Serves one accepted connection to its end. `cert_id` is the subject CN of a verified TLS
/// client certificate.
pub(super) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    sh: Arc<Shared>,
    peer: SocketAddr,
    cert_id: Option<String>,
) {
    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    let max_inflight = sh.limits.max_inflight;
    let mut c = Conn {
        io,
        sh,
        id,
        peer,
        version: Version::V4,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        client_id: None,
        identity: None,
        subs: Vec::new(),
        inbox: None,
        kill: CancellationToken::new(),
        inflight: 0,
        max_inflight,
        next_pkid: 0,
        client_max_packet: usize::MAX,
        keep_alive: None,
        session: false,
        assigned_id: None,
    };
    let end = c.run(cert_id).await;
    let _ = c.io.shutdown().await;
    c.leave();
    c.sh.telemetry.mqtt_closed(end);
    debug!(peer = %c.peer, end, "mqtt connection closed");
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn run(&mut self, cert_id: Option<String>) -> End {
        let connect = match timeout(self.sh.limits.connect_timeout, self.read_connect()).await {
            // Part of a CONNECT, then nothing: told apart from a socket that never spoke.
            Err(_) if !self.rbuf.is_empty() => return "half_connect",
            Err(_) => return "connect_timeout",
            Ok(Err(end)) => return end,
            Ok(Ok(c)) => c,
        };
        self.version = connect.version;
        if let Err(why) = self.admit(&connect, cert_id.as_deref()) {
            self.sh.telemetry.mqtt_refused(why.as_str());
            if let Some(suppressed) = self.sh.telemetry.log_fault("mqtt_connect_refused") {
                warn!(peer = %self.peer, client_id = %printable(&connect.client_id), reason = why.as_str(), suppressed, "mqtt CONNECT refused");
            }
            let limits = self.server_limits();
            packets::connack(self.version, &mut self.wbuf, Some(why), &limits);
            let _ = self.flush().await;
            return "refused";
        }
        let limits = self.server_limits();
        packets::connack(self.version, &mut self.wbuf, None, &limits);
        if let Err(end) = self.flush().await {
            return end;
        }
        self.session_loop().await
    }

    fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            receive_maximum: self.sh.limits.max_inflight.max(1),
            max_packet_size: self.sh.limits.max_packet as u32,
            assigned_id: self.assigned_id.clone(),
        }
    }

    async fn read_connect(&mut self) -> Result<Connect, End> {
        loop {
            match packets::read_connect(&mut self.rbuf, self.sh.limits.max_packet) {
                Ok(c) => return Ok(c),
                Err(ReadError::Incomplete(n)) => self.fill(n).await?,
                Err(ReadError::Level(level)) => {
                    // MQTT 3.1.1 §3.2.2.3: answer 0x01 and close; a 5.0 client reads it too.
                    debug!(peer = %self.peer, level, "CONNECT with an unsupported protocol level");
                    self.sh.telemetry.mqtt_refused(Refused::ProtocolVersion.as_str());
                    let limits = self.server_limits();
                    packets::connack(Version::V4, &mut self.wbuf, Some(Refused::ProtocolVersion), &limits);
                    let _ = self.flush().await;
                    return Err("refused");
                }
                Err(ReadError::TooLarge) => {
                    self.sh.telemetry.bad_input("mqtt_too_large");
                    return Err("too_large");
                }
                Err(ReadError::Malformed) => {
                    self.sh.telemetry.bad_input("mqtt_malformed");
                    return Err("malformed");
                }
            }
        }
    }

    /// Reads more bytes: at least the `need` the codec asked for, in small steps.
    async fn fill(&mut self, need: usize) -> Result<(), End> {
        self.rbuf.reserve(need.clamp(READ_CHUNK, self.sh.limits.max_packet + 8));
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) => Err("closed"),
            Ok(_) => Ok(()),
            Err(_) => Err("io_error"),
        }
    }

    /// Writes what is buffered, within the write time limit: a client that does not read
    /// cannot hold the gateway's memory for longer.
    async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        match timeout(self.sh.limits.write_timeout, write).await {
            Err(_) => return Err("slow_reader"),
            Ok(Err(_)) => return Err("io_error"),
            Ok(Ok(())) => {}
        }
        if self.wbuf.capacity() > KEEP_WRITE {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        Ok(())
    }

    fn admit(&mut self, c: &Connect, cert_id: Option<&str>) -> Result<(), Refused> {
        if c.auth_method {
            return Err(Refused::BadAuthMethod);
        }
        let sh = &self.sh;
        let proves = cert_id.is_some() || sh.auth.is_some();
        if (c.client_id.is_empty() && proves) || c.client_id.len() > 256 {
            return Err(Refused::IdentifierRejected);
        }
        let identity = if let Some(cn) = cert_id {
            // The certificate names the device; the client id must be the same name.
            if c.client_id != cn || (sh.auth.is_some() && !sh.fleet.contains(cn)) {
                return Err(Refused::NotAuthorized);
            }
            Some(cn)
        } else if let Some(secret) = &sh.auth {
            if !valid_device_id(&c.client_id) {
                return Err(Refused::IdentifierRejected);
            }
            if !sh.fleet.contains(&c.client_id) {
                return Err(Refused::NotAuthorized);
            }
            match &c.password {
                Some(p) if token_ok(secret, &c.client_id, p) => {}
                _ => return Err(Refused::BadCredentials),
            }
            Some(c.client_id.as_str())
        } else {
            None
        };
        if sh.sessions.fetch_add(1, Ordering::AcqRel) >= sh.limits.max_connections {
            sh.sessions.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::ServerBusy);
        }
        self.session = true;
        sh.telemetry.set_connected(sh.sessions.load(Ordering::Relaxed) as i64);
        self.identity = identity.map(Into::into);
        self.keep_alive = (c.keep_alive > 0).then(|| Duration::from_millis(c.keep_alive as u64 * 1500));
        if let Some(r) = c.receive_maximum {
            self.max_inflight = self.max_inflight.min(r.max(1));
        }
        if let Some(m) = c.max_packet_size {
            self.client_max_packet = m as usize;
        }
        if c.will {
            debug!(peer = %self.peer, "a will in CONNECT: accepted, never published");
        }
        // An empty client id without auth: the server names it (MQTT 5 says so in the
        // CONNACK; 3.1.1 allows it for a clean session, the only kind served).
        let client_id: Box<str> = if c.client_id.is_empty() {
            let id = format!("fwgate-{}", self.id);
            self.assigned_id = Some(id.clone());
            id.into()
        } else {
            c.client_id.as_str().into()
        };
        // A second connection with the same client id takes over: the old one is closed.
        if let Some((_, old)) = sh.clients.insert(client_id.clone(), (self.id, self.kill.clone())) {
            old.cancel();
        }
        self.client_id = Some(client_id);
        Ok(())
    }

    async fn session_loop(&mut self) -> End {
        // The waits that outlive one packet are made once: a timer or waiter registered per
        // packet would cost more than the packet.
        let (kill, shutdown) = (self.kill.clone(), self.sh.shutdown.clone());
        let killed = kill.cancelled();
        let stopped = shutdown.cancelled();
        let far = Instant::now() + Duration::from_secs(365 * 86_400);
        let mut last_rx = Instant::now();
        let alarm = tokio::time::sleep_until(self.keep_alive.map_or(far, |k| last_rx + k));
        tokio::pin!(killed, stopped, alarm);
        loop {
            // Every complete packet in the buffer, then one write of all the answers.
            let need = loop {
                match packets::read(self.version, &mut self.rbuf, self.sh.limits.max_packet) {
                    Ok(p) => {
                        last_rx = Instant::now();
                        if let Err(end) = self.handle(p) {
                            let _ = self.flush().await;
                            return end;
                        }
                    }
                    Err(ReadError::Incomplete(n)) => break n,
                    Err(e) => {
                        let (why, end) = match e {
                            ReadError::TooLarge => (Closing::PacketTooLarge, "too_large"),
                            _ => (Closing::Malformed, "malformed"),
                        };
                        self.sh.telemetry.bad_input(if end == "too_large" {
                            "mqtt_too_large"
                        } else {
                            "mqtt_malformed"
                        });
                        return self.close(why, end).await;
                    }
                }
            };
            if let Err(end) = self.flush().await {
                return end;
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_READ {
                self.rbuf = BytesMut::new();
            }
            let inbox = self.inbox.clone();
            let delivered = async {
                match &inbox {
                    Some(i) => i.notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                biased;
                _ = &mut killed => Woke::TakenOver,
                _ = &mut stopped => Woke::Shutdown,
                _ = delivered => Woke::Delivery,
                // The alarm is moved only when it rings: to the keep-alive deadline after the
                // last packet, or it is the deadline.
                _ = &mut alarm => match self.keep_alive {
                    Some(k) if Instant::now() >= last_rx + k => Woke::KeepAlive,
                    Some(k) => {
                        alarm.as_mut().reset(last_rx + k);
                        Woke::Read
                    }
                    None => {
                        alarm.as_mut().reset(far);
                        Woke::Read
                    }
                },
                r = self.fill_step(need) => match r {
                    Err(end) => Woke::Ended(end),
                    Ok(()) => Woke::Read,
                },
            };
            match woke {
                Woke::Read => {}
                Woke::TakenOver => return self.close(Closing::TakenOver, "taken_over").await,
                Woke::Shutdown => return self.close(Closing::ShuttingDown, "shutdown").await,
                Woke::KeepAlive => return self.close(Closing::KeepAliveTimeout, "keep_alive").await,
                Woke::Ended(end) => return end,
                Woke::Delivery => {
                    if let Err(end) = self.drain_inbox() {
                        return self.close(Closing::QuotaExceeded, end).await;
                    }
                }
            }
        }
    }

    /// `fill` without borrowing anything but the socket and the read buffer, for `select!`.
    fn fill_step(&mut self, need: usize) -> impl std::future::Future<Output = Result<(), End>> + '_ {
        let max = self.sh.limits.max_packet + 8;
        self.rbuf.reserve(need.clamp(READ_CHUNK, max));
        async move {
            match self.io.read_buf(&mut self.rbuf).await {
                Ok(0) => Err("closed"),
                Ok(_) => Ok(()),
                Err(_) => Err("io_error"),
            }
        }
    }

    async fn close(&mut self, why: Closing, end: End) -> End {
        packets::disconnect(self.version, &mut self.wbuf, why);
        let _ = self.flush().await;
        end
    }

    fn handle(&mut self, p: Inbound) -> Result<(), End> {
        match p {
            Inbound::Publish { topic, payload, qos, pkid, retain, alias } => {
                self.publish(topic, payload, qos, pkid, retain, alias)
            }
            Inbound::PubAck => {
                self.inflight = self.inflight.saturating_sub(1);
                Ok(())
            }
            Inbound::Subscribe { pkid, filters } => {
                let codes: Vec<Granted> = filters.iter().map(|(f, qos)| self.subscribe(f, *qos)).collect();
                packets::suback(self.version, &mut self.wbuf, pkid, &codes);
                Ok(())
            }
            Inbound::Unsubscribe { pkid, filters } => {
                let existed: Vec<bool> = filters.iter().map(|f| self.unsubscribe(f)).collect();
                packets::unsuback(self.version, &mut self.wbuf, pkid, &existed);
                Ok(())
            }
            Inbound::PingReq => {
                packets::pingresp(self.version, &mut self.wbuf);
                Ok(())
            }
            Inbound::Disconnect => Err("client_disconnect"),
            Inbound::Unexpected(what) => {
                debug!(peer = %self.peer, what, "unexpected MQTT packet");
                self.sh.telemetry.bad_input("mqtt_protocol_error");
                packets::disconnect(self.version, &mut self.wbuf, Closing::ProtocolError);
                Err("protocol_error")
            }
        }
    }

    /// A refusal of a PUBLISH: a PUBACK with the reason for MQTT 5 at QoS 1; otherwise the
    /// connection closes (MQTT 5 says why first).
    fn refuse_publish(
        &mut self,
        qos: u8,
        pkid: u16,
        outcome: PubOutcome,
        why: Closing,
        reason: &'static str,
    ) -> Result<(), End> {
        self.sh.telemetry.mqtt_refused(reason);
        if let Some(suppressed) = self.sh.telemetry.log_fault("mqtt_publish_refused") {
            warn!(peer = %self.peer, client_id = %printable(self.client_id.as_deref().unwrap_or("")), reason, suppressed, "mqtt PUBLISH refused");
        }
        if self.version == Version::V5 && qos == 1 {
            packets::puback(self.version, &mut self.wbuf, pkid, outcome);
            return Ok(());
        }
        packets::disconnect(self.version, &mut self.wbuf, why);
        Err(reason)
    }

    fn publish(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
        alias: bool,
    ) -> Result<(), End> {
        if qos > 1 {
            self.sh.telemetry.mqtt_refused("qos2");
            packets::disconnect(self.version, &mut self.wbuf, Closing::QoSNotSupported);
            return Err("qos2");
        }
        if self.version == Version::V5 && alias {
            packets::disconnect(self.version, &mut self.wbuf, Closing::TopicAliasInvalid);
            return Err("topic_alias");
        }
        if self.version == Version::V5 && retain {
            self.sh.telemetry.mqtt_refused("retain");
            packets::disconnect(self.version, &mut self.wbuf, Closing::RetainNotSupported);
            return Err("retain");
        }
        let echo_ping = self.sh.echo.as_ref().and_then(|z| echo_reply(&topic, &payload, z));
        let device = parse_status_topic(&topic).or_else(|| echo_ping.as_ref().map(|e| e.0));
        let Some(device) = device else {
            return self.refuse_publish(
                qos,
                pkid,
                PubOutcome::TopicInvalid,
                Closing::TopicNameInvalid,
                "publish_topic",
            );
        };
        if self.identity.as_deref().is_some_and(|me| me != device) {
            return self.refuse_publish(
                qos,
                pkid,
                PubOutcome::NotAuthorized,
                Closing::NotAuthorized,
                "publish_not_authorized",
            );
        }
        let (to, replies) = if let Some((_, reply)) = echo_ping {
            (format!("echo/{device}/pong"), vec![reply])
        } else {
            let mut out = Vec::with_capacity(4);
            self.sh.dfu.handle("mqtt", device, &payload, crate::now_secs(), crate::transport::Shape::Window, &mut out);
            (crate::protocol::topic::command_topic(device), out.into_iter().map(Bytes::from).collect())
        };
        if qos == 1 {
            let heard = replies.is_empty() || self.has_subscriber(&to);
            let outcome = if heard { PubOutcome::Accepted } else { PubOutcome::NoSubscribers };
            packets::puback(self.version, &mut self.wbuf, pkid, outcome);
        }
        self.deliver(&to, &replies);
        Ok(())
    }

    fn has_subscriber(&self, topic: &str) -> bool {
        self.subs.iter().any(|s| &*s.topic == topic) || self.sh.routes.get(topic).is_some_and(|r| !r.is_empty())
    }

    /// Sends `payloads` on `topic` to every subscriber: this connection's socket, the others'
    /// inboxes.
    fn deliver(&mut self, topic: &str, payloads: &[Bytes]) {
        if let Some(qos) = self.subs.iter().find(|s| &*s.topic == topic).map(|s| s.qos) {
            for p in payloads {
                self.send(topic, p.clone(), qos);
            }
        }
        if let Some(routes) = self.sh.routes.get(topic) {
            for r in routes.iter().filter(|r| r.conn != self.id) {
                r.inbox.push(topic, payloads);
            }
        }
    }

    fn send(&mut self, topic: &str, payload: Bytes, qos: u8) {
        if payload.len() + topic.len() + 16 > self.client_max_packet {
            self.sh.telemetry.mqtt_dropped("client_max_packet");
            return;
        }
        let mut pkid = 0;
        if qos >= 1 {
            if self.inflight >= self.max_inflight {
                self.sh.telemetry.mqtt_dropped("inflight_full");
                return;
            }
            self.inflight += 1;
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            pkid = self.next_pkid;
        }
        packets::publish(self.version, &mut self.wbuf, topic, payload, qos.min(1), pkid);
    }

    fn drain_inbox(&mut self) -> Result<(), End> {
        let Some(inbox) = self.inbox.clone() else { return Ok(()) };
        if inbox.overflowed.load(Ordering::Acquire) {
            self.sh.telemetry.mqtt_dropped("inbox_full");
            return Err("slow_subscriber");
        }
        let items = std::mem::take(&mut *inbox.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for (topic, payload) in items {
            if let Some(qos) = self.subs.iter().find(|s| *s.topic == *topic).map(|s| s.qos) {
                self.send(&topic, payload, qos);
            }
        }
        Ok(())
    }

    fn subscribe(&mut self, filter: &str, qos: u8) -> Granted {
        let isolated = self.identity.is_some();
        let refuse = |g: Granted, reason: &'static str, sh: &Shared| {
            sh.telemetry.mqtt_refused(reason);
            g
        };
        let device = parse_command_topic(filter).or_else(|| {
            self.sh.echo.as_ref()?;
            let id = filter.strip_prefix("echo/")?.strip_suffix("/pong")?;
            valid_device_id(id).then_some(id)
        });
        let Some(device) = device else {
            let (g, reason) = if isolated {
                (Granted::NotAuthorized, "subscribe_not_authorized")
            } else if filter.starts_with("$share/") {
                (Granted::SharedNotSupported, "subscribe_shared")
            } else if filter.contains(['+', '#']) {
                (Granted::WildcardsNotSupported, "subscribe_wildcard")
            } else {
                (Granted::FilterInvalid, "subscribe_topic")
            };
            if let Some(suppressed) = self.sh.telemetry.log_fault("mqtt_subscribe_refused") {
                warn!(peer = %self.peer, filter = %printable(filter), reason, suppressed, "mqtt SUBSCRIBE refused");
            }
            return refuse(g, reason, &self.sh);
        };
        if self.identity.as_deref().is_some_and(|me| me != device) {
            if let Some(suppressed) = self.sh.telemetry.log_fault("mqtt_subscribe_refused") {
                warn!(peer = %self.peer, filter = %printable(filter), suppressed, "mqtt SUBSCRIBE to another device's topic refused");
            }
            return refuse(Granted::NotAuthorized, "subscribe_not_authorized", &self.sh);
        }
        let qos = qos.min(1);
        if let Some(s) = self.subs.iter_mut().find(|s| &*s.topic == filter) {
            s.qos = qos;
            return Granted::QoS(qos);
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return refuse(Granted::Quota, "subscribe_quota", &self.sh);
        }
        let topic: Box<str> = filter.into();
        let inbox = self.inbox.get_or_insert_with(|| Arc::new(Inbox::new(self.sh.limits.inbox))).clone();
        self.sh.routes.entry(topic.clone()).or_default().push(Route { conn: self.id, inbox });
        self.subs.push(Sub { topic, qos });
        Granted::QoS(qos)
    }

    fn unsubscribe(&mut self, filter: &str) -> bool {
        let Some(i) = self.subs.iter().position(|s| &*s.topic == filter) else { return false };
        let sub = self.subs.swap_remove(i);
        self.sh.drop_route(&sub.topic, self.id);
        true
    }

    /// Everything this connection registered goes with it.
    fn leave(&mut self) {
        for s in std::mem::take(&mut self.subs) {
            self.sh.drop_route(&s.topic, self.id);
        }
        if let Some(id) = self.client_id.take() {
            self.sh.clients.remove_if(&id, |_, (conn, _)| *conn == self.id);
        }
        if self.session {
            self.session = false;
            let n = self.sh.sessions.fetch_sub(1, Ordering::AcqRel) - 1;
            self.sh.telemetry.set_connected(n as i64);
        }
    }
}

/// A device-supplied string as it may go into a log line: printable ASCII only, bounded.
pub(super) fn printable(s: &str) -> String {
    s.chars().take(64).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect()
}
