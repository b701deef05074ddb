//! Rollout selection over a million-device fleet index: `cargo bench --bench select`.
//!
//! Prints the index's heap bytes per device, then times a `--limit 10000` sample and a
//! whole-group rollout of 100,000 devices.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fwgate::fleet::select::{DeviceFacts, FleetIndex, Limit, Selection};

#[path = "fleet_common.rs"]
mod fleet_common;
use fleet_common::{rss_kib, uuid};

const DEVICES: u64 = 1_000_000;
const NOW: u64 = 2_000_000_000;

fn fleet() -> FleetIndex {
    let mut x = FleetIndex::default();
    let groups: Vec<Vec<String>> = (0..10).map(|g| vec![format!("region-{g}")]).collect();
    for n in 0..DEVICES {
        let id = uuid(n);
        let seen = NOW - (n * 7_919) % (30 * 86_400);
        let facts = DeviceFacts {
            id: &id,
            tag: Some("prod"),
            groups: &groups[(n % 10) as usize],
            production: true,
            last_seen: Some(seen),
            version: Some("1.0.0"),
        };
        x.upsert(facts).expect("index accepts the device");
    }
    x
}

fn select(c: &mut Criterion) {
    let before = rss_kib();
    let x = fleet();
    let grown = rss_kib().saturating_sub(before) * 1024;
    println!(
        "fleet index: {} devices, {:.0} heap bytes per device counted, {:.0} bytes per device of RSS growth \
         (UUID ids of 36 bytes included)",
        x.len(),
        x.heap_bytes() as f64 / x.len() as f64,
        grown as f64 / x.len() as f64
    );
    let staged: Vec<bool> = (0..x.len()).map(|i| i % 50 == 0).collect();
    let mut g = c.benchmark_group("select");
    g.sample_size(20);
    let limited = Selection {
        tag: "prod",
        production: true,
        group: None,
        uuids: None,
        limit: Some(Limit::Count(10_000)),
        seed: 42,
        now: NOW,
    };
    g.bench_function("limit_10000_of_1000000", |b| {
        b.iter(|| black_box(x.select(&limited, |i| staged[i as usize])).devices.len())
    });
    let group = Selection { group: Some("region-3"), limit: None, ..limited };
    g.bench_function("whole_group_100000", |b| {
        b.iter(|| black_box(x.select(&group, |i| staged[i as usize])).devices.len())
    });
    g.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
