//! A CoAP client as a constrained device runs it: confirmable requests over one UDP socket,
//! retransmitted with exponential back-off (RFC 7252 §4.2), optionally losing a seeded share
//! of datagrams in both directions; Block2 downloads (RFC 7959) and DFU Status posts.

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::device::{DeviceError, DfuDevice, Ended};
use super::stats::Stats;
use crate::protocol::coap::{read_uint, uint, CF_CBOR};
use crate::protocol::Command;

#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    /// Time to wait for the first answer; doubled on each retransmission.
    pub ack_timeout: Duration,
    /// Retransmissions before a request is given up (RFC 7252's MAX_RETRANSMIT is 4).
    pub max_retransmit: u32,
    /// Share of datagrams lost on the way out and, independently, on the way in (0.0..1.0).
    pub loss: f64,
    /// Seed of the loss pattern, so a lossy run can be repeated.
    pub seed: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { ack_timeout: Duration::from_secs(2), max_retransmit: 4, loss: 0.0, seed: 1 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("udp: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer after {0} transmissions")]
    Timeout(u32),
    #[error("answered {0}")]
    Status(String),
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    #[error("the resource changed during the download (etag)")]
    EtagChanged,
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// What a client sent and lost, for reports and for tests that must see loss happen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    pub requests: u64,
    pub retransmissions: u64,
    /// Waits for an answer that ran out (each is followed by a retransmission, or, after the
    /// last attempt, by giving up), and the time spent in them.
    pub timeouts: u64,
    pub timeout_wait: Duration,
    pub lost_out: u64,
    pub lost_in: u64,
    /// 4.01 answers with an Echo option, each answered by repeating the request.
    pub echo_challenges: u64,
}

/// The CoAP Echo option (RFC 9175).
const ECHO: u16 = 252;

/// How many 5.03 answers in a row a DFU run accepts before giving up.
pub const MAX_UNAVAILABLE: u32 = 20;

/// One block of a Block2 resource.
#[derive(Debug)]
pub struct Block {
    pub num: u32,
    pub szx: u32,
    pub more: bool,
    pub etag: Option<Vec<u8>>,
    pub size2: Option<u32>,
    pub payload: Vec<u8>,
}

pub struct CoapClient {
    socket: UdpSocket,
    cfg: ClientConfig,
    rng: fastrand::Rng,
    next_mid: u16,
    next_token: u32,
    buf: Vec<u8>,
    pub stats: ClientStats,
}

/// "4.04" for a response code, as operators read them.
pub fn code_name(c: MessageClass) -> String {
    let n: u8 = c.into();
    format!("{}.{:02}", n >> 5, n & 0x1f)
}

