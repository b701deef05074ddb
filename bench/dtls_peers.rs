//! CoAP over DTLS (PSK), fwgate against libcoap's `coap-server-openssl`, side by side in one
//! run:
//!
//! ```sh
//! cargo bench --bench dtls_peers -- --clients 4 --seconds 10 --rounds 3 --sessions 10000
//! ```
//!
//! Both servers hold the same image and the same pre-shared key (the device's fwgate token;
//! libcoap's `-k`). Three measurements, each on both servers, alternating:
//! - **download**: `--clients` loops of the stock `coap-client-openssl -b 1024` each fetching
//!   the whole image over coaps (handshake, Block2 GETs, close) until `--seconds` are up;
//!   blocks per second and blocks per CPU-second of the server process. Rounds alternate
//!   between servers; the table row is each server's median round.
//! - **handshakes**: two threads doing full PSK handshakes (TLS_PSK_WITH_AES_128_CCM_8, a new
//!   UDP port each, closed with close_notify) as fast as they can for `--seconds`.
//! - **idle sessions**: `--sessions` handshakes kept open; the server's RSS before and after,
//!   per session. The client end of each session is a socket of this process, so what is
//!   measured is the server's own memory.
//!
//! Under `cargo test` (no `--bench`) it runs once, small, as a smoke test.

use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use openssl::ssl::{SslContext, SslStream};

#[path = "peers_common.rs"]
mod peers_common;
use fwgate::loadgen::run::rss_kib;
use peers_common::{cpu_secs, free_tcp, free_udp, median_round, psk_client};

const FWGATE: &str = env!("CARGO_BIN_EXE_fwgate");
const SECRET: &str = "dtls-bench-device-secret";
const DEVICE: &str = "bench-1";

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent stock clients in the download measurement.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Length of each measured round.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Download rounds per server; the table reports the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Size of the served image, in KiB.
    #[arg(long, default_value_t = 256)]
    kib: usize,
    /// Idle sessions held for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Set by `cargo bench`; without it this is a smoke test.
    #[arg(long)]
    bench: bool,
}

