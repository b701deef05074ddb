use bytes::Bytes;

use super::*;
use crate::config::FirmwareConfig;
use crate::fleet::{DeviceSpec, MAIN_COMPONENT};

struct World {
    dir: tempfile::TempDir,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    rollouts: Rollouts,
}

fn open_at(dir: tempfile::TempDir, approval: bool) -> World {
    let store = Store::open(dir.path(), false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 10_000).unwrap());
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    let planner = Arc::new(Planner::open(store.clone(), fleet.clone(), firmware.clone(), 3600, 0).unwrap());
    if firmware.list().is_empty() {
        firmware.add("app", "2.1", vec![], Bytes::from_static(b"0123456789"), 0).unwrap();
    }
    let rollouts = Rollouts::open(store, fleet.clone(), firmware.clone(), planner.clone(), approval, 0).unwrap();
    World { dir, fleet, firmware, planner, rollouts }
}

/// Closes everything (the store last) and opens it again, as a restart does.
fn reopen(w: World) -> World {
    let World { dir, fleet, firmware, planner, rollouts } = w;
    drop((rollouts, planner, firmware, fleet));
    open_at(dir, false)
}

/// `n` CI devices d00.. on tag `release`; the even ones are nrf52, the odd ones esp32.
fn world(n: usize, approval: bool) -> World {
    let w = open_at(tempfile::tempdir().unwrap(), approval);
    let specs = (0..n)
        .map(|i| DeviceSpec {
            id: format!("d{i:02}"),
            tag: Some("release".into()),
            hardware: Some(if i % 2 == 0 { "nrf52" } else { "esp32" }.into()),
            ..Default::default()
        })
        .collect();
    w.fleet.upsert(specs, 0).unwrap();
    w
}

fn create(w: &World, name: &str, groups: usize, error: &str) -> Rollout {
    let req = CreateRequest {
        name: name.into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        groups: Some(groups),
        success: Some(100),
        error: Some(error.into()),
        ..Default::default()
    };
    w.rollouts.create(req, 1).unwrap()
}

/// Devices with an unfinished operation of the rollout's group `g` (from 1).
fn queued(w: &World, name: &str, g: usize) -> Vec<String> {
    let origin = format!("rollout:{name}/{g}");
    let mut v = Vec::new();
    w.planner.scan(|o| {
        if o.origin == origin && !o.state.is_terminal() {
            v.push(o.device.clone());
        }
    });
    v.sort();
    v
}

/// Runs a device's head operation to its end, as the DFU engine would record it.
fn finish(w: &World, device: &str, ok: bool, now: u64) {
    let op = w.planner.operation(device, MAIN_COMPONENT).unwrap();
    assert_eq!(op.state, OpState::Pending, "{device}");
    w.planner.record(device, op.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, now).unwrap();
    let end = if ok { OpState::Succeeded } else { OpState::Failed };
    w.planner.record(device, op.seq, OpState::Downloading, Some(end), None, None, now).unwrap();
}

fn states(w: &World, name: &str) -> (RolloutState, Vec<GroupState>) {
    let r = w.rollouts.get(name).unwrap();
    (r.state, r.groups.iter().map(|g| g.state).collect())
}

use GroupState::{Error as GErr, Finished as Fin, Running as Run, Scheduled as Sch};

