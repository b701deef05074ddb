//! The planner and waves against a real TUF repository (the python-tuf fixtures, copied to a
//! temp dir so a test can publish a later targets version): refusals that pass wait, the ones
//! that do not fail, signed facts decide, and a device resumes only into the same bytes — each
//! also across a restart at the worst point. The fixtures' metadata expires on 2036-01-01:
//! passing a `now` after it is how these tests let it expire.

use std::path::Path;

use bytes::Bytes;

use super::waves::{InitRequest, RolloutRequest, UuidsArg, Waves};
use super::*;
use crate::config::FirmwareConfig;
use crate::fleet::{DeviceSpec, MAIN_COMPONENT};
use crate::tuf::tests::{fixtures, rt};
use crate::tuf::{RepoConfig, PRODUCTION};

/// When the fixtures' metadata expires (2036-01-01T00:00:00Z).
const EXPIRES: u64 = 2_082_758_400;
/// A time when it is fresh.
const T0: u64 = 1_000;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Publishes a fixture repository's metadata and targets over the test's repository.
fn publish(dir: &Path, variant: &str) {
    let from = fixtures().join("repos").join(variant);
    copy_dir(&from.join("metadata"), &dir.join("repo/metadata"));
    copy_dir(&from.join("targets"), &dir.join("repo/targets"));
}

/// The bytes of a production target.
fn target(name: &str) -> Bytes {
    let dir = fixtures().join("repos/production/targets");
    let suffix = format!(".{name}");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(&suffix))
        .unwrap();
    Bytes::from(std::fs::read(file).unwrap())
}

struct World {
    dir: tempfile::TempDir,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    planner: Arc<Planner>,
    waves: Waves,
}

/// Opens everything as the gateway starts: the TUF repository is refreshed first (it keeps
/// its verified state in the data dir), then the planner and the waves, at `now`.
fn open_at(dir: tempfile::TempDir, now: u64) -> World {
    let store = Store::open(&dir.path().join("db"), false).unwrap();
    let url = |what: &str| format!("file://{}/", dir.path().join("repo").join(what).display());
    let production = RepoConfig {
        root: fixtures().join("production-root.json"),
        metadata_url: url("metadata"),
        targets_url: url("targets"),
    };
    let trust = Trust::new(&production, &RepoConfig::default(), dir.path());
    rt().block_on(trust.refresh(PRODUCTION)).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
    let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    let planner = Arc::new(
        Planner::open(store.clone(), fleet.clone(), firmware.clone(), 3600, now)
            .unwrap()
            .with_trust(Arc::new(trust), false),
    );
    let waves = Waves::open(store, fleet.clone(), firmware.clone(), planner.clone(), 900, now).unwrap();
    World { dir, fleet, firmware, planner, waves }
}

/// Drops everything without any shutdown step and opens it again: a crash and a restart.
fn restart(w: World, now: u64) -> World {
    let World { dir, fleet, firmware, planner, waves } = w;
    drop((waves, planner, firmware, fleet));
    open_at(dir, now)
}

fn device(id: &str, tag: &str, production: bool) -> DeviceSpec {
    DeviceSpec { id: id.into(), tag: Some(tag.into()), production, ..Default::default() }
}

/// Production devices d1..d3 on `release`, b1 on `beta`, CI device c1 on `release`; images
/// app 2.0 and 2.1 and beta 3.0 (production targets), and `other@2.0` (not a target).
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "production");
    let w = open_at(dir, T0);
    let specs = vec![
        device("d1", "release", true),
        device("d2", "release", true),
        device("d3", "release", true),
        device("b1", "beta", true),
        device("c1", "release", false),
    ];
    w.fleet.upsert(specs, T0).unwrap();
    w.firmware.add("app", "2.0", vec![], target("app-2.0.bin"), T0).unwrap();
    w.firmware.add("app", "2.1", vec![], target("app-2.1.bin"), T0).unwrap();
    w.firmware.add("beta", "3.0", vec![], target("beta-3.0.bin"), T0).unwrap();
    w.firmware.add("other", "2.0", vec![], Bytes::from_static(b"other bytes of version 2.0"), T0).unwrap();
    w
}

fn lookup(w: &World, id: &str, now: u64) -> Lookup {
    w.planner.lookup(id, MAIN_COMPONENT, now).unwrap()
}

fn op(w: &World, id: &str) -> Operation {
    w.planner.operation(id, MAIN_COMPONENT).unwrap()
}

