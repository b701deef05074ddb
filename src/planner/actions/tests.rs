use super::*;

fn image(id: &str, target: &str, fw: &str, semver: &str, tags: &[&str]) -> ImageRecord {
    ImageRecord {
        id: id.into(),
        identity: ImageIdentity {
            device_type: "nodeBMC".into(),
            manufacturer: "intel".into(),
            models: vec!["s2600".into(), "s2600_REV_a".into()],
            target: target.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            firmware_version: fw.into(),
            semantic_firmware_version: semver.into(),
            ..Default::default()
        },
    }
}

/// BIOS 1.0/1.1/1.2 (1.2 not tagged default), BMC 5.0/6.0, NIC 9.0 only.
fn images() -> Vec<ImageRecord> {
    vec![
        image("bios@1.0", "BIOS", "f1.0", "1.0.0", &["default"]),
        image("bios@1.1", "BIOS", "f1.1", "1.1.0", &["default"]),
        image("bios@1.2", "BIOS", "f1.2", "1.2.0", &["recovery"]),
        image("bmc@5", "BMC", "b5", "5.0.0", &["default"]),
        image("bmc@6", "BMC", "b6", "6.0.0", &["default"]),
        image("nic@9", "NIC", "n9", "9.0.0", &["default"]),
    ]
}

fn xname(name: &str, model: &str, targets: &[(&str, &str)]) -> Xname {
    Xname {
        xname: name.into(),
        device_type: Some("nodeBMC".into()),
        manufacturer: Some("Intel".into()),
        model: Some(model.into()),
        groups: vec!["blue".into()],
        targets: targets.iter().map(|(t, v)| (t.to_string(), v.to_string())).collect(),
    }
}

fn fleet() -> Vec<Xname> {
    vec![
        xname("x0c0s1b0", "s2600", &[("BIOS", "f1.0"), ("BMC", "b5"), ("NIC", "n8")]),
        xname("x0c0s2b0", "S2600", &[("BIOS", "f1.1"), ("BMC", "b6")]),
        xname("x0c0s3b0", "other", &[("BIOS", "f1.0")]),
    ]
}

fn states(ops: &[PlannedOperation]) -> Vec<(String, &str, OperationState)> {
    ops.iter().map(|o| (o.xname.clone(), o.target.as_str(), o.state)).collect()
}

fn live(version: VersionChoice) -> ActionRequest {
    ActionRequest { command: Command { version, ..Command::default() }, ..Default::default() }
}

#[test]
fn latest_picks_the_highest_tagged_image_and_siblings_wait_their_turn() {
    let ops = plan(&live(VersionChoice::Latest), fleet(), &images()).unwrap();
    use OperationState::*;
    assert_eq!(
        states(&ops),
        [
            ("x0c0s1b0".into(), "BIOS", Configured),
            ("x0c0s1b0".into(), "BMC", Blocked),
            ("x0c0s1b0".into(), "NIC", Failed),
            ("x0c0s2b0".into(), "BIOS", NoOperation),
            ("x0c0s2b0".into(), "BMC", NoOperation),
            ("x0c0s3b0".into(), "BIOS", NoSolution),
        ]
    );
    // 1.2 is newer but not tagged default; models compare without case.
    assert_eq!(ops[0].to_image_id.as_deref(), Some("bios@1.1"));
    assert_eq!(
        (ops[0].from_image_id.as_deref(), ops[0].to_firmware_version.as_deref()),
        (Some("bios@1.0"), Some("f1.1"))
    );
    assert_eq!(ops[1].state_helper, "waits for BIOS on the same xname");
    assert!(ops[2].state_helper.starts_with("restore not possible: no image of n8"), "{}", ops[2].state_helper);
    assert_eq!(ops[3].state_helper, "already runs f1.1");
    assert!(ops[5].state_helper.contains("no image"), "model `other` matches no image");
}

