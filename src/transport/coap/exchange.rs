//! The CoAP layer (RFC 7252, with RFC 7959 Block2): one datagram in, at most one out.
//!
//! Pure — no sockets, time is a parameter. Owns CON/NON, piggybacked ACKs, token echo, the
//! bounded duplicate cache keyed by (peer, message id, token), option rules (unknown elective
//! options ignored, unknown critical ones → 4.02), paths, methods, Content-Format and the Block2
//! arithmetic, who may use a device's resources ([`Access`]) and, on plain CoAP, the
//! amplification limit: an answer to an address that has not proven it receives (an Echo
//! option, RFC 9175 §2.4) is at most 3× its request, and a Status from it is not acted on
//! before it has. What to answer comes from a [`Resources`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::proof::AddressKey;
use crate::protocol::coap::{read_uint, uint, CF_CBOR, CF_OCTET_STREAM};
use crate::protocol::topic::{parse_coap_path, CoapPath};

/// The answer to a Status posted to `/dfu/{id}`.
pub enum DfuAnswer {
    /// An encoded Command.
    Command(Vec<u8>),
    /// The Status did not decode.
    BadInput,
    /// The gateway could not decide now (store failure, concurrent change); ask again.
    Unavailable,
}

/// A device's assigned image, served block-wise.
pub struct Image {
    pub bytes: Bytes,
    pub digest: [u8; 32],
}

/// The image behind `GET /fw/{id}`.
pub enum FirmwareAnswer {
    Image(Image),
    /// Nothing is assigned to the device (or it is unknown).
    NotAssigned,
    /// The gateway could not decide now (store failure); ask again.
    Unavailable,
}

/// What the gateway answers; implemented by the transport over the DFU session and planner.
pub trait Resources {
    fn dfu(&self, device: &str, status: &[u8], now_secs: u64) -> DfuAnswer;
    /// The device's assigned image.
    fn firmware(&self, device: &str) -> FirmwareAnswer;
    /// Called before the block `offset..offset + len` goes out, so the owner records the
    /// device's progress first; `false` means it could not, and the block is not sent.
    fn block_served(&self, device: &str, offset: u64, len: u64, now_secs: u64) -> bool;
}

/// What became of one datagram; `label` names it in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered(&'static str),
    /// A retransmission, answered from the duplicate cache.
    Duplicate,
    Dropped(&'static str),
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered(l) | Outcome::Dropped(l) => l,
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// Who may use the device resources (`/dfu/{id}`, `/fw/{id}`) through one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Anyone, as any device: plain CoAP without device authentication.
    Open,
    /// Nobody: plain CoAP while devices must authenticate (4.01).
    Refused,
    /// Only this device (a DTLS session's PSK identity); another id gets 4.03.
    Device(&'a str),
}

#[derive(Debug, Clone, Copy)]
pub struct ExchangeConfig {
    /// Largest Block2 size, a power of two in 16..=1024.
    pub max_block: u32,
    /// Largest request payload; larger gets 4.13.
    pub max_request: usize,
    pub dedup_per_peer: usize,
    pub dedup_lifetime_ms: u64,
    pub max_peers: usize,
    /// Limit answers to unverified addresses to 3× their request and challenge them with Echo
    /// (plain UDP; a DTLS session's address is verified by its cookie exchange).
    pub amplification_limit: bool,
    /// How long an address stays verified after it returned an Echo.
    pub echo_lifetime_ms: u64,
}

/// CoAP Echo option (RFC 9175): elective, safe to forward.
const ECHO: u16 = 252;
/// An Echo value is accepted this long after it was issued.
const ECHO_FRESH_MS: u64 = 60_000;
/// Most an answer to an unverified address may be, as a multiple of its request (RFC 9175
/// §2.4; QUIC's limit, RFC 9000 §8).
const AMPLIFICATION: usize = 3;

struct Answer {
    mid: u16,
    token: Token,
    expires: u64,
    bytes: Vec<u8>,
}

/// A request's token (0–8 bytes) without an allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Token {
    len: u8,
    bytes: [u8; 8],
}