#[test]
fn groups_cascade_by_themselves_and_the_error_condition_pauses_the_rollout() {
    let w = world(9, false);
    let r = create(&w, "r1", 3, "1");
    assert_eq!(r.state, RolloutState::Ready);
    assert_eq!(r.groups.iter().map(|g| g.total).collect::<Vec<_>>(), [3, 3, 3]);
    w.rollouts.act("r1", Action::Start, None, 2).unwrap();
    assert_eq!(states(&w, "r1"), (RolloutState::Running, vec![Run, Sch, Sch]));
    assert_eq!(queued(&w, "r1", 1), ["d00", "d01", "d02"]);
    for d in ["d00", "d01", "d02"] {
        finish(&w, d, true, 3);
    }
    assert_eq!(w.rollouts.pump(3).unwrap(), 3);
    assert_eq!(states(&w, "r1"), (RolloutState::Running, vec![Fin, Run, Sch]));
    assert_eq!(queued(&w, "r1", 2), ["d03", "d04", "d05"]);
    // Two failures are more than the threshold of one: emergency stop, group 3 gets nothing.
    finish(&w, "d03", false, 4);
    w.rollouts.pump(4).unwrap();
    assert_eq!(states(&w, "r1").1, [Fin, Run, Sch], "1 is not more than 1");
    finish(&w, "d04", false, 4);
    w.rollouts.pump(4).unwrap();
    assert_eq!(states(&w, "r1"), (RolloutState::Paused, vec![Fin, GErr, Sch]));
    assert!(queued(&w, "r1", 3).is_empty());
    let st = w.rollouts.status("r1").unwrap();
    assert_eq!((st.groups[1].counts.failed, st.groups[1].scheduled, st.groups[1].toward_error), (2, 1, 100.0));
    // Resume continues with the next group; the error group's last device keeps its operation.
    w.rollouts.act("r1", Action::Resume, None, 5).unwrap();
    assert_eq!(states(&w, "r1"), (RolloutState::Running, vec![Fin, GErr, Run]));
    assert_eq!(queued(&w, "r1", 3), ["d06", "d07", "d08"]);
    for d in ["d05", "d06", "d07", "d08"] {
        finish(&w, d, true, 6);
    }
    w.rollouts.pump(6).unwrap();
    assert_eq!(states(&w, "r1"), (RolloutState::Finished, vec![Fin, GErr, Fin]));
    assert_eq!(w.rollouts.outcomes(), 9);
    // Nothing but a delete is left; the illegal ones name the state.
    let e = w.rollouts.act("r1", Action::Resume, None, 7).unwrap_err();
    assert_eq!(e.to_string(), "cannot resume a rollout that is finished");
}

#[test]
fn a_pause_success_action_waits_for_resume_and_trigger_next_group_starts_the_next_by_hand() {
    let w = world(6, false);
    let req = CreateRequest {
        name: "r".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        groups: Some(3),
        success: Some(50),
        success_action: Some(SuccessAction::Pause),
        ..Default::default()
    };
    w.rollouts.create(req, 1).unwrap();
    w.rollouts.act("r", Action::Start, None, 2).unwrap();
    finish(&w, "d00", true, 3);
    w.rollouts.pump(3).unwrap();
    assert_eq!(states(&w, "r"), (RolloutState::Paused, vec![Fin, Sch, Sch]), "50% met: pause");
    assert!(queued(&w, "r", 2).is_empty());
    w.rollouts.act("r", Action::Resume, None, 4).unwrap();
    assert_eq!(states(&w, "r"), (RolloutState::Running, vec![Fin, Run, Sch]));
    // By hand, before any outcome of group 2.
    w.rollouts.act("r", Action::TriggerNextGroup, None, 5).unwrap();
    assert_eq!(states(&w, "r"), (RolloutState::Running, vec![Fin, Fin, Run]));
    assert_eq!(queued(&w, "r", 3), ["d04", "d05"]);
    assert_eq!(queued(&w, "r", 2), ["d02", "d03"], "the triggered group's devices keep their operations");
}

#[test]
fn a_rollout_that_needs_approval_starts_only_once_approved_and_a_denied_one_ends() {
    let w = world(4, true);
    assert_eq!(create(&w, "a", 2, "50%").state, RolloutState::WaitingForApproval);
    let e = w.rollouts.act("a", Action::Start, None, 2).unwrap_err();
    assert_eq!(e.to_string(), "cannot start a rollout that is waiting_for_approval");
    let r = w.rollouts.act("a", Action::Approve, Some("looks good".into()), 3).unwrap();
    assert_eq!((r.state, r.remark.as_deref()), (RolloutState::Ready, Some("looks good")));
    w.rollouts.act("a", Action::Start, None, 4).unwrap();
    assert_eq!(queued(&w, "a", 1).len(), 2);
    create(&w, "b", 2, "50%");
    let r = w.rollouts.act("b", Action::Deny, Some("not now".into()), 5).unwrap();
    assert_eq!(r.state, RolloutState::ApprovalDenied);
    assert!(r.state.is_final());
    assert!(w.rollouts.act("b", Action::Start, None, 6).is_err());
}

