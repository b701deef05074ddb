//! The execute phase over a real registry, image store and operation queue (RocksDB in a temp
//! dir); devices' outcomes recorded as the DFU engine records them.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::config::FirmwareConfig;
use crate::engine::OpState;
use crate::firmware::{Firmware, ImageIdentity};
use crate::fleet::{DeviceSpec, Fleet, Inventory};
use crate::planner::Planner;
use crate::store::Store;

struct World {
    dir: tempfile::TempDir,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    actions: Actions,
    store: Store,
}

fn open_at(dir: tempfile::TempDir) -> World {
    let store = Store::open(dir.path(), false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    let planner = Arc::new(Planner::open(store.clone(), fleet.clone(), firmware.clone(), 3600, 0).unwrap());
    if firmware.list().is_empty() {
        for (target, v) in [("BIOS", "1"), ("BIOS", "2"), ("BMC", "1"), ("BMC", "2")] {
            let name = target.to_lowercase();
            firmware.add(&name, v, vec![], Bytes::from(format!("{name} {v}")), 0).unwrap();
            let identity = ImageIdentity {
                device_type: "nodeBMC".into(),
                target: target.into(),
                tags: vec!["default".into()],
                firmware_version: format!("{target}-{v}"),
                semantic_firmware_version: format!("{v}.0.0"),
                ..Default::default()
            };
            firmware.set_identity(&name, v, identity).unwrap();
        }
    }
    let actions = Actions::open(store.clone(), fleet.clone(), firmware.clone(), planner.clone(), 0).unwrap();
    World { dir, fleet, firmware, planner, actions, store }
}

fn reopen(w: World) -> World {
    let World { dir, fleet, firmware, planner, actions, store } = w;
    drop((actions, planner, fleet, firmware, store));
    open_at(dir)
}

/// x1 and x2, nodeBMCs, each running BIOS-1 and BMC-1.
fn world() -> World {
    let w = open_at(tempfile::tempdir().unwrap());
    for x in ["x1", "x2"] {
        let inventory = Some(Box::new(Inventory { device_type: Some("nodeBMC".into()), ..Default::default() }));
        w.fleet.upsert(vec![DeviceSpec { id: x.into(), inventory, ..Default::default() }], 0).unwrap();
        w.fleet.observe(x, "BIOS", "BIOS-1", 0).unwrap();
        w.fleet.observe(x, "BMC", "BMC-1", 0).unwrap();
    }
    w
}

fn live() -> ActionRequest {
    serde_json::from_value(serde_json::json!({"command": {"version": "latest", "overrideDryrun": true}})).unwrap()
}

/// Runs a device's target through its transfer to `end`.
fn run(w: &World, xname: &str, target: &str, end: OpState, now: u64) {
    let op = w.planner.operation(xname, target).unwrap();
    w.planner.record(xname, op.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, now).unwrap();
    w.planner.record(xname, op.seq, OpState::Downloading, Some(end), None, None, now).unwrap();
}

fn states(w: &World, id: &str) -> Vec<(String, String, OperationState)> {
    w.actions.operations(id).unwrap().into_iter().map(|o| (o.xname, o.target, o.state)).collect()
}

use super::snapshot::{SnapshotRequest, SnapshotTarget};
use OperationState::{Blocked, Configured, InProgress, Succeeded};

#[test]
fn a_dry_run_changes_nothing_and_lists_what_the_live_action_then_does() {
    let w = world();
    let dry = w.actions.create(serde_json::from_str("{}").unwrap(), 1).unwrap();
    assert_eq!((dry.state, dry.dryrun), (ActionState::Completed, true));
    assert!(w.planner.operations_of("x1").is_empty(), "nothing queued");
    let planned: Vec<(String, String, Option<String>)> =
        dry.operations.iter().map(|o| (o.xname.clone(), o.target.clone(), o.to_image_id.clone())).collect();
    let a = w.actions.create(live(), 2).unwrap();
    assert_eq!(a.state, ActionState::Running);
    // The queue serves one transfer per device: the sibling waits while one is in flight.
    let op = w.planner.operation("x1", "BIOS").unwrap();
    w.planner.record("x1", op.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 3).unwrap();
    assert!(matches!(w.planner.lookup("x1", "BMC", 3).unwrap(), crate::planner::Lookup::Wait(None)));
    let s = states(&w, &a.action_id);
    assert_eq!(s[0].2, InProgress);
    assert_eq!(s[1].2, Blocked);
    assert_eq!((s[2].2, s[3].2), (Configured, Configured), "x2's targets are queued, neither started");
    w.planner.record("x1", op.seq, OpState::Downloading, Some(OpState::Succeeded), None, None, 4).unwrap();
    for (x, t) in [("x1", "BMC"), ("x2", "BIOS"), ("x2", "BMC")] {
        run(&w, x, t, OpState::Succeeded, 5);
    }
    w.actions.pump(6).unwrap();
    let a = w.actions.get(&a.action_id).unwrap();
    assert_eq!(a.state, ActionState::Completed);
    let done: Vec<(String, String, Option<String>)> = w
        .actions
        .operations(&a.action_id)
        .unwrap()
        .into_iter()
        .filter(|o| o.state == Succeeded)
        .map(|o| (o.xname, o.target, o.to_image_id))
        .collect();
    assert_eq!(done, planned, "the dry run listed exactly what the live action did");
    // What the device must report is the image's firmwareVersion, not its label.
    assert!(w.planner.operations_of("x1").iter().all(|o| o.version.ends_with("-2")));
}

#[test]
fn a_second_action_waits_for_the_first_and_abort_withdraws_what_has_not_started() {
    let w = world();
    let first = w.actions.create(live(), 1).unwrap();
    let mut bios_only = live();
    bios_only.target_filter.targets = vec!["BIOS".into()];
    bios_only.command.overwrite_same_image = true;
    let second = w.actions.create(bios_only, 2).unwrap();
    assert_eq!(second.state, ActionState::Blocked);
    // x1's BIOS is under way; abort: the rest is withdrawn, the transfer told SYNC.
    let op = w.planner.operation("x1", "BIOS").unwrap();
    w.planner.record("x1", op.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 3).unwrap();
    let a = w.actions.abort(&first.action_id, 4).unwrap();
    assert_eq!(a.state, ActionState::Aborted);
    assert!(
        states(&w, &first.action_id).iter().all(|s| s.2 == OperationState::Aborted),
        "{:?}",
        states(&w, &first.action_id)
    );
    // The second one starts at once.
    assert_eq!(w.actions.get(&second.action_id).unwrap().state, ActionState::Running);
    assert_eq!(states(&w, &second.action_id).len(), 2);
    let e = w.actions.abort(&first.action_id, 5).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("action {} is aborted: only a blocked or running action can be aborted", first.action_id)
    );
}

