//! `fwgate load`: registers simulated devices through the admin API when asked, runs them
//! against the gateway (`loadgen::run`), prints a summary and writes the JSON report.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::{Client, Remote};

mod targets;
use crate::loadgen::mqtt::MqttDeviceConfig;
use crate::loadgen::run::{Expected, LoadPlan, Report, Transport};
use crate::protocol::Form;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FormArg {
    Named,
    Packed,
}

#[derive(Args)]
pub struct LoadArgs {
    /// How the devices talk to the gateway.
    #[arg(long, value_enum, default_value = "mqtt")]
    transport: Transport,
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Block size the devices ask for (CoAP Block2: rounded down to a power of two, 16..=1024).
    #[arg(long, default_value_t = 512)]
    mtu: u32,
    /// WRITE blocks per Status (MQTT only).
    #[arg(long)]
    window: Option<u32>,
    /// CBOR form of the DFU messages.
    #[arg(long, value_enum, default_value = "named")]
    form: FormArg,
    /// Devices started per second; 0 starts all at once.
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Stop after this many seconds, finished or not (default: run until every device ends).
    #[arg(long)]
    duration: Option<f64>,
    /// Seed of every random choice (loss, faults, generated image), so a run repeats.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// CoAP: percent of datagrams lost each way.
    #[arg(long = "drop", default_value_t = 0.0)]
    drop_pct: f64,
    /// Disconnect once this percent of the image is written, reconnect and resume.
    #[arg(long)]
    disconnect_at: Option<f64>,
    /// Percent of devices that first send a garbage Status, which must disturb nobody.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Create the devices and assign them an image through the admin API first.
    #[arg(long)]
    register: bool,
    /// With --register: the image to assign (default: --image-kib of seeded random bytes).
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    image_kib: usize,
    /// Device ids are PREFIX00000, PREFIX00001, ...
    #[arg(long, default_value = "load-")]
    prefix: String,
    /// The gateway's MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// The gateway's CoAP listener.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    /// MQTT: put in front of the DFU topics, for a gateway in external mode behind a broker
    /// that namespaces tenants (its mqtt.topic_prefix, e.g. `tenant-a/`).
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// QoS of MQTT Status messages (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Read the gateway's resident memory (from /proc) at named moments: before the first
    /// device connects, once all are connected and idle (with --sync-start; 1 s after the last
    /// connection, before any download starts), the peak while downloading (sampled every
    /// 500 ms), and 1 s after the last device ended.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seconds a device waits for an answer before asking again (3 tries, then it fails).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// MQTT: connect every device first and start all downloads together once the gateway
    /// holds the whole fleet's connections.
    #[arg(long)]
    sync_start: bool,
    /// MQTT: spread devices over this many loopback addresses when --mqtt is 127.0.0.1
    /// (default: one per 20,000 devices), since each address has ~28,000 ephemeral ports.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=254))]
    spread: Option<u8>,
    /// MQTT: the broker's bare round-trip ceiling instead of DFU — as many round trips per
    /// device as the image has blocks, answered by the gateway's `mqtt.echo` (which must be on).
    #[arg(long)]
    echo: bool,
    /// Without --register: the image the devices are expected to end up with, instead of
    /// asking the admin API (for a DFU server other than fwgate; its version must be named
    /// as --register names it, 2.0.0-<first 12 hex digits of its sha256>).
    #[arg(long, conflicts_with = "register")]
    expect_image: Option<PathBuf>,
    /// Multi-target devices (FAS xnames), e.g. `BIOS,BMC,NIC` or `BIOS=1.2.0,BMC`: every
    /// device has these firmware targets, each running the given version (default 1.0.0).
    /// With --register, the run uploads one image per target, registers the devices with a
    /// FAS inventory, and once all have reported starts one live FAS action that updates them
    /// (one transfer per device at a time); the report adds the action's counts.
    #[arg(long, value_delimiter = ',', requires = "register")]
    targets: Vec<String>,
    /// With --targets: a device fails once this many seconds pass without any of its
    /// targets finishing an update.
    #[arg(long, default_value_t = 120.0)]
    patience: f64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    remote: Remote,
}

fn seeded_image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Uploads the image, creates the devices and assigns the image to each; returns what they
/// should end up with.
async fn register(c: &Client, a: &LoadArgs, ids: &[String]) -> Result<Expected> {
    let data = match &a.image {
        Some(p) => tokio::fs::read(p).await.with_context(|| format!("reading {}", p.display()))?,
        None => seeded_image(a.image_kib * 1024, a.seed),
    };
    let Expected { version, sha256: sha, length } = Expected::of(&data);
    let q = [("name", "load"), ("version", version.as_str())];
    c.send(c.http.post(c.url("/api/v1/images")).query(&q).body(data)).await.context("uploading the image")?;
    for chunk in ids.chunks(5000) {
        let specs: Vec<Value> = chunk.iter().map(|id| json!({"id": id})).collect();
        c.send(c.http.post(c.url("/api/v1/devices")).json(&specs)).await.context("registering devices")?;
    }
    let image = format!("load@{version}");
    let mut pending = tokio::task::JoinSet::new();
    for id in ids {
        if pending.len() >= 32 {
            pending.join_next().await.expect("not empty")??;
        }
        let (c, id, image) = (c.clone(), id.clone(), image.clone());
        pending.spawn(async move {
            let req = c.http.put(c.url(&format!("/api/v1/devices/{id}/assignment"))).json(&json!({"image": image}));
            c.send(req).await.with_context(|| format!("assigning {image} to {id}")).map(drop)
        });
    }
    while let Some(r) = pending.join_next().await {
        r??;
    }
    nodes_hold_changes(&c).await?;
    Ok(Expected { version, sha256: sha, length })
}

