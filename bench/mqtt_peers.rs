//! MQTT DFU throughput, fwgate against its peers, side by side in one run:
//!
//! ```sh
//! cargo bench --bench mqtt_peers -- --devices 1000 --image-kib 64 --rounds 2
//! ```
//!
//! Three scenarios, each driven by the same `fwgate load` process (a separate process from
//! every server), the same devices count, image size and block size:
//! - **fwgate DFU**: `fwgate serve`, devices download and verify the image over MQTT.
//! - **echo ceiling**: the same MQTT listener with `mqtt.echo` on: as many round trips per
//!   device as the image has blocks, each answered with a block-sized payload and no DFU logic.
//!   What fwgate could at most do with this listener.
//! - **Mosquitto relay**: Debian's Mosquitto broker, and a minimal DFU server (this binary in
//!   `--relay` mode: fwgate's engine over one rumqttc connection, as a service behind an
//!   external broker would run) answering every device's Status through it.
//!
//! Rounds alternate between the scenarios. Every round is printed whole; the table shows each
//! scenario's median round — the round whose blocks/s is the median, with every other column
//! from that same round, so its blocks, rate, wall time and completion times agree. Each round
//! also reports the servers' CPU per block: the CPU time (user + system, from /proc) the
//! serving processes spent during the round — fwgate, or Mosquitto plus the relay — divided by
//! the blocks delivered. Under
//! `cargo test` (no `--bench`) it runs once, small, as a smoke test.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use fwgate::engine::{handle_status, EngineConfig, OpState, Target};
use fwgate::loadgen::run::Expected;
use fwgate::protocol::topic::{command_topic, parse_status_topic};
use fwgate::protocol::Status;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
struct Args {
    /// Simulated devices per scenario.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Image size, in KiB.
    #[arg(long, default_value_t = 64)]
    image_kib: usize,
    /// Block size (device mtu).
    #[arg(long, default_value_t = 512)]
    mtu: u32,
    /// Rounds per scenario; the table reports the median.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Set by `cargo bench`; without it this is a smoke test.
    #[arg(long)]
    bench: bool,
    /// Run as the DFU relay behind Mosquitto (used by this benchmark itself).
    #[arg(long, requires = "image")]
    relay: Option<SocketAddr>,
    #[arg(long)]
    image: Option<PathBuf>,
}

#[path = "peers_common.rs"]
mod peers_common;
use peers_common::{ensure, free_tcp as free_port, median_round};