#[test]
fn the_time_limit_fails_what_has_not_finished_and_a_wrong_version_fails_its_operation() {
    let w = world();
    let mut req = live();
    req.command.time_limit = 100;
    let a = w.actions.create(req, 10).unwrap();
    run(&w, "x1", "BIOS", OpState::Failed, 20);
    run(&w, "x1", "BMC", OpState::Succeeded, 30);
    w.actions.pump(109).unwrap();
    assert_eq!(w.actions.get(&a.action_id).unwrap().state, ActionState::Running);
    w.actions.pump(110).unwrap();
    w.actions.pump(110).unwrap();
    assert_eq!(w.actions.get(&a.action_id).unwrap().state, ActionState::Completed);
    let ops = w.actions.operations(&a.action_id).unwrap();
    assert_eq!(ops[0].state, OperationState::Failed);
    assert!(ops[0].state_helper.contains("BIOS-2"), "{}", ops[0].state_helper);
    assert_eq!(ops[1].state, Succeeded);
    assert!(ops[2..]
        .iter()
        .all(|o| o.state == OperationState::Failed && o.state_helper.contains("time limit of 100 s")));
}

#[test]
fn after_a_restart_mid_action_nothing_is_lost_or_run_twice() {
    let w = world();
    let a = w.actions.create(live(), 1).unwrap();
    run(&w, "x1", "BIOS", OpState::Succeeded, 2);
    let pushed = w.planner.operations_of("x1").len() + w.planner.operations_of("x2").len();
    let w = reopen(w);
    assert_eq!(w.actions.get(&a.action_id).unwrap().state, ActionState::Running);
    assert_eq!(
        w.planner.operations_of("x1").len() + w.planner.operations_of("x2").len(),
        pushed,
        "nothing queued twice"
    );
    for (x, t) in [("x1", "BMC"), ("x2", "BIOS"), ("x2", "BMC")] {
        run(&w, x, t, OpState::Succeeded, 3);
    }
    w.actions.pump(4).unwrap();
    assert_eq!(w.actions.get(&a.action_id).unwrap().state, ActionState::Completed);
    assert_eq!(states(&w, &a.action_id).iter().filter(|s| s.2 == Succeeded).count(), 4);
}

