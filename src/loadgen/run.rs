//! One load run: N simulated devices started at a given rate against a running gateway, each
//! downloading its image over the chosen transport and verifying it, with faults injected
//! as asked; a live progress bar, and a [`Report`] at the end.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::coap::{ClientConfig, ClientError, CoapClient};
use super::device::{DeviceError, DfuDevice, Ended};
use super::mqtt::{MqttDevice, MqttDeviceConfig, MqttError};
use super::stats::{Percentiles, Stats};
use super::targets::TargetPlan;
use crate::protocol::Form;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// DFU over MQTT (Status on dfu/{id}/status, Commands on dfu/{id}/command).
    Mqtt,
    /// DFU over CoAP: POST /dfu/{id}.
    Coap,
    /// Block2 download over CoAP: GET /fw/{id}, then a Status to report the new version.
    CoapBlock2,
}

/// The image every device should end up with.
#[derive(Debug, Clone, Serialize)]
pub struct Expected {
    pub version: String,
    pub sha256: String,
    pub length: u64,
}

impl Expected {
    /// An image as load runs name it: the version names the bytes (`2.0.0-` and the first 12
    /// hex digits of the sha256), so a rerun with other bytes never collides with an earlier one.
    pub fn of(data: &[u8]) -> Expected {
        let sha = hex::encode(Sha256::digest(data));
        Expected { version: format!("2.0.0-{}", &sha[..12]), sha256: sha, length: data.len() as u64 }
    }
}

/// What to run: built by `fwgate load` from its arguments (after `--register`).
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub transport: Transport,
    /// MQTT broker or CoAP endpoint.
    pub target: SocketAddr,
    pub devices: Vec<String>,
    /// The version devices run before the update.
    pub running: String,
    pub expected: Expected,
    pub mtu: u32,
    pub window: Option<u32>,
    pub form: Form,
    /// Devices started per second (0: all at once).
    pub connect_rate: f64,
    /// Stop after this long, finished or not; `None` runs to completion.
    pub duration: Option<Duration>,
    pub seed: u64,
    /// CoAP: share of datagrams lost each way, in percent.
    pub drop_pct: f64,
    /// Disconnect once this share of the image is written, then reconnect and resume.
    pub disconnect_at_pct: Option<f64>,
    /// Share of Status messages preceded by a garbage one, in percent.
    pub corrupt_pct: f64,
    pub mqtt: MqttDeviceConfig,
    /// MQTT: put in front of the DFU topics (a broker that namespaces tenants).
    pub topic_prefix: String,
    pub coap_ack_timeout: Duration,
    pub gateway_pid: Option<u32>,
    pub progress: bool,
    /// MQTT: every device connects first; downloads start once all are connected, so the
    /// gateway holds the whole fleet's connections at once.
    pub sync_start: bool,
    /// MQTT: spread devices over this many loopback addresses (127.0.0.1, .2, …) when the
    /// target is 127.0.0.1, so each address has its own ~28,000 ephemeral ports. The gateway
    /// must listen on all of them (0.0.0.0, the default).
    pub spread: u8,
    /// MQTT: the echo benchmark instead of DFU — each device makes as many round trips as the
    /// image has blocks, each answered with `mtu` bytes by the gateway's `mqtt.echo`.
    pub echo: bool,
    /// Multi-target devices: each device has these firmware targets, asked in turn over one
    /// connection (empty: one image on `main`, checked against `expected`).
    pub targets: Vec<TargetPlan>,
    /// Multi-target: a device fails once this long passes without any of its targets
    /// finishing an update.
    pub patience: Duration,
}

/// Run once every device has connected (and, with targets, reported what each runs), before
/// downloads start: `fwgate load` starts the FAS action there. Its note goes into the report;
/// an error ends the run.
pub type Ready = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send>;

