//! hawkBit-style rollouts on a million-device registry, through the code the admin API calls,
//! with RocksDB in a temp dir: `cargo bench --bench hawkbit_rollouts`.
//!
//! 1. Creating a rollout over every device (filter `tag==prod`) split into 100 groups: the
//!    filter over the registry, the admission check, the split, and the write of the rollout
//!    and its groups — five times, each deleted after.
//! 2. One outcome event: a device's operation ended, counted into its group and the group's
//!    conditions evaluated (the error condition, then the success one), as the rollouts'
//!    worker does for each outcome the planner reports; 9,999 of them, one at a time, to a
//!    group of 10,000 with a 100% success threshold, so none of them starts the next group.
//! 3. The latency from the outcome that meets a group's success condition to the first
//!    operation of the next group, through the gateway's path: the planner records the
//!    device's success (written to RocksDB), tells the rollouts' worker thread, which evaluates,
//!    writes the rollout record and queues the next group; measured until that first operation
//!    is visible in the planner, for each of 9 group changes.
//!
//! Without `--bench` (as `cargo test` runs it) the registry is 20,000 devices, as a smoke test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fwgate::config::FirmwareConfig;
use fwgate::engine::OpState;
use fwgate::firmware::Firmware;
use fwgate::fleet::{DeviceSpec, Fleet, MAIN_COMPONENT};
use fwgate::planner::rollouts::{Action, CreateRequest, Rollouts};
use fwgate::planner::{Ended, Planner};
use fwgate::store::Store;

#[path = "fleet_common.rs"]
mod fleet_common;
use fleet_common::{rss_kib, uuid};

