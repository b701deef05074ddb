//! The two DTLS implementations fwgate could serve coaps with, measured side by side in one
//! run, as the server end of the same OpenSSL client (the library `coap-client-openssl`
//! uses), offering TLS_PSK_WITH_AES_128_CCM_8:
//! - **openssl**: the context fwgate's listener uses (`dtls::psk_context`), driven over
//!   in-memory datagrams the way the listener drives it, record buffers freed after each
//!   datagram (`dtls::release_buffers`);
//! - **dimpl**: the maintained pure-Rust, sans-IO DTLS 1.2/1.3 crate (RustCrypto provider),
//!   with its PSK server and its own cookie exchange.
//!
//! ```sh
//! cargo bench --bench dtls_engines -- --handshakes 2000 --blocks 50000 --sessions 10000
//! ```
//!
//! Per engine: server time per handshake (cookie exchange included) and per 1 KiB block
//! (decrypting a 24-byte request record, encrypting a 1,057-byte answer), timed around the
//! server's calls only; and the memory of `--sessions` established, idle sessions, each
//! measured in a child process of its own (RSS before and after, client ends dropped as they
//! finish). Under `cargo test` (no `--bench`) it runs once, small, and checks that every
//! block arrives intact through both engines.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslStream};

#[path = "peers_common.rs"]
mod peers_common;
use fwgate::loadgen::run::rss_kib;
use fwgate::transport::coap::dtls::{psk_context, release_buffers};
use peers_common::psk_client;

const DEVICE: &str = "bench-1";
const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const MTU: usize = 1280;
/// A CoAP GET for one Block2 block, and the answer's size: header, token, options, 1 KiB.
const REQUEST: usize = 24;
const ANSWER: usize = 1057;

#[derive(Parser, Debug)]
struct Args {
    /// Handshakes timed per engine.
    #[arg(long, default_value_t = 2000)]
    handshakes: usize,
    /// Blocks timed per engine.
    #[arg(long, default_value_t = 50_000)]
    blocks: usize,
    /// Idle sessions held for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Internal: measure one engine's idle sessions and print bytes per session.
    #[arg(long, hide = true)]
    memory_of: Option<String>,
    /// Set by `cargo bench`; without it this is a smoke test.
    #[arg(long)]
    bench: bool,
}

/// Datagrams in and out of one OpenSSL endpoint.
#[derive(Default)]
struct Pipe {
    inbox: VecDeque<Vec<u8>>,
    outbox: Vec<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.inbox.pop_front().ok_or(ErrorKind::WouldBlock)?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Engine {
    Openssl,
    Dimpl,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Openssl => "openssl",
            Engine::Dimpl => "dimpl",
        }
    }
}

struct Key;

impl dimpl::PskResolver for Key {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        (identity == DEVICE.as_bytes()).then(|| KEY.as_bytes().to_vec())
    }
}

/// What a server engine needs that is shared by its sessions.
struct Servers {
    engine: Engine,
    openssl: SslContext,
    dimpl: Arc<dimpl::Config>,
}

impl Servers {
    fn new(engine: Engine) -> Result<Servers> {
        let mut b = psk_context(|id| (id == DEVICE.as_bytes()).then(|| KEY.to_owned()))?;
        // A cookie the client returns; fwgate's listener binds it to the address instead.
        b.set_cookie_generate_cb(|_ssl, buf| {
            buf[..16].copy_from_slice(b"bench-cookie-16b");
            Ok(16)
        });
        b.set_cookie_verify_cb(|_ssl, cookie| cookie == b"bench-cookie-16b");
        let dimpl = dimpl::Config::builder()
            .mtu(MTU)
            .dtls12_cipher_suites(&[dimpl::crypto::Dtls12CipherSuite::PSK_AES128_CCM_8])
            .with_psk_server(None, Arc::new(Key))
            .build()
            .map_err(|e| anyhow::anyhow!("dimpl config: {e}"))?;
        Ok(Servers { engine, openssl: b.build(), dimpl: Arc::new(dimpl) })
    }

    fn session(&self) -> Result<Server> {
        Ok(match self.engine {
            Engine::Openssl => {
                let mut ssl = Ssl::new(&self.openssl)?;
                ssl.set_mtu(MTU as u32)?;
                ssl.set_accept_state();
                Server::Openssl(SslStream::new(ssl, Pipe::default())?, false)
            }
            Engine::Dimpl => Server::Dimpl(Box::new(dimpl::Dtls::new_12_psk(self.dimpl.clone(), Instant::now()))),
        })
    }
}

/// One server-side session.
enum Server {
    Openssl(SslStream<Pipe>, bool),
    Dimpl(Box<dimpl::Dtls>),
}