#[test]
fn earliest_explicit_overwrite_and_the_restore_override() {
    use OperationState::*;
    let ops = plan(&live(VersionChoice::Earliest), fleet(), &images()).unwrap();
    let got: Vec<(OperationState, Option<&str>)> = ops.iter().map(|o| (o.state, o.to_image_id.as_deref())).collect();
    assert_eq!(
        got,
        [
            (NoOperation, Some("bios@1.0")),
            (NoOperation, Some("bmc@5")),
            (Failed, Some("nic@9")),
            (Configured, Some("bios@1.0")),
            (Blocked, Some("bmc@5")),
            (NoSolution, None),
        ]
    );

    // Explicit: the named image, on the targets it is for; a tag does not matter.
    let mut req = live(VersionChoice::Explicit);
    assert_eq!(plan(&req, fleet(), &images()), Err(PlanError::ExplicitWithoutImage));
    req.image_filter.image_id = Some("bios@9".into());
    assert!(matches!(plan(&req, fleet(), &images()), Err(PlanError::UnknownImage(_))));
    req.image_filter.image_id = Some("bios@1.2".into());
    let ops = plan(&req, fleet(), &images()).unwrap();
    assert_eq!(states(&ops), [("x0c0s1b0".into(), "BIOS", Configured), ("x0c0s2b0".into(), "BIOS", Configured)]);
    // Overriding the image's applicability reaches the odd model too, whose version then has
    // no image to restore: refused unless that is overridden as well.
    req.image_filter.override_image = true;
    let ops = plan(&req, fleet(), &images()).unwrap();
    assert_eq!((ops.len(), ops[2].xname.as_str(), ops[2].state), (3, "x0c0s3b0", Failed));
    req.command.restore_not_possible_override = true;
    assert_eq!(plan(&req, fleet(), &images()).unwrap()[2].state, Configured);

    // Overwrite: a target already on the chosen version is updated again.
    let mut req = live(VersionChoice::Latest);
    req.command.overwrite_same_image = true;
    req.command.restore_not_possible_override = true;
    let ops = plan(&req, fleet(), &images()).unwrap();
    assert_eq!(
        states(&ops)[..5],
        [
            ("x0c0s1b0".into(), "BIOS", Configured),
            ("x0c0s1b0".into(), "BMC", Blocked),
            ("x0c0s1b0".into(), "NIC", Blocked),
            ("x0c0s2b0".into(), "BIOS", Configured),
            ("x0c0s2b0".into(), "BMC", Blocked),
        ]
    );
}

#[test]
fn the_five_filters_are_anded() {
    let count = |f: &dyn Fn(&mut ActionRequest)| {
        let mut req = live(VersionChoice::Latest);
        f(&mut req);
        plan(&req, fleet(), &images()).unwrap().iter().map(|o| format!("{}/{}", o.xname, o.target)).collect::<Vec<_>>()
    };
    assert_eq!(
        count(&|r| r.state_component_filter.xnames = vec!["x0c0s2b0".into()]),
        ["x0c0s2b0/BIOS", "x0c0s2b0/BMC"]
    );
    assert!(count(&|r| r.state_component_filter.groups = vec!["red".into()]).is_empty());
    assert_eq!(count(&|r| r.state_component_filter.device_types = vec!["NODEBMC".into()]).len(), 6);
    assert_eq!(count(&|r| r.inventory_hardware_filter.model = Some("s2600".into())).len(), 5);
    assert!(count(&|r| r.inventory_hardware_filter.manufacturer = Some("gigabyte".into())).is_empty());
    assert_eq!(count(&|r| r.target_filter.targets = vec!["bmc".into()]), ["x0c0s1b0/BMC", "x0c0s2b0/BMC"]);
    assert_eq!(
        count(&|r| {
            r.target_filter.targets = vec!["BIOS".into()];
            r.inventory_hardware_filter.model = Some("other".into());
        }),
        ["x0c0s3b0/BIOS"]
    );
}