#[test]
fn a_snapshot_restores_every_target_and_skips_a_device_deleted_since() {
    let w = world();
    let snap = w.actions.snapshot(SnapshotRequest { name: "before".into(), ..Default::default() }, 1).unwrap();
    assert_eq!(snap.devices.len(), 2);
    assert_eq!(
        snap.devices[0].targets[0],
        SnapshotTarget { name: "BIOS".into(), firmware_version: "BIOS-1".into(), image_id: Some("bios@1".into()) }
    );
    assert!(matches!(
        w.actions.snapshot(SnapshotRequest { name: "before".into(), ..Default::default() }, 1),
        Err(ActionError::SnapshotExists(_))
    ));
    // Everything to version 2, as the devices then report it.
    let a = w.actions.create(live(), 2).unwrap();
    for (x, t) in [("x1", "BIOS"), ("x1", "BMC"), ("x2", "BIOS"), ("x2", "BMC")] {
        run(&w, x, t, OpState::Succeeded, 3);
        w.fleet.observe(x, t, &format!("{t}-2"), 3).unwrap();
    }
    w.actions.pump(4).unwrap();
    assert_eq!(w.actions.get(&a.action_id).unwrap().state, ActionState::Completed);
    w.planner.forget("x2").unwrap();
    w.fleet.delete("x2").unwrap();
    // A dry run first, then live.
    let (dry, skipped) = w.actions.restore("before", false, None, 5).unwrap();
    assert!(dry.dryrun);
    assert_eq!(skipped, ["x2"]);
    let (a, _) = w.actions.restore("before", true, Some(600), 6).unwrap();
    let planned: Vec<(String, OperationState, Option<String>)> =
        a.operations.iter().map(|o| (o.target.clone(), o.state, o.to_image_id.clone())).collect();
    assert_eq!(
        planned,
        [("BIOS".into(), Configured, Some("bios@1".into())), ("BMC".into(), Blocked, Some("bmc@1".into()))]
    );
    for t in ["BIOS", "BMC"] {
        run(&w, "x1", t, OpState::Succeeded, 7);
        w.fleet.observe("x1", t, &format!("{t}-1"), 7).unwrap();
    }
    w.actions.pump(8).unwrap();
    assert_eq!(w.actions.get(&a.action_id).unwrap().state, ActionState::Completed);
    assert_eq!(w.fleet.running("x1", "BIOS").as_deref(), Some("BIOS-1"));
    assert!(w
        .planner
        .operations_of("x1")
        .iter()
        .filter(|o| o.origin == format!("action:{}", a.action_id))
        .all(|o| o.version.ends_with("-1")));
    // Expired snapshots are not restored.
    let old = SnapshotRequest {
        name: "old".into(),
        expiration_time: Some("1970-01-01T00:00:10Z".into()),
        ..Default::default()
    };
    w.actions.snapshot(old, 9).unwrap();
    assert!(matches!(w.actions.restore("old", false, None, 11), Err(ActionError::Expired(_))));
    assert!(matches!(w.actions.restore("nope", false, None, 11), Err(ActionError::NoSnapshot(_))));
}