#[test]
fn after_a_restart_in_the_middle_of_group_2_counts_and_the_cascade_go_on_without_a_double_count() {
    let w = world(6, false);
    create(&w, "r", 3, "50%");
    w.rollouts.act("r", Action::Start, None, 2).unwrap();
    finish(&w, "d00", true, 3);
    finish(&w, "d01", true, 3);
    w.rollouts.pump(3).unwrap();
    finish(&w, "d02", true, 4);
    // Not pumped: the outcome is in the operations only, as after a crash.
    let before = w.rollouts.status("r").unwrap();
    assert_eq!(before.groups[1].counts.succeeded, 0);
    let w = reopen(w);
    let st = w.rollouts.status("r").unwrap();
    assert_eq!(
        (st.groups[0].counts.succeeded, st.groups[1].counts.succeeded, st.groups[1].scheduled),
        (2, 1, 1),
        "rebuilt from the operations"
    );
    assert_eq!(states(&w, "r"), (RolloutState::Running, vec![Fin, Run, Sch]));
    finish(&w, "d03", true, 5);
    w.rollouts.pump(5).unwrap();
    assert_eq!(states(&w, "r"), (RolloutState::Running, vec![Fin, Fin, Run]));
    assert_eq!(w.rollouts.status("r").unwrap().groups[1].counts.succeeded, 2, "each device counted once");
    assert_eq!(queued(&w, "r", 3), ["d04", "d05"]);
}

#[test]
fn a_group_marked_running_before_a_crash_is_handed_out_on_open() {
    let w = world(4, false);
    create(&w, "r", 2, "50%");
    // As if the gateway died between writing "group 1 running" and queuing its operations.
    let mut r = w.rollouts.get("r").unwrap();
    r.state = RolloutState::Running;
    r.groups[0].state = Run;
    r.groups[1].state = Sch;
    w.rollouts.put(&r).unwrap();
    let w = reopen(w);
    assert_eq!(queued(&w, "r", 1), ["d00", "d01"]);
}

#[test]
fn the_rate_limits_operations_handed_out_per_minute_and_grows_with_successes() {
    let w = world(20, false);
    let req = CreateRequest {
        name: "slow".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        success: Some(100),
        rate: Some(Rate { per_minute: 2, factor: Some(2.0), every: Some(2) }),
        ..Default::default()
    };
    w.rollouts.create(req, 0).unwrap();
    w.rollouts.act("slow", Action::Start, None, 100).unwrap();
    assert_eq!(queued(&w, "slow", 1).len(), 2);
    w.rollouts.pump(130).unwrap();
    assert_eq!(queued(&w, "slow", 1).len(), 2, "the minute is not over");
    w.rollouts.pump(160).unwrap();
    assert_eq!(queued(&w, "slow", 1).len(), 4);
    // Two successes double the rate to 4 a minute.
    for d in queued(&w, "slow", 1).into_iter().take(2) {
        finish(&w, &d, true, 161);
    }
    w.rollouts.pump(161).unwrap();
    assert_eq!(queued(&w, "slow", 1).len(), 2 + 2, "4 a minute, 2 already in this minute");
    for t in (220..=600).step_by(10) {
        w.rollouts.pump(t).unwrap();
    }
    // From the planner's own records: no 60 s window holds more than the rate then allowed.
    let mut created = Vec::new();
    w.planner.scan(|o| created.push(o.created_at));
    created.sort();
    assert_eq!(created.len(), 20, "every device got its operation in the end");
    for (i, &t) in created.iter().enumerate() {
        let in_minute = created[i..].iter().take_while(|&&u| u < t + 60).count();
        assert!(in_minute <= 4, "{in_minute} operations in the minute from {t}: {created:?}");
        if t < 160 {
            assert!(in_minute <= 2, "before any success the rate is 2: {created:?}");
        }
    }
}

