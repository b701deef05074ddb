//! The simulated operators: what they ask of the planner, through the same calls the admin
//! API makes. Refusals (an illegal rollout action, an operation in flight) are part of the
//! game: they are noted, and must change nothing.

use super::devices::{self, COMPONENTS, IMAGES};
use super::{Node, Sim};
use crate::planner::actions::{ActionRequest, SnapshotRequest};
use crate::planner::rollouts::{Action, CreateRequest, Rate, SuccessAction};
use crate::planner::waves::{InitRequest, LimitArg, RolloutRequest, WaveState};

/// At most this many rollouts are kept; past it the oldest is deleted.
const MAX_ROLLOUTS: usize = 6;
/// At most this many devices are registered.
const MAX_DEVICES: usize = 24;

const FILTERS: [&str; 4] = ["production==false;tag==t0", "production==false;tag==t1", "production==false", "tag==t1"];
const ROLLOUT_IMAGES: [&str; 4] = ["app@1.1.0", "app@1.2.0", "1.2.0", "app@1.2.0"];

pub(super) fn act(node: &Node, sim: &mut Sim, roll: u32) {
    match roll {
        50..=54 => assign(node, sim),
        55..=59 => create_rollout(node, sim),
        60..=66 => rollout_action(node, sim),
        67..=71 => create_action(node, sim),
        72..=73 => abort_or_delete_action(node, sim),
        74..=75 => snapshot_or_restore(node, sim),
        76..=80 => register_or_retag(node, sim),
        81..=83 => delete_device(node, sim),
        84..=86 => wave(node, sim),
        _ => {
            let _ = node.fleet.flush_last_seen();
            sim.note("last-seen flushed".into());
        }
    }
}

fn any_device(sim: &mut Sim) -> Option<String> {
    (!sim.devices.list.is_empty()).then(|| sim.devices.list[sim.rng.usize(0..sim.devices.list.len())].id.clone())
}

fn assign(node: &Node, sim: &mut Sim) {
    let Some(id) = any_device(sim) else { return };
    let c = sim.rng.usize(0..COMPONENTS.len());
    let candidates: Vec<String> = IMAGES
        .iter()
        .filter(|(name, ..)| match c {
            0 => *name == "app",
            1 => *name == "bios",
            _ => *name == "bmc",
        })
        .map(|(name, version, ..)| format!("{name}@{version}"))
        .collect();
    let image = &candidates[sim.rng.usize(0..candidates.len())];
    let r = node.planner.assign(&id, COMPONENTS[c], image, sim.now);
    sim.note(format!(
        "assign {image} to {id}/{}: {}",
        COMPONENTS[c],
        r.map(|o| format!("operation {}", o.seq)).unwrap_or_else(|e| e.to_string())
    ));
}

fn create_rollout(node: &Node, sim: &mut Sim) {
    let live: Vec<_> = node.rollouts.list(false);
    if live.len() >= MAX_ROLLOUTS {
        let oldest = live[0].name.clone();
        let r = node.rollouts.act(&oldest, Action::Delete, None, sim.now);
        sim.note(format!(
            "delete rollout {oldest}: {}",
            r.map(|r| r.state.as_str().to_owned()).unwrap_or_else(|e| e.to_string())
        ));
        return;
    }
    sim.names += 1;
    let name = format!("r{}", sim.names);
    let rng = &mut sim.rng;
    let req = CreateRequest {
        name: name.clone(),
        filter: FILTERS[rng.usize(0..FILTERS.len())].into(),
        image: ROLLOUT_IMAGES[rng.usize(0..ROLLOUT_IMAGES.len())].into(),
        groups: Some(rng.usize(1..4)),
        success: Some([0, 50, 100][rng.usize(0..3)]),
        error: Some(["50%", "1", "0", "100%"][rng.usize(0..4)].into()),
        success_action: (rng.u32(0..5) == 0).then_some(SuccessAction::Pause),
        rate: (rng.u32(0..3) == 0).then(|| Rate { per_minute: rng.u32(1..3), factor: None, every: None }),
        dynamic_group_size: (rng.u32(0..5) == 0).then(|| rng.u64(1..4)),
        ..Default::default()
    };
    let what = format!(
        "{} {} groups {:?} success {:?} error {:?} rate {:?} dynamic {:?}",
        req.filter,
        req.image,
        req.groups,
        req.success,
        req.error,
        req.rate.map(|r| r.per_minute),
        req.dynamic_group_size
    );
    match node.rollouts.create(req, sim.now) {
        Ok(r) => {
            sim.note(format!("create rollout {name} ({what}): {} devices", r.total()));
            if sim.rng.u32(0..5) != 0 {
                let s = node.rollouts.act(&name, Action::Start, None, sim.now);
                sim.note(format!(
                    "start rollout {name}: {}",
                    s.map(|r| r.state.as_str().to_owned()).unwrap_or_else(|e| e.to_string())
                ));
            }
        }
        Err(e) => sim.note(format!("create rollout {name} ({what}): {e}")),
    }
}

