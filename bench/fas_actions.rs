//! Planning a FAS action (filter and plan phases) over 100,000 xnames × 3 targets as a dry run:
//! `cargo bench --bench fas_actions`. The planner's input is built first (xnames with their
//! targets' running versions, 30 images with FAS identities); then `actions::plan` runs five
//! times, and the Rust heap its result holds is counted with a counting allocator. Without
//! `--bench` (as `cargo test` runs it) the fleet is 2,000 xnames, as a smoke test.

use std::time::Instant;

use fwgate::planner::actions::{plan, ActionRequest, ImageIdentity, ImageRecord, OperationState, Xname};

#[global_allocator]
static HEAP: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

const TARGETS: [&str; 3] = ["BIOS", "BMC", "NIC"];

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 100_000 } else { 2_000 };
    // Ten versions of each target's image for two models; the fleet runs one of the first five.
    let mut images = Vec::new();
    for target in TARGETS {
        for v in 0..10 {
            images.push(ImageRecord {
                id: format!("{}@{v}.0", target.to_lowercase()),
                identity: ImageIdentity {
                    device_type: "nodeBMC".into(),
                    manufacturer: "intel".into(),
                    models: vec!["s2600".into(), "s2600_REV_a".into()],
                    target: target.into(),
                    tags: vec!["default".into()],
                    firmware_version: format!("{target}-{v}.0"),
                    semantic_firmware_version: format!("{v}.0.0"),
                    ..Default::default()
                },
            });
        }
    }
    let fleet: Vec<Xname> = (0..n)
        .map(|i| Xname {
            xname: format!("x{}c{}s{}b0", i / 4096, (i / 64) % 64, i % 64),
            device_type: Some("nodeBMC".into()),
            manufacturer: Some("intel".into()),
            model: Some(if i % 2 == 0 { "s2600" } else { "s2600_REV_a" }.into()),
            groups: vec![format!("rack-{}", i % 50)],
            targets: TARGETS.iter().map(|t| (t.to_string(), format!("{t}-{}.0", i % 5))).collect(),
        })
        .collect();
    let req: ActionRequest = serde_json::from_str(r#"{"command": {"version": "latest"}}"#).expect("action");
    let mut secs = Vec::new();
    let mut held = 0;
    let mut ops = Vec::new();
    for _ in 0..5 {
        drop(std::mem::take(&mut ops));
        let heap0 = HEAP.allocated();
        let t = Instant::now();
        // Each xname is copied as the planner reads it, as it would be out of the registry.
        ops = plan(&req, fleet.iter().cloned(), &images).expect("plan");
        secs.push(t.elapsed().as_secs_f64());
        held = HEAP.allocated().saturating_sub(heap0);
    }
    assert_eq!(ops.len(), n * 3);
    let configured = ops.iter().filter(|o| o.state == OperationState::Configured).count();
    let blocked = ops.iter().filter(|o| o.state == OperationState::Blocked).count();
    assert_eq!((configured, blocked), (n, 2 * n), "one free operation per xname");
    let shown: Vec<String> = secs.iter().map(|s| format!("{s:.3}")).collect();
    secs.sort_by(f64::total_cmp);
    println!(
        "planning {} operations ({n} xnames × 3 targets, dry run): median {:.3} s (runs: {} s); \
         the plan holds {:.0} B of Rust heap per operation",
        ops.len(),
        secs[2],
        shown.join(", "),
        held as f64 / ops.len() as f64
    );
}