/// What the [`Ready`] step said, and how long the run took from it to the last device's end.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyReport {
    pub note: String,
    pub seconds_after: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub transport: Transport,
    pub devices: usize,
    pub ok: u64,
    pub failed: u64,
    /// Devices still running when `--duration` ended the run.
    pub unfinished: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub blocks_per_sec: f64,
    pub mb_per_sec: f64,
    pub block_rtt: Percentiles,
    pub completion: Percentiles,
    pub retries: u64,
    pub reconnects: u64,
    pub drops: u64,
    pub checksum_failures: u64,
    pub corrupt_sent: u64,
    /// The first few failures, each with its device.
    pub errors: Vec<String>,
    /// The gateway's resident set at named moments of the run (with `--gateway-pid`).
    pub gateway_rss: Option<RssMoments>,
    pub expected: Expected,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyReport>,
    /// Multi-target: the action's state and operation counts at the end (filled by `fwgate load`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<serde_json::Value>,
    pub command: String,
}

/// The gateway's RSS, in KiB, at the moments of a run that size its memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RssMoments {
    /// Before the first device connects.
    pub before_connect_kib: u64,
    /// With `sync_start`: every device connected, none downloading yet, after a
    /// [`SETTLE`] pause.
    pub connected_idle_kib: Option<u64>,
    /// The largest sample (every 500 ms) from the first download to the last device's end.
    pub peak_downloading_kib: u64,
    /// [`SETTLE`] after the last device ended (and disconnected).
    pub after_kib: u64,
}

impl RssMoments {
    /// What a moment holds beyond the start, per device.
    pub fn per_device_kib(&self, kib: u64, devices: usize) -> f64 {
        kib.saturating_sub(self.before_connect_kib) as f64 / devices.max(1) as f64
    }
}

/// Pause before the "connected, idle" and "after" samples, so the gateway has taken in the
/// last connection or closed the last socket.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Failures kept verbatim in the report; the rest are only counted.
const MAX_ERRORS: usize = 20;

/// Garbage a broken device might send as a Status: each must be refused without an answer
/// (MQTT) or with 4.00 (CoAP), and change nothing.
const GARBAGE: [&[u8]; 4] = [b"\xff", b"\xa1\x67version\x01", b"not cbor at all", b"\xbf\x61\x61"];

/// Resident set size of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(super) struct Shared {
    pub(super) plan: LoadPlan,
    pub(super) stats: Stats,
    errors: std::sync::Mutex<Vec<String>>,
    /// With `sync_start`: devices that tried to connect (connected or not)...
    arrived: std::sync::atomic::AtomicUsize,
    /// ...and the signal that lets them start downloading, once all have.
    go: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// With `sync_start`, a device that tried to connect waits here for the whole fleet.
    pub(super) async fn wait_for_fleet(&self) {
        if !self.plan.sync_start {
            return;
        }
        self.arrived.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut go = self.go.subscribe();
        let _ = go.wait_for(|&go| go).await;
    }

    fn error(&self, device: &str, e: impl std::fmt::Display) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < MAX_ERRORS {
            errors.push(format!("{device}: {e}"));
        }
    }
}

