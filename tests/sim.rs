//! The planner's deterministic simulator (`fwgate::sim`) over a fixed set of seeds: real
//! RocksDB in a temp dir, real plans and DFU step, a simulated clock, crashes between writes.
//! A failure prints its seed, step, invariant and the events before it; `fwgate sim --seed N
//! --seeds 1 --verbose` replays it.

use fwgate::sim::{run, SimConfig};

/// The seeds CI runs (about a minute on these machines); `fwgate sim` runs any number.
const SEEDS: std::ops::Range<u64> = 1..25;

#[test]
fn no_invariant_breaks_over_the_fixed_seeds() {
    let mut failed = Vec::new();
    let (mut steps, mut crashes, mut checks) = (0, 0, 0);
    for seed in SEEDS {
        let r = run(&SimConfig { seed, steps: 1_500, ..SimConfig::default() });
        steps += r.steps;
        crashes += r.crashes;
        checks += r.checks;
        if let Some(f) = r.failure {
            failed.push(format!("seed {seed}: {f}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Each run did what it says: steps, crashes and checks happened.
    assert_eq!(steps, 1_500 * (SEEDS.end - SEEDS.start));
    assert!(crashes > 0 && checks > steps, "{crashes} crashes, {checks} checks");
}

/// The same on the file system: RocksDB's own files in a temp dir, reopened after each crash.
#[test]
fn no_invariant_breaks_with_the_store_on_disk() {
    for seed in [101, 102] {
        let r = run(&SimConfig { seed, steps: 1_000, on_disk: true, ..SimConfig::default() });
        assert!(r.crashes > 0, "seed {seed}: no crash");
        if let Some(f) = r.failure {
            panic!("seed {seed}: {f}");
        }
    }
}

/// Cluster mode: two data-plane nodes serve the devices from the planner's views over a
/// network that delays, repeats, reorders and loses, nodes restart and reconnect.
#[test]
fn no_invariant_breaks_in_cluster_mode() {
    let mut failed = Vec::new();
    let (mut steps, mut crashes, mut statuses) = (0, 0, 0);
    for seed in 1..13 {
        let r = run(&SimConfig { seed, steps: 1_500, cluster: true, ..SimConfig::default() });
        steps += r.steps;
        crashes += r.crashes;
        statuses += r.statuses;
        if let Some(f) = r.failure {
            failed.push(format!("seed {seed}: {f}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!(steps, 1_500 * 12);
    assert!(crashes > 0 && statuses > 0, "{crashes} crashes, {statuses} Statuses");
}

#[test]
fn a_cluster_seed_replays_exactly() {
    let cfg = SimConfig { seed: 5, steps: 800, cluster: true, ..SimConfig::default() };
    let (a, b) = (run(&cfg), run(&cfg));
    assert!(a.failure.is_none(), "{}", a.failure.unwrap());
    assert_eq!(
        (a.steps, a.crashes, a.checks, a.statuses, a.stale_serves),
        (b.steps, b.crashes, b.checks, b.statuses, b.stale_serves)
    );
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = SimConfig { seed: 7, steps: 800, ..SimConfig::default() };
    let (a, b) = (run(&cfg), run(&cfg));
    assert!(a.failure.is_none(), "{}", a.failure.unwrap());
    assert_eq!((a.steps, a.crashes, a.checks, a.statuses), (b.steps, b.crashes, b.checks, b.statuses));
    let other = run(&SimConfig { seed: 8, ..cfg });
    assert_ne!((a.crashes, a.statuses), (other.crashes, other.statuses), "another seed is another run");
}
