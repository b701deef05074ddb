//! Waves on a million-device registry, through the same code the admin API calls, with
//! RocksDB in a temp dir: `cargo bench --bench rollout`.
//!
//! Registers 1,000,000 UUID devices (10 groups of 100,000) and prints what that costs; times
//! the selection of `rollout --limit 10000` and of a whole-group rollout of 100,000 devices
//! (dry runs, repeated by criterion); then, in a fresh process that builds the same registry
//! and runs no dry run first (criterion's repeated dry runs leave freed heap behind that
//! staging would reuse, hiding what it costs), stages both for real once — one operation per
//! device, written to RocksDB — and prints the time, the memory per operation and the time
//! of `waves status`. Without `--bench` (as `cargo test` runs it) the registry is 20,000
//! devices, as a smoke test. The devices are test (CI) devices with no CI TUF repository, so
//! any image may reach them: this measures the planner, not TUF.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::Criterion;
use fwgate::config::FirmwareConfig;
use fwgate::firmware::Firmware;
use fwgate::fleet::{DeviceSpec, Fleet};
use fwgate::planner::waves::{InitRequest, LimitArg, RolloutRequest, Waves};
use fwgate::planner::Planner;
use fwgate::store::Store;

/// Counts the Rust heap in use, so memory per staged operation is what staging allocated —
/// not RSS, which the freed heap of building the registry partly absorbs.
#[global_allocator]
static HEAP: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

#[path = "fleet_common.rs"]
mod fleet_common;
use fleet_common::{rss_kib, uuid};

const NOW: u64 = 2_000_000_000;

/// The registry, the planner and a wave over it, as `fwgate serve` holds them.
struct World {
    _dir: tempfile::TempDir,
    waves: Waves,
    devices: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let devices: u64 = if full { 1_000_000 } else { 20_000 };
    if args.iter().any(|a| a == "--stage") {
        return stage(&registry(devices));
    }
    let w = registry(devices);
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    {
        let mut g = c.benchmark_group("waves");
        g.bench_function(format!("select_limit_10000_of_{devices}"), |b| {
            b.iter(|| black_box(w.waves.rollout("w", limited(true), NOW).expect("dry run")).selected)
        });
        g.bench_function(format!("select_whole_group_{}", devices / 10), |b| {
            b.iter(|| black_box(w.waves.rollout("w", group(true), NOW).expect("dry run")).selected)
        });
        g.finish();
    }
    c.final_summary();
    drop(w);
    // Staging for real, in a process of its own.
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"));
    child.arg("--stage");
    if full {
        child.arg("--bench");
    }
    let status = child.status().expect("staging process runs");
    assert!(status.success(), "staging process failed: {status}");
}

fn limited(dry_run: bool) -> RolloutRequest {
    RolloutRequest { limit: Some(LimitArg::Count(10_000)), seed: Some(42), dry_run, ..Default::default() }
}

fn group(dry_run: bool) -> RolloutRequest {
    RolloutRequest { group: Some("region-3".into()), seed: Some(42), dry_run, ..Default::default() }
}

/// Registers `devices` devices with UUID ids, 10 groups, spread last-seen times, and inits
/// wave `w` on their tag; prints what the registry costs.
fn registry(devices: u64) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), false).expect("store");
    let fleet = Arc::new(Fleet::open(store.clone(), devices as usize + 1).expect("fleet"));
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).expect("firmware"));
    let planner = Arc::new(Planner::open(store.clone(), fleet.clone(), firmware.clone(), 3600, NOW).expect("planner"));
    let waves = Waves::open(store, fleet.clone(), firmware.clone(), planner.clone(), 900, NOW).expect("waves");
    firmware.add("app", "2.0", vec![], Bytes::from_static(b"firmware image"), NOW).expect("image");

    let (rss0, t) = (rss_kib(), Instant::now());
    for chunk in (0..devices).collect::<Vec<_>>().chunks(50_000) {
        let specs = chunk
            .iter()
            .map(|&n| DeviceSpec {
                id: uuid(n),
                tag: Some("prod".into()),
                groups: vec![format!("region-{}", n % 10)],
                production: false,
                hardware: None,
                inventory: None,
            })
            .collect();
        fleet.upsert(specs, NOW).expect("register");
    }
    // Recency for the sample: a spread of last-seen times, as a real fleet reports them.
    for n in 0..devices {
        fleet.observe(&uuid(n), "main", "1.0", NOW - (n * 7_919) % (30 * 86_400)).expect("observe");
    }
    fleet.flush_last_seen().expect("flush");
    let registry_bytes = (rss_kib() - rss0) * 1024;
    let index_bytes = fleet.with_index(|x| x.heap_bytes());
    println!(
        "registered {devices} devices in {:.1} s: {:.0} B/device of RSS for the whole registry \
         (records, index, store caches), of which the selection index {:.0} B/device",
        t.elapsed().as_secs_f64(),
        registry_bytes as f64 / devices as f64,
        index_bytes as f64 / devices as f64
    );
    let init = InitRequest {
        name: "w".into(),
        version: "2.0".into(),
        tag: "prod".into(),
        production: false,
        ..Default::default()
    };
    waves.init(init, NOW).expect("init");
    World { _dir: dir, waves, devices }
}

/// Stages `--limit 10000`, then the rest of a whole group, for real; then `waves status`.
fn stage(w: &World) {
    println!("staging in a fresh process ({} devices registered, no dry run before):", w.devices);
    for (what, req) in [("--limit 10000", limited(false)), ("whole group region-3", group(false))] {
        let (rss0, heap0, t) = (rss_kib(), HEAP.allocated(), Instant::now());
        let r = w.waves.rollout("w", req, NOW).expect("rollout");
        let secs = t.elapsed().as_secs_f64();
        let per = |bytes: usize| bytes as f64 / r.staged.max(1) as f64;
        println!(
            "rollout {what}: staged {} devices in {secs:.2} s ({:.1} µs/device); per operation {:.0} B of Rust heap \
             (allocator count, kept after the rollout), {:.0} B of RSS growth (RocksDB's memtable included, \
             less what reused freed heap)",
            r.staged,
            secs * 1e6 / r.staged.max(1) as f64,
            per(HEAP.allocated().saturating_sub(heap0)),
            per(rss_kib().saturating_sub(rss0) as usize * 1024),
        );
        assert!(r.staged > 0);
    }
    let t = Instant::now();
    let s = w.waves.status("w", NOW).expect("status");
    println!(
        "waves status: {} devices on the tag, {} scheduled, {} groups, in {:.0} ms",
        s.total,
        s.scheduled,
        s.groups.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
}
