//! `fwgate sim`: runs the planner's simulator (`crate::sim`) over many seeds for a while and
//! prints what it did; a broken invariant prints its seed and step, and exits non-zero.

use anyhow::{bail, Result};
use clap::Args;

use crate::sim::{soak, SimConfig};

#[derive(Args)]
pub struct SimArgs {
    /// The first seed; each run takes the next.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many seeds at most.
    #[arg(long, default_value_t = u64::MAX)]
    seeds: u64,
    /// Stop starting new seeds after this many seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Simulated steps per seed (then the fleet quiesces).
    #[arg(long, default_value_t = 2_000)]
    steps: u64,
    /// Devices at the start of each run.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// A crash is armed in one of this many steps, on average.
    #[arg(long, default_value_t = 40)]
    crash_every: u64,
    /// RocksDB on the file system (a temp dir) instead of its in-memory environment.
    #[arg(long)]
    on_disk: bool,
    /// Cluster mode: two simulated data-plane nodes serve the devices from the planner's
    /// views, over a network that delays, repeats, reorders and loses.
    #[arg(long)]
    cluster: bool,
    /// Break a rule of the planner on purpose (repeatable), to see which invariant catches
    /// it and how soon.
    #[arg(long = "break", value_enum)]
    broken: Vec<crate::planner::rules::Rule>,
    /// Print a line per seed.
    #[arg(long)]
    verbose: bool,
}

pub fn sim(args: SimArgs) -> Result<()> {
    let cfg = SimConfig {
        seed: args.seed,
        steps: args.steps,
        devices: args.devices,
        crash_every: args.crash_every,
        on_disk: args.on_disk,
        cluster: args.cluster,
    };
    for rule in &args.broken {
        crate::planner::rules::set_broken(*rule, true);
    }
    let start = std::time::Instant::now();
    let (mut steps, mut crashes, mut checks, mut statuses, mut failed) = (0u64, 0u64, 0u64, 0u64, Vec::new());
    let (mut stale, mut overlaps) = (0u64, 0u64);
    let reports = soak(args.seed, args.seeds, args.seconds, &cfg, |r| {
        if args.verbose || r.failure.is_some() {
            let end = r.failure.as_ref().map_or("ok".to_owned(), |f| format!("FAILED\n{f}"));
            println!(
                "seed {}: {} steps, {} crashes, {} checks, {} Statuses{}: {end}",
                r.seed,
                r.steps,
                r.crashes,
                r.checks,
                r.statuses,
                if args.cluster { format!(", {} stale-view blocks", r.stale_serves) } else { String::new() }
            );
        }
    });
    for r in &reports {
        steps += r.steps;
        crashes += r.crashes;
        checks += r.checks;
        statuses += r.statuses;
        stale += r.stale_serves;
        overlaps += r.stale_overlaps;
        if r.failure.is_some() {
            failed.push(r.seed);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} seeds ({}..{}), {steps} steps, {crashes} crashes, {checks} invariant checks, {statuses} Statuses, {} failed, in {secs:.1} s ({:.0} steps/s)",
        reports.len(),
        args.seed,
        args.seed + reports.len().saturating_sub(1) as u64,
        failed.len(),
        steps as f64 / secs.max(1e-9)
    );
    if args.cluster {
        println!(
            "blocks served from a view the planner had already replaced (newer one on its way): {stale}, \
             {overlaps} of them while the planner had another transfer of the device in flight"
        );
    }
    if !failed.is_empty() {
        bail!("invariants broken with seeds {failed:?}: replay one with `fwgate sim --seed N --seeds 1 --verbose`");
    }
    Ok(())
}