#[test]
fn an_images_hints_set_the_wait_poll_and_bound_each_stage_of_its_update() {
    let w = world();
    // BMC-2 asks devices waiting for it back every 15 s, and allows 50 s per stage.
    let mut identity = w.firmware.get("bmc", "2").unwrap().identity.clone().unwrap();
    (identity.polling_speed_seconds, identity.time_limit) = (Some(15), Some(50));
    w.firmware.set_identity("bmc", "2", identity).unwrap();
    let a = w.actions.create(live(), 10).unwrap();
    // x1's BIOS downloads: its BMC waits, told to come back in 15 s; x2's BMC goes first and
    // its BIOS waits with the gateway's default (BIOS-2 has no hint).
    let bios = w.planner.operation("x1", "BIOS").unwrap();
    w.planner.record("x1", bios.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 10).unwrap();
    assert!(matches!(w.planner.lookup("x1", "BMC", 10).unwrap(), crate::planner::Lookup::Wait(Some(15))));
    let bmc = w.planner.operation("x2", "BMC").unwrap();
    w.planner.record("x2", bmc.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 20).unwrap();
    assert!(matches!(w.planner.lookup("x2", "BIOS", 20).unwrap(), crate::planner::Lookup::Wait(None)));
    // x2's BMC downloads past its 50 s; x1's BIOS has no limit of its own and goes on.
    w.actions.pump(69).unwrap();
    assert_eq!(w.planner.operation("x2", "BMC").unwrap().state, OpState::Downloading);
    w.actions.pump(70).unwrap();
    let op = w.planner.operations_of("x2").into_iter().find(|o| o.seq == bmc.seq).unwrap();
    assert_eq!(op.state, OpState::TimedOut);
    assert!(op.detail.as_deref().unwrap().contains("bmc@2's time limit of 50 s passed while downloading"), "{op:?}");
    assert_eq!(w.planner.operation("x1", "BIOS").unwrap().state, OpState::Downloading);
    // After SWAP the device has 50 s again to come back.
    w.planner.record("x1", bios.seq, OpState::Downloading, Some(OpState::Succeeded), None, None, 71).unwrap();
    let bmc1 = w.planner.operation("x1", "BMC").unwrap();
    w.planner.record("x1", bmc1.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 72).unwrap();
    w.planner.record("x1", bmc1.seq, OpState::Downloading, Some(OpState::Swapping), None, None, 80).unwrap();
    w.actions.pump(129).unwrap();
    assert_eq!(w.planner.operation("x1", "BMC").unwrap().state, OpState::Swapping);
    w.actions.pump(130).unwrap();
    let op = w.planner.operations_of("x1").into_iter().find(|o| o.seq == bmc1.seq).unwrap();
    assert!(op.detail.as_deref().unwrap().contains("after SWAP"), "{op:?}");
    w.actions.pump(131).unwrap();
    let ops = w.actions.operations(&a.action_id).unwrap();
    let failed: Vec<(&str, &str)> = ops
        .iter()
        .filter(|o| o.state == OperationState::Failed)
        .map(|o| (o.xname.as_str(), o.target.as_str()))
        .collect();
    assert_eq!(failed, [("x1", "BMC"), ("x2", "BMC")], "the BMC updates failed, counted once each");
}

/// Finding 2 of issue 28: starting an action wrote its state, then one commit per operation;
/// a crash between them left it running with operations never queued, then `completed`. Now
/// the start is one step: a crash at any write leaves it not started (and open starts it) or
/// started with every operation.
#[test]
fn a_crash_at_any_write_of_an_actions_start_queues_all_of_it_or_none() {
    for writes in 0..3 {
        let w = world();
        w.store.crash_after(Some(writes));
        let _ = w.actions.create(live(), 1);
        let crashed = w.store.is_down();
        w.store.crash_after(None);
        let w = reopen(w);
        let all = w.actions.list();
        if all.is_empty() {
            assert_eq!(writes, 0, "the action's record is its first write");
            continue;
        }
        let a = &all[0];
        assert_eq!(a.state, ActionState::Running, "writes {writes}, crashed {crashed}");
        let queued: Vec<(String, String)> =
            ["x1", "x2"].iter().flat_map(|x| w.planner.operations_of(x)).map(|o| (o.device, o.component)).collect();
        assert_eq!(
            queued,
            [("x1", "BIOS"), ("x1", "BMC"), ("x2", "BIOS"), ("x2", "BMC")].map(|(x, t)| (x.to_owned(), t.to_owned())),
            "writes {writes}: every planned operation queued, once"
        );
    }
}