const NOW: u64 = 2_000_000_000;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let devices: u64 = if full { 1_000_000 } else { 20_000 };
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), false).expect("store");
    let fleet = Arc::new(Fleet::open(store.clone(), devices as usize + 20_000).expect("fleet"));
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).expect("firmware"));
    let planner = Arc::new(Planner::open(store.clone(), fleet.clone(), firmware.clone(), 3600, NOW).expect("planner"));
    firmware.add("app", "2.0", vec![], Bytes::from_static(b"firmware image"), NOW).expect("image");
    let rollouts =
        Arc::new(Rollouts::open(store, fleet.clone(), firmware, planner.clone(), false, NOW).expect("rollouts"));
    let t = Instant::now();
    register(&fleet, 0..devices, "prod");
    register(&fleet, devices..devices + 10_000, "lat");
    println!("registered {} devices in {:.1} s", devices + 10_000, t.elapsed().as_secs_f64());

    // 1. Creation.
    let mut secs = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let r = rollouts.create(request(&format!("c{i}"), "tag==prod", 100), NOW).expect("create");
        secs.push(t.elapsed().as_secs_f64());
        assert_eq!((r.total(), r.groups.len()), (devices, 100));
        rollouts.act(&r.name, Action::Delete, None, NOW).expect("delete");
    }
    let shown: Vec<String> = secs.iter().map(|s| format!("{s:.2}")).collect();
    secs.sort_by(f64::total_cmp);
    println!(
        "create over {devices} devices in 100 groups: median {:.2} s (runs: {} s)",
        secs[secs.len() / 2],
        shown.join(", ")
    );

    // 2. One outcome event (and what a kept rollout over every device costs in memory).
    let rss0 = rss_kib();
    rollouts.create(request("o", "tag==prod", 100), NOW).expect("create");
    println!(
        "a rollout over {devices} devices held in memory: {:.0} B/device of RSS growth (ids in groups)",
        rss_kib().saturating_sub(rss0) as f64 * 1024.0 / devices as f64
    );
    rollouts.act("o", Action::Start, None, NOW).expect("start");
    let group: Vec<String> = (0..devices / 100).map(uuid).collect();
    let events: Vec<Ended> = group[..group.len() - 1]
        .iter()
        .map(|d| Ended { device: d.clone(), origin: "rollout:o/1".into(), seq: 0, state: OpState::Succeeded })
        .collect();
    let t = Instant::now();
    for e in &events {
        rollouts.handle_outcomes(std::slice::from_ref(e), NOW).expect("outcome");
    }
    let per = t.elapsed().as_secs_f64() * 1e9 / events.len() as f64;
    let st = rollouts.status("o").expect("status");
    assert_eq!((st.groups[0].counts.succeeded, st.groups[1].state.as_str()), (events.len() as u64, "scheduled"));
    println!(
        "one outcome event (counted, conditions evaluated, group of {} still running): {per:.0} ns each over {} events",
        group.len(),
        events.len()
    );

    // 3. Latency to the next group's first operation, through the worker thread.
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = rollouts.spawn(stop.clone());
    rollouts.create(request("l", "tag==lat", 10), NOW).expect("create");
    rollouts.act("l", Action::Start, None, NOW).expect("start");
    let lat: Vec<String> = (devices..devices + 10_000).map(uuid).collect();
    let mut sorted = lat.clone();
    sorted.sort();
    let groups: Vec<&[String]> = sorted.chunks(1000).collect();
    let mut samples = Vec::new();
    let mut whole = Vec::new();
    let mut handled = rollouts.outcomes();
    for g in 0..9 {
        let (last, rest) = groups[g].split_last().expect("a group of 1000");
        for d in rest {
            succeed(&planner, d);
        }
        handled += rest.len() as u64;
        wait(|| rollouts.outcomes() >= handled, "the group's other outcomes handled");
        handled += 1;
        let (first, end) = (&groups[g + 1][0], &groups[g + 1][999]);
        assert!(planner.operation(first, MAIN_COMPONENT).is_none(), "group {} has not started", g + 2);
        let t = Instant::now();
        succeed(&planner, last);
        wait(|| planner.operation(first, MAIN_COMPONENT).is_some(), "the next group's first operation");
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        // The worker queues the rest of the group before the next round records outcomes.
        wait(|| planner.operation(end, MAIN_COMPONENT).is_some(), "the next group's last operation");
        whole.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop.cancel();
    worker.join().expect("worker");
    let shown: Vec<String> = samples.iter().map(|s| format!("{s:.2}")).collect();
    samples.sort_by(f64::total_cmp);
    println!(
        "success condition met → first operation of the next group: median {:.2} ms, max {:.2} ms ({} ms)",
        samples[samples.len() / 2],
        samples[samples.len() - 1],
        shown.join(", ")
    );
    whole.sort_by(f64::total_cmp);
    println!(
        "success condition met → all 1,000 operations of the next group queued: median {:.2} ms, max {:.2} ms",
        whole[whole.len() / 2],
        whole[whole.len() - 1]
    );
}

fn register(fleet: &Fleet, range: std::ops::Range<u64>, tag: &str) {
    for chunk in range.collect::<Vec<_>>().chunks(50_000) {
        let specs =
            chunk.iter().map(|&n| DeviceSpec { id: uuid(n), tag: Some(tag.into()), ..Default::default() }).collect();
        fleet.upsert(specs, NOW).expect("register");
    }
}

fn request(name: &str, filter: &str, groups: usize) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        filter: filter.into(),
        image: "app@2.0".into(),
        groups: Some(groups),
        success: Some(100),
        ..Default::default()
    }
}

/// The device's operation succeeds, as the DFU engine records it.
fn succeed(planner: &Planner, device: &str) {
    let op = planner.operation(device, MAIN_COMPONENT).expect("an operation");
    planner.record(device, op.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, NOW).expect("record");
    planner.record(device, op.seq, OpState::Downloading, Some(OpState::Succeeded), None, None, NOW).expect("record");
}

/// Spins until `done` (at most 10 s).
fn wait(done: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::hint::spin_loop();
    }
}