#[test]
fn devices_that_match_later_join_a_trailing_group_of_a_dynamic_rollout() {
    let w = world(2, false);
    let req = CreateRequest {
        name: "dyn".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        success: Some(100),
        dynamic_group_size: Some(2),
        ..Default::default()
    };
    w.rollouts.create(req, 0).unwrap();
    w.rollouts.act("dyn", Action::Start, None, 1).unwrap();
    finish(&w, "d00", true, 2);
    finish(&w, "d01", true, 2);
    w.rollouts.pump(2).unwrap();
    assert_eq!(states(&w, "dyn"), (RolloutState::Running, vec![Fin]), "a dynamic rollout keeps running");
    let new: Vec<DeviceSpec> = ["n1", "n2", "n3", "x"]
        .iter()
        .map(|id| DeviceSpec {
            id: id.to_string(),
            tag: Some(if *id == "x" { "other" } else { "release" }.into()),
            ..Default::default()
        })
        .collect();
    let ids: Vec<String> = new.iter().map(|d| d.id.clone()).collect();
    w.fleet.upsert(new, 3).unwrap();
    assert_eq!(w.rollouts.devices_changed(&ids, 3).unwrap(), 3);
    let r = w.rollouts.get("dyn").unwrap();
    assert_eq!(r.groups.iter().map(|g| (g.total, g.dynamic)).collect::<Vec<_>>(), [(2, false), (2, true), (1, true)]);
    assert_eq!(queued(&w, "dyn", 2), ["n1", "n2"]);
    assert!(queued(&w, "dyn", 3).is_empty(), "the next trailing group waits for its turn");
    finish(&w, "n1", true, 4);
    finish(&w, "n2", true, 4);
    w.rollouts.pump(4).unwrap();
    assert_eq!(queued(&w, "dyn", 3), ["n3"]);
    assert_eq!(w.rollouts.devices_changed(&ids, 5).unwrap(), 0, "already in it");
}

/// Finding 6 of issue 28: a late joiner arriving after the trailing dynamic group had
/// finished got a group of its own, one group per joiner without bound. The trailing group
/// takes newcomers until it is full, as in hawkBit, and hands them out at once.
#[test]
fn late_joiners_fill_the_trailing_dynamic_group_before_a_new_one_opens() {
    let w = world(1, false);
    let req = CreateRequest {
        name: "dyn".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        dynamic_group_size: Some(3),
        ..Default::default()
    };
    w.rollouts.create(req, 0).unwrap();
    w.rollouts.act("dyn", Action::Start, None, 1).unwrap();
    finish(&w, "d00", true, 2);
    w.rollouts.pump(2).unwrap();
    for (i, id) in ["n1", "n2", "n3", "n4"].iter().enumerate() {
        let now = 3 + i as u64;
        let spec = DeviceSpec { id: id.to_string(), tag: Some("release".into()), ..Default::default() };
        w.fleet.upsert(vec![spec], now).unwrap();
        assert_eq!(w.rollouts.devices_changed(&[id.to_string()], now).unwrap(), 1);
        // Each one is handed out and updates before the next joins.
        finish(&w, id, true, now);
        w.rollouts.pump(now).unwrap();
    }
    let r = w.rollouts.get("dyn").unwrap();
    assert_eq!(r.groups.iter().map(|g| (g.total, g.dynamic)).collect::<Vec<_>>(), [(1, false), (3, true), (1, true)]);
    w.rollouts.audit(true).unwrap();
}

/// A member deleted while its group runs leaves it with a stored reason: the total drops,
/// and after a restart the counts are the same (before, the group waited for it forever).
#[test]
fn a_deleted_member_leaves_its_group_for_good_across_a_restart() {
    let w = world(4, false);
    create(&w, "r", 1, "100%");
    w.rollouts.act("r", Action::Start, None, 2).unwrap();
    finish(&w, "d00", true, 3);
    w.rollouts.pump(3).unwrap();
    let waves = crate::planner::waves::Waves::open(
        w.planner.store.clone(),
        w.fleet.clone(),
        w.firmware.clone(),
        w.planner.clone(),
        3600,
        3,
    )
    .unwrap();
    // One that had succeeded and one still queued are deleted.
    for id in ["d00", "d02"] {
        crate::planner::delete_device(&w.planner, &w.fleet, &waves, Some(&w.rollouts), id, 4).unwrap().unwrap();
    }
    w.rollouts.pump(4).unwrap();
    w.rollouts.audit(true).unwrap();
    assert_eq!(w.rollouts.get("r").unwrap().groups[0].total, 2);
    drop(waves);
    let w = reopen(w);
    w.rollouts.audit(true).unwrap();
    assert_eq!(w.rollouts.status("r").unwrap().groups[0].counts, Counts { total: 2, ..Default::default() });
    finish(&w, "d01", true, 5);
    finish(&w, "d03", true, 5);
    w.rollouts.pump(5).unwrap();
    assert_eq!(states(&w, "r"), (RolloutState::Finished, vec![Fin]));
}