/// What one datagram into a server produced.
#[derive(Default)]
struct Produced {
    datagrams: Vec<Vec<u8>>,
    data: Vec<Vec<u8>>,
    connected: bool,
}

impl Server {
    fn input(&mut self, d: &[u8], out: &mut Produced, buf: &mut Vec<u8>) -> Result<()> {
        match self {
            Server::Openssl(s, connected) => {
                s.get_mut().inbox.push_back(d.to_vec());
                if !*connected {
                    match s.do_handshake() {
                        Ok(()) => *connected = true,
                        Err(e) if e.code() == ErrorCode::WANT_READ => {}
                        Err(e) => bail!("openssl handshake: {e}"),
                    }
                    out.connected = *connected;
                }
                if *connected {
                    buf.resize(MTU, 0);
                    loop {
                        match s.ssl_read(buf) {
                            Ok(n) => out.data.push(buf[..n].to_vec()),
                            Err(e) if e.code() == ErrorCode::WANT_READ => break,
                            Err(e) => bail!("openssl read: {e}"),
                        }
                    }
                }
                out.datagrams.append(&mut s.get_mut().outbox);
            }
            Server::Dimpl(s) => {
                s.handle_timeout(Instant::now()).map_err(|e| anyhow::anyhow!("dimpl: {e}"))?;
                s.handle_packet(d).map_err(|e| anyhow::anyhow!("dimpl: {e}"))?;
                drain_dimpl(s, out, buf);
            }
        }
        Ok(())
    }

    fn send(&mut self, data: &[u8], out: &mut Produced, buf: &mut Vec<u8>) -> Result<()> {
        match self {
            Server::Openssl(s, _) => {
                s.ssl_write(data).context("openssl write")?;
                out.datagrams.append(&mut s.get_mut().outbox);
            }
            Server::Dimpl(s) => {
                s.send_application_data(data).map_err(|e| anyhow::anyhow!("dimpl: {e}"))?;
                drain_dimpl(s, out, buf);
            }
        }
        Ok(())
    }
}

impl Server {
    /// Done with a datagram: as fwgate's listener does, an established OpenSSL session gives
    /// back its record buffers (a handshaking one may still write without reading first).
    fn rest(&mut self) {
        if let Server::Openssl(s, true) = self {
            release_buffers(s.ssl());
        }
    }
}

fn drain_dimpl(s: &mut dimpl::Dtls, out: &mut Produced, buf: &mut Vec<u8>) {
    buf.resize(MTU.max(buf.len()), 0);
    loop {
        match s.poll_output(buf) {
            dimpl::Output::Packet(p) => out.datagrams.push(p.to_vec()),
            dimpl::Output::ApplicationData(d) => out.data.push(d.to_vec()),
            dimpl::Output::Connected => out.connected = true,
            dimpl::Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            dimpl::Output::Timeout(_) => break,
            _ => {}
        }
    }
}

/// The client end of one session.
fn client(ctx: &SslContext) -> Result<SslStream<Pipe>> {
    let mut ssl = Ssl::new(ctx)?;
    ssl.set_mtu(MTU as u32)?;
    ssl.set_connect_state();
    Ok(SslStream::new(ssl, Pipe::default())?)
}

/// A full handshake between a new client and a new server session; the server time spent.
fn handshake(servers: &Servers, ctx: &SslContext, buf: &mut Vec<u8>) -> Result<(Server, SslStream<Pipe>, Duration)> {
    let mut c = client(ctx)?;
    let mut timed = Duration::ZERO;
    let t = Instant::now();
    let mut s = servers.session()?;
    timed += t.elapsed();
    let (mut client_done, mut server_done) = (false, false);
    for _ in 0..20 {
        if !client_done {
            match c.do_handshake() {
                Ok(()) => client_done = true,
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => bail!("client handshake: {e}"),
            }
        }
        let sent: Vec<Vec<u8>> = std::mem::take(&mut c.get_mut().outbox);
        let mut out = Produced::default();
        let t = Instant::now();
        for d in &sent {
            s.input(d, &mut out, buf)?;
            s.rest();
        }
        timed += t.elapsed();
        server_done |= out.connected;
        c.get_mut().inbox.extend(out.datagrams);
        if client_done && server_done {
            return Ok((s, c, timed));
        }
    }
    bail!("{}: no handshake after 20 flights", servers.engine.name())
}

