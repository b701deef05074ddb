//! CoAP Block2 throughput, fwgate against libcoap, side by side in one run:
//!
//! ```sh
//! cargo bench --bench coap_peers -- --clients 32 --seconds 5 --rounds 3 --block 512
//! ```
//!
//! Starts `fwgate serve` (this build) and libcoap's `coap-server-notls` on loopback, gives both
//! the same 256 KiB file (fwgate: assigned to one device per client; libcoap: PUT to its
//! `/example_data` resource), checks that each serves it byte for byte, then drives each in turn
//! with the same client load — N simulated devices, each reading the file block after block
//! with confirmable GETs, one request outstanding per device — and prints blocks per second,
//! blocks per CPU-second of the server process, the clients' retransmissions and timeouts,
//! and the ratio. Rounds alternate between the servers so drift on a shared machine hits both
//! alike; every round is printed, and the table's row for a server is its median round, whole.
//!
//! Both servers get the same kernel socket buffers (`--socket-buffer`, 4 MiB): run as root,
//! the benchmark sets `net.core.rmem_default`/`wmem_default` to it for the run (libcoap keeps
//! the kernel default) and gives fwgate half of it to ask for (Linux doubles what a socket
//! asks), restoring the old values at the end; otherwise both keep the kernel default. What
//! each server's socket really got is read back with `ss` and printed, and a difference is an
//! error.
//!
//! Under `cargo test` (no `--bench`) it runs once, small, as a smoke test.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use fwgate::loadgen::coap::{ClientConfig, CoapClient};
use fwgate::loadgen::stats::Stats;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent simulated devices.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Length of each measured round.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds per server; the table reports the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Block size the clients ask for (16..=1024).
    #[arg(long, default_value_t = 512)]
    block: u32,
    /// Size of the served file, in KiB.
    #[arg(long, default_value_t = 256)]
    kib: usize,
    /// Kernel receive and send buffer of both servers' sockets, in bytes, as the kernel
    /// reports it (needs root to set; otherwise both keep the kernel default).
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// Set by `cargo bench`; without it this is a smoke test.
    #[arg(long)]
    bench: bool,
}

#[path = "peers_common.rs"]
mod peers_common;
use peers_common::{cpu_secs, ensure, free_tcp, free_udp, median_round};

const FWGATE: &str = env!("CARGO_BIN_EXE_fwgate");

struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    /// Path of the file for client `i`.
    path: fn(usize) -> String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..len).map(|_| rng.u8(..)).collect()
}