const FWGATE: &str = env!("CARGO_BIN_EXE_fwgate");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_tcp(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One `fwgate load` run; returns its JSON report.
fn load(dir: &Path, name: &str, extra: &[String]) -> Result<serde_json::Value> {
    let report = dir.join(format!("{name}.json"));
    let out = Command::new(FWGATE)
        .args(["load", "--quiet", "--timeout", "60", "--report"])
        .arg(&report)
        .args(extra)
        .env("FWGATE_TOKEN", "bench-token")
        .output()
        .context("running fwgate load")?;
    if !out.status.success() {
        bail!(
            "{name}: fwgate load failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&std::fs::read(&report)?)?)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let (Some(broker), Some(image)) = (args.relay, &args.image) {
        let image = std::fs::read(image)?;
        return tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(relay(broker, image));
    }
    if !args.bench {
        (args.devices, args.image_kib, args.rounds) = (20, 8, 1);
    }
    // The smoke test fails too: one that skipped its peer would pass without comparing.
    let Some(mosquitto) = ensure("mosquitto", "mosquitto", args.bench) else {
        bail!("the Mosquitto broker is not installed (or could not be): install it with `apt-get install mosquitto` (.ci/run does)");
    };
    run(&args, &mosquitto)
}

fn run(args: &Args, mosquitto: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = fastrand::Rng::with_seed(9);
    let image: Vec<u8> = (0..args.image_kib * 1024).map(|_| rng.u8(..)).collect();
    let image_path = dir.path().join("image.bin");
    std::fs::write(&image_path, &image)?;

    let (admin, mqtt) = (free_port(), free_port());
    let config = dir.path().join("fwgate.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n")?;
    let fwgate = Proc(
        Command::new(FWGATE)
            .args(["serve", "--config"])
            .arg(&config)
            .env("FWGATE_STORE__DATA_DIR", dir.path().join("data"))
            .env("FWGATE_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
            .env("FWGATE_MQTT__ECHO", "true")
            .env("FWGATE_COAP__ENABLED", "false")
            .env("FWGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("FWGATE_ADMIN__TOKEN", "bench-token")
            .stdout(Stdio::null())
            .spawn()
            .context("starting fwgate serve")?,
    );
    wait_tcp(admin)?;
    wait_tcp(mqtt)?;

    let mosq_port = free_port();
    let mosq_conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &mosq_conf,
        format!(
            "listener {mosq_port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\npersistence false\n"
        ),
    )?;
    let mosq =
        Proc(Command::new(mosquitto).arg("-c").arg(&mosq_conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    wait_tcp(mosq_port)?;
    let mut relay = Proc(
        Command::new(std::env::current_exe()?)
            .arg("--relay")
            .arg(format!("127.0.0.1:{mosq_port}"))
            .arg("--image")
            .arg(&image_path)
            .stdout(Stdio::piped())
            .spawn()?,
    );
    // The relay says "ready" once its subscription is acknowledged.
    let mut line = String::new();
    BufReader::new(relay.0.stdout.take().context("relay stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the relay did not start: {line:?}");
    }

    let common = |prefix: String, port: u16| -> Vec<String> {
        vec![
            "--devices".into(),
            args.devices.to_string(),
            "--mtu".into(),
            args.mtu.to_string(),
            "--prefix".into(),
            prefix,
            "--mqtt".into(),
            format!("127.0.0.1:{port}"),
            "--server".into(),
            format!("http://127.0.0.1:{admin}"),
        ]
    };
    let names = ["fwgate DFU", "echo ceiling (same listener)", "Mosquitto + DFU relay"];
    let servers = [vec![fwgate.0.id()], vec![fwgate.0.id()], vec![mosq.0.id(), relay.0.id()]];
    let mut results: Vec<Vec<Row>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for r in 0..args.rounds {
        let mut dfu = common(format!("dfu{r}-"), mqtt);
        dfu.extend(["--register".into(), "--image".into(), image_path.display().to_string()]);
        let mut echo = common(format!("echo{r}-"), mqtt);
        echo.extend(["--echo".into(), "--image-kib".into(), args.image_kib.to_string()]);
        let mut relayed = common(format!("relay{r}-"), mosq_port);
        relayed.extend(["--expect-image".into(), image_path.display().to_string()]);
        for (i, extra) in [dfu, echo, relayed].iter().enumerate() {
            let cpu = cpu_secs(&servers[i])?;
            let report = load(dir.path(), &format!("{i}-{r}"), extra)?;
            let cpu = cpu_secs(&servers[i])? - cpu;
            results[i].push(Row::of(r + 1, &report, cpu)?);
        }
    }
    println!();
    println!(
        "MQTT, {} devices, {} KiB image, {}-byte blocks, Status at QoS 0, {} round(s)",
        args.devices, args.image_kib, args.mtu, args.rounds
    );
    println!("every round:");
    println!(
        "| round | scenario | blocks | wall time | blocks/s | server CPU / block | round trip p50 / p99 | completion p99 / max | retries |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in 0..args.rounds {
        for (i, rows) in results.iter().enumerate() {
            let row = &rows[r];
            println!(
                "| {} | {} | {} | {:.2} s | {:.0} | {:.1} µs | {:.1} / {:.1} ms | {:.2} / {:.2} s | {} |",
                r + 1,
                names[i],
                row.blocks,
                row.seconds,
                row.rate,
                row.cpu_us_per_block(),
                row.rtt_p50_ms,
                row.rtt_p99_ms,
                row.done_p99_ms / 1000.0,
                row.done_max_ms / 1000.0,
                row.retries
            );
        }
    }
    let median: Vec<&Row> = results.iter().map(|rows| median_round(rows, |r| r.rate)).collect();
    println!();
    println!("median round of each scenario (by blocks/s; every column from that round):");
    println!(
        "| scenario | round | blocks/s | server CPU / block | wall time | round trip p50 / p99 | completion p99 | retries | fwgate DFU / this: throughput, CPU per block |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, row) in median.iter().enumerate() {
        println!(
            "| {} | {} | {:.0} | {:.1} µs | {:.2} s | {:.1} / {:.1} ms | {:.2} s | {} | {:.2}x, {:.2}x |",
            names[i],
            row.round,
            row.rate,
            row.cpu_us_per_block(),
            row.seconds,
            row.rtt_p50_ms,
            row.rtt_p99_ms,
            row.done_p99_ms / 1000.0,
            row.retries,
            median[0].rate / row.rate,
            median[0].cpu_us_per_block() / row.cpu_us_per_block()
        );
    }
    Ok(())
}

/// One scenario's round, every column from one `fwgate load` report.
struct Row {
    round: usize,
    blocks: u64,
    seconds: f64,
    rate: f64,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    done_p99_ms: f64,
    done_max_ms: f64,
    /// Connection attempts and Status messages a device had to repeat: a round with many
    /// is a stall, not a slower broker.
    retries: u64,
    /// CPU seconds the serving processes spent in the round.
    cpu_secs: f64,
}

/// User + system CPU seconds of `pids` so far, from /proc/PID/stat (fields 14 and 15, in
/// clock ticks).
fn cpu_secs(pids: &[u32]) -> Result<f64> {
    let tick = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok());
    let tick = tick.unwrap_or(100.0);
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (utime, stime): (f64, f64) = (f[11].parse()?, f[12].parse()?);
        total += (utime + stime) / tick;
    }
    Ok(total)
}

impl Row {
    fn cpu_us_per_block(&self) -> f64 {
        self.cpu_secs * 1e6 / self.blocks.max(1) as f64
    }

    fn of(round: usize, report: &serde_json::Value, cpu_secs: f64) -> Result<Row> {
        let num = |path: &[&str]| -> Result<f64> {
            let v = path.iter().fold(report, |v, k| &v[*k]);
            v.as_f64().with_context(|| format!("report has no number at {}", path.join(".")))
        };
        let row = Row {
            round,
            blocks: num(&["blocks"])? as u64,
            seconds: num(&["seconds"])?,
            rate: num(&["blocks_per_sec"])?,
            rtt_p50_ms: num(&["block_rtt", "p50_ms"])?,
            rtt_p99_ms: num(&["block_rtt", "p99_ms"])?,
            done_p99_ms: num(&["completion", "p99_ms"])?,
            done_max_ms: num(&["completion", "max_ms"])?,
            retries: num(&["retries"])? as u64,
            cpu_secs,
        };
        // A report whose columns disagree is a broken harness, not a result to print.
        if row.done_max_ms / 1000.0 > row.seconds + 0.001 {
            bail!("a device took {:.3} s in a run of {:.3} s", row.done_max_ms / 1000.0, row.seconds);
        }
        Ok(row)
    }
}

/// A minimal DFU server behind an external broker: fwgate's engine, every device assigned
/// the same image, answering each Status over one MQTT connection.
async fn relay(broker: SocketAddr, image: Vec<u8>) -> Result<()> {
    let expected = Expected::of(&image);
    let sha: [u8; 32] = Sha256::digest(&image).into();
    let target = Target { version: &expected.version, image: &image, sha256: sha };
    let cfg = EngineConfig { max_block: 4096, default_mtu: 512, max_window: 8, sync_poll: 300, wait_poll: 30 };
    let mut opts = MqttOptions::new("dfu-relay", broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 100_000);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    client.subscribe("dfu/+/status", QoS::AtMostOnce).await?;
    let mut states: HashMap<String, OpState> = HashMap::new();
    loop {
        match events.poll().await? {
            Event::Incoming(Packet::SubAck(_)) => println!("ready"),
            Event::Incoming(Packet::Publish(p)) => {
                let Some(id) = parse_status_topic(p.topic.as_bytes()) else { continue };
                let Ok((status, form)) = Status::decode(&p.payload) else { continue };
                let state = states.entry(id.to_owned()).or_insert(OpState::Pending);
                let step = handle_status(&cfg, &status, Some((*state, target)));
                if let Some(t) = step.transition {
                    *state = t;
                }
                for c in step.commands {
                    let mut buf = Vec::with_capacity(c.encoded_len_hint());
                    c.encode(form, &mut buf);
                    client.try_publish(command_topic(id), QoS::AtMostOnce, false, buf)?;
                }
            }
            _ => {}
        }
    }
}