#[test]
fn a_fas_action_json_is_read_with_fas_defaults_and_unknown_fields_ignored() {
    let text = r#"{
        "stateComponentFilter": {"xnames": ["x0c0s1b0"], "partitions": ["p1"]},
        "inventoryHardwareFilter": {"manufacturer": "intel"},
        "targetFilter": {"targets": ["BIOS"]},
        "imageFilter": {"imageID": "bios@1.1", "overrideImage": false},
        "command": {"version": "latest", "tag": "default", "restoreNotPossibleOverride": true,
                    "timeLimit": 1000, "description": "update cabinet x0c0"},
        "somethingNew": 1
    }"#;
    let req: ActionRequest = serde_json::from_str(text).unwrap();
    // A filter fwgate does not implement is read, then refused by name, never ignored
    // (before, the partition was dropped and the action selected every device).
    assert_eq!(req.state_component_filter.partitions, ["p1"]);
    let refused = plan(&req, Vec::new(), &[]).unwrap_err();
    assert_eq!(refused, PlanError::Unsupported("stateComponentFilter.partitions"));
    assert!(refused.to_string().contains("stateComponentFilter.partitions is not supported"), "{refused}");
    assert!(!req.command.override_dryrun, "a dry run unless told otherwise");
    assert_eq!((req.command.time_limit, req.command.tag.as_str()), (1000, "default"));
    assert_eq!(req.image_filter.image_id.as_deref(), Some("bios@1.1"));
    let empty: ActionRequest = serde_json::from_str("{}").unwrap();
    assert_eq!((empty.command.version, empty.command.time_limit), (VersionChoice::Latest, DEFAULT_TIME_LIMIT));
    // A known field of the wrong shape is refused.
    assert!(serde_json::from_str::<ActionRequest>(r#"{"command": {"version": "newest"}}"#).is_err());
    // The seed's image record (singular `model` and `tag`) reads as an identity.
    let img: ImageIdentity = serde_json::from_str(
        r#"{"imageID": "3fa8", "deviceType": "nodeBMC", "manufacturer": "intel", "model": ["s2600"],
            "target": "BIOS", "tag": ["recovery", "default"], "firmwareVersion": "f1.123.24xz",
            "semanticFirmwareVersion": "v1.2.252", "pollingSpeedSeconds": 30, "s3URL": "s3://x"}"#,
    )
    .unwrap();
    assert_eq!((img.models.len(), img.tags.len(), img.polling_speed_seconds), (1, 2, Some(30)));
}

/// The registry and the image store, real (RocksDB in a temp dir), as the planner reads them.
#[test]
fn registered_devices_and_uploaded_images_plan_through_their_fas_identity() {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::config::FirmwareConfig;
    use crate::firmware::Firmware;
    use crate::fleet::{DeviceSpec, Fleet, Inventory};
    use crate::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
    let firmware = Firmware::open(store.clone(), FirmwareConfig::default()).unwrap();
    let inventory = Some(Box::new(Inventory {
        device_type: Some("nodeBMC".into()),
        manufacturer: Some("intel".into()),
        model: Some("s2600".into()),
    }));
    fleet.upsert(vec![DeviceSpec { id: "x0c0s1b0".into(), inventory, ..Default::default() }], 0).unwrap();
    fleet.observe("x0c0s1b0", "BIOS", "f1.0", 1).unwrap();
    fleet.observe("x0c0s1b0", "BMC", "b5", 1).unwrap();
    for (name, version, fw) in [("bios", "1.0", "f1.0"), ("bios", "1.1", "f1.1"), ("bmc", "5", "b5")] {
        firmware.add(name, version, vec![], Bytes::from(format!("{name} {version}")), 0).unwrap();
        let identity = images().into_iter().find(|i| i.identity.firmware_version == fw).unwrap().identity;
        firmware.set_identity(name, version, identity).unwrap();
    }
    firmware.add("plain", "1", vec![], Bytes::from_static(b"no identity"), 0).unwrap();
    // A second image tagged default for the same hardware, target and version is refused.
    firmware.add("bios-copy", "1.1", vec![], Bytes::from_static(b"copy"), 0).unwrap();
    let copy = images().into_iter().find(|i| i.id == "bios@1.1").unwrap().identity;
    let e = firmware.set_identity("bios-copy", "1.1", copy).unwrap_err();
    assert!(e.to_string().contains("bios@1.1 is already tagged default"), "{e}");
    drop(firmware);
    let firmware = Firmware::open(store, FirmwareConfig::default()).unwrap();
    let records: Vec<ImageRecord> = firmware.list().iter().filter_map(|m| ImageRecord::of(m)).collect();
    assert_eq!(records.len(), 3, "identities survive a restart; images without one are not candidates");
    let devices = fleet.list(None, 100).iter().map(Xname::of).collect::<Vec<_>>();
    let ops = plan(&live(VersionChoice::Latest), devices, &records).unwrap();
    let got: Vec<(&str, OperationState, Option<&str>)> =
        ops.iter().map(|o| (o.target.as_str(), o.state, o.to_image_id.as_deref())).collect();
    assert_eq!(
        got,
        [("BIOS", OperationState::Configured, Some("bios@1.1")), ("BMC", OperationState::NoOperation, Some("bmc@5"))]
    );
}