impl Token {
    fn new(t: &[u8]) -> Token {
        let mut bytes = [0; 8];
        let len = t.len().min(8);
        bytes[..len].copy_from_slice(&t[..len]);
        Token { len: len as u8, bytes }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

struct Peer {
    generation: u64,
    answers: VecDeque<Answer>,
    /// Until when (ms) answers to this address are not limited: it returned an Echo.
    verified_until: u64,
}

/// The CoAP endpoint's state: the duplicate cache, verified addresses, the NON message-id
/// counter and the key of Echo values.
pub struct Exchange {
    cfg: ExchangeConfig,
    peers: HashMap<SocketAddr, Peer>,
    /// Peers in the order they were first remembered, for forgetting the oldest.
    order: VecDeque<(SocketAddr, u64)>,
    generation: u64,
    next_mid: u16,
    echo_key: AddressKey,
}

/// Header, token and options of a Block2 answer beyond its payload, at most.
const BLOCK_OVERHEAD: usize = 40;

const CON: u8 = 0;
const NON: u8 = 1;

/// Options we act on or may safely ignore; any other odd (critical) option gets 4.02.
fn recognized(number: u16) -> bool {
    // Uri-Host, Uri-Port, Uri-Path, Content-Format, Uri-Query, Accept, Block2, Size2.
    matches!(number, 3 | 7 | 11 | 12 | 15 | 17 | 23 | 28) || number & 1 == 0
}

enum Body {
    Empty,
    Owned(Vec<u8>),
    Slice(Bytes),
}

struct Reply {
    code: ResponseType,
    label: &'static str,
    /// Carries an Echo challenge.
    echo: bool,
    content_format: Option<u16>,
    etag: Option<[u8; 8]>,
    block2: Option<u32>,
    size1: Option<u32>,
    size2: Option<u32>,
    body: Body,
}

impl Reply {
    fn error(code: ResponseType, label: &'static str) -> Reply {
        Reply {
            code,
            label,
            echo: false,
            content_format: None,
            etag: None,
            block2: None,
            size1: None,
            size2: None,
            body: Body::Empty,
        }
    }

    /// 4.01 with an Echo option: repeat the request with it to show the address is yours.
    fn challenge() -> Reply {
        Reply { echo: true, ..Reply::error(ResponseType::Unauthorized, "echo") }
    }
}

impl Exchange {
    pub fn new(cfg: ExchangeConfig) -> Exchange {
        let echo_key = AddressKey::new();
        Exchange { cfg, peers: HashMap::new(), order: VecDeque::new(), generation: 0, next_mid: 1, echo_key }
    }

    /// Handles one datagram from `peer`; the reply, if any, is left in `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        peer: SocketAddr,
        datagram: &[u8],
        now_ms: u64,
        now_secs: u64,
        access: Access<'_>,
        res: &impl Resources,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let (kind, tkl, mid) = match self.start(peer, datagram, now_ms, out) {
            Ok(h) => h,
            Err(outcome) => return outcome,
        };
        let packet = match Packet::from_bytes(datagram) {
            Ok(p) => p,
            Err(_) => {
                // The header and token are readable: a CON gets 4.00; anything else is dropped.
                if kind != CON || tkl > 8 || datagram.len() < 4 + tkl {
                    return Outcome::Dropped("malformed");
                }
                let reply = Reply::error(ResponseType::BadRequest, "malformed");
                return self.send(peer, kind, mid, &datagram[4..4 + tkl], datagram.len(), reply, now_ms, out);
            }
        };
        match packet.header.code {
            MessageClass::Request(_) if kind == CON || kind == NON => {}
            // A CON ping (empty message) gets a reset, as RFC 7252 §4.3 says.
            MessageClass::Empty if kind == CON => {
                out.extend_from_slice(&[0x70, 0x00, datagram[2], datagram[3]]);
                return Outcome::Answered("ping");
            }
            _ => return Outcome::Dropped("ignored"),
        }
        if self.cfg.amplification_limit {
            if let Some(echo) = packet.get_first_option(CoapOption::from(ECHO)) {
                if self.echo_ok(peer, echo, now_ms) {
                    self.verified(peer, now_ms);
                }
            }
        }
        let budget = self.limited(peer, now_ms).then_some(datagram.len() * AMPLIFICATION);
        let reply = self.respond(&packet, now_secs, access, budget, res);
        self.send(peer, kind, mid, packet.get_token(), datagram.len(), reply, now_ms, out)
    }

    /// A datagram longer than the receive buffer, of which `head` is the start: a CON gets
    /// 4.13 with `Size1`, anything else is dropped.
    pub fn refuse_oversized(&mut self, peer: SocketAddr, head: &[u8], now_ms: u64, out: &mut Vec<u8>) -> Outcome {
        let (kind, tkl, mid) = match self.start(peer, head, now_ms, out) {
            Ok(h) => h,
            Err(outcome) => return outcome,
        };
        if kind != CON || tkl > 8 || head.len() < 4 + tkl {
            return Outcome::Dropped("too_large");
        }
        let reply = Reply {
            size1: Some(self.cfg.max_request as u32),
            ..Reply::error(ResponseType::RequestEntityTooLarge, "too_large")
        };
        // The datagram was at least as long as its buffer: that is what it cost the sender.
        self.send(peer, kind, mid, &head[4..4 + tkl], head.len(), reply, now_ms, out)
    }

    /// Reads the fixed header: (type, token length, message id), or how the datagram ended —
    /// dropped as malformed, or answered from the duplicate cache.
    fn start(
        &mut self,
        peer: SocketAddr,
        datagram: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(u8, usize, u16), Outcome> {
        out.clear();
        if datagram.len() < 4 || datagram[0] >> 6 != 1 {
            return Err(Outcome::Dropped("malformed"));
        }
        let kind = (datagram[0] >> 4) & 3;
        let tkl = (datagram[0] & 0x0f) as usize;
        let mid = u16::from_be_bytes([datagram[2], datagram[3]]);
        if (kind == CON || kind == NON) && tkl <= 8 && datagram.len() >= 4 + tkl {
            let token = Token::new(&datagram[4..4 + tkl]);
            let over = self.limited(peer, now_ms).then_some(datagram.len() * AMPLIFICATION);
            if let Some(bytes) = self.cached(peer, mid, token, now_ms) {
                if over.is_some_and(|limit| bytes.len() > limit) {
                    // Replayed to an address no longer verified: the same limit as a first answer.
                    let challenge = self.encode(peer, kind, mid, token.as_slice(), Reply::challenge(), now_ms);
                    out.extend_from_slice(&challenge.unwrap_or_default());
                    return Err(Outcome::Answered("echo"));
                }
                out.extend_from_slice(bytes);
                return Err(Outcome::Duplicate);
            }
        }
        Ok((kind, tkl, mid))
    }

    /// Answers to `peer` are limited now: the limit is on and the address is not verified.
    fn limited(&self, peer: SocketAddr, now_ms: u64) -> bool {
        self.cfg.amplification_limit && !self.peers.get(&peer).is_some_and(|p| p.verified_until > now_ms)
    }

    /// An Echo value: when it was issued (seconds of this exchange's clock) and a MAC of that
    /// and the address, so checking it needs no state.
    fn echo_value(&self, peer: SocketAddr, issued_secs: u32) -> [u8; 12] {
        let tag = self.echo_key.mac(Some(peer), issued_secs as u64);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&issued_secs.to_be_bytes());
        v[4..].copy_from_slice(&tag[..8]);
        v
    }

    fn echo_ok(&self, peer: SocketAddr, echo: &[u8], now_ms: u64) -> bool {
        let Ok(issued) = <[u8; 4]>::try_from(echo.get(..4).unwrap_or_default()) else { return false };
        let issued = u32::from_be_bytes(issued);
        let age = now_ms.saturating_sub(issued as u64 * 1000);
        echo.len() == 12 && age <= ECHO_FRESH_MS && self.echo_value(peer, issued)[..] == *echo
    }

    fn verified(&mut self, peer: SocketAddr, now_ms: u64) {
        let until = now_ms + self.cfg.echo_lifetime_ms;
        self.peer(peer).verified_until = until;
    }

    fn respond(
        &self,
        p: &Packet,
        now_secs: u64,
        access: Access<'_>,
        budget: Option<usize>,
        res: &impl Resources,
    ) -> Reply {
        if let Some((_, _)) = p.options().find(|(n, _)| !recognized(**n)) {
            return Reply::error(ResponseType::BadOption, "bad_option");
        }
        let segments: Vec<&[u8]> =
            p.get_option(CoapOption::UriPath).map(|l| l.iter().map(Vec::as_slice).collect()).unwrap_or_default();
        let first = |o| p.get_first_option(o).map(|v| read_uint(v));
        let method = match p.header.code {
            MessageClass::Request(m) => m,
            _ => return Reply::error(ResponseType::BadRequest, "malformed"),
        };
        let accept = first(CoapOption::Accept);
        let path = parse_coap_path(&segments);
        if let Some(CoapPath::Dfu(device) | CoapPath::Firmware(device)) = path {
            match access {
                Access::Open => {}
                Access::Refused => return Reply::error(ResponseType::Unauthorized, "unauthorized"),
                Access::Device(id) if id == device => {}
                Access::Device(_) => return Reply::error(ResponseType::Forbidden, "forbidden"),
            }
        }
        match path {
            None => Reply::error(ResponseType::NotFound, "not_found"),
            Some(CoapPath::Dfu(device)) => {
                if method != RequestType::Post {
                    return Reply::error(ResponseType::MethodNotAllowed, "method_not_allowed");
                }
                match first(CoapOption::ContentFormat) {
                    None | Some(Some(60)) => {}
                    Some(_) => return Reply::error(ResponseType::UnsupportedContentFormat, "unsupported_format"),
                }
                if accept.is_some_and(|a| a != Some(CF_CBOR as u32)) {
                    return Reply::error(ResponseType::NotAcceptable, "not_acceptable");
                }
                if p.payload.len() > self.cfg.max_request {
                    return Reply {
                        size1: Some(self.cfg.max_request as u32),
                        ..Reply::error(ResponseType::RequestEntityTooLarge, "too_large")
                    };
                }
                if budget.is_some() {
                    // The Command's size is known only once the Status has been acted on: an
                    // unverified address proves itself first, so a Status from a spoofed one
                    // changes nothing either.
                    return Reply::challenge();
                }
                match res.dfu(device, &p.payload, now_secs) {
                    DfuAnswer::Command(c) => Reply {
                        content_format: Some(CF_CBOR),
                        body: Body::Owned(c),
                        ..Reply::error(ResponseType::Changed, "dfu")
                    },
                    DfuAnswer::BadInput => Reply::error(ResponseType::BadRequest, "bad_input"),
                    DfuAnswer::Unavailable => Reply::error(ResponseType::ServiceUnavailable, "unavailable"),
                }
            }
            Some(CoapPath::Firmware(device)) => {
                if method != RequestType::Get {
                    return Reply::error(ResponseType::MethodNotAllowed, "method_not_allowed");
                }
                if accept.is_some_and(|a| a != Some(CF_OCTET_STREAM as u32)) {
                    return Reply::error(ResponseType::NotAcceptable, "not_acceptable");
                }
                let block = match first(CoapOption::Block2) {
                    None => None,
                    Some(Some(v)) if v & 7 != 7 => Some(v),
                    Some(_) => return Reply::error(ResponseType::BadRequest, "bad_option"),
                };
                self.block(device, block, first(CoapOption::Size2).is_some(), now_secs, budget, res)
            }
        }
    }

    /// One block of the device's image (RFC 7959 §2.2–2.4).
    fn block(
        &self,
        device: &str,
        requested: Option<u32>,
        want_size: bool,
        now_secs: u64,
        budget: Option<usize>,
        res: &impl Resources,
    ) -> Reply {
        let max_szx = self.cfg.max_block.trailing_zeros() - 4;
        let (mut num, mut szx) = requested.map(|v| (v >> 4, v & 7)).unwrap_or((0, max_szx));
        if szx > max_szx {
            // A smaller block than asked for: the block number scales to our size (§2.4).
            num <<= szx - max_szx;
            szx = max_szx;
        }
        let size = 1u64 << (szx + 4);
        let offset = num as u64 * size;
        let image = match res.firmware(device) {
            FirmwareAnswer::Image(i) => i,
            FirmwareAnswer::NotAssigned => return Reply::error(ResponseType::NotFound, "not_found"),
            FirmwareAnswer::Unavailable => return Reply::error(ResponseType::ServiceUnavailable, "unavailable"),
        };
        let len = image.bytes.len() as u64;
        if offset >= len && !(offset == 0 && len == 0) {
            return Reply::error(ResponseType::BadOption, "block_out_of_range");
        }
        let end = (offset + size).min(len);
        let more = end < len;
        if budget.is_some_and(|b| (end - offset) as usize + BLOCK_OVERHEAD > b) {
            // Too large for an unverified address: challenge it before the block counts as sent.
            return Reply::challenge();
        }
        if !res.block_served(device, offset, end - offset, now_secs) {
            return Reply::error(ResponseType::ServiceUnavailable, "unavailable");
        }
        let mut etag = [0u8; 8];
        etag.copy_from_slice(&image.digest[..8]);
        Reply {
            code: ResponseType::Content,
            label: "block",
            echo: false,
            content_format: Some(CF_OCTET_STREAM),
            etag: Some(etag),
            block2: (more || num > 0 || requested.is_some()).then_some((num << 4) | ((more as u32) << 3) | szx),
            size1: None,
            size2: (num == 0 || want_size).then_some(len as u32),
            body: Body::Slice(image.bytes.slice(offset as usize..end as usize)),
        }
    }

    /// Encodes `r`, replaced by an Echo challenge when it is too large for an unverified
    /// address, into `out`, and remembers it for retransmissions.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        peer: SocketAddr,
        kind: u8,
        mid: u16,
        token: &[u8],
        request_len: usize,
        r: Reply,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let mut label = r.label;
        let Some(mut bytes) = self.encode(peer, kind, mid, token, r, now_ms) else {
            return Outcome::Dropped("encode_failed");
        };
        if self.limited(peer, now_ms) && bytes.len() > request_len * AMPLIFICATION {
            label = "echo";
            match self.encode(peer, kind, mid, token, Reply::challenge(), now_ms) {
                Some(b) => bytes = b,
                None => return Outcome::Dropped("encode_failed"),
            }
        }
        out.extend_from_slice(&bytes);
        self.remember(peer, mid, Token::new(token), bytes, now_ms);
        Outcome::Answered(label)
    }