async fn start_fwgate(dir: &Path, file: &Path, clients: usize, buffer: usize) -> Result<Server> {
    let (admin, mqtt, coap) = (free_tcp(), free_tcp(), free_udp());
    let config = dir.join("fwgate.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n")?;
    let child = Command::new(FWGATE)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FWGATE_STORE__DATA_DIR", dir.join("data"))
        .env("FWGATE_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("FWGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("FWGATE_COAP__LISTEN", format!("127.0.0.1:{coap}"))
        // Linux doubles what a socket asks for (bookkeeping); the default a socket gets is not.
        .env("FWGATE_COAP__SOCKET_BUFFER_BYTES", (buffer / 2).to_string())
        .env("FWGATE_ADMIN__TOKEN", "bench-token")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting fwgate serve")?;
    let server =
        Server { name: "fwgate", child, addr: ([127, 0, 0, 1], coap).into(), path: |i| format!("/fw/bench-{i}") };
    let base = format!("http://127.0.0.1:{admin}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
        if Instant::now() > deadline {
            bail!("fwgate serve not ready after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let call = |req: reqwest::RequestBuilder| async move {
        let r = req.bearer_auth("bench-token").send().await?;
        let status = r.status();
        let body = r.text().await?;
        if !status.is_success() {
            bail!("admin api: {status} {body}");
        }
        Ok(())
    };
    call(http.post(format!("{base}/api/v1/images?name=bench&version=2.0.0")).body(std::fs::read(file)?)).await?;
    let devices: Vec<_> = (0..clients).map(|i| serde_json::json!({"id": format!("bench-{i}")})).collect();
    call(http.post(format!("{base}/api/v1/devices")).json(&devices)).await?;
    for i in 0..clients {
        let body = serde_json::json!({"image": "bench@2.0.0"});
        call(http.put(format!("{base}/api/v1/devices/bench-{i}/assignment")).json(&body)).await?;
    }
    Ok(server)
}

fn start_libcoap(file: &Path) -> Result<Server> {
    let port = free_udp();
    let child = Command::new("coap-server-notls")
        .args(["-A", "127.0.0.1", "-p", &port.to_string(), "-v", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting coap-server-notls")?;
    let server =
        Server { name: "libcoap", child, addr: ([127, 0, 0, 1], port).into(), path: |_| "/example_data".into() };
    // The server needs a moment to bind; the PUT is retried by the client itself.
    std::thread::sleep(Duration::from_millis(300));
    let put = Command::new("coap-client-notls")
        .args(["-m", "put", "-b", "1024", "-B", "30", "-f"])
        .arg(file)
        .arg(format!("coap://127.0.0.1:{port}/example_data"))
        .output()
        .context("coap-client-notls")?;
    if !put.status.success() {
        bail!("PUT to coap-server-notls failed: {}", String::from_utf8_lossy(&put.stderr));
    }
    Ok(server)
}

struct Round {
    round: usize,
    blocks: u64,
    secs: f64,
    cpu: Option<f64>,
    /// The clients' requests sent again after an answer did not come within its timeout.
    retransmissions: u64,
    /// Waits for an answer that ran out, and the time the clients spent in them.
    timeouts: u64,
    timeout_wait: Duration,
}

impl Round {
    fn rate(&self) -> f64 {
        self.blocks as f64 / self.secs
    }

    fn per_cpu(&self) -> Option<f64> {
        self.cpu.filter(|&c| c > 0.0).map(|c| self.blocks as f64 / c)
    }
}

fn szx(block: u32) -> u32 {
    block.trailing_zeros() - 4
}

/// Each of `clients` devices downloads the file once and checks it.
async fn verify(server: &Server, clients: usize, block: u32, img: &[u8]) -> Result<()> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (addr, path) = (server.addr, (server.path)(i));
        tasks.push(tokio::spawn(async move {
            let mut c = CoapClient::connect(addr, ClientConfig::default()).await?;
            anyhow::Ok(c.download(&path, szx(block), 0, None, &Stats::default()).await?)
        }));
    }
    for t in tasks {
        if t.await?? != img {
            bail!("{} served different bytes", server.name);
        }
    }
    Ok(())
}

async fn round(server: &Server, n: usize, clients: usize, block: u32, secs: f64) -> Result<Round> {
    let cpu0 = cpu_secs(server.child.id());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (addr, path) = (server.addr, (server.path)(i));
        tasks.push(tokio::spawn(async move {
            let mut c = CoapClient::connect(addr, ClientConfig::default()).await?;
            let blocks = c.read_blocks_until(&path, szx(block), deadline).await?;
            anyhow::Ok((blocks, c.stats))
        }));
    }
    let mut r = Round {
        round: n,
        blocks: 0,
        secs: 0.0,
        cpu: None,
        retransmissions: 0,
        timeouts: 0,
        timeout_wait: Duration::ZERO,
    };
    for t in tasks {
        let (blocks, stats) = t.await?.with_context(|| format!("a client of {}", server.name))?;
        r.blocks += blocks;
        r.retransmissions += stats.retransmissions;
        r.timeouts += stats.timeouts;
        r.timeout_wait += stats.timeout_wait;
    }
    r.secs = started.elapsed().as_secs_f64();
    r.cpu = cpu0.zip(cpu_secs(server.child.id())).map(|(a, b)| b - a);
    Ok(r)
}

/// The kernel's default socket buffers, set for the length of the run and put back after.
struct DefaultBuffers {
    old: Vec<(&'static str, String)>,
}

const RMEM_DEFAULT: &str = "/proc/sys/net/core/rmem_default";
const WMEM_DEFAULT: &str = "/proc/sys/net/core/wmem_default";

impl DefaultBuffers {
    /// Sets both defaults (and the maxima, where lower) to `bytes`; `None` when this process
    /// may not (not root), and both servers then keep the kernel's defaults.
    fn set(bytes: usize) -> Result<Option<DefaultBuffers>> {
        let mut guard = DefaultBuffers { old: Vec::new() };
        for (path, raise_only) in [
            ("/proc/sys/net/core/rmem_max", true),
            ("/proc/sys/net/core/wmem_max", true),
            (RMEM_DEFAULT, false),
            (WMEM_DEFAULT, false),
        ] {
            let old = std::fs::read_to_string(path).with_context(|| path.to_owned())?.trim().to_owned();
            if raise_only && old.parse::<usize>().is_ok_and(|v| v >= bytes) {
                continue;
            }
            if std::fs::write(path, bytes.to_string()).is_err() {
                return Ok(None); // the guard puts back what was already changed
            }
            guard.old.push((path, old));
        }
        Ok(Some(guard))
    }
}

impl Drop for DefaultBuffers {
    fn drop(&mut self) {
        for (path, old) in self.old.iter().rev() {
            if let Err(e) = std::fs::write(path, old) {
                eprintln!("could not restore {path} to {old}: {e}");
            }
        }
    }
}

fn read_usize(path: &str) -> Result<usize> {
    std::fs::read_to_string(path).with_context(|| path.to_owned())?.trim().parse().with_context(|| path.to_owned())
}

/// The receive and send buffer of the UDP socket bound to `port`, as `ss` reports them.
fn socket_buffers(port: u16) -> Result<(usize, usize)> {
    let out = Command::new("ss").args(["-uanm", &format!("sport = :{port}")]).output().context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<usize> {
        let at = text.find("skmem:(")?;
        let mem = &text[at..];
        let v = mem
            .split([',', '(', ')'])
            .find(|f| f.starts_with(name) && f[name.len()..].starts_with(char::is_numeric))?;
        v[name.len()..].parse().ok()
    };
    match (field("rb"), field("tb")) {
        (Some(rb), Some(tb)) => Ok((rb, tb)),
        _ => bail!("ss shows no socket buffers for udp port {port}:\n{text}"),
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if !args.bench {
        // A smoke test under `cargo test`: every step once, small.
        (args.clients, args.seconds, args.rounds, args.kib) = (4, 0.3, 1, 32);
    }
    if !matches!(args.block, 16 | 32 | 64 | 128 | 256 | 512 | 1024) {
        bail!("--block must be a power of two from 16 to 1024");
    }
    // The smoke test fails too: one that skipped its peer would pass without comparing.
    for tool in ["coap-server-notls", "coap-client-notls"] {
        if ensure(tool, "libcoap3-bin", args.bench).is_none() {
            bail!("{tool} is not installed (or could not be): install it with `apt-get install libcoap3-bin` (.ci/run does)");
        }
    }
    // The clients get one thread; the servers have the rest of the machine.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = image(args.kib * 1024);
    let file = dir.path().join("firmware.bin");
    std::fs::write(&file, &img)?;
    // The smoke test leaves the machine's settings alone.
    let _defaults = if args.bench { DefaultBuffers::set(args.socket_buffer)? } else { None };
    let buffer = read_usize(RMEM_DEFAULT)?;
    if buffer != args.socket_buffer {
        let why = if args.bench { "setting it needs root" } else { "a smoke test changes no kernel setting" };
        println!("socket buffers: the kernel default ({buffer} bytes) for both servers ({why})");
    }
    let servers = [start_fwgate(dir.path(), &file, args.clients, buffer).await?, start_libcoap(&file)?];
    let mut buffers = Vec::new();
    for s in &servers {
        let (rb, tb) = socket_buffers(s.addr.port()).with_context(|| s.name)?;
        println!("{}: socket receive buffer {rb} bytes, send buffer {tb} bytes", s.name);
        buffers.push((rb, tb));
    }
    if buffers[0] != buffers[1] {
        bail!("the servers' socket buffers differ: {buffers:?}");
    }
    for s in &servers {
        verify(s, args.clients, args.block, &img).await?;
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(), Vec::new()];
    for r in 0..args.rounds {
        for (i, s) in servers.iter().enumerate() {
            results[i].push(round(s, r + 1, args.clients, args.block, args.seconds).await?);
        }
    }
    println!();
    println!(
        "CoAP Block2, {} KiB file, {}-byte blocks, {} clients, {} x {} s rounds, socket buffers {} bytes",
        args.kib, args.block, args.clients, args.rounds, args.seconds, buffers[0].0
    );
    println!("every round:");
    println!("| round | server | blocks | time | blocks/s | server CPU | blocks per CPU-second | retransmissions | timeouts (time waited) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in 0..args.rounds {
        for (i, s) in servers.iter().enumerate() {
            let x = &results[i][r];
            println!(
                "| {} | {} | {} | {:.2} s | {:.0} | {} | {} | {} | {} ({:.1} s) |",
                x.round,
                s.name,
                x.blocks,
                x.secs,
                x.rate(),
                x.cpu.map_or("-".into(), |c| format!("{c:.2} s")),
                x.per_cpu().map_or("-".into(), |v| format!("{v:.0}")),
                x.retransmissions,
                x.timeouts,
                x.timeout_wait.as_secs_f64()
            );
        }
    }
    let median: Vec<&Round> = results.iter().map(|rs| median_round(rs, Round::rate)).collect();
    println!();
    println!("median round of each server (by blocks/s; every column from that round):");
    println!("| server | round | blocks/s | MB/s | blocks per server CPU-second | retransmissions | timeouts |");
    println!("|---|---|---|---|---|---|---|");
    for (i, s) in servers.iter().enumerate() {
        let m = median[i];
        let cpu = m.per_cpu().map_or("-".into(), |v| format!("{v:.0}"));
        println!(
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} |",
            s.name,
            m.round,
            m.rate(),
            m.rate() * args.block as f64 / 1e6,
            cpu,
            m.retransmissions,
            m.timeouts
        );
    }
    let cpu_ratio = median[0].per_cpu().zip(median[1].per_cpu()).map_or("-".into(), |(a, b)| format!("{:.2}x", a / b));
    println!("| fwgate / libcoap | | {:.2}x | | {} | | |", median[0].rate() / median[1].rate(), cpu_ratio);
    if median.iter().any(|m| m.blocks == 0) {
        bail!("a server served no blocks");
    }
    Ok(())
}
