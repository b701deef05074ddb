//! The invariants, checked after every step (DESIGN §4):
//! - **one transfer**: at most one operation in flight per device, across components;
//! - **admission**: no block is served that admission refuses at that moment (hardware, TUF
//!   class, a downgrade when the transfer starts);
//! - **plans**: a plan's records in memory are the stored ones, its counts equal a recount
//!   from stored facts, and no operation it planned or member it handed out is lost;
//! - **durable**: the operations and devices in memory are exactly what a restart loads (so
//!   a crash leaves the state of the last completed commit);
//! - **settled** (at the end): every plan has ended, or waits with a reason.

use super::{Failure, Node, Sim};
use crate::firmware::version_order;

/// Checks every invariant; `full` adds the comparisons with the whole store.
pub(super) fn all(node: &Node, sim: &mut Sim, full: bool) -> Result<(), Failure> {
    let run = |sim: &mut Sim, name: &'static str, r: Result<(), String>| {
        sim.report.checks += 1;
        r.map_err(|e| sim.fail(name, e))
    };
    run(sim, "one transfer per device", node.planner.audit_transfers())?;
    run(sim, "rollouts: stored, recounted, nothing lost", node.rollouts.audit(full))?;
    run(sim, "actions: stored, recounted, nothing lost", node.actions.audit(full))?;
    run(sim, "waves: stored", node.waves.audit(full))?;
    if full {
        run(sim, "operations: memory is the store", node.planner.audit_store())?;
        run(sim, "devices: memory is the store", node.fleet.audit_store())?;
    }
    Ok(())
}

/// A WRITE of `version` for a device's component went out: the operation it belongs to is in
/// flight, and its image fits the device's hardware and is admissible for its class and tag
/// now; when the transfer starts here (`starting`: the version the device reported), it is
/// not a downgrade.
pub(super) fn served(
    node: &Node,
    sim: &mut Sim,
    device: &str,
    component: &str,
    version: &str,
    offset: u32,
    starting: Option<&str>,
) -> Result<(), Failure> {
    sim.report.checks += 1;
    let fail = |sim: &Sim, why: String| {
        Err(sim.fail("admission", format!("{device}/{component} got a WRITE of {version} at {offset}: {why}")))
    };
    let Some(op) = node.planner.operation(device, component) else { return fail(sim, "no operation".into()) };
    if !op.state.in_flight() || op.version != version {
        return fail(sim, format!("its operation {} is {} for {}", op.seq, op.state.as_str(), op.version));
    }
    if let Some(why) = image_refused(node, device, &op.image, sim.now) {
        return fail(sim, why);
    }
    if let Some(from) = starting {
        if let (Some(a), Some(b)) = (version_order(from), version_order(&op.version)) {
            if b < a {
                return fail(sim, format!("a downgrade from {from}"));
            }
        }
    }
    Ok(())
}

/// Why `image` may not reach the device now: unknown, not for its hardware, or refused by
/// admission for its class and tag.
pub(super) fn image_refused(node: &Node, device: &str, image: &str, now: u64) -> Option<String> {
    let (name, v) = image.split_once('@').unwrap_or((image, ""));
    let Some(meta) = node.firmware.get(name, v) else { return Some(format!("image {image} is unknown")) };
    let Some(d) = node.fleet.get(device) else { return Some("the device is not registered".into()) };
    if !meta.fits_hardware(d.spec.hardware.as_deref()) {
        return Some(format!("image {image} is not for hardware {:?}", d.spec.hardware));
    }
    let refused = node.planner.admit(d.spec.production, &meta, d.spec.tag.as_deref(), now).err();
    refused.map(|d| format!("admission refuses it: {}", d.reason))
}

/// After the fleet quiesced: every rollout has ended or waits with a reason (paused, waiting
/// for approval or its start time, dynamic), every action has ended.
pub(super) fn settled(node: &Node, sim: &mut Sim) -> Result<(), Failure> {
    sim.report.checks += 1;
    for (name, state, busy, dynamic) in node.rollouts.unsettled() {
        if busy || !dynamic {
            return Err(sim.fail(
                "every plan ends",
                format!(
                    "rollout {name} is still {} after the fleet quiesced (members left to do: {busy})",
                    state.as_str()
                ),
            ));
        }
    }
    if let Some((id, state)) = node.actions.unsettled().into_iter().next() {
        return Err(
            sim.fail("every plan ends", format!("action {id} is still {} after the fleet quiesced", state.as_str()))
        );
    }
    Ok(())
}