struct Server {
    name: &'static str,
    child: Child,
    port: u16,
    path: &'static str,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_fwgate(dir: &Path, file: &Path, sessions: usize) -> Result<Server> {
    let (admin, mqtt, coap, dtls) = (free_tcp(), free_tcp(), free_udp(), free_udp());
    let config = dir.join("fwgate.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n")?;
    let child = Command::new(FWGATE)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FWGATE_STORE__DATA_DIR", dir.join("data"))
        .env("FWGATE_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("FWGATE_MQTT__AUTH", "true")
        .env("FWGATE_MQTT__DEVICE_SECRET", SECRET)
        .env("FWGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("FWGATE_ADMIN__TOKEN", "bench-token")
        .env("FWGATE_COAP__LISTEN", format!("127.0.0.1:{coap}"))
        .env("FWGATE_COAP__DTLS_LISTEN", format!("127.0.0.1:{dtls}"))
        .env("FWGATE_COAP__DTLS_MAX_SESSIONS", (sessions + 1000).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting fwgate serve")?;
    let server = Server { name: "fwgate", child, port: dtls, path: "/fw/bench-1" };
    let cli = |args: &[&str]| -> Result<()> {
        let out = Command::new(FWGATE)
            .args(args)
            .env("FWGATE_SERVER", format!("http://127.0.0.1:{admin}"))
            .env("FWGATE_TOKEN", "bench-token")
            .output()?;
        if !out.status.success() {
            bail!("fwgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli(&["devices", "list"]).is_err() {
        if Instant::now() > deadline {
            bail!("fwgate serve not ready after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let f = file.to_str().context("path")?;
    cli(&["images", "add", f, "--name", "bench", "--version", "2.0.0"])?;
    cli(&["devices", "add", DEVICE])?;
    cli(&["devices", "assign", DEVICE, "bench@2.0.0"])?;
    Ok(server)
}

fn start_libcoap(file: &Path, key: &str) -> Result<Server> {
    let port = free_udp();
    let child = Command::new("coap-server-openssl")
        .args(["-A", "127.0.0.1", "-p", &(port - 1).to_string(), "-k", key, "-v", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting coap-server-openssl")?;
    // libcoap listens for coaps on the port after the plain one.
    let server = Server { name: "libcoap", child, port, path: "/example_data" };
    std::thread::sleep(Duration::from_millis(300));
    let put = Command::new("coap-client-openssl")
        .args(["-u", DEVICE, "-k", key, "-m", "put", "-b", "1024", "-B", "30", "-f"])
        .arg(file)
        .arg(format!("coaps://127.0.0.1:{port}/example_data"))
        .output()
        .context("coap-client-openssl")?;
    if !put.status.success() {
        bail!("PUT to coap-server-openssl failed: {}", String::from_utf8_lossy(&put.stderr));
    }
    Ok(server)
}

/// One whole download with the stock client, stopped after `limit`; the bytes it wrote.
fn download(server: &Server, key: &str, out: &Path, limit: Duration) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let _ = Command::new("timeout")
        .arg(format!("{:.3}", limit.as_secs_f64().max(0.001)))
        .args(["coap-client-openssl", "-u", DEVICE, "-k", key, "-b", "1024", "-B", "30", "-o"])
        .arg(out)
        .arg(format!("coaps://127.0.0.1:{}{}", server.port, server.path))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    std::fs::read(out).unwrap_or_default()
}

struct Round {
    round: usize,
    downloads: u64,
    /// Downloads that did not finish: cut at the round's end, or failed.
    unfinished: u64,
    blocks: u64,
    secs: f64,
    cpu: Option<f64>,
}

impl Round {
    fn rate(&self) -> f64 {
        self.blocks as f64 / self.secs
    }

    fn cpu_per_block_us(&self) -> Option<f64> {
        self.cpu.filter(|_| self.blocks > 0).map(|c| c * 1e6 / self.blocks as f64)
    }
}

fn download_round(server: &Server, key: &str, args: &Args, img_len: usize, dir: &Path, round: usize) -> Round {
    let done = Arc::new(AtomicU64::new(0));
    let unfinished = Arc::new(AtomicU64::new(0));
    let pid = server.child.id();
    let cpu0 = cpu_secs(pid);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    std::thread::scope(|s| {
        for c in 0..args.clients {
            let (done, unfinished) = (done.clone(), unfinished.clone());
            let out = dir.join(format!("{}-{c}.bin", server.name));
            s.spawn(move || {
                // A download still running at the round's end is stopped and not counted, so
                // every round lasts `--seconds` for both servers.
                while Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now());
                    if download(server, key, &out, left).len() == img_len {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        unfinished.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let downloads = done.load(Ordering::Relaxed);
    let cpu = cpu0.zip(cpu_secs(pid)).map(|(a, b)| b - a);
    Round {
        round,
        downloads,
        unfinished: unfinished.load(Ordering::Relaxed),
        blocks: downloads * img_len.div_ceil(1024) as u64,
        secs,
        cpu,
    }
}

/// A UDP socket as the byte stream OpenSSL's DTLS reads datagram by datagram.
struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A full PSK handshake from a new port; the session, open.
fn handshake(ctx: &SslContext, port: u16) -> Result<SslStream<Udp>> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut ssl = openssl::ssl::Ssl::new(ctx)?;
    ssl.set_mtu(1280)?;
    let mut s = SslStream::new(ssl, Udp(sock))?;
    s.connect().map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
    Ok(s)
}

fn handshakes_per_sec(ctx: &SslContext, server: &Server, secs: f64) -> (f64, u64) {
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while Instant::now() < until {
                    match handshake(ctx, server.port) {
                        Ok(mut h) => {
                            let _ = h.shutdown();
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    (ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(), failed.load(Ordering::Relaxed))
}

/// Opens `n` sessions and keeps them; the server's RSS growth per session, in bytes.
fn idle_session_bytes(ctx: &SslContext, server: &Server, n: usize) -> Result<(f64, usize)> {
    let pid = server.child.id();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid).context("rss")?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match handshake(ctx, server.port) {
            Ok(s) => held.push(s),
            Err(e) => bail!("{}: session {} of {n}: {e}", server.name, held.len() + 1),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid).context("rss")?;
    let per = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    for mut s in held {
        let _ = s.shutdown();
    }
    Ok((per, n))
}

fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, soft.max(want.min(hard)), hard);
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if !args.bench {
        (args.clients, args.seconds, args.rounds, args.kib, args.sessions) = (1, 1.0, 1, 16, 20);
    }
    for tool in ["coap-client-openssl", "coap-server-openssl"] {
        if peers_common::find(tool).is_none() {
            bail!("{tool} is not on PATH: install libcoap3-bin (.ci/run does)");
        }
    }
    raise_fd_limit(args.sessions as u64 + 1024);
    let dir = tempfile::tempdir()?;
    let mut rng = fastrand::Rng::with_seed(7);
    let img: Vec<u8> = (0..args.kib * 1024).map(|_| rng.u8(..)).collect();
    let file = dir.path().join("image.bin");
    std::fs::write(&file, &img)?;
    let key = fwgate::fleet::device_token(SECRET, DEVICE);
    let servers = [start_fwgate(dir.path(), &file, args.sessions)?, start_libcoap(&file, &key)?];
    for s in &servers {
        let got = download(s, &key, &dir.path().join("check.bin"), Duration::from_secs(60));
        if got != img {
            bail!("{} did not serve the image byte for byte over coaps ({} of {} bytes)", s.name, got.len(), img.len());
        }
    }
    println!(
        "coaps download: {} stock clients (coap-client-openssl -b 1024), {} KiB image, {:.0} s rounds",
        args.clients, args.kib, args.seconds
    );
    let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for r in 1..=args.rounds {
        for (i, s) in servers.iter().enumerate() {
            let round = download_round(s, &key, &args, img.len(), dir.path(), r);
            println!(
                "  round {r} {:<8} {:>5} downloads ({} unfinished) {:>9.0} blocks/s  CPU/block {:>6.1} µs",
                s.name,
                round.downloads,
                round.unfinished,
                round.rate(),
                round.cpu_per_block_us().unwrap_or(f64::NAN)
            );
            rounds[i].push(round);
        }
    }
    let [f, l] = [median_round(&rounds[0], Round::rate), median_round(&rounds[1], Round::rate)];
    println!("| server | round | blocks/s | server CPU per block |");
    println!("|---|---|---|---|");
    for (name, r) in [("fwgate", f), ("libcoap", l)] {
        let cpu = r.cpu_per_block_us().map_or("-".into(), |c| format!("{c:.1} µs"));
        println!("| {name} | {} | {:.0} | {cpu} |", r.round, r.rate());
    }
    let cpu_ratio = f.cpu_per_block_us().zip(l.cpu_per_block_us()).map(|(a, b)| a / b);
    println!(
        "fwgate / libcoap: throughput {:.2}×, CPU per block {}",
        f.rate() / l.rate().max(f64::MIN_POSITIVE),
        cpu_ratio.map_or("-".into(), |c| format!("{c:.2}×"))
    );

    let ctx = psk_client(DEVICE, &key)?;
    println!("\nPSK handshakes (TLS_PSK_WITH_AES_128_CCM_8, 2 client threads, {:.0} s each):", args.seconds);
    let mut hs = Vec::new();
    for s in &servers {
        let (rate, failed) = handshakes_per_sec(&ctx, s, args.seconds);
        println!("  {:<8} {rate:>8.0} handshakes/s ({failed} failed)", s.name);
        hs.push(rate);
    }
    println!("fwgate / libcoap: {:.2}×", hs[0] / hs[1].max(f64::MIN_POSITIVE));

    println!("\nidle sessions ({} held open, server RSS growth):", args.sessions);
    for s in &servers {
        match idle_session_bytes(&ctx, s, args.sessions) {
            Ok((per, n)) => println!("  {:<8} {:>8.0} bytes per session ({n} sessions)", s.name, per),
            Err(e) => println!("  {:<8} failed: {e}", s.name),
        }
    }
    Ok(())
}