/// One block: the client's request, the server's answer; the server time spent.
fn block(s: &mut Server, c: &mut SslStream<Pipe>, n: u32, buf: &mut Vec<u8>) -> Result<Duration> {
    let mut request = [0u8; REQUEST];
    request[..4].copy_from_slice(&n.to_be_bytes());
    c.ssl_write(&request)?;
    let sent: Vec<Vec<u8>> = std::mem::take(&mut c.get_mut().outbox);
    let mut out = Produced::default();
    let t = Instant::now();
    for d in &sent {
        s.input(d, &mut out, buf)?;
    }
    let got = out.data.concat();
    if got != request {
        bail!("the server read {} bytes, not the request", got.len());
    }
    let mut answer = vec![(n % 251) as u8; ANSWER];
    answer[..4].copy_from_slice(&n.to_be_bytes());
    s.send(&answer, &mut out, buf)?;
    s.rest();
    let timed = t.elapsed();
    c.get_mut().inbox.extend(out.datagrams);
    let mut read = vec![0u8; MTU];
    let k = c.ssl_read(&mut read).context("client read")?;
    if read[..k] != answer[..] {
        bail!("block {n}: the answer arrived changed");
    }
    Ok(timed)
}

struct Measured {
    engine: Engine,
    handshake_us: f64,
    block_us: f64,
    idle_bytes: Option<f64>,
}

fn measure(engine: Engine, args: &Args) -> Result<Measured> {
    let servers = Servers::new(engine)?;
    let ctx = psk_client(DEVICE, KEY)?;
    let mut buf = Vec::new();
    let mut hs = Duration::ZERO;
    for _ in 0..args.handshakes {
        hs += handshake(&servers, &ctx, &mut buf)?.2;
    }
    let (mut s, mut c, _) = handshake(&servers, &ctx, &mut buf)?;
    let mut blocks = Duration::ZERO;
    for n in 0..args.blocks {
        blocks += block(&mut s, &mut c, n as u32, &mut buf)?;
    }
    Ok(Measured {
        engine,
        handshake_us: hs.as_secs_f64() * 1e6 / args.handshakes as f64,
        block_us: blocks.as_secs_f64() * 1e6 / args.blocks as f64,
        idle_bytes: None,
    })
}

/// In this process: `n` sessions, each with one block exchanged, kept; the client ends are
/// dropped as they finish so the growth is the servers'.
fn hold_sessions(engine: Engine, n: usize) -> Result<f64> {
    let servers = Servers::new(engine)?;
    let ctx = psk_client(DEVICE, KEY)?;
    let mut buf = Vec::new();
    let pid = std::process::id();
    // Warm the allocator and OpenSSL's lazy tables before the baseline.
    for i in 0..50 {
        let (mut s, mut c, _) = handshake(&servers, &ctx, &mut buf)?;
        block(&mut s, &mut c, i, &mut buf)?;
    }
    let mut held = Vec::with_capacity(n);
    let before = rss_kib(pid).context("rss")?;
    for i in 0..n {
        let (mut s, mut c, _) = handshake(&servers, &ctx, &mut buf)?;
        block(&mut s, &mut c, i as u32, &mut buf)?;
        held.push(s);
    }
    let after = rss_kib(pid).context("rss")?;
    let per = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    drop(held);
    Ok(per)
}

fn idle_bytes(engine: Engine, n: usize) -> Result<f64> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--memory-of", engine.name(), "--sessions", &n.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("{}: {}", engine.name(), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("{}: printed {text:?}", engine.name()))
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(name) = &args.memory_of {
        let engine = if name == "dimpl" { Engine::Dimpl } else { Engine::Openssl };
        println!("{:.0}", hold_sessions(engine, args.sessions)?);
        return Ok(());
    }
    if !args.bench {
        (args.handshakes, args.blocks, args.sessions) = (5, 200, 100);
    }
    let mut rows = Vec::new();
    for engine in [Engine::Openssl, Engine::Dimpl] {
        let mut m = measure(engine, &args)?;
        m.idle_bytes = Some(idle_bytes(engine, args.sessions)?);
        rows.push(m);
    }
    println!(
        "\nDTLS 1.2 PSK (AES-128-CCM-8), server side; {} handshakes, {} blocks, {} idle sessions",
        args.handshakes, args.blocks, args.sessions
    );
    println!("| engine | µs per handshake | µs per 1 KiB block | bytes per idle session |");
    println!("|---|---:|---:|---:|");
    for m in &rows {
        println!(
            "| {} | {:.1} | {:.2} | {:.0} |",
            m.engine.name(),
            m.handshake_us,
            m.block_us,
            m.idle_bytes.unwrap_or(f64::NAN)
        );
    }
    let (o, d) = (&rows[0], &rows[1]);
    println!(
        "dimpl / openssl: handshake {:.2}×, block {:.2}×, idle memory {:.2}×",
        d.handshake_us / o.handshake_us,
        d.block_us / o.block_us,
        d.idle_bytes.unwrap_or(f64::NAN) / o.idle_bytes.unwrap_or(f64::NAN)
    );
    Ok(())
}