/// The second sequence of issue 28 without the wall clock: a rate-limited group meets its
/// threshold with its first slice; the rollout runs on until every member is handed out and
/// has ended.
#[test]
fn a_rate_limited_group_hands_out_every_member_whatever_its_threshold_did() {
    let w = world(8, false);
    let req = CreateRequest {
        name: "rate".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        rate: Some(Rate { per_minute: 2, factor: None, every: None }),
        ..Default::default()
    };
    w.rollouts.create(req, 0).unwrap();
    w.rollouts.act("rate", Action::Start, None, 0).unwrap();
    let mut now = 0;
    let mut updated = 0;
    while updated < 8 {
        let ready = queued(&w, "rate", 1);
        assert!(!ready.is_empty() || now < 1000, "nothing handed out for too long");
        for d in ready {
            finish(&w, &d, true, now);
            updated += 1;
        }
        w.rollouts.pump(now).unwrap();
        w.rollouts.audit(true).unwrap();
        let r = w.rollouts.get("rate").unwrap();
        if updated < 8 {
            assert_eq!(r.state, RolloutState::Running, "finished with {updated} of 8 updated");
        }
        now += 30;
        w.rollouts.pump(now).unwrap();
    }
    assert_eq!(states(&w, "rate"), (RolloutState::Finished, vec![Fin]));
    assert_eq!(w.rollouts.status("rate").unwrap().groups[0].counts.succeeded, 8);
}

#[test]
fn retry_makes_a_rollout_of_the_devices_that_failed() {
    let w = world(4, false);
    create(&w, "r", 1, "100%");
    assert!(matches!(w.rollouts.retry("r", 2), Err(RolloutError::NotRetryable { .. })));
    w.rollouts.act("r", Action::Start, None, 2).unwrap();
    finish(&w, "d00", true, 3);
    finish(&w, "d01", false, 3);
    finish(&w, "d02", true, 3);
    finish(&w, "d03", false, 3);
    w.rollouts.pump(3).unwrap();
    assert_eq!(w.rollouts.get("r").unwrap().state, RolloutState::Finished);
    let again = w.rollouts.retry("r", 4).unwrap();
    assert_eq!((again.name.as_str(), again.retry_of.as_deref(), again.total()), ("r-retry", Some("r"), 2));
    w.rollouts.act("r-retry", Action::Start, None, 5).unwrap();
    assert_eq!(queued(&w, "r-retry", 1), ["d01", "d03"]);
    assert_eq!(w.rollouts.retry("r", 6).unwrap().name, "r-retry2");
}

#[test]
fn stop_cancels_what_is_queued_and_in_flight_and_delete_keeps_the_name() {
    let w = world(4, false);
    create(&w, "r", 2, "50%");
    w.rollouts.act("r", Action::Start, None, 2).unwrap();
    // d00 is mid-transfer: its operation ends too, and its next Status is answered SYNC.
    let op = w.planner.operation("d00", MAIN_COMPONENT).unwrap();
    w.planner.record("d00", op.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 2).unwrap();
    let r = w.rollouts.act("r", Action::Stop, None, 3).unwrap();
    assert_eq!(r.state, RolloutState::Stopped);
    assert!(queued(&w, "r", 1).is_empty());
    assert_eq!(w.planner.operations_of("d00")[0].state, OpState::Canceled);
    w.rollouts.pump(3).unwrap();
    assert_eq!(w.rollouts.status("r").unwrap().groups[0].counts.canceled, 2);
    assert!(w.rollouts.act("r", Action::Resume, None, 3).is_err());
    let r = w.rollouts.act("r", Action::Delete, None, 4).unwrap();
    assert_eq!(r.state, RolloutState::Deleted);
    assert!(w.rollouts.list(false).is_empty());
    assert!(matches!(w.rollouts.create(CreateRequest { name: "r".into(), ..Default::default() }, 5), Err(_)));
    let w = reopen(w);
    assert_eq!(w.rollouts.get("r").unwrap().state, RolloutState::Deleted);
}

