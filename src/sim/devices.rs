//! The simulated fleet: devices with three components (the main application, and a BIOS and
//! a BMC as FAS targets) that talk to the real DFU step, and the images they are offered.
//! Devices are outside the gateway: they outlive its crashes.

use bytes::Bytes;

use super::cluster::Net;
use super::{check, cluster, Failure, Node, Sim};
use crate::engine::OpState;
use crate::firmware::ImageIdentity;
use crate::fleet::{DeviceSpec, Inventory, MAIN_COMPONENT};
use crate::loadgen::device::DfuDevice;
use crate::protocol::{Command, Form};
use crate::transport::{Handled, Shape};

pub(super) const COMPONENTS: [&str; 3] = [MAIN_COMPONENT, "BIOS", "BMC"];
/// What each component runs when its device is registered.
const FIRST: &str = "1.0.0";
/// Versions a misbehaving device may come back on.
const OTHER_VERSIONS: [&str; 4] = ["1.0.0", "1.1.0", "0.5.0", "2.0.0"];
/// Exchanges a device makes in one go at most, and per component when the fleet quiesces.
const EXCHANGES: u32 = 6;
const QUIESCE_EXCHANGES: u32 = 400;
const QUIESCE_ROUNDS: u32 = 200;

pub(super) struct SimDevice {
    pub id: String,
    /// Rolls back after some SWAPs (the new image "did not boot").
    pub flaky: bool,
    /// One per [`COMPONENTS`] entry.
    pub parts: Vec<DfuDevice>,
}

#[derive(Default)]
pub(super) struct Devices {
    pub list: Vec<SimDevice>,
    registered: u64,
}

/// The images of the simulation (name, version, hardware, FAS target and firmware version):
/// the main application in four versions (one only for esp32, one a downgrade), and BIOS and
/// BMC images whose labels are not the versions the devices report.
pub(super) const IMAGES: [(&str, &str, Option<&str>, Option<(&str, &str)>); 9] = [
    ("app", "1.1.0", None, None),
    ("app", "1.2.0", None, None),
    ("app", "1.3.0", Some("esp32"), None),
    ("app", "0.9.0", None, None),
    ("bios", "b1", None, Some(("BIOS", "1.0.0"))),
    ("bios", "b2", None, Some(("BIOS", "2.0.0"))),
    ("bios", "b3", None, Some(("BIOS", "3.0.0"))),
    ("bmc", "m1", None, Some(("BMC", "1.0.0"))),
    ("bmc", "m2", None, Some(("BMC", "2.0.0"))),
];

pub(super) fn setup(node: &Node, sim: &mut Sim, n: usize) -> Result<(), String> {
    for (i, (name, version, hw, fas)) in IMAGES.iter().enumerate() {
        let len = 300 + sim.rng.usize(0..900);
        let data: Vec<u8> = (0..len).map(|b| (b * 31 + i * 7) as u8).collect();
        let hardware = hw.map(|h| vec![h.to_owned()]).unwrap_or_default();
        node.firmware.add(name, version, hardware, Bytes::from(data), sim.now).map_err(|e| e.to_string())?;
        if let Some((target, fw)) = fas {
            let identity = ImageIdentity {
                device_type: "nodeBMC".into(),
                target: target.to_string(),
                tags: vec!["default".into()],
                firmware_version: fw.to_string(),
                semantic_firmware_version: fw.to_string(),
                ..Default::default()
            };
            node.firmware.set_identity(name, version, identity).map_err(|e| e.to_string())?;
        }
    }
    for _ in 0..n {
        register(node, sim);
    }
    Ok(())
}

/// Registers a new device (as an operator does, then the device's first Statuses report
/// what its components run).
pub(super) fn register(node: &Node, sim: &mut Sim) {
    sim.devices.registered += 1;
    let id = format!("d{:03}", sim.devices.registered);
    let spec = spec(sim, &id);
    let production = spec.production;
    let r = crate::planner::register_devices(&node.fleet, &node.waves, Some(&node.rollouts), vec![spec], sim.now);
    // The registry write may have landed while the plans' reaction failed (a crash between
    // them, finished at the next open): the device exists then.
    if node.fleet.get(&id).is_none() {
        sim.note(format!("registering {id} failed: {}", r.err().map(|e| e.to_string()).unwrap_or_default()));
        return;
    }
    let parts = COMPONENTS
        .iter()
        .map(|c| {
            let mut d = DfuDevice::new(&id, Form::Named, FIRST);
            d.mtu = 256;
            d.window = Some(sim.rng.u32(1..4));
            d.component = (*c != MAIN_COMPONENT).then(|| c.to_string());
            d
        })
        .collect();
    let flaky = sim.rng.u32(0..4) == 0;
    sim.note(format!("device {id} registered (production {production}, flaky {flaky})"));
    sim.devices.list.push(SimDevice { id, flaky, parts });
}

/// A device's registration: tag t0 or t1, nrf52 or esp32, one in three a production device
/// (which gets only the application's images the TUF repository signs for its tag), all FAS
/// nodeBMCs.
pub(super) fn spec(sim: &mut Sim, id: &str) -> DeviceSpec {
    DeviceSpec {
        id: id.into(),
        tag: Some(format!("t{}", sim.rng.u32(0..2))),
        hardware: Some(if sim.rng.bool() { "nrf52" } else { "esp32" }.into()),
        production: sim.rng.u32(0..3) == 0,
        inventory: Some(Box::new(Inventory { device_type: Some("nodeBMC".into()), ..Default::default() })),
        ..Default::default()
    }
}

