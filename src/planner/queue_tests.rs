//! The queue under the faults issue 28 found: numbers reused after a restart, a downgrade
//! judged by an image's label, two starts at once, a step half written.

use std::sync::Arc;

use bytes::Bytes;

use super::tests::world;
use super::*;
use crate::config::FirmwareConfig;
use crate::firmware::ImageIdentity;
use crate::fleet::{DeviceSpec, MAIN_COMPONENT};

fn open(dir: &std::path::Path) -> (Planner, Arc<Fleet>, Arc<Firmware>, Store) {
    let store = Store::open(dir, false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    (Planner::open(store.clone(), fleet.clone(), firmware.clone(), 100, 0).unwrap(), fleet, firmware, store)
}

/// Finding 8 of issue 28: the next sequence number was the highest stored one plus one, so
/// after the device holding the highest was deleted, a restart handed its number out again.
#[test]
fn sequence_numbers_are_never_reused_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (p, fleet, firmware, store) = open(dir.path());
    fleet
        .upsert(
            vec![
                DeviceSpec { id: "a".into(), ..Default::default() },
                DeviceSpec { id: "b".into(), ..Default::default() },
            ],
            0,
        )
        .unwrap();
    firmware.add("app", "2.0", vec![], Bytes::from_static(b"0123456789"), 0).unwrap();
    p.assign("a", MAIN_COMPONENT, "app@2.0", 1).unwrap();
    let highest = p.assign("b", MAIN_COMPONENT, "app@2.0", 1).unwrap().seq;
    p.forget("b").unwrap();
    fleet.delete("b").unwrap();
    drop((p, fleet, firmware, store));
    let (p, ..) = open(dir.path());
    assert!(p.assign("a", MAIN_COMPONENT, "app@2.0", 2).unwrap().seq > highest);
}

/// Finding 4 of issue 28: the downgrade check compared the image's label with what the device
/// reports; a FAS image reports its `firmwareVersion`.
#[test]
fn the_downgrade_check_compares_the_version_the_device_will_report() {
    let w = world();
    let p = &w.planner;
    p.firmware.add("bios", "1.1.0", vec![], Bytes::from_static(b"bios bytes"), 0).unwrap();
    let identity = ImageIdentity {
        target: "BIOS".into(),
        firmware_version: "2.19.0".into(),
        tags: vec!["default".into()],
        ..Default::default()
    };
    let meta = p.firmware.set_identity("bios", "1.1.0", identity).unwrap();
    // The device runs 2.0.0: 2.19.0 is an upgrade (its label 1.1.0 would have made it a
    // downgrade, and failed it).
    p.fleet.observe("d1", "BIOS", "2.0.0", 1).unwrap();
    let seq = p.push_expecting("d1", "BIOS", &meta, "2.19.0", 10, "action:x", 1).unwrap().seq;
    match p.lookup("d1", "BIOS", 2).unwrap() {
        Lookup::Active(a) => assert_eq!((a.seq, a.version.as_str()), (seq, "2.19.0")),
        Lookup::Refused(why) => panic!("refused: {why}"),
        _ => panic!("not active"),
    }
    // On 3.0.0 it is a downgrade, named by the version the device would report.
    p.fleet.observe("d2", "BIOS", "3.0.0", 3).unwrap();
    p.push_expecting("d2", "BIOS", &meta, "2.19.0", 10, "action:x", 3).unwrap();
    match p.lookup("d2", "BIOS", 4).unwrap() {
        Lookup::Refused(why) => assert!(why.contains("downgrade from 3.0.0 to 2.19.0"), "{why}"),
        _ => panic!("a downgrade must be refused"),
    }
}

/// Finding 1 of issue 28 (the planner's side): two components' transfers could start at once
/// when their Statuses (or two data-plane nodes' reports) raced. The second start loses, and
/// a view grants one start per device.
#[test]
fn a_second_start_on_one_device_loses_and_a_view_grants_one() {
    let w = world();
    let p = &w.planner;
    let main = p.enqueue("d1", MAIN_COMPONENT, "app@2.0", 10, "action:a", 1).unwrap().seq;
    let bios = p.enqueue("d1", "bios", "app@2.0", 10, "action:a", 1).unwrap().seq;
    // Both heads looked up before either started: each Status thinks it may start.
    let views = p.view_of("d1", 2).unwrap();
    let active: Vec<u64> = views
        .iter()
        .filter_map(|(_, l)| match l {
            Lookup::Active(a) if a.state == OpState::Pending => Some(a.seq),
            _ => None,
        })
        .collect();
    assert_eq!(active, [main], "the view grants the oldest of equal weight, the other waits");
    assert!(!p.advance("d1", bios, Some(OpState::Downloading), Some(0), None, None, 3).unwrap(), "not granted");
    assert!(p.record("d1", main, OpState::Pending, Some(OpState::Downloading), Some(0), None, 3).unwrap());
    assert!(
        !p.record("d1", bios, OpState::Pending, Some(OpState::Downloading), Some(0), None, 3).unwrap(),
        "one transfer"
    );
    p.audit_transfers().unwrap();
    assert_eq!(p.grant("d1"), None, "nothing may start while one is in flight");
}

/// A step is one batch: a crash at its commit leaves nothing of it, in the store or memory.
#[test]
fn a_step_that_fails_to_commit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (p, fleet, firmware, store) = open(dir.path());
    let ids: Vec<DeviceSpec> = (0..5).map(|i| DeviceSpec { id: format!("s{i}"), ..Default::default() }).collect();
    fleet.upsert(ids, 0).unwrap();
    let (meta, _) = firmware.add("app", "2.0", vec![], Bytes::from_static(b"0123456789"), 0).unwrap();
    store.crash_after(Some(0));
    let mut step = p.step();
    for i in 0..5 {
        step.push(&format!("s{i}"), MAIN_COMPONENT, &meta, 10, "rollout:r/1", 1);
    }
    assert!(matches!(step.commit(), Err(PlannerError::Store(StoreError::Down))));
    assert!((0..5).all(|i| p.operations_of(&format!("s{i}")).is_empty()), "memory unchanged");
    store.crash_after(None);
    p.audit_store().unwrap();
    let mut step = p.step();
    for i in 0..5 {
        step.push(&format!("s{i}"), MAIN_COMPONENT, &meta, 10, "rollout:r/1", 1);
    }
    step.commit().unwrap();
    drop((p, fleet, firmware, store));
    let (p, ..) = open(dir.path());
    assert!((0..5).all(|i| p.operations_of(&format!("s{i}")).len() == 1), "all five after a restart");
}