/// Behind a planner (`cluster.role = "planner"`), waits until every data-plane node holds the
/// changes made so far — the planner has published every changed view and each node's
/// heartbeat, sent after now, names the newest — so no device asks a node that has not heard
/// of its assignment yet. Returns at once for a single node (no nodes listed).
async fn nodes_hold_changes(c: &Client) -> Result<()> {
    let since = crate::now_millis();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = c.send(c.http.get(c.url("/api/v1/nodes"))).await.context("listing data-plane nodes")?;
        let up: Vec<&Value> =
            v.as_array().into_iter().flatten().filter(|n| n["gone"].as_bool() != Some(true)).collect();
        if up.is_empty() {
            return Ok(());
        }
        let holds = |n: &&Value| {
            n["lag_ms"].as_u64() == Some(0)
                && n["planner_backlog"].as_u64() == Some(0)
                && n["at_ms"].as_u64().is_some_and(|at| at >= since)
        };
        if up.iter().all(holds) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("data-plane nodes did not catch up with the planner's changes within 60 s: {v}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// What the first device is assigned, read back from the admin API (without --register the
/// devices must already exist and share one assignment).
async fn assigned(c: &Client, id: &str) -> Result<Expected> {
    let d = c.send(c.http.get(c.url(&format!("/api/v1/devices/{id}")))).await?;
    let Some(image) = d["operations"][0]["image"].as_str() else {
        bail!("{id} has nothing assigned (use --register, or assign an image to the devices first)");
    };
    let (name, version) = image.split_once('@').unwrap_or((image, ""));
    let i = c.send(c.http.get(c.url(&format!("/api/v1/images/{name}/{version}")))).await?;
    Ok(Expected {
        version: version.into(),
        sha256: i["sha256"].as_str().unwrap_or_default().into(),
        length: i["length"].as_u64().unwrap_or(0),
    })
}

fn print_summary(r: &Report) {
    let verdict = if r.failed == 0 && r.unfinished == 0 { "all verified" } else { "NOT all verified" };
    let each = if r.targets.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = r.targets.iter().map(|t| t.name.as_str()).collect();
        format!(" × {} targets ({})", names.len(), names.join(", "))
    };
    println!(
        "{} devices{each} over {:?}: {} ok, {} failed, {} unfinished — {verdict}",
        r.devices, r.transport, r.ok, r.failed, r.unfinished
    );
    println!("{:<28} {}", "blocks", r.blocks);
    println!("{:<28} {:.1} s", "time", r.seconds);
    println!("{:<28} {:.0} blocks/s, {:.2} MB/s", "throughput", r.blocks_per_sec, r.mb_per_sec);
    let p = |x: &crate::loadgen::stats::Percentiles| {
        format!("p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms", x.p50_ms, x.p90_ms, x.p99_ms, x.max_ms)
    };
    println!("{:<28} {}", "round trip per request", p(&r.block_rtt));
    println!("{:<28} {}", "completion per device", p(&r.completion));
    println!(
        "{:<28} {} retries, {} reconnects, {} datagrams dropped, {} garbage Statuses, {} checksum failures",
        "faults", r.retries, r.reconnects, r.drops, r.corrupt_sent, r.checksum_failures
    );
    if let Some(rss) = &r.gateway_rss {
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let per = |k: u64| format!("{:.1} KiB per device over the start", rss.per_device_kib(k, r.devices));
        println!("{:<28} {}", "gateway RSS before connect", mib(rss.before_connect_kib));
        if let Some(k) = rss.connected_idle_kib {
            println!("{:<28} {}, {}", "  all connected, idle", mib(k), per(k));
        }
        println!(
            "{:<28} {}, {}",
            "  peak while downloading",
            mib(rss.peak_downloading_kib),
            per(rss.peak_downloading_kib)
        );
        println!("{:<28} {}", "  after", mib(rss.after_kib));
    }
    if let Some(ready) = &r.ready {
        println!("{:<28} {}", "before downloads", ready.note);
        println!("{:<28} {:.1} s", "  from then to the last end", ready.seconds_after);
    }
    if let Some(a) = &r.action {
        let counts = a["operationCounts"].as_object().cloned().unwrap_or_default();
        let counts: Vec<String> = counts
            .iter()
            .filter(|(k, n)| *k != "total" && n.as_u64() != Some(0))
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("{:<28} {} — {}", "action at the end", a["state"].as_str().unwrap_or("?"), counts.join(", "));
    }
    for e in &r.errors {
        println!("error: {e}");
    }
}

pub async fn load(a: LoadArgs) -> Result<()> {
    if a.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(a.timeout > 0.0 && a.timeout <= 3600.0) {
        bail!("--timeout must be in (0, 3600] seconds");
    }
    if !(0.0..100.0).contains(&a.drop_pct) || !(0.0..=100.0).contains(&a.corrupt) {
        bail!("--drop must be in 0..100 and --corrupt in 0..=100 (percent)");
    }
    if a.disconnect_at.is_some_and(|d| !(0.0..100.0).contains(&d)) {
        bail!("--disconnect-at must be in 0..100 (percent of the image)");
    }
    if a.topic_prefix.contains(['+', '#']) {
        bail!("--topic-prefix may not hold an MQTT wildcard (+ or #)");
    }
    if a.drop_pct > 0.0 && a.transport == Transport::Mqtt {
        bail!("--drop applies to CoAP; MQTT runs over TCP");
    }
    super::raise_fd_limit();
    let ids: Vec<String> = (0..a.devices).map(|i| format!("{}{i:05}", a.prefix)).collect();
    let c = Client::new(&a.remote);
    if a.echo && a.transport != Transport::Mqtt {
        bail!("--echo measures the MQTT broker; use it with --transport mqtt");
    }
    let multi = !a.targets.is_empty();
    if multi {
        if a.transport == Transport::CoapBlock2 || a.echo {
            bail!("--targets needs DFU over --transport mqtt or coap (Block2 and --echo have no firmware targets)");
        }
        if a.disconnect_at.is_some() || a.corrupt > 0.0 || a.image.is_some() {
            bail!("--targets does not combine with --disconnect-at, --corrupt or --image yet");
        }
        if !(a.patience > 0.0 && a.patience <= 86_400.0) {
            bail!("--patience must be in (0, 86400] seconds");
        }
    }
    let action_id = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (targets, ready) = if multi {
        let targets = targets::parse(&a.targets)?;
        let (targets, tag, group) = targets::register(&c, &ids, &targets, a.image_kib * 1024, a.seed).await?;
        eprintln!(
            "registered {} devices with {} targets each, images tagged {tag}, group {group}",
            ids.len(),
            targets.len()
        );
        let ready = targets::start_action(&c, (&tag, &group), &targets, ids.len(), action_id.clone());
        (targets, Some(ready))
    } else {
        (Vec::new(), None)
    };
    let expected = if multi {
        // Each target has its own image; this one is not used.
        Expected { version: String::new(), sha256: String::new(), length: 0 }
    } else if a.echo {
        Expected { version: "echo".into(), sha256: String::new(), length: a.image_kib as u64 * 1024 }
    } else if a.register {
        let e = register(&c, &a, &ids).await?;
        eprintln!("registered {} devices, assigned load@{} ({} bytes)", ids.len(), e.version, e.length);
        e
    } else if let Some(path) = &a.expect_image {
        let data = tokio::fs::read(path).await.with_context(|| format!("reading {}", path.display()))?;
        Expected::of(&data)
    } else {
        assigned(&c, &ids[0]).await?
    };
    let plan = LoadPlan {
        transport: a.transport,
        target: if a.transport == Transport::Mqtt { a.mqtt } else { a.coap },
        devices: ids,
        running: "1.0.0".into(),
        expected,
        mtu: a.mtu,
        window: a.window,
        form: match a.form {
            FormArg::Named => Form::Named,
            FormArg::Packed => Form::Packed,
        },
        connect_rate: a.connect_rate,
        duration: a.duration.map(Duration::from_secs_f64),
        seed: a.seed,
        drop_pct: a.drop_pct,
        disconnect_at_pct: a.disconnect_at,
        corrupt_pct: a.corrupt,
        mqtt: MqttDeviceConfig {
            status_qos: if a.qos == 1 { rumqttc::QoS::AtLeastOnce } else { rumqttc::QoS::AtMostOnce },
            reply_timeout: Duration::from_secs_f64(a.timeout),
            ..MqttDeviceConfig::default()
        },
        topic_prefix: a.topic_prefix.clone(),
        coap_ack_timeout: Duration::from_millis(if a.drop_pct > 0.0 { 200 } else { 2000 }),
        gateway_pid: a.gateway_pid,
        progress: !a.quiet,
        // Multi-target devices report first, and start together once the action exists.
        sync_start: a.sync_start || multi,
        echo: a.echo,
        targets,
        patience: Duration::from_secs_f64(a.patience),
        spread: a.spread.unwrap_or(a.devices.div_ceil(20_000).min(254) as u8),
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut report = crate::loadgen::run::run(plan, command, ready).await;
    if let Some(id) = action_id.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        report.action = Some(targets::settled(&c, &id).await?);
    }
    print_summary(&report);
    if let Some(path) = &a.report {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    // A device that --duration stopped did not verify its update either.
    if report.failed > 0 || report.unfinished > 0 {
        bail!(
            "{} of {} devices did not verify their update ({} failed, {} unfinished)",
            report.failed + report.unfinished,
            report.devices,
            report.failed,
            report.unfinished
        );
    }
    Ok(())
}