fn rollout_action(node: &Node, sim: &mut Sim) {
    let live = node.rollouts.list(false);
    if live.is_empty() {
        return;
    }
    let name = live[sim.rng.usize(0..live.len())].name.clone();
    // Deletes are rarer than the rest: they end a rollout's story.
    let action = loop {
        let a = Action::ALL[sim.rng.usize(0..Action::ALL.len())];
        if a != Action::Delete || sim.rng.u32(0..3) == 0 {
            break a;
        }
    };
    let r = node.rollouts.act(&name, action, None, sim.now);
    sim.note(format!(
        "{} rollout {name}: {}",
        action.as_str(),
        r.map(|r| r.state.as_str().to_owned()).unwrap_or_else(|e| e.to_string())
    ));
}

fn xnames(sim: &mut Sim) -> Vec<String> {
    if sim.rng.bool() {
        return Vec::new();
    }
    let mut v: Vec<String> = sim.devices.list.iter().filter(|_| sim.rng.bool()).map(|d| d.id.clone()).collect();
    v.sort();
    v
}

fn create_action(node: &Node, sim: &mut Sim) {
    let xnames = xnames(sim);
    let targets = [vec!["BIOS"], vec!["BMC"], vec!["BIOS", "BMC"]][sim.rng.usize(0..3)].clone();
    let live = sim.rng.u32(0..4) != 0;
    let req = serde_json::json!({
        "stateComponentFilter": {"xnames": xnames},
        "targetFilter": {"targets": targets},
        "command": {"version": if sim.rng.u32(0..4) == 0 { "earliest" } else { "latest" },
                    "overrideDryrun": live, "timeLimit": sim.rng.u64(100..2000),
                    "restoreNotPossibleOverride": true},
    });
    let req: ActionRequest = match serde_json::from_value(req) {
        Ok(r) => r,
        Err(e) => return sim.note(format!("action request does not decode: {e}")),
    };
    let r = node.actions.create(req, sim.now);
    sim.note(format!(
        "create action (live {live}, {targets:?}, {} xnames): {}",
        xnames.len(),
        r.map(|a| format!("{} {} with {} operations", a.action_id, a.state.as_str(), a.operations.len()))
            .unwrap_or_else(|e| e.to_string())
    ));
}

fn abort_or_delete_action(node: &Node, sim: &mut Sim) {
    let all = node.actions.list();
    if all.is_empty() {
        return;
    }
    let id = all[sim.rng.usize(0..all.len())].action_id.clone();
    if sim.rng.u32(0..3) == 0 {
        let r = node.actions.delete(&id);
        sim.note(format!(
            "delete action {id}: {}",
            r.map(|a| format!("was {}", a.state.as_str())).unwrap_or_else(|e| e.to_string())
        ));
        return;
    }
    let r = node.actions.abort(&id, sim.now);
    sim.note(format!(
        "abort action {id}: {}",
        r.map(|a| a.state.as_str().to_owned()).unwrap_or_else(|e| e.to_string())
    ));
}