    /// The datagram of one answer; a NON answer takes the next message id.
    fn encode(&mut self, peer: SocketAddr, kind: u8, mid: u16, token: &[u8], r: Reply, now_ms: u64) -> Option<Vec<u8>> {
        let mut p = Packet::new();
        p.header.set_version(1);
        if kind == CON {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = mid;
        } else {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = self.next_mid;
            self.next_mid = self.next_mid.wrapping_add(1);
        }
        p.header.code = MessageClass::Response(r.code);
        p.set_token(token.to_vec());
        if let Some(etag) = r.etag {
            p.add_option(CoapOption::ETag, etag.to_vec());
        }
        if let Some(cf) = r.content_format {
            p.add_option(CoapOption::ContentFormat, uint(cf as u32));
        }
        if let Some(b) = r.block2 {
            p.add_option(CoapOption::Block2, uint(b));
        }
        if let Some(s) = r.size2 {
            p.add_option(CoapOption::Size2, uint(s));
        }
        if let Some(s) = r.size1 {
            p.add_option(CoapOption::Size1, uint(s));
        }
        if r.echo {
            let issued = (now_ms / 1000).min(u32::MAX as u64) as u32;
            p.add_option(CoapOption::from(ECHO), self.echo_value(peer, issued).to_vec());
        }
        p.payload = match r.body {
            Body::Empty => Vec::new(),
            Body::Owned(v) => v,
            Body::Slice(b) => b.to_vec(),
        };
        p.to_bytes_with_limit(u16::MAX as usize).ok()
    }