#[test]
fn expired_metadata_holds_operations_without_failing_them_and_they_go_on_after_a_restart() {
    let w = world();
    w.planner.assign("d1", MAIN_COMPONENT, "app@2.0", T0).unwrap();
    w.planner.assign("d2", MAIN_COMPONENT, "app@2.0", T0).unwrap();
    let Lookup::Active(a) = lookup(&w, "d1", T0) else { panic!("fresh metadata: served") };
    let sha = a.meta.sha256.clone();
    assert!(w
        .planner
        .record("d1", a.seq, OpState::Pending, Some(OpState::Downloading), Some(512), Some(&sha), T0)
        .unwrap());
    // The metadata expires: both operations wait, neither fails.
    for id in ["d1", "d2"] {
        match lookup(&w, id, EXPIRES + 10) {
            Lookup::Held(why) => assert!(why.starts_with("waiting for trust:") && why.contains("expired"), "{why}"),
            _ => panic!("{id}: expected to wait for trust"),
        }
    }
    assert_eq!((op(&w, "d1").state, op(&w, "d2").state), (OpState::Downloading, OpState::Pending));
    let why = w.planner.waits_for_trust(&op(&w, "d2"), EXPIRES + 10).unwrap();
    assert!(why.starts_with("waiting for trust:"), "{why}");
    assert_eq!(w.planner.trust_holds(), (2, 2));
    // The device keeps asking through a long outage: its transfer does not time out.
    assert!(matches!(lookup(&w, "d1", EXPIRES + 3000), Lookup::Held(_)));
    assert_eq!(w.planner.sweep_timeouts(EXPIRES + 6000).unwrap(), 0);
    assert_eq!(op(&w, "d1").state, OpState::Downloading);
    // A crash during the outage, and a restart with fresh metadata: both proceed, d1 where it
    // was, into the same bytes.
    let w = restart(w, T0);
    let Lookup::Active(a) = lookup(&w, "d1", T0) else { panic!("served after the restart") };
    assert!(a.resume && a.state == OpState::Downloading && op(&w, "d1").offset == 512);
    assert!(matches!(lookup(&w, "d2", T0), Lookup::Active(_)));
    assert_eq!(w.planner.trust_holds().0, 0);
}

#[test]
fn staging_refused_while_trust_is_missing_is_retried_after_the_next_refresh_and_after_a_restart() {
    let w = world();
    let wave = |name: &str, version: &str, tag: &str| InitRequest {
        name: name.into(),
        version: version.into(),
        tag: tag.into(),
        production: true,
        ..Default::default()
    };
    w.waves.init(wave("w", "2.0", "release"), T0).unwrap();
    w.waves.init(wave("b", "beta@3.0", "beta"), T0).unwrap();
    let to = |ids: &str| RolloutRequest { uuids: Some(UuidsArg::Text(ids.into())), ..Default::default() };
    let r = w.waves.rollout("w", to("d1,d2"), EXPIRES + 1).unwrap();
    assert_eq!(r.staged, 0);
    assert!(r.rejected.iter().all(|x| x.reason.contains("waiting for trust")), "{:?}", r.rejected);
    assert_eq!(w.waves.get("w").unwrap().deferred, ["d1", "d2"]);
    let status = w.waves.status("w", EXPIRES + 1).unwrap();
    assert!(status.waiting.as_deref().is_some_and(|x| x.starts_with("waiting for trust:")), "{status:?}");
    assert_eq!(status.deferred, 2);
    w.waves.rollout("b", to("b1"), EXPIRES + 1).unwrap();
    // The next successful refresh stages what waited (here for wave b) and counts it.
    // Without it, nothing is staged: `w` shows the state a crash right after the refresh
    // leaves, and the restart (which refreshes, then opens the waves) stages it.
    assert_eq!(w.waves.after_refresh(T0).unwrap(), 3);
    assert_eq!(w.waves.staging_retries(), 3);
    assert!(w.waves.get("w").unwrap().deferred.is_empty());
    assert_eq!(op(&w, "b1").origin, "wave:b");

    let w2 = world();
    w2.waves.init(wave("w", "2.0", "release"), T0).unwrap();
    w2.waves.rollout("w", to("d1,d2"), EXPIRES + 1).unwrap();
    let w2 = restart(w2, T0);
    assert_eq!(w2.waves.staging_retries(), 2);
    for id in ["d1", "d2"] {
        assert_eq!((op(&w2, id).origin.as_str(), op(&w2, id).state), ("wave:w", OpState::Pending));
    }
    assert!(w2.waves.get("w").unwrap().deferred.is_empty(), "written back: a second restart stages nothing again");
    let w2 = restart(w2, T0);
    assert_eq!(w2.waves.staging_retries(), 0);
}