/// Finding 5 of issue 28: a restore that waited behind a running action ran the plan made
/// when it was created, so targets that action changed were never put back, yet it said
/// completed. An action leaving `blocked` is planned again.
#[test]
fn a_restore_blocked_behind_an_action_restores_what_that_action_changed() {
    let w = world();
    w.actions.snapshot(SnapshotRequest { name: "before".into(), ..Default::default() }, 1).unwrap();
    let mut bios = live();
    bios.target_filter.targets = vec!["BIOS".into()];
    let update = w.actions.create(bios, 2).unwrap();
    assert_eq!(update.state, ActionState::Running);
    // Created now, every target still runs its snapshot version: nothing to do, as planned.
    let (restore, _) = w.actions.restore("before", true, None, 3).unwrap();
    assert_eq!(restore.state, ActionState::Blocked);
    assert!(restore.operations.iter().all(|o| o.state == OperationState::NoOperation));
    for x in ["x1", "x2"] {
        run(&w, x, "BIOS", OpState::Succeeded, 4);
        w.fleet.observe(x, "BIOS", "BIOS-2", 4).unwrap();
    }
    w.actions.pump(5).unwrap();
    assert_eq!(w.actions.get(&update.action_id).unwrap().state, ActionState::Completed);
    let restore = w.actions.get(&restore.action_id).unwrap();
    assert_eq!(restore.state, ActionState::Running);
    let back: Vec<(&str, &str, Option<&str>)> = restore
        .operations
        .iter()
        .filter(|o| o.state == OperationState::Configured || o.state == OperationState::Blocked)
        .map(|o| (o.xname.as_str(), o.target.as_str(), o.to_image_id.as_deref()))
        .collect();
    assert_eq!(back, [("x1", "BIOS", Some("bios@1")), ("x2", "BIOS", Some("bios@1"))]);
    assert_eq!(w.planner.operation("x1", "BIOS").unwrap().image, "bios@1", "queued: the BIOS goes back");
}

#[test]
fn an_ended_action_can_be_deleted_and_dry_runs_expire_after_their_keep_time() {
    let w = world();
    let dry = w.actions.create(serde_json::from_str("{}").unwrap(), 1).unwrap();
    let a = w.actions.create(live(), 2).unwrap();
    // A running action is not deleted: it is aborted first.
    let e = w.actions.delete(&a.action_id).unwrap_err();
    assert!(matches!(e, ActionError::NotDeletable { state: "running", .. }), "{e}");
    w.actions.abort(&a.action_id, 3).unwrap();
    assert_eq!(w.actions.delete(&a.action_id).unwrap().state, ActionState::Aborted);
    assert!(matches!(w.actions.delete(&a.action_id), Err(ActionError::NotFound(_))));
    // Its operations stay in the devices' histories.
    assert!(w.planner.operations_of("x1").iter().any(|o| o.origin.ends_with(&a.action_id)));
    // The dry run is kept a week, then goes by itself; the deletion survives a restart.
    let week = DRY_RUN_KEEP_SECS;
    w.actions.pump(1 + week - 60).unwrap();
    assert!(w.actions.get(&dry.action_id).is_some());
    w.actions.pump(1 + week).unwrap();
    assert!(w.actions.get(&dry.action_id).is_none());
    let w = reopen(w);
    assert!(w.actions.list().is_empty(), "{:?}", w.actions.list());
    // Kept until deleted: 0.
    let w = World { actions: reopen_actions(&w).keep_dry_runs(0), ..w };
    let dry = w.actions.create(serde_json::from_str("{}").unwrap(), 10).unwrap();
    w.actions.pump(10 + 10 * week).unwrap();
    assert!(w.actions.get(&dry.action_id).is_some());
}

fn reopen_actions(w: &World) -> Actions {
    Actions::open(w.store.clone(), w.fleet.clone(), w.firmware.clone(), w.planner.clone(), 0).unwrap()
}