    fn cached(&mut self, peer: SocketAddr, mid: u16, token: Token, now_ms: u64) -> Option<&[u8]> {
        let p = self.peers.get_mut(&peer)?;
        p.answers.retain(|a| a.expires > now_ms);
        p.answers.iter().find(|a| a.mid == mid && a.token == token).map(|a| a.bytes.as_slice())
    }

    fn remember(&mut self, peer: SocketAddr, mid: u16, token: Token, bytes: Vec<u8>, now_ms: u64) {
        let expires = now_ms + self.cfg.dedup_lifetime_ms;
        let keep = self.cfg.dedup_per_peer;
        let p = self.peer(peer);
        if p.answers.len() >= keep {
            p.answers.pop_front();
        }
        p.answers.push_back(Answer { mid, token, expires, bytes });
    }

    /// The peer's entry, made (forgetting the oldest peer when full) if it has none.
    fn peer(&mut self, peer: SocketAddr) -> &mut Peer {
        if !self.peers.contains_key(&peer) {
            while self.peers.len() >= self.cfg.max_peers {
                let Some((old, generation)) = self.order.pop_front() else { break };
                if self.peers.get(&old).is_some_and(|p| p.generation == generation) {
                    self.peers.remove(&old);
                }
            }
            self.generation += 1;
            self.order.push_back((peer, self.generation));
            self.peers.insert(peer, Peer { generation: self.generation, answers: VecDeque::new(), verified_until: 0 });
            if self.order.len() > self.cfg.max_peers * 2 {
                // Entries of peers already forgotten: drop them so the queue stays bounded.
                let peers = &self.peers;
                self.order.retain(|(a, g)| peers.get(a).is_some_and(|p| p.generation == *g));
            }
        }
        let generation = self.generation;
        self.peers.entry(peer).or_insert_with(|| Peer { generation, answers: VecDeque::new(), verified_until: 0 })
    }

    /// Forgets `peer` (its DTLS session ended).
    pub fn forget(&mut self, peer: SocketAddr) {
        self.peers.remove(&peer);
    }

    /// Peers currently remembered (for tests and metrics).
    pub fn peers(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests;