#[test]
fn signed_tags_decide_at_assign_and_at_serving_when_a_later_targets_version_changes_them() {
    let w = world();
    // beta-3.0.bin is released for "beta" only.
    match w.planner.assign("d1", MAIN_COMPONENT, "beta@3.0", T0) {
        Err(PlannerError::NotAdmissible(why)) => assert!(why.contains("not for tag release"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    w.planner.assign("d1", MAIN_COMPONENT, "app@2.0", T0).unwrap();
    w.planner.assign("d2", MAIN_COMPONENT, "app@2.0", T0).unwrap();
    assert!(matches!(lookup(&w, "d1", T0), Lookup::Active(_)), "released for release when assigned");
    // Targets version 3 releases app-2.0.bin for "beta" only.
    publish(w.dir.path(), "retagged");
    let v = rt().block_on(w.planner.trust().refresh(PRODUCTION)).unwrap();
    assert_eq!(v.targets_version, 3);
    match lookup(&w, "d1", T0) {
        Lookup::Refused(why) => assert!(why.contains("not for tag release"), "{why}"),
        _ => panic!("a target no longer released for the device's tag is refused at serving"),
    }
    assert_eq!(op(&w, "d1").state, OpState::Failed);
    assert!(op(&w, "d1").detail.unwrap().contains("not for tag release"));
    // The same after a crash and a restart (which verifies version 3 again from the store).
    let w = restart(w, T0);
    assert!(matches!(lookup(&w, "d2", T0), Lookup::Refused(_)));
    assert_eq!(op(&w, "d2").state, OpState::Failed);
}

#[test]
fn the_downgrade_check_reads_the_signed_version_and_a_mislabeled_image_is_refused_at_wave_init() {
    let w = world();
    // The bytes of app-2.0.bin (signed custom.version 2.0), labeled 2.5.
    w.firmware.add("app", "2.5", vec![], target("app-2.0.bin"), T0).unwrap();
    w.fleet.observe("d1", MAIN_COMPONENT, "2.1", T0).unwrap();
    w.planner.assign("d1", MAIN_COMPONENT, "app@2.5", T0).unwrap();
    match lookup(&w, "d1", T0) {
        Lookup::Refused(why) => assert!(why.contains("downgrade from 2.1 to 2.0 (image app@2.5)"), "{why}"),
        _ => panic!("2.5 by its label, 2.0 by its signature: a downgrade"),
    }
    let req = InitRequest {
        name: "w".into(),
        version: "2.5".into(),
        tag: "release".into(),
        production: true,
        ..Default::default()
    };
    match w.waves.init(req, T0) {
        Err(waves::WaveError::LabelMismatch { image, label, signed }) => {
            assert_eq!((image.as_str(), label.as_str(), signed.as_str()), ("app@2.5", "2.5", "2.0"))
        }
        other => panic!("expected a label mismatch, got {other:?}"),
    }
    let w = restart(w, T0);
    assert_eq!(op(&w, "d1").state, OpState::Failed, "the refusal was written");
}

#[test]
fn a_device_resumes_only_into_the_bytes_it_was_served() {
    // c1 is a CI device and no CI repository is configured: any image may reach it.
    let w = world();
    let x = w.planner.enqueue("c1", MAIN_COMPONENT, "app@2.0", 500, "wave:a", T0).unwrap();
    let Lookup::Active(a) = lookup(&w, "c1", T0) else { panic!() };
    assert!(!a.resume, "nothing served yet: an offset the device reports is not ours");
    let sha_x = a.meta.sha256.clone();
    w.planner.record("c1", x.seq, OpState::Pending, Some(OpState::Downloading), Some(1024), Some(&sha_x), T0).unwrap();
    let w = restart(w, T0);
    assert_eq!(op(&w, "c1").digest.as_deref(), Some(sha_x.as_str()), "recorded with the transition");
    let Lookup::Active(a) = lookup(&w, "c1", T0) else { panic!() };
    assert!(a.resume);
    // The wave is canceled mid-transfer and another wave's image of the same version follows.
    w.planner.cancel_origin("wave:a", T0).unwrap();
    w.planner.enqueue("c1", MAIN_COMPONENT, "other@2.0", 500, "wave:b", T0).unwrap();
    let Lookup::Active(a) = lookup(&w, "c1", T0) else { panic!() };
    assert!(!a.resume, "other bytes: start at 0");
    // The first image again: the device's bytes are its.
    w.planner.enqueue("c1", MAIN_COMPONENT, "app@2.0", 500, "wave:c", T0).unwrap();
    let Lookup::Active(a) = lookup(&w, "c1", T0) else { panic!() };
    assert!(a.resume);
}
