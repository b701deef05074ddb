use bytes::Bytes;

use super::*;
use crate::config::FirmwareConfig;
use crate::fleet::select::Limit;
use crate::fleet::DeviceSpec;

struct World {
    dir: tempfile::TempDir,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    waves: Waves,
}

fn open_at(dir: tempfile::TempDir) -> World {
    let store = Store::open(dir.path(), false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 10_000).unwrap());
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    let planner = Arc::new(Planner::open(store.clone(), fleet.clone(), firmware.clone(), 3600, 0).unwrap());
    let waves = Waves::open(store, fleet.clone(), firmware.clone(), planner.clone(), 900, 0).unwrap();
    World { dir, fleet, firmware, planner, waves }
}

/// Closes everything (the store last) and opens it again, as a restart does.
fn reopen(w: World) -> World {
    let World { dir, fleet, firmware, planner, waves } = w;
    drop((waves, planner, firmware, fleet));
    open_at(dir)
}

fn device(id: &str, tag: &str, groups: &[&str], production: bool) -> DeviceSpec {
    DeviceSpec {
        id: id.into(),
        tag: Some(tag.into()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        production,
        hardware: None,
        inventory: None,
    }
}

/// 30 test (CI) devices p00..p29 on `release` (p00..p04 in `canary`, even ones in `eu`), 3
/// production devices t0..t2 on `release`, 2 CI devices o0, o1 on `other`; images app 1.0,
/// 2.0, 2.1, 3.0. The waves are for CI devices: with no CI TUF repository configured, any
/// image may reach them, so these tests are about the wave rules alone (TUF: `crate::tuf`
/// and the gateway tests).
fn world() -> World {
    let w = open_at(tempfile::tempdir().unwrap());
    let mut specs = Vec::new();
    for n in 0..30 {
        let mut groups = Vec::new();
        if n < 5 {
            groups.push("canary");
        }
        if n % 2 == 0 {
            groups.push("eu");
        }
        specs.push(device(&format!("p{n:02}"), "release", &groups, false));
    }
    for n in 0..3 {
        specs.push(device(&format!("t{n}"), "release", &[], true));
    }
    for n in 0..2 {
        specs.push(device(&format!("o{n}"), "other", &[], false));
    }
    w.fleet.upsert(specs, 0).unwrap();
    for v in ["1.0", "2.0", "2.1", "3.0"] {
        w.firmware.add("app", v, vec![], Bytes::from(format!("image {v}").into_bytes()), 0).unwrap();
    }
    w
}

fn init(name: &str, version: &str, tag: &str) -> InitRequest {
    InitRequest { name: name.into(), version: version.into(), tag: tag.into(), production: false, ..Default::default() }
}

fn limit(l: &str) -> RolloutRequest {
    RolloutRequest { limit: Some(LimitArg::Text(l.into())), seed: Some(7), ..Default::default() }
}

fn uuids(ids: &str) -> RolloutRequest {
    RolloutRequest { uuids: Some(UuidsArg::Text(ids.into())), ..Default::default() }
}

/// [`world`] with complete wave `c` (2.0) on `release`, and active wave `a` (2.1) rolled out
/// to p00 and p01.
fn complete_c_and_active_a() -> World {
    let w = world();
    w.waves.init(init("c", "2.0", "release"), 1).unwrap();
    w.waves.complete("c", 2).unwrap();
    w.waves.init(init("a", "2.1", "release"), 3).unwrap();
    w.waves.rollout("a", uuids("p00,p01"), 4).unwrap();
    w
}

/// Devices with a live (not canceled) operation of the wave, sorted.
fn staged(w: &World, wave: &str) -> Vec<String> {
    let origin = format!("wave:{wave}");
    let mut v = Vec::new();
    w.planner.scan(|o| {
        if o.origin == origin && o.state != OpState::Canceled {
            v.push(o.device.clone());
        }
    });
    v.sort();
    v
}

fn state_of(w: &World, device: &str, wave: &str) -> Option<OpState> {
    let origin = format!("wave:{wave}");
    w.planner.operations_of(device).into_iter().filter(|o| o.origin == origin).max_by_key(|o| o.seq).map(|o| o.state)
}

#[test]
fn one_active_wave_per_tag_and_class() {
    let w = world();
    w.waves.init(init("w1", "2.0", "release"), 1).unwrap();
    let err = w.waves.init(init("w2", "2.1", "release"), 2).unwrap_err();
    assert!(matches!(&err, WaveError::ActiveWave { active, .. } if active == "w1"), "{err}");
    assert!(err.to_string().contains("already has an active wave: w1"));
    // Another tag is independent.
    w.waves.init(init("w3", "2.1", "other"), 3).unwrap();
    // The production devices of the same tag are another class: not blocked by w1, but with no
    // production TUF repository configured no image may reach them.
    let err = w.waves.init(InitRequest { production: true, ..init("w4", "2.1", "release") }, 4).unwrap_err();
    assert!(matches!(err, WaveError::NotAdmissible { .. }), "{err}");
    assert!(err.to_string().contains("no production TUF repository"), "{err}");
    assert!(matches!(w.waves.init(init("w1", "3.0", "x"), 5), Err(WaveError::Exists(_))));
    assert!(matches!(w.waves.init(init("bad name", "3.0", "x"), 5), Err(WaveError::InvalidName(_))));
    // Once the first is canceled, the tag takes a new wave.
    w.waves.cancel("w1", 6).unwrap();
    w.waves.init(init("w5", "2.1", "release"), 7).unwrap();
}

#[test]
fn the_version_must_exist_order_and_be_newer_than_production() {
    let w = world();
    assert!(matches!(w.waves.init(init("w", "9.9", "release"), 1), Err(WaveError::NoImage(_))));
    w.firmware.add("app", "nightly", vec![], Bytes::from_static(b"n"), 0).unwrap();
    assert!(matches!(w.waves.init(init("w", "nightly", "release"), 1), Err(WaveError::Unordered(_))));
    w.waves.init(init("w1", "2.0", "release"), 1).unwrap();
    w.waves.complete("w1", 2).unwrap();
    assert_eq!(w.waves.production_versions("release", false), ["2.0"]);
    for v in ["1.0", "2.0", "app@2.0"] {
        let err = w.waves.init(init("w2", v, "release"), 3).unwrap_err();
        assert!(matches!(err, WaveError::NotNewer { ref current, .. } if current == "2.0"), "{v}: {err}");
    }
    // A dry run checks everything and writes nothing.
    let dry = w.waves.init(InitRequest { dry_run: true, ..init("w2", "app@2.1", "release") }, 3).unwrap();
    assert_eq!((dry.version.as_str(), dry.image_name.as_deref()), ("2.1", Some("app")));
    assert!(w.waves.get("w2").is_none());
    w.waves.init(init("w2", "app@2.1", "release"), 3).unwrap();
}

#[test]
fn a_complete_wave_cannot_be_canceled_but_its_version_can_be_pruned() {
    let w = world();
    w.waves.init(init("w1", "2.0", "release"), 1).unwrap();
    w.waves.complete("w1", 2).unwrap();
    let err = w.waves.cancel("w1", 3).unwrap_err();
    assert!(matches!(err, WaveError::CancelComplete(..)));
    assert!(err.to_string().contains("--prune 2.0"), "{err}");
    assert_eq!(w.waves.get("w1").unwrap().state, WaveState::Complete);
    w.waves.init(init("w2", "3.0", "release"), 4).unwrap();
    w.waves.complete("w2", 5).unwrap();
    assert_eq!(w.waves.production_versions("release", false), ["2.0", "3.0"]);
    // Pruning a version that is not a production version is refused and names the ones there are.
    let req = InitRequest { prune: vec!["1.0".into()], ..init("w3", "2.1", "release") };
    assert!(matches!(w.waves.init(req, 6), Err(WaveError::NotProduction { .. })));
    // Pruning 3.0 makes 2.0 the newest again, so 2.1 is newer.
    let req = InitRequest { prune: vec!["3.0".into()], ..init("w3", "2.1", "release") };
    w.waves.init(req, 6).unwrap();
    w.waves.complete("w3", 7).unwrap();
    assert_eq!(w.waves.production_versions("release", false), ["2.0", "2.1"]);
    // Canceling twice, or canceling a canceled wave, changes nothing.
    w.waves.init(init("w4", "3.0", "release"), 8).unwrap();
    w.waves.cancel("w4", 9).unwrap();
    assert_eq!(w.waves.cancel("w4", 10).unwrap().1, 0);
    assert!(matches!(w.waves.rollout("w4", RolloutRequest::default(), 11), Err(WaveError::NotActive { .. })));
}

#[test]
fn limits_are_counts_or_percentages() {
    assert_eq!(parse_limit(&LimitArg::Text("20".into())).unwrap(), Limit::Count(20));
    assert_eq!(parse_limit(&LimitArg::Count(3)).unwrap(), Limit::Count(3));
    assert_eq!(parse_limit(&LimitArg::Text(" 10% ".into())).unwrap(), Limit::PartsPerMillion(100_000));
    for bad in ["0", "0%", "101%", "-5", "ten", "%", "1.5", "1.12345%", "-1%", "1e1%", ".5%", "0.00001%", "100.0001%"] {
        assert!(matches!(parse_limit(&LimitArg::Text(bad.into())), Err(WaveError::BadLimit(_))), "{bad}");
    }
    // Decimal percentages are read exactly.
    for (text, ppm) in [("1.1%", 11_000), ("0.0001%", 1), ("100%", 1_000_000), ("33.3333%", 333_333), ("5.%", 50_000)] {
        assert_eq!(parse_limit(&LimitArg::Text(text.into())).unwrap(), Limit::PartsPerMillion(ppm), "{text}");
    }
}

#[test]
fn limit_percent_rounds_up_and_repeated_limits_never_pick_a_staged_device_again() {
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    // 10% of the 30 CI devices of the tag: 3; the production devices are another class.
    let r = w.waves.rollout("w", limit("10%"), 2).unwrap();
    assert_eq!((r.population, r.selected, r.staged), (30, 3, 3));
    let first = staged(&w, "w");
    let r = w.waves.rollout("w", RolloutRequest { seed: Some(8), ..limit("20") }, 3).unwrap();
    assert_eq!(r.staged, 20);
    let second = staged(&w, "w");
    assert_eq!(second.len(), 23, "no device staged twice");
    assert!(first.iter().all(|d| second.contains(d)));
    // 10% of 30 rounds up to 3 even though only 7 are left to choose from.
    let r = w.waves.rollout("w", limit("10%"), 4).unwrap();
    assert_eq!(r.staged, 3);
    let r = w.waves.rollout("w", RolloutRequest::default(), 5).unwrap();
    assert_eq!(r.staged, 4, "the rest");
    assert_eq!(w.waves.rollout("w", limit("5"), 6).unwrap().staged, 0, "everyone is in the wave");
    assert!(staged(&w, "w").iter().all(|d| d.starts_with('p')));
    assert_eq!(w.waves.get("w").unwrap().rollouts.len(), 5);
    // A device that already runs the wave's version is not staged either.
    w.waves.init(init("x", "2.0", "other"), 7).unwrap();
    w.fleet.observe("o0", MAIN_COMPONENT, "2.0", 7).unwrap();
    let r = w.waves.rollout("x", RolloutRequest::default(), 8).unwrap();
    assert_eq!((r.population, r.staged), (2, 1));
    assert_eq!(staged(&w, "x"), ["o1"]);
}

#[test]
fn uuids_take_any_separator_and_intersect_with_the_group() {
    assert_eq!(split_uuids(" a,b;c|d e\tf\n\ng,,|"), ["a", "b", "c", "d", "e", "f", "g"]);
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    // p00..p04 are canary; p06 is not; t0 is a production device; o0 follows another tag.
    let list = "p00,p01;p02|p06\nt0 o0\tnope";
    let req = RolloutRequest {
        group: Some("canary".into()),
        uuids: Some(UuidsArg::Text(list.into())),
        seed: Some(1),
        ..Default::default()
    };
    let r = w.waves.rollout("w", req.clone(), 2).unwrap();
    assert_eq!(r.staged, 3);
    assert_eq!(staged(&w, "w"), ["p00", "p01", "p02"]);
    let reasons: BTreeMap<&str, &str> = r.rejected.iter().map(|x| (x.device.as_str(), x.reason.as_str())).collect();
    assert_eq!(reasons["p06"], "not in the group");
    assert_eq!(reasons["t0"], "of the other production class");
    assert_eq!(reasons["o0"], "follows another tag");
    assert_eq!(reasons["nope"], "unknown device");
    assert_eq!(reasons.len(), 4);
    // Again: the staged ones are reported as already in the wave, not silently dropped.
    let r = w.waves.rollout("w", req, 3).unwrap();
    assert_eq!(r.staged, 0);
    assert_eq!(r.rejected.iter().filter(|x| x.reason.starts_with("already in the wave")).count(), 3);
    // --uuids with --limit samples from the list.
    let req = RolloutRequest {
        uuids: Some(UuidsArg::List(vec!["p10 p11".into(), "p12".into(), "p13".into()])),
        limit: Some(LimitArg::Count(2)),
        seed: Some(1),
        ..Default::default()
    };
    let r = w.waves.rollout("w", req, 4).unwrap();
    assert_eq!((r.population, r.staged), (4, 2));
}

#[test]
fn a_dry_run_with_a_seed_prints_the_sample_the_rollout_then_stages() {
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    let dry = RolloutRequest { dry_run: true, print_uuids: true, seed: Some(99), ..limit("6") };
    let a = w.waves.rollout("w", dry.clone(), 2).unwrap();
    let b = w.waves.rollout("w", dry, 2).unwrap();
    assert_eq!(a.devices, b.devices);
    assert_eq!(a.devices.as_ref().unwrap().len(), 6);
    assert!(staged(&w, "w").is_empty() && w.waves.get("w").unwrap().rollouts.is_empty(), "a dry run writes nothing");
    let real = RolloutRequest { seed: Some(99), ..limit("6") };
    assert_eq!(w.waves.rollout("w", real, 2).unwrap().staged, 6);
    let mut expected = a.devices.unwrap();
    expected.sort();
    assert_eq!(staged(&w, "w"), expected);
}

#[test]
fn a_registration_cut_short_by_a_crash_before_the_waves_acted_is_finished_at_open() {
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    w.waves.complete("w", 2).unwrap();
    // A new device joins the tag, and p29 leaves it; the registry write lands, then the
    // gateway dies before the waves hear of it.
    let (_, r) =
        w.fleet.register(vec![device("new", "release", &[], false), device("p29", "other", &[], false)], 3).unwrap();
    assert_eq!(r.ids, ["new", "p29"]);
    let w = reopen(w);
    // What a restart alone leaves: opening the waves stages the newcomer (they reconcile
    // complete waves), but p29 still has the wave of a tag it left.
    assert_eq!(state_of(&w, "new", "w"), Some(OpState::Pending));
    assert_eq!(state_of(&w, "p29", "w"), Some(OpState::Pending));
    // The intent written with the registry finishes it, once.
    assert_eq!(crate::planner::finish_registrations(&w.fleet, &w.waves, None, 4).unwrap(), 1);
    assert_eq!(state_of(&w, "new", "w"), Some(OpState::Pending));
    assert_eq!(state_of(&w, "p29", "w"), Some(OpState::Canceled));
    let w = reopen(w);
    assert_eq!(crate::planner::finish_registrations(&w.fleet, &w.waves, None, 5).unwrap(), 0);
    assert_eq!(staged(&w, "w").len(), 30, "p29 out, new in");
}

#[test]
fn complete_reaches_every_device_of_the_tag_and_the_ones_that_join_later() {
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    w.waves.rollout("w", RolloutRequest { group: Some("canary".into()), ..Default::default() }, 2).unwrap();
    let (wave, n) = w.waves.complete("w", 3).unwrap();
    assert_eq!((wave.state, n), (WaveState::Complete, 25));
    assert_eq!(staged(&w, "w").len(), 30);
    assert!(state_of(&w, "t0", "w").is_none() && state_of(&w, "o0", "w").is_none());
    // A new device on the tag, and a production device that becomes a CI one, get it.
    w.fleet.upsert(vec![device("new", "release", &[], false), device("t0", "release", &[], false)], 4).unwrap();
    assert_eq!(w.waves.devices_changed(&["new".into(), "t0".into()], 4).unwrap(), 2);
    assert_eq!(state_of(&w, "new", "w"), Some(OpState::Pending));
    assert_eq!(w.planner.operation("new", MAIN_COMPONENT).unwrap().image, "app@2.0");
    // A device leaving the tag before it started loses the queued operation.
    w.fleet.upsert(vec![device("p29", "other", &[], false)], 5).unwrap();
    assert_eq!(w.waves.devices_changed(&["p29".into()], 5).unwrap(), 0);
    assert_eq!(state_of(&w, "p29", "w"), Some(OpState::Canceled));
    // Registering again changes nothing for devices already in the wave.
    assert_eq!(w.waves.devices_changed(&["new".into()], 6).unwrap(), 0);
    // A device the join hook missed (its image was not admissible then) is reached by the
    // reconciliation that follows each TUF refresh, once.
    w.fleet.upsert(vec![device("missed", "release", &[], false)], 7).unwrap();
    assert_eq!(w.waves.after_refresh(7).unwrap(), 1);
    assert_eq!(state_of(&w, "missed", "w"), Some(OpState::Pending));
    assert_eq!(w.waves.after_refresh(8).unwrap(), 0);
    // A device that already runs a newer version (a later wave it updated to was canceled)
    // is not handed a downgrade.
    w.fleet.upsert(vec![device("ahead", "release", &[], false)], 9).unwrap();
    w.fleet.observe("ahead", MAIN_COMPONENT, "2.1", 9).unwrap();
    assert_eq!(w.waves.devices_changed(&["ahead".into()], 9).unwrap(), 0);
    assert_eq!(w.waves.after_refresh(9).unwrap(), 0);
    assert_eq!(state_of(&w, "ahead", "w"), None);
}

#[test]
fn cancel_withdraws_queued_and_in_flight_operations_and_keeps_updated_devices() {
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    w.waves.rollout("w", RolloutRequest { group: Some("canary".into()), ..Default::default() }, 2).unwrap();
    // p00 updates, p01 is downloading, p02 failed (rolled back); p03, p04 have not started.
    let seq = |d: &str| w.planner.operation(d, MAIN_COMPONENT).unwrap().seq;
    w.planner.record("p00", seq("p00"), OpState::Pending, Some(OpState::Succeeded), None, None, 3).unwrap();
    w.fleet.observe("p00", MAIN_COMPONENT, "2.0", 3).unwrap();
    w.planner.record("p01", seq("p01"), OpState::Pending, Some(OpState::Downloading), Some(0), None, 3).unwrap();
    w.fleet.observe("p01", MAIN_COMPONENT, "1.0", 3).unwrap();
    w.planner.record("p02", seq("p02"), OpState::Pending, Some(OpState::Failed), None, None, 3).unwrap();
    w.fleet.flush_last_seen().unwrap();
    let s = w.waves.status("w", 4).unwrap();
    assert_eq!((s.total, s.updated, s.need_update, s.scheduled, s.in_progress, s.failed), (30, 1, 29, 3, 1, 1));
    assert_eq!(s.online, 2, "p00 and p01 reported");
    let canary = s.groups.iter().find(|g| g.group == "canary").unwrap();
    assert_eq!((canary.total, canary.updated, canary.need_update, canary.scheduled), (5, 1, 4, 3));
    let eu = s.groups.iter().find(|g| g.group == "eu").unwrap();
    assert_eq!((eu.total, eu.updated, eu.scheduled), (15, 1, 1), "of p00, p02, p04 in eu only p04 is queued");

    let (wave, n) = w.waves.cancel("w", 5).unwrap();
    assert_eq!((wave.state, n), (WaveState::Canceled, 3), "p01 in flight, p03 and p04 queued");
    assert_eq!(state_of(&w, "p00", "w"), Some(OpState::Succeeded));
    assert_eq!(state_of(&w, "p01", "w"), Some(OpState::Canceled));
    assert_eq!(state_of(&w, "p03", "w"), Some(OpState::Canceled));
    let s = w.waves.status("w", 6).unwrap();
    assert_eq!((s.updated, s.scheduled, s.in_progress, s.failed, s.canceled), (1, 0, 0, 1, 3));
}

#[test]
fn each_device_gets_the_image_of_the_version_that_fits_its_hardware() {
    let w = open_at(tempfile::tempdir().unwrap());
    let hw = |id: &str, h: &str| DeviceSpec { hardware: Some(h.into()), ..device(id, "t", &[], false) };
    w.fleet.upsert(vec![hw("n", "nrf52"), hw("e", "esp32"), hw("s", "stm32")], 0).unwrap();
    w.firmware.add("fw-nrf", "2.0", vec!["nrf52".into()], Bytes::from_static(b"nrf"), 0).unwrap();
    w.firmware.add("fw-esp", "2.0", vec!["esp32".into()], Bytes::from_static(b"esp"), 0).unwrap();
    w.waves.init(init("w", "2.0", "t"), 1).unwrap();
    let r = w.waves.rollout("w", RolloutRequest::default(), 2).unwrap();
    assert_eq!(r.staged, 2);
    assert_eq!(w.planner.operation("n", MAIN_COMPONENT).unwrap().image, "fw-nrf@2.0");
    assert_eq!(w.planner.operation("e", MAIN_COMPONENT).unwrap().image, "fw-esp@2.0");
    assert_eq!(r.rejected.len(), 1);
    assert!(r.rejected[0].reason.contains("no image of this version for hardware stm32"), "{:?}", r.rejected);
}

#[test]
fn waves_and_who_is_in_them_survive_a_restart_and_an_interrupted_complete_is_finished() {
    let w = world();
    w.waves.init(init("w", "2.0", "release"), 1).unwrap();
    w.waves.rollout("w", limit("10"), 2).unwrap();
    let before = staged(&w, "w");
    let wave = w.waves.get("w").unwrap();
    let w = reopen(w);
    assert_eq!(w.waves.get("w").unwrap(), wave);
    assert_eq!(staged(&w, "w"), before);
    // The repeated --limit still excludes the devices staged before the restart.
    w.waves.rollout("w", RolloutRequest { seed: Some(3), ..limit("20") }, 3).unwrap();
    assert_eq!(staged(&w, "w").len(), 30);

    // A crash right after `complete` wrote the wave and before it staged anyone: the next
    // open stages them.
    w.waves.init(init("x", "2.0", "other"), 4).unwrap();
    let mut x = w.waves.get("x").unwrap();
    x.state = WaveState::Complete;
    x.ended_at = Some(5);
    w.waves.put(&x).unwrap();
    // And a crash after `cancel` wrote the wave and before it withdrew the operations.
    w.waves.complete("w", 6).unwrap();
    w.waves.init(init("y", "2.1", "release"), 6).unwrap();
    w.waves.rollout("y", RolloutRequest { group: Some("canary".into()), ..Default::default() }, 6).unwrap();
    let mut y = w.waves.get("y").unwrap();
    y.state = WaveState::Canceled;
    w.waves.put(&y).unwrap();
    let w = reopen(w);
    assert_eq!(staged(&w, "x"), ["o0", "o1"]);
    assert!(staged(&w, "y").is_empty());
    assert_eq!(state_of(&w, "p00", "y"), Some(OpState::Canceled));
    assert_eq!(w.waves.production_versions("other", false), ["2.0"]);
}

#[test]
fn a_newer_waves_queued_operation_replaces_an_older_waves_undelivered_one() {
    let w = world();
    w.waves.init(init("w2", "2.0", "release"), 1).unwrap();
    let just =
        |ids: &str| RolloutRequest { uuids: Some(UuidsArg::Text(ids.into())), seed: Some(1), ..Default::default() };
    w.waves.rollout("w2", just("p10 p11"), 2).unwrap();
    // p11 starts its download of 2.0; p10's operation is still queued.
    let p11 = w.planner.operation("p11", MAIN_COMPONENT).unwrap();
    assert!(w.planner.record("p11", p11.seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 3).unwrap());
    w.waves.complete("w2", 4).unwrap();
    w.waves.init(init("w3", "3.0", "release"), 5).unwrap();
    w.waves.rollout("w3", just("p10 p11"), 6).unwrap();

    // p10 never received 2.0: the newer wave's operation takes the place of the older one...
    let ops = w.planner.operations_of("p10");
    let old = ops.iter().find(|o| o.origin == "wave:w2").unwrap();
    let new = ops.iter().find(|o| o.origin == "wave:w3").unwrap();
    assert_eq!(old.state, OpState::Canceled);
    assert_eq!(old.detail.as_deref(), Some(format!("replaced by operation {} (wave:w3)", new.seq).as_str()));
    assert_eq!((new.state, new.version.as_str()), (OpState::Pending, "3.0"));
    assert_eq!(w.planner.operation("p10", MAIN_COMPONENT).unwrap().seq, new.seq, "3.0 is what p10 gets next");
    // ...while p11's transfer in flight is left alone, with 3.0 queued behind it.
    assert_eq!(state_of(&w, "p11", "w2"), Some(OpState::Downloading));
    assert_eq!(state_of(&w, "p11", "w3"), Some(OpState::Pending));
    // Reconciling the complete wave (after a TUF refresh, or at start) leaves the active
    // wave's devices alone: w2 does not take p10 back.
    assert_eq!(w.waves.after_refresh(7).unwrap(), 0);
    assert_eq!(state_of(&w, "p10", "w3"), Some(OpState::Pending));
    let w = reopen(w);
    assert_eq!(state_of(&w, "p10", "w2"), Some(OpState::Canceled), "replaced, and stays replaced");
    assert_eq!(state_of(&w, "p10", "w3"), Some(OpState::Pending));
    assert_eq!(w.planner.operation("p10", MAIN_COMPONENT).unwrap().version, "3.0");
}

#[test]
fn a_complete_wave_never_stages_a_version_older_than_one_a_device_is_already_to_get() {
    let w = world();
    // p20 is assigned 3.0 directly; p21 has nothing queued.
    w.planner.assign("p20", MAIN_COMPONENT, "app@3.0", 1).unwrap();
    w.waves.init(init("w2", "2.0", "release"), 2).unwrap();
    w.waves.complete("w2", 3).unwrap();
    assert_eq!(state_of(&w, "p20", "w2"), None, "2.0 would go backwards from the queued 3.0");
    assert_eq!(state_of(&w, "p21", "w2"), Some(OpState::Pending));
    // Nor later, when the complete wave is reconciled or the gateway restarts.
    assert_eq!(w.waves.after_refresh(4).unwrap(), 0);
    let w = reopen(w);
    assert_eq!(state_of(&w, "p20", "w2"), None);
    assert_eq!(w.planner.operation("p20", MAIN_COMPONENT).unwrap().version, "3.0");
}

#[test]
fn canceling_a_wave_gives_its_devices_the_complete_waves_version_back_at_once() {
    let w = world();
    w.waves.init(init("a", "2.0", "release"), 1).unwrap();
    w.waves.complete("a", 2).unwrap();
    assert_eq!(state_of(&w, "p10", "a"), Some(OpState::Pending));
    w.waves.init(init("w", "3.0", "release"), 3).unwrap();
    let just = RolloutRequest { uuids: Some(UuidsArg::Text("p10".into())), seed: Some(1), ..Default::default() };
    w.waves.rollout("w", just, 4).unwrap();
    assert_eq!(state_of(&w, "p10", "a"), Some(OpState::Canceled), "w replaced a's queued operation");
    w.waves.cancel("w", 5).unwrap();
    // p10 is to get 2.0 again, without waiting for a restart...
    assert_eq!(state_of(&w, "p10", "w"), Some(OpState::Canceled));
    assert_eq!(state_of(&w, "p10", "a"), Some(OpState::Pending));
    assert_eq!(w.planner.operation("p10", MAIN_COMPONENT).unwrap().version, "2.0");
    // ...and keeps it across one, staged once.
    let w = reopen(w);
    let live = w.planner.operations_of("p10").iter().filter(|o| !o.state.is_terminal()).count();
    assert_eq!(live, 1);
    assert_eq!(w.planner.operation("p10", MAIN_COMPONENT).unwrap().version, "2.0");
}

#[test]
fn a_device_that_leaves_a_tag_leaves_its_waves_and_is_staged_again_when_it_returns() {
    let w = complete_c_and_active_a();
    let moved = |w: &World, id: &str, tag: &str, now: u64| {
        w.fleet.upsert(vec![device(id, tag, &[], false)], now).unwrap();
        w.waves.devices_changed(&[id.to_owned()], now).unwrap()
    };
    // p00 leaves the tag: its queued operations of both waves are withdrawn...
    assert_eq!(moved(&w, "p00", "other", 5), 0);
    assert_eq!(state_of(&w, "p00", "a"), Some(OpState::Canceled));
    // ...and when it comes back, the active wave can roll out to it again and the complete
    // one stages it at once.
    assert_eq!(moved(&w, "p00", "release", 6), 1);
    assert_eq!(state_of(&w, "p00", "c"), Some(OpState::Pending));
    let r = w.waves.rollout("a", uuids("p00"), 7).unwrap();
    assert_eq!((r.staged, r.rejected.len()), (1, 0), "{:?}", r.rejected);
    // The same across a crash between the leaving and the return: the members rebuilt at
    // start are the devices that still follow the tag.
    assert_eq!(moved(&w, "p01", "other", 8), 0);
    let w = reopen(w);
    assert_eq!(moved(&w, "p01", "release", 9), 1);
    let r = w.waves.rollout("a", uuids("p01"), 10).unwrap();
    assert_eq!((r.staged, r.rejected.len()), (1, 0), "{:?}", r.rejected);
    let status = w.waves.status("a", 10).unwrap();
    assert_eq!((status.total, status.scheduled), (30, 2));
}

#[test]
fn a_deleted_device_leaves_its_waves_and_counts_and_comes_back_as_a_joiner() {
    let w = complete_c_and_active_a();
    assert_eq!(crate::planner::delete_device(&w.planner, &w.fleet, &w.waves, None, "p00", 5).unwrap(), Some(1));
    assert_eq!(crate::planner::delete_device(&w.planner, &w.fleet, &w.waves, None, "p00", 5).unwrap(), None, "gone");
    assert!(w.planner.operations_of("p00").is_empty() && w.fleet.get("p00").is_none());
    let status = w.waves.status("a", 5).unwrap();
    assert_eq!((status.total, status.scheduled), (29, 1));
    assert_eq!(w.waves.status("c", 5).unwrap().total, 29);
    // Registered again, it is a joiner: the complete wave stages it, a rollout may too.
    w.fleet.upsert(vec![device("p00", "release", &[], false)], 6).unwrap();
    assert_eq!(w.waves.devices_changed(&["p00".into()], 6).unwrap(), 1);
    assert_eq!(state_of(&w, "p00", "c"), Some(OpState::Pending));
    let r = w.waves.rollout("a", uuids("p00"), 7).unwrap();
    assert_eq!((r.staged, r.rejected.len()), (1, 0), "{:?}", r.rejected);
    // A crash right after a delete: the device stays deleted and out of every count.
    assert_eq!(crate::planner::delete_device(&w.planner, &w.fleet, &w.waves, None, "p01", 7).unwrap(), Some(1));
    let w = reopen(w);
    assert!(w.fleet.get("p01").is_none() && w.planner.operations_of("p01").is_empty());
    let status = w.waves.status("a", 8).unwrap();
    assert_eq!((status.total, status.scheduled), (29, 1));
}

#[test]
fn a_rollout_and_its_record_are_one_write_a_crash_leaves_all_or_nothing() {
    for writes in 0..2 {
        let w = world();
        w.waves.init(init("w", "2.0", "release"), 1).unwrap();
        w.waves.store.crash_after(Some(writes));
        let r = w.waves.rollout("w", RolloutRequest { group: Some("canary".into()), ..Default::default() }, 2);
        w.waves.store.crash_after(None);
        let w = reopen(w);
        let wave = w.waves.get("w").unwrap();
        let staged = staged(&w, "w");
        if writes == 0 {
            assert!(r.is_err(), "the store was down");
            assert!(staged.is_empty() && wave.rollouts.is_empty(), "nothing, not half: {staged:?}");
        } else {
            assert_eq!(r.unwrap().staged, 5);
            assert_eq!((staged.len(), wave.rollouts.len()), (5, 1), "all of it");
        }
    }
}