impl CoapClient {
    /// A client on its own ephemeral port of `server`'s address family.
    pub async fn connect(server: SocketAddr, cfg: ClientConfig) -> Result<CoapClient, ClientError> {
        let local: SocketAddr = if server.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }.parse().expect("literal");
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        Ok(CoapClient {
            socket,
            rng: fastrand::Rng::with_seed(cfg.seed),
            next_mid: (cfg.seed as u16).wrapping_mul(7919),
            next_token: 1,
            cfg,
            buf: vec![0; 2048],
            stats: ClientStats::default(),
        })
    }

    fn lose(&mut self) -> bool {
        self.cfg.loss > 0.0 && self.rng.f64() < self.cfg.loss
    }

    /// Sends one confirmable request and waits for its piggybacked answer, retransmitting
    /// the same message (same id) on silence. A 4.01 carrying an Echo option (the server
    /// limits what it sends to an address it has not verified, RFC 9175 §2.4) is answered
    /// once by repeating the request with that Echo, as a stock client does.
    pub async fn request(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Result<Packet, ClientError> {
        let answer = self.request_once(method, path, options, payload).await?;
        let echo = (answer.header.code == MessageClass::Response(ResponseType::Unauthorized))
            .then(|| answer.get_first_option(CoapOption::from(ECHO)).cloned())
            .flatten();
        let Some(echo) = echo else { return Ok(answer) };
        self.stats.echo_challenges += 1;
        let mut with_echo = options.to_vec();
        with_echo.push((CoapOption::from(ECHO), echo));
        self.request_once(method, path, &with_echo, payload).await
    }

    async fn request_once(
        &mut self,
        method: RequestType,
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Result<Packet, ClientError> {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        let mid = self.next_mid;
        self.next_mid = self.next_mid.wrapping_add(1);
        p.header.message_id = mid;
        let token = self.next_token.to_be_bytes().to_vec();
        self.next_token = self.next_token.wrapping_add(1);
        p.set_token(token.clone());
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for (o, v) in options {
            p.add_option(*o, v.clone());
        }
        p.payload = payload.to_vec();
        // Any size UDP carries: a device may well send more than the server accepts.
        let bytes = p.to_bytes_with_limit(65_507).map_err(|_| ClientError::Malformed("request does not encode"))?;
        self.stats.requests += 1;
        let mut timeout = self.cfg.ack_timeout;
        for attempt in 0..=self.cfg.max_retransmit {
            if attempt > 0 {
                self.stats.retransmissions += 1;
            }
            if self.lose() {
                self.stats.lost_out += 1;
            } else {
                self.socket.send(&bytes).await?;
            }
            let deadline = Instant::now() + timeout;
            while let Ok(r) = tokio::time::timeout_at(deadline, self.socket.recv(&mut self.buf)).await {
                let n = match r {
                    Ok(n) => n,
                    // An ICMP port-unreachable from an earlier send: the server is not (yet) there.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e.into()),
                };
                if self.lose() {
                    self.stats.lost_in += 1;
                    continue;
                }
                let Ok(answer) = Packet::from_bytes(&self.buf[..n]) else { continue };
                // Late answers to earlier requests carry other ids; they are not this one's.
                if answer.header.message_id == mid && answer.get_token() == token.as_slice() {
                    if answer.header.get_type() == MessageType::Reset {
                        return Err(ClientError::Status("RST".into()));
                    }
                    return Ok(answer);
                }
            }
            self.stats.timeouts += 1;
            self.stats.timeout_wait += timeout;
            timeout *= 2;
        }
        Err(ClientError::Timeout(self.cfg.max_retransmit + 1))
    }

    /// Block `num` of size 2^(szx+4) of a Block2 resource.
    pub async fn get_block(&mut self, path: &str, num: u32, szx: u32) -> Result<Block, ClientError> {
        let answer = self.request(RequestType::Get, path, &[(CoapOption::Block2, uint((num << 4) | szx))], &[]).await?;
        if answer.header.code != MessageClass::Response(ResponseType::Content) {
            return Err(ClientError::Status(code_name(answer.header.code)));
        }
        let opt = |o| answer.get_first_option(o).and_then(|v| read_uint(v));
        let (num, szx, more) = match opt(CoapOption::Block2) {
            Some(b) if b & 7 != 7 => (b >> 4, b & 7, b & 8 != 0),
            Some(_) => return Err(ClientError::Malformed("block2 szx 7")),
            None => (0, szx, false),
        };
        Ok(Block {
            num,
            szx,
            more,
            etag: answer.get_first_option(CoapOption::ETag).cloned(),
            size2: opt(CoapOption::Size2),
            payload: answer.payload,
        })
    }

    /// A Block2 resource from `from` bytes (a multiple of the block size, so a download can
    /// resume) to its end, or until at least `until` bytes are held. Follows a server that
    /// answers with smaller blocks than asked; each block's round trip goes into `stats`.
    pub async fn download(
        &mut self,
        path: &str,
        szx: u32,
        from: usize,
        until: Option<u64>,
        stats: &Stats,
    ) -> Result<Vec<u8>, ClientError> {
        let mut szx = szx;
        let mut body = Vec::new();
        let mut etag: Option<Vec<u8>> = None;
        let mut offset = from as u64;
        loop {
            let size = 16u64 << szx;
            let sent = Instant::now();
            let b = self.get_block(path, (offset / size) as u32, szx).await?;
            stats.rtt(sent.elapsed());
            let at = b.num as u64 * (16u64 << b.szx);
            if at != offset {
                return Err(ClientError::Malformed("block2 answer is not at the offset asked for"));
            }
            if etag.is_some() && b.etag != etag {
                return Err(ClientError::EtagChanged);
            }
            etag = b.etag;
            stats.block(b.payload.len());
            body.extend_from_slice(&b.payload);
            offset += b.payload.len() as u64;
            szx = b.szx;
            if !b.more || until.is_some_and(|u| offset >= u) {
                return Ok(body);
            }
        }
    }

    /// Reads a Block2 resource over and over, block after block, until `deadline`; returns
    /// how many blocks arrived. The load a fleet of downloading devices puts on a server.
    pub async fn read_blocks_until(&mut self, path: &str, szx: u32, deadline: Instant) -> Result<u64, ClientError> {
        let (mut num, mut blocks) = (0u32, 0u64);
        while Instant::now() < deadline {
            let b = self.get_block(path, num, szx).await?;
            blocks += 1;
            num = if b.more { num + 1 } else { 0 };
        }
        Ok(blocks)
    }

    /// POSTs one Status to `/dfu/{device}` and returns the Command.
    pub async fn post_status(&mut self, device: &str, status: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.post(&format!("/dfu/{device}"), status).await
    }

    async fn post(&mut self, path: &str, status: &[u8]) -> Result<Vec<u8>, ClientError> {
        let cf = [(CoapOption::ContentFormat, uint(CF_CBOR as u32))];
        let answer = self.request(RequestType::Post, path, &cf, status).await?;
        if answer.header.code != MessageClass::Response(ResponseType::Changed) {
            return Err(ClientError::Status(code_name(answer.header.code)));
        }
        Ok(answer.payload)
    }

    /// Runs `device`'s DFU exchange over `POST /dfu/{id}` until it ends, or until the device
    /// holds `pause_at` bytes; each Status's round trip goes into `stats`. A 5.03 (the gateway
    /// could not decide now) is asked again, up to [`MAX_UNAVAILABLE`] times in a row.
    pub async fn run_dfu(
        &mut self,
        device: &mut DfuDevice,
        pause_at: Option<u32>,
        stats: &Stats,
    ) -> Result<Ended, ClientError> {
        let mut unavailable = 0;
        let path = format!("/dfu/{}", device.id);
        loop {
            if let Some(end) = device.paused_at(pause_at) {
                return Ok(end);
            }
            let sent = Instant::now();
            let command = match self.post(&path, &device.status_bytes()).await {
                Ok(c) => c,
                Err(ClientError::Status(s)) if s == "5.03" && unavailable < MAX_UNAVAILABLE => {
                    unavailable += 1;
                    tokio::time::sleep(self.cfg.ack_timeout / 4).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            stats.rtt(sent.elapsed());
            unavailable = 0;
            if let Ok((Command::Write { data, .. }, _)) = Command::decode(&command) {
                stats.block(data.len());
            }
            if let Some(end) = device.apply(&command)? {
                return Ok(end);
            }
        }
    }
}
