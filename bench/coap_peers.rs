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
//! blocks per CPU-second of the server process, and the ratio. Rounds alternate between the
//! servers so drift on a shared machine hits both alike.
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
    /// Set by `cargo bench`; without it this is a smoke test.
    #[arg(long)]
    bench: bool,
}

#[path = "peers_common.rs"]
mod peers_common;
use peers_common::{ensure, free_tcp, free_udp};

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

/// Server CPU time (user + system) in seconds, from /proc.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn image(len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..len).map(|_| rng.u8(..)).collect()
}

async fn start_fwgate(dir: &Path, file: &Path, clients: usize) -> Result<Server> {
    let (admin, mqtt, coap) = (free_tcp(), free_tcp(), free_udp());
    let config = dir.join("fwgate.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n")?;
    let child = Command::new(FWGATE)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FWGATE_STORE__DATA_DIR", dir.join("data"))
        .env("FWGATE_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("FWGATE_MQTT__LISTEN_V5", "")
        .env("FWGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("FWGATE_COAP__LISTEN", format!("127.0.0.1:{coap}"))
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
    blocks: u64,
    secs: f64,
    cpu: Option<f64>,
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

async fn round(server: &Server, clients: usize, block: u32, secs: f64) -> Result<Round> {
    let cpu0 = cpu_secs(server.child.id());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (addr, path) = (server.addr, (server.path)(i));
        tasks.push(tokio::spawn(async move {
            let mut c = CoapClient::connect(addr, ClientConfig::default()).await?;
            anyhow::Ok(c.read_blocks_until(&path, szx(block), deadline).await?)
        }));
    }
    let mut blocks = 0;
    for t in tasks {
        blocks += t.await?.with_context(|| format!("a client of {}", server.name))?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu0.zip(cpu_secs(server.child.id())).map(|(a, b)| b - a);
    Ok(Round { blocks, secs, cpu })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    for tool in ["coap-server-notls", "coap-client-notls"] {
        if ensure(tool, "libcoap3-bin", args.bench).is_none() {
            if args.bench {
                bail!("{tool} is needed and could not be installed (apt-get install libcoap3-bin)");
            }
            println!("SKIPPED: {tool} not installed (apt-get install libcoap3-bin; .ci/run does)");
            return Ok(());
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
    let servers = [start_fwgate(dir.path(), &file, args.clients).await?, start_libcoap(&file)?];
    for s in &servers {
        verify(s, args.clients, args.block, &img).await?;
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(), Vec::new()];
    for r in 0..args.rounds {
        for (i, s) in servers.iter().enumerate() {
            let round = round(s, args.clients, args.block, args.seconds).await?;
            eprintln!("round {}: {:<8} {:>9.0} blocks/s", r + 1, s.name, round.blocks as f64 / round.secs);
            results[i].push(round);
        }
    }
    let rate: Vec<f64> =
        results.iter().map(|rs| median(rs.iter().map(|r| r.blocks as f64 / r.secs).collect())).collect();
    let per_cpu: Vec<Option<f64>> = results
        .iter()
        .map(|rs| {
            let v: Option<Vec<f64>> =
                rs.iter().map(|r| r.cpu.filter(|&c| c > 0.0).map(|c| r.blocks as f64 / c)).collect();
            v.map(median)
        })
        .collect();
    println!();
    println!(
        "CoAP Block2, {} KiB file, {}-byte blocks, {} clients, {} x {} s rounds (median)",
        args.kib, args.block, args.clients, args.rounds, args.seconds
    );
    println!("| server | blocks/s | MB/s | blocks per server CPU-second |");
    println!("|---|---|---|---|");
    for (i, s) in servers.iter().enumerate() {
        let cpu = per_cpu[i].map_or("-".into(), |v| format!("{v:.0}"));
        println!("| {} | {:.0} | {:.1} | {} |", s.name, rate[i], rate[i] * args.block as f64 / 1e6, cpu);
    }
    let cpu_ratio = per_cpu[0].zip(per_cpu[1]).map_or("-".into(), |(a, b)| format!("{:.2}x", a / b));
    println!("| fwgate / libcoap | {:.2}x | | {} |", rate[0] / rate[1], cpu_ratio);
    if rate.iter().any(|&r| r <= 0.0) {
        bail!("a server served no blocks");
    }
    Ok(())
}