pub async fn run(plan: LoadPlan, command: String, mut ready: Option<Ready>) -> Report {
    let n = plan.devices.len();
    let shared = Arc::new(Shared {
        plan,
        stats: Stats::default(),
        errors: Default::default(),
        arrived: Default::default(),
        go: tokio::sync::watch::channel(false).0,
    });
    let pid = shared.plan.gateway_pid;
    let before_connect = pid.and_then(rss_kib);
    let mut connected_idle = None;
    let mut released = !shared.plan.sync_start;
    let mut ready_note: Option<(String, Instant)> = None;
    let bar = if shared.plan.progress { ProgressBar::new(n as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} devices  {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let deadline = shared.plan.duration.map(|d| started + d);
    let mut tasks = JoinSet::new();
    let gap = (shared.plan.connect_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / shared.plan.connect_rate));
    let mut peak = None;
    let mut last_tick = Instant::now();
    let mut last_blocks = 0;
    let mut next = 0;
    let mut done = 0;
    loop {
        // Start devices at the configured rate.
        while next < n && gap.is_none_or(|g| started + g.mul_f64(next as f64) <= Instant::now()) {
            let s = shared.clone();
            let i = next;
            tasks.spawn(async move { device(&s, i).await });
            next += 1;
        }
        if done == n || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if !released && shared.arrived.load(std::sync::atomic::Ordering::Relaxed) == n {
            if let Some(pid) = pid {
                tokio::time::sleep(SETTLE).await;
                connected_idle = rss_kib(pid);
            }
            if let Some(step) = ready.take() {
                match step().await {
                    Ok(note) => {
                        bar.println(&note);
                        ready_note = Some((note, Instant::now()));
                    }
                    Err(e) => {
                        shared.error("run", e);
                        break;
                    }
                }
            }
            released = true;
            shared.go.send_replace(true);
        }
        let wake = gap.map_or(Duration::from_millis(200), |g| g.min(Duration::from_millis(200)));
        tokio::select! {
            r = tasks.join_next(), if !tasks.is_empty() => {
                if r.is_some() {
                    done += 1;
                    bar.inc(1);
                }
            }
            _ = tokio::time::sleep(wake) => {}
        }
        if last_tick.elapsed() >= Duration::from_millis(500) {
            if let Some(pid) = pid.filter(|_| released) {
                peak = peak.max(rss_kib(pid));
            }
            let blocks = Stats::get(&shared.stats.blocks);
            let rate = (blocks - last_blocks) as f64 / last_tick.elapsed().as_secs_f64();
            bar.set_message(format!("{rate:.0} blocks/s  {} failed", Stats::get(&shared.stats.failed)));
            (last_blocks, last_tick) = (blocks, Instant::now());
        }
    }
    let end = Instant::now();
    let seconds = (end - started).as_secs_f64();
    if let Some(pid) = pid {
        peak = peak.max(rss_kib(pid));
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    let gateway_rss = match (pid, before_connect) {
        (Some(pid), Some(before_connect_kib)) => {
            tokio::time::sleep(SETTLE).await;
            let after_kib = rss_kib(pid).unwrap_or(0);
            Some(RssMoments {
                before_connect_kib,
                connected_idle_kib: connected_idle,
                peak_downloading_kib: peak.unwrap_or(0),
                after_kib,
            })
        }
        _ => None,
    };
    let st = &shared.stats;
    let (ok, failed) = (Stats::get(&st.ok), Stats::get(&st.failed));
    let (blocks, bytes) = (Stats::get(&st.blocks), Stats::get(&st.bytes));
    Report {
        transport: shared.plan.transport,
        devices: n,
        ok,
        failed,
        unfinished: n as u64 - ok - failed,
        blocks,
        bytes,
        seconds,
        blocks_per_sec: blocks as f64 / seconds,
        mb_per_sec: bytes as f64 / seconds / 1e6,
        block_rtt: st.rtt_percentiles(),
        completion: st.completion_percentiles(),
        retries: Stats::get(&st.retries),
        reconnects: Stats::get(&st.reconnects),
        drops: Stats::get(&st.drops),
        checksum_failures: Stats::get(&st.checksum_failures),
        corrupt_sent: Stats::get(&st.corrupt_sent),
        errors: shared.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        gateway_rss,
        expected: shared.plan.expected.clone(),
        targets: shared.plan.targets.clone(),
        ready: ready_note.map(|(note, at)| ReadyReport { note, seconds_after: (end - at).as_secs_f64() }),
        action: None,
        command,
    }
}

/// One simulated device, start to finish; the outcome goes into the shared stats.
async fn device(s: &Shared, i: usize) {
    let p = &s.plan;
    let id = p.devices[i].clone();
    let started = Instant::now();
    let result = match p.transport {
        // Nothing to verify but that every round trip was answered.
        Transport::Mqtt if p.echo => echo_device(s, i).await.map(|()| None),
        // Each target verified against its own image.
        _ if !p.targets.is_empty() => super::targets::device(s, i).await.map(|()| None),
        Transport::Mqtt => mqtt_device(s, i).await.map(Some),
        Transport::Coap => coap_device(s, i).await.map(Some),
        Transport::CoapBlock2 => block2_device(s, i).await.map(Some),
    };
    let ok = match result {
        Ok(None) => true,
        Ok(Some(digest)) if hex::encode(digest) == p.expected.sha256 => true,
        Ok(Some(digest)) => {
            Stats::add(&s.stats.checksum_failures, 1);
            s.error(&id, format!("ended on an image with sha256 {}", hex::encode(digest)));
            false
        }
        Err(e) => {
            if e.checksum {
                Stats::add(&s.stats.checksum_failures, 1);
            }
            s.error(&id, e.message);
            false
        }
    };
    s.stats.finished(ok, started.elapsed());
}

pub(super) fn new_device(p: &LoadPlan, i: usize) -> DfuDevice {
    let mut d = DfuDevice::new(&p.devices[i], p.form, &p.running);
    d.mtu = p.mtu;
    d.window = p.window;
    d.keep_images = false;
    d
}

fn pause_point(p: &LoadPlan) -> Option<u32> {
    p.disconnect_at_pct.map(|pct| (p.expected.length as f64 * pct / 100.0) as u32)
}

/// Why a simulated device did not verify its update.
pub(super) struct Failure {
    pub(super) message: String,
    /// The image it assembled did not match the checksum it was given.
    pub(super) checksum: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { message, checksum: false }
    }
}

impl From<MqttError> for Failure {
    fn from(e: MqttError) -> Failure {
        let checksum = matches!(e, MqttError::Device(DeviceError::Checksum { .. }));
        Failure { message: e.to_string(), checksum }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let checksum = matches!(e, ClientError::Device(DeviceError::Checksum { .. }));
        Failure { message: e.to_string(), checksum }
    }
}

/// The device's image after an update it verified, or why it has none.
fn updated(d: &DfuDevice, ended: Ended, want: &str) -> Result<[u8; 32], Failure> {
    match d.last_sha256 {
        Some(sha) if ended == Ended::Updated && d.running == want => Ok(sha),
        _ => Err(format!("ended {ended:?} on version {}", d.running).into()),
    }
}

async fn mqtt_device(s: &Shared, i: usize) -> Result<[u8; 32], Failure> {
    let p = &s.plan;
    let mut rng = fastrand::Rng::with_seed(p.seed ^ i as u64);
    let connected = connect(s, i, new_device(p, i)).await;
    s.wait_for_fleet().await;
    let mut dev = connected?;
    if p.corrupt_pct > 0.0 && rng.f64() * 100.0 < p.corrupt_pct {
        dev.publish_raw(GARBAGE[rng.usize(..GARBAGE.len())].to_vec()).await?;
        Stats::add(&s.stats.corrupt_sent, 1);
    }
    let mut pause_at = pause_point(p);
    let mut lost = 0;
    let ended = loop {
        let lost_connection = match dev.run(pause_at, &s.stats).await {
            // Stopped on purpose (--disconnect-at): close the connection and come back once.
            Ok(Ended::Paused(_)) => {
                pause_at = None;
                false
            }
            Ok(end) => break end,
            // The broker dropped the connection (it restarted, say): come back and go on
            // from where the device is, as a real device does.
            Err(MqttError::Lost(_)) if lost < MAX_LOST => {
                lost += 1;
                true
            }
            Err(e) => return Err(e.into()),
        };
        let state = dev.dev.clone();
        Stats::add(&s.stats.reconnects, 1);
        // A dead connection is dropped, not closed: closing it would poll its event loop,
        // which connects again under the same client id first.
        if !lost_connection {
            dev.disconnect().await;
        }
        dev = connect(s, i, state).await?;
    };
    let out = updated(&dev, ended, &p.expected.version);
    dev.disconnect().await;
    out
}

async fn echo_device(s: &Shared, i: usize) -> Result<(), Failure> {
    let p = &s.plan;
    let dev = new_device(p, i);
    let connected = MqttDevice::connect_echo(mqtt_target(p, i), dev, p.mqtt).await;
    s.wait_for_fleet().await;
    let mut dev = connected?;
    let rounds = p.expected.length.div_ceil(p.mtu.max(1) as u64) as u32;
    let size = p.mtu.min(u16::MAX as u32) as u16;
    let out = dev.echo(rounds, size, &s.stats).await;
    dev.disconnect().await;
    Ok(out?)
}

/// Where MQTT device `i` connects: the target, or with `spread` one of several loopback
/// addresses in turn.
fn mqtt_target(p: &LoadPlan, i: usize) -> SocketAddr {
    match p.target {
        SocketAddr::V4(a) if p.spread > 1 && a.ip().octets() == [127, 0, 0, 1] => {
            SocketAddr::from(([127, 0, 0, 1 + (i % p.spread as usize) as u8], a.port()))
        }
        t => t,
    }
}

/// Connects as a device does: a refused or timed-out attempt is retried after a growing
/// pause, up to [`CONNECT_ATTEMPTS`] times.
pub(super) async fn connect(s: &Shared, i: usize, dev: DfuDevice) -> Result<MqttDevice, Failure> {
    let target = mqtt_target(&s.plan, i);
    let mut pause = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match MqttDevice::connect_prefixed(target, dev.clone(), None, s.plan.mqtt, &s.plan.topic_prefix).await {
            Ok(d) => return Ok(d),
            Err(e) if attempt >= CONNECT_ATTEMPTS => return Err(format!("{e} (after {attempt} attempts)").into()),
            Err(_) => {
                s.stats.retry();
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
        }
    }
}

const CONNECT_ATTEMPTS: u32 = 5;

/// Connections an MQTT device may lose during one run and still go on.
pub(super) const MAX_LOST: u32 = 3;

pub(super) fn coap_config(p: &LoadPlan, i: usize, attempt: u64) -> ClientConfig {
    ClientConfig {
        ack_timeout: p.coap_ack_timeout,
        max_retransmit: if p.drop_pct > 0.0 { 8 } else { 4 },
        loss: p.drop_pct / 100.0,
        seed: p.seed.wrapping_mul(1_000_003) ^ ((i as u64) << 8) ^ attempt,
    }
}

pub(super) fn tally(s: &Shared, c: &CoapClient) {
    Stats::add(&s.stats.retries, c.stats.retransmissions);
    Stats::add(&s.stats.drops, c.stats.lost_in + c.stats.lost_out);
}

async fn coap_device(s: &Shared, i: usize) -> Result<[u8; 32], Failure> {
    let p = &s.plan;
    let mut rng = fastrand::Rng::with_seed(p.seed ^ i as u64);
    let mut dev = new_device(p, i);
    let mut c = CoapClient::connect(p.target, coap_config(p, i, 0)).await?;
    if p.corrupt_pct > 0.0 && rng.f64() * 100.0 < p.corrupt_pct {
        // Refused with 4.00; anything else would be a gateway bug.
        match c.post_status(&dev.id, GARBAGE[rng.usize(..GARBAGE.len())]).await {
            Err(ClientError::Status(code)) if code == "4.00" => {}
            other => return Err(format!("a garbage Status got {other:?}, not 4.00").into()),
        }
        Stats::add(&s.stats.corrupt_sent, 1);
    }
    let first = c.run_dfu(&mut dev, pause_point(p), &s.stats).await;
    tally(s, &c);
    let mut ended = first?;
    if let Ended::Paused(_) = ended {
        // Back from another port, as after a NAT rebinding or a reboot.
        Stats::add(&s.stats.reconnects, 1);
        c = CoapClient::connect(p.target, coap_config(p, i, 1)).await?;
        let second = c.run_dfu(&mut dev, None, &s.stats).await;
        tally(s, &c);
        ended = second?;
    }
    updated(&dev, ended, &p.expected.version)
}

async fn block2_device(s: &Shared, i: usize) -> Result<[u8; 32], Failure> {
    let p = &s.plan;
    let id = &p.devices[i];
    let path = format!("/fw/{id}");
    let szx = p.mtu.clamp(16, 1024).ilog2() - 4;
    let mut c = CoapClient::connect(p.target, coap_config(p, i, 0)).await?;
    let until = pause_point(p).map(u64::from);
    let first = c.download(&path, szx, 0, until, &s.stats).await;
    tally(s, &c);
    let mut body = first?;
    if (body.len() as u64) < p.expected.length {
        Stats::add(&s.stats.reconnects, 1);
        c = CoapClient::connect(p.target, coap_config(p, i, 1)).await?;
        let rest = c.download(&path, szx, body.len(), None, &s.stats).await;
        tally(s, &c);
        body.extend_from_slice(&rest?);
    }
    let digest: [u8; 32] = Sha256::digest(&body).into();
    if hex::encode(digest) != p.expected.sha256 {
        let message = format!("downloaded {} bytes with sha256 {}, not the image's", body.len(), hex::encode(digest));
        return Err(Failure { message, checksum: true });
    }
    // Installed: report the new version, as a device does after its reboot.
    let mut dev = new_device(p, i);
    dev.running = p.expected.version.clone();
    dev.last_sha256 = Some(digest);
    let ended = c.run_dfu(&mut dev, None, &s.stats).await?;
    updated(&dev, ended, &p.expected.version)
}