/// A device asks for one of its components, a few times in a row, and does what it is told.
pub(super) fn status_round(node: &Node, sim: &mut Sim, net: Option<&mut Net>) -> Result<(), Failure> {
    if sim.devices.list.is_empty() {
        return Ok(());
    }
    let d = sim.rng.usize(0..sim.devices.list.len());
    let c = sim.rng.usize(0..COMPONENTS.len());
    let n = sim.rng.u32(1..=EXCHANGES);
    let flaky = sim.devices.list[d].flaky;
    exchange(node, sim, net, d, c, n, flaky)?;
    sim.now += sim.rng.u64(0..3);
    Ok(())
}

/// Up to `n` Status/Command exchanges of device `d`'s component `c`; stops at a WAIT or SYNC.
/// In cluster mode each Status goes to either node.
fn exchange(
    node: &Node,
    sim: &mut Sim,
    mut net: Option<&mut Net>,
    d: usize,
    c: usize,
    n: u32,
    flaky: bool,
) -> Result<bool, Failure> {
    let id = sim.devices.list[d].id.clone();
    let component = COMPONENTS[c];
    let mut out = Vec::new();
    for _ in 0..n {
        let part = &sim.devices.list[d].parts[c];
        let payload = part.status_bytes();
        let reported = part.running.clone();
        out.clear();
        let (before, handled, by) = match net.as_deref() {
            Some(net) => {
                let k = sim.rng.usize(0..net.nodes.len());
                let before = net.nodes[k].replica.state(&id, component);
                (before, net.nodes[k].dfu.handle("sim", &id, &payload, sim.now, Shape::Window, &mut out), Some(k))
            }
            None => {
                let before = node.planner.head_state(&id, component);
                (before, node.dfu.handle("sim", &id, &payload, sim.now, Shape::Window, &mut out), None)
            }
        };
        sim.report.statuses += 1;
        if handled == Handled::Failed || node.store.is_down() {
            sim.note(format!("{id}/{component}: the Status failed (store down)"));
            return Ok(false);
        }
        let mut ended = out.is_empty();
        for bytes in &out {
            let (cmd, _) = Command::decode(bytes).map_err(|e| sim.fail("device protocol", e.to_string()))?;
            if let Command::Write { version, offset, .. } = cmd {
                let starting = before.is_some_and(|(_, s)| s == OpState::Pending).then_some(reported.as_str());
                match (by, net.as_deref_mut()) {
                    (Some(k), Some(net)) => {
                        cluster::served(net, k, node, sim, &id, component, version, offset, starting)?
                    }
                    _ => check::served(node, sim, &id, component, version, offset, starting)?,
                }
            }
            let swap = matches!(cmd, Command::Swap { .. });
            let part = &mut sim.devices.list[d].parts[c];
            let running = part.running.clone();
            match part.apply(bytes) {
                Err(e) => return Err(sim.fail("device protocol", format!("{id}/{component}: {e}"))),
                Ok(Some(_)) => ended = true,
                Ok(None) => {}
            }
            if swap {
                let new = part.running.clone();
                if flaky && sim.rng.u32(0..3) == 0 {
                    part.running = running;
                    sim.note(format!("{id}/{component}: swapped to {new}, rolled back"));
                } else {
                    sim.note(format!("{id}/{component}: swapped to {new}"));
                }
            }
        }
        if ended {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A device does something unexpected: reboots on another version, loses its partial
/// download, or becomes (un)reliable.
pub(super) fn misbehave(sim: &mut Sim) {
    if sim.devices.list.is_empty() {
        return;
    }
    let d = sim.rng.usize(0..sim.devices.list.len());
    let c = sim.rng.usize(0..COMPONENTS.len());
    let id = sim.devices.list[d].id.clone();
    match sim.rng.u32(0..3) {
        0 => {
            let v = OTHER_VERSIONS[sim.rng.usize(0..OTHER_VERSIONS.len())];
            let part = &mut sim.devices.list[d].parts[c];
            part.running = v.into();
            part.download = None;
            sim.note(format!("{id}/{}: comes back on {v}", COMPONENTS[c]));
        }
        1 => {
            sim.devices.list[d].parts[c].download = None;
            sim.note(format!("{id}/{}: lost its partial download", COMPONENTS[c]));
        }
        _ => {
            let flaky = !sim.devices.list[d].flaky;
            sim.devices.list[d].flaky = flaky;
            sim.note(format!("{id}: flaky {flaky}"));
        }
    }
}

/// The end of a run: no more operators or faults; every device asks for every component
/// until it is told to wait or is up to date, time runs on a minute at a time (rates release,
/// limits pass), until no plan has anything left to do or the rounds run out.
pub(super) fn quiesce(node: &Node, sim: &mut Sim, mut net: Option<&mut Net>) -> Result<(), Failure> {
    sim.note("the fleet quiesces".into());
    for round in 0..QUIESCE_ROUNDS {
        sim.now += 61;
        let _ = node.planner.sweep_timeouts(sim.now);
        node.pump(sim.now);
        if let Some(net) = net.as_deref_mut() {
            net.settle(node, sim);
        }
        for d in 0..sim.devices.list.len() {
            for c in 0..COMPONENTS.len() {
                exchange(node, sim, net.as_deref_mut(), d, c, QUIESCE_EXCHANGES, false)?;
                node.pump(sim.now);
                if let Some(net) = net.as_deref_mut() {
                    // What the nodes saw reaches the planner, and its answer the nodes.
                    net.settle(node, sim);
                }
            }
        }
        node.pump(sim.now);
        check::all(node, sim, round % 8 == 0)?;
        let busy = node.rollouts.unsettled().iter().any(|(_, _, busy, _)| *busy);
        if !busy && node.actions.unsettled().is_empty() && round > 0 {
            break;
        }
    }
    Ok(())
}