fn snapshot_or_restore(node: &Node, sim: &mut Sim) {
    let snaps = node.actions.snapshots().unwrap_or_default();
    if !snaps.is_empty() && sim.rng.bool() {
        let name = snaps[sim.rng.usize(0..snaps.len())].name.clone();
        let r = node.actions.restore(&name, sim.rng.u32(0..4) != 0, Some(sim.rng.u64(100..2000)), sim.now);
        sim.note(format!(
            "restore snapshot {name}: {}",
            r.map(|(a, skipped)| format!("{} {} ({} skipped)", a.action_id, a.state.as_str(), skipped.len()))
                .unwrap_or_else(|e| e.to_string())
        ));
        return;
    }
    sim.names += 1;
    let name = format!("s{}", sim.names);
    let req: SnapshotRequest = match serde_json::from_value(
        serde_json::json!({"name": name, "stateComponentFilter": {"xnames": xnames(sim)}}),
    ) {
        Ok(r) => r,
        Err(e) => return sim.note(format!("snapshot request does not decode: {e}")),
    };
    let r = node.actions.snapshot(req, sim.now);
    sim.note(format!(
        "snapshot {name}: {}",
        r.map(|s| format!("{} devices", s.devices.len())).unwrap_or_else(|e| e.to_string())
    ));
}

fn register_or_retag(node: &Node, sim: &mut Sim) {
    if sim.devices.list.len() < MAX_DEVICES && (sim.devices.list.is_empty() || sim.rng.bool()) {
        return devices::register(node, sim);
    }
    let Some(id) = any_device(sim) else { return };
    let Some(mut spec) = node.fleet.get(&id).map(|d| d.spec) else { return };
    spec.tag = Some(format!("t{}", sim.rng.u32(0..2)));
    let tag = spec.tag.clone();
    let r = crate::planner::register_devices(&node.fleet, &node.waves, Some(&node.rollouts), vec![spec], sim.now);
    sim.note(format!("retag {id} to {tag:?}: {}", r.map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string())));
}

fn delete_device(node: &Node, sim: &mut Sim) {
    let Some(id) = any_device(sim) else { return };
    let r = crate::planner::delete_device(&node.planner, &node.fleet, &node.waves, Some(&node.rollouts), &id, sim.now);
    match r {
        Ok(Some(open)) => {
            sim.devices.list.retain(|d| d.id != id);
            sim.note(format!("delete device {id}: {open} unfinished operations"));
        }
        Ok(None) => sim.note(format!("delete device {id}: unknown")),
        Err(e) => sim.note(format!("delete device {id}: {e}")),
    }
}

/// Waves of test devices (no TUF repository verifies here): init one on a tag that has none
/// active, else roll the active one out to a few devices, complete or cancel it.
fn wave(node: &Node, sim: &mut Sim) {
    let tag = format!("t{}", sim.rng.u32(0..2));
    let active = node.waves.list(Some(WaveState::Active), Some(&tag)).into_iter().find(|w| !w.production);
    let Some(w) = active else {
        sim.names += 1;
        let name = format!("w{}", sim.names);
        let version = ["1.1.0", "1.2.0", "app@1.2.0", "1.3.0"][sim.rng.usize(0..4)].to_owned();
        // Half the time the tag's versions are withdrawn: an older version may follow.
        let prune = if sim.rng.bool() { node.waves.production_versions(&tag, false) } else { Vec::new() };
        let req = InitRequest {
            name: name.clone(),
            version: version.clone(),
            tag: tag.clone(),
            production: false,
            prune,
            ..Default::default()
        };
        let r = node.waves.init(req, sim.now);
        sim.note(format!(
            "wave init {name} ({version} on {tag}): {}",
            r.map(|_| "ok".into()).unwrap_or_else(|e| e.to_string())
        ));
        return;
    };
    let name = w.name;
    match sim.rng.u32(0..6) {
        0..=3 => {
            let req = RolloutRequest {
                limit: Some(LimitArg::Count(sim.rng.u64(1..5))),
                seed: Some(sim.rng.u64(..)),
                ..Default::default()
            };
            let r = node.waves.rollout(&name, req, sim.now);
            sim.note(format!(
                "wave rollout {name}: {}",
                r.map(|r| format!("{} staged", r.staged)).unwrap_or_else(|e| e.to_string())
            ));
        }
        4 => {
            let r = node.waves.complete(&name, sim.now);
            sim.note(format!(
                "wave complete {name}: {}",
                r.map(|(_, n)| format!("{n} staged")).unwrap_or_else(|e| e.to_string())
            ));
        }
        _ => {
            let r = node.waves.cancel(&name, sim.now);
            sim.note(format!(
                "wave cancel {name}: {}",
                r.map(|(_, n)| format!("{n} withdrawn")).unwrap_or_else(|e| e.to_string())
            ));
        }
    }
}
