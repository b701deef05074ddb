//! TUF in the simulation: a production repository whose signed targets (the application's
//! images, each released for tag t0, t1 or both, or withdrawn) a simulated publisher changes
//! and whose metadata expires at simulated times; the gateway refreshes it at random points
//! and when it starts, and a refresh may fail (what was verified stays until it expires). What
//! a refresh verifies is installed as [`crate::tuf::Trust::refresh`] stores it; the
//! verification itself is proven against real repositories elsewhere. The repository is
//! outside the gateway: it outlives its crashes.

use super::{Node, Sim};
use crate::tuf::{TargetInfo, Verified, PRODUCTION};

/// The application's versions the repository may sign.
const SIGNED: [&str; 4] = ["1.1.0", "1.2.0", "1.3.0", "0.9.0"];

/// What the repository serves now.
#[derive(Default)]
pub(super) struct Repo {
    pub current: Option<Verified>,
}

/// The publisher signs new metadata: some targets withdrawn, tags changed, a new expiry.
pub(super) fn publish(node: &Node, sim: &mut Sim) {
    // Short lives half the time: expiry must strike mid-transfer, and while the planner's
    // feed is stalled.
    let lifetime = if sim.rng.bool() { sim.rng.u64(30..600) } else { sim.rng.u64(600..6_000) };
    let mut targets = Vec::new();
    for v in SIGNED {
        if sim.rng.u32(0..4) == 0 {
            continue;
        }
        let tags = match sim.rng.u32(0..3) {
            0 => vec!["t0".to_owned()],
            1 => vec!["t1".to_owned()],
            _ => vec!["t0".to_owned(), "t1".to_owned()],
        };
        targets.extend(target(node, v, tags));
    }
    install(sim, targets, sim.now + lifetime);
}

/// At the end of a run the publisher signs every target for both tags for a long time, and
/// the gateway verifies it: whatever waited for trust may go on.
pub(super) fn restore(node: &Node, sim: &mut Sim) {
    let both = || vec!["t0".to_owned(), "t1".to_owned()];
    let targets = SIGNED.iter().filter_map(|v| target(node, v, both())).collect();
    install(sim, targets, sim.now + 100_000_000);
    refresh(node, sim, true);
}

fn target(node: &Node, version: &str, tags: Vec<String>) -> Option<TargetInfo> {
    let meta = node.firmware.get("app", version)?;
    Some(TargetInfo {
        name: format!("app-{version}.bin"),
        length: meta.length,
        sha256: meta.sha256.clone(),
        tags,
        version: Some(version.to_owned()),
    })
}

fn install(sim: &mut Sim, targets: Vec<TargetInfo>, expires: u64) {
    let version = sim.repo.current.as_ref().map_or(0, |v| v.targets_version) + 1;
    let signed: Vec<String> =
        targets.iter().map(|t| format!("{}{:?}", t.version.as_deref().unwrap_or("?"), t.tags)).collect();
    sim.note(format!("TUF: targets version {version} published, expires at {expires}: {}", signed.join(" ")));
    sim.repo.current = Some(Verified {
        repo: PRODUCTION.into(),
        root_version: 1,
        timestamp_version: version,
        snapshot_version: version,
        targets_version: version,
        expires,
        targets,
    });
}

/// The gateway refreshes: unless it fails (`sure`: it does not), it verifies what the
/// repository serves, and complete waves stage the devices that waited for it.
pub(super) fn refresh(node: &Node, sim: &mut Sim, sure: bool) {
    if !sure && sim.rng.u32(0..4) == 0 {
        sim.note("TUF: the refresh fails (the repository is unreachable)".into());
        return;
    }
    let Some(v) = sim.repo.current.clone() else { return };
    sim.note(format!("TUF: refreshed, targets version {}", v.targets_version));
    node.planner.trust().install_verified(v);
    let _ = node.waves.after_refresh(sim.now);
}

/// A TUF event: the publisher signs new metadata, or the gateway refreshes.
pub(super) fn event(node: &Node, sim: &mut Sim) {
    if sim.rng.u32(0..3) == 0 {
        publish(node, sim);
    } else {
        refresh(node, sim, false);
    }
}