#[test]
fn creation_refuses_what_devices_may_not_receive_and_bad_definitions() {
    let w = world(4, false);
    // Production devices get only verified production targets; no repository is configured.
    w.fleet
        .upsert(
            vec![DeviceSpec { id: "p1".into(), tag: Some("release".into()), production: true, ..Default::default() }],
            0,
        )
        .unwrap();
    let req = CreateRequest {
        name: "r".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        ..Default::default()
    };
    let e = w.rollouts.create(req.clone(), 1).unwrap_err();
    assert!(matches!(e, RolloutError::NotAdmissible { count: 1, total: 5, .. }), "{e}");
    assert!(e.to_string().contains("e.g. device p1"), "{e}");
    // Narrowed to the CI devices, it is fine.
    let ok = CreateRequest { filter: "tag==release;production==false".into(), ..req.clone() };
    assert_eq!(w.rollouts.create(ok, 1).unwrap().total(), 4);
    let bad = |r: CreateRequest| w.rollouts.create(r, 1).unwrap_err().to_string();
    assert!(bad(CreateRequest { name: "x".into(), filter: "tag=release".into(), ..req.clone() }).starts_with("filter:"));
    assert_eq!(bad(CreateRequest { name: "x".into(), image: "app@9".into(), ..req.clone() }), "no image app@9");
    assert!(bad(CreateRequest { name: "x".into(), filter: "tag==none".into(), ..req.clone() })
        .contains("matches no device"));
    assert!(bad(CreateRequest { name: "x".into(), groups: Some(0), ..req.clone() }).contains("groups"));
    assert!(
        bad(CreateRequest { name: "x".into(), error: Some("5 %%".into()), ..req.clone() }).contains("error threshold")
    );
    assert!(bad(CreateRequest { name: "bad name".into(), ..req }).contains("invalid rollout name"));
}

#[test]
fn a_ready_rollout_with_a_start_time_starts_by_itself_then() {
    let w = world(2, false);
    let req = CreateRequest {
        name: "later".into(),
        filter: "tag==release".into(),
        image: "app@2.1".into(),
        start_at: Some(100),
        ..Default::default()
    };
    w.rollouts.create(req, 1).unwrap();
    w.rollouts.pump(99).unwrap();
    assert_eq!(states(&w, "later"), (RolloutState::Ready, vec![GroupState::Ready]));
    w.rollouts.pump(100).unwrap();
    assert_eq!(states(&w, "later"), (RolloutState::Running, vec![Run]));
    assert_eq!(queued(&w, "later", 1), ["d00", "d01"]);
}

#[test]
fn explicit_groups_take_sub_filters_and_percentages_and_each_image_fits_its_hardware() {
    let w = world(8, false);
    // Per-hardware images of one version, as waves pick them.
    w.firmware.add("esp", "3.0", vec!["esp32".into()], Bytes::from_static(b"esp image"), 0).unwrap();
    w.firmware.add("nrf", "3.0", vec!["nrf52".into()], Bytes::from_static(b"nrf image"), 0).unwrap();
    let req = CreateRequest {
        name: "hw".into(),
        filter: "tag==release".into(),
        image: "3.0".into(),
        group_defs: vec![
            GroupDef { filter: Some("hardware==esp32".into()), percent: Some(50), ..Default::default() },
            GroupDef { percent: Some(50), success: Some(90), ..Default::default() },
            GroupDef::default(),
        ],
        ..Default::default()
    };
    let r = w.rollouts.create(req, 1).unwrap();
    assert_eq!(r.groups.iter().map(|g| g.total).collect::<Vec<_>>(), [2, 3, 3]);
    assert_eq!(r.groups[1].conditions.success_percent, 90);
    w.rollouts.act("hw", Action::Start, None, 2).unwrap();
    assert_eq!(queued(&w, "hw", 1), ["d01", "d03"], "half of the four esp32 devices");
    for d in ["d01", "d03"] {
        assert_eq!(w.planner.operation(d, MAIN_COMPONENT).unwrap().image, "esp@3.0");
    }
}
