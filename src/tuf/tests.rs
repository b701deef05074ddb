use super::*;

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tuf")
}

fn file_url(p: &Path) -> String {
    format!("file://{}/", p.display())
}

/// A client of the fixture repository `variant`, trusting the production root, with its
/// datastore in `store`.
fn client(variant: &str, store: &Path) -> Client {
    let repo = fixtures().join("repos").join(variant);
    Client {
        name: PRODUCTION.into(),
        initial_root: fixtures().join(if variant == "ci" { "ci-root.json" } else { "production-root.json" }),
        metadata_url: file_url(&repo.join("metadata")),
        targets_url: file_url(&repo.join("targets")),
        datastore: store.to_owned(),
        fetch_timeout: FETCH_TIMEOUT,
    }
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn a_python_tuf_production_repository_verifies_and_lists_its_targets() {
    let dir = tempfile::tempdir().unwrap();
    let v = rt().block_on(client("production", dir.path()).refresh()).unwrap();
    assert_eq!((v.root_version, v.timestamp_version, v.snapshot_version, v.targets_version), (1, 2, 2, 2));
    let mut names: Vec<&str> = v.targets.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["app-2.0.bin", "app-2.1.bin", "beta-3.0.bin"]);
    let app = v.targets.iter().find(|t| t.name == "app-2.0.bin").unwrap();
    assert_eq!(
        (app.length, app.tags.as_slice(), app.version.as_deref()),
        (4096, &["release".to_string()][..], Some("2.0"))
    );
    assert_eq!(app.sha256.len(), 64);
    // The trusted metadata is persisted under non-versioned names.
    for f in ["root.json", "timestamp.json", "snapshot.json", "targets.json"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}

#[test]
fn every_defective_repository_is_refused_with_a_clear_error_and_poisons_nothing() {
    let cases = [
        ("missing-signature", "signature"),
        ("duplicate-signature", "duplicate key id"),
        ("tampered-target", "signature"),
        ("expired-targets", "expired"),
        ("expired-snapshot", "expired"),
        ("expired-timestamp", "expired"),
        ("rotation-too-few", "signature"),
    ];
    for (variant, words) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = rt().block_on(client(variant, dir.path()).refresh()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TufError::Verify { .. }), "{variant}: {text}");
        assert!(text.to_lowercase().contains(words), "{variant}: {text}");
        // The same datastore still accepts the good repository afterwards.
        rt().block_on(client("production", dir.path()).refresh()).unwrap_or_else(|e| panic!("{variant}: {e}"));
    }
}

/// What the client says when a repository offers older metadata than it verified before.
const ROLLBACK: &str = "timestamp: version 1 is older than the trusted 2";

#[test]
fn a_rolled_back_repository_is_refused_once_a_newer_one_was_seen() {
    let dir = tempfile::tempdir().unwrap();
    // Alone, version 1 is a valid repository.
    rt().block_on(client("rollback", tempfile::tempdir().unwrap().path()).refresh()).unwrap();
    rt().block_on(client("production", dir.path()).refresh()).unwrap();
    let err = rt().block_on(client("rollback", dir.path()).refresh()).unwrap_err();
    // The timestamp is checked first: version 1 offered after version 2 was verified.
    match &err {
        TufError::Verify { repo, message } => {
            assert_eq!(repo, PRODUCTION);
            assert!(message.contains(ROLLBACK), "{message}");
        }
        other => panic!("expected a verification error, got {other:?}"),
    }
}

#[test]
fn a_root_rotation_signed_by_old_and_new_keys_is_followed_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let v = rt().block_on(client("rotated", dir.path()).refresh()).unwrap();
    assert_eq!(v.root_version, 2);
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("root.json")).unwrap()).unwrap();
    assert_eq!(stored["signed"]["version"], 2, "the next start trusts version 2");
}

#[test]
fn target_bytes_that_differ_in_hash_or_length_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = client("bad-target-bytes", dir.path());
    let rt = rt();
    let mut repo = rt.block_on(c.load()).unwrap();
    for name in ["app-2.0.bin", "app-2.1.bin"] {
        let err = rt.block_on(c.fetch_target(&mut repo, name)).unwrap_err();
        assert!(matches!(err, TufError::Target { .. }), "{name}: {err}");
    }
    assert!(matches!(rt.block_on(c.fetch_target(&mut repo, "nope.bin")), Err(TufError::NoTarget { .. })));
    let good = rt.block_on(c.fetch_target(&mut repo, "beta-3.0.bin")).unwrap();
    assert_eq!(good.len(), 2048);
}

#[test]
fn production_devices_get_only_verified_production_targets_for_their_tag() {
    let dir = tempfile::tempdir().unwrap();
    let repo = |v: &str| {
        let r = fixtures().join("repos").join(v);
        RepoConfig {
            root: fixtures().join(format!("{v}-root.json")),
            metadata_url: file_url(&r.join("metadata")),
            targets_url: file_url(&r.join("targets")),
        }
    };
    let trust = Trust::new(&repo("production"), &RepoConfig::default(), dir.path());
    let bytes = |name: &str, v: &str| {
        let dir = fixtures().join("repos").join(v).join("targets");
        let f = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(name))
            .unwrap();
        std::fs::read(f).unwrap()
    };
    let sha = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    let app = bytes("app-2.0.bin", "production");
    let ci = bytes("app-2.2-ci.bin", "ci");
    let now = 1_800_000_000;
    assert_eq!(trust.admit(true, &sha(&app), 4096, None, now), Err(Refusal::NotVerified(PRODUCTION)));
    rt().block_on(trust.refresh(PRODUCTION)).unwrap();
    assert_eq!(trust.admit(true, &sha(&app), 4096, Some("release"), now), Ok(()));
    assert!(matches!(trust.admit(true, &sha(&app), 4096, Some("beta"), now), Err(Refusal::OtherTag { .. })));
    assert!(matches!(trust.admit(true, &sha(&ci), 4096, None, now), Err(Refusal::NotATarget { .. })));
    assert!(matches!(trust.admit(true, &sha(&app), 4095, None, now), Err(Refusal::NotATarget { .. })));
    assert_eq!(trust.admit(true, &sha(&app), 4096, None, 2_200_000_000), Err(Refusal::Expired(PRODUCTION)));
    // Without a CI repository, CI devices take any image; with one, only its targets.
    assert_eq!(trust.admit(false, &sha(&ci), 4096, None, now), Ok(()));
    let trust = Trust::new(&repo("production"), &repo("ci"), dir.path());
    rt().block_on(trust.refresh(CI)).unwrap();
    assert_eq!(trust.admit(false, &sha(&ci), 4096, Some("release"), now), Ok(()));
    assert!(matches!(trust.admit(false, &sha(&app), 4096, None, now), Err(Refusal::NotATarget { .. })));
    assert_eq!(Trust::none().admit(true, &sha(&app), 4096, None, now), Err(Refusal::NoProductionRepo));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_refresh_that_does_not_verify_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    let good = fixtures().join("repos/production");
    copy_dir(&good.join("metadata"), &served.join("metadata"));
    let config = RepoConfig {
        root: fixtures().join("production-root.json"),
        metadata_url: file_url(&served.join("metadata")),
        targets_url: file_url(&good.join("targets")),
    };
    let trust = Trust::new(&config, &RepoConfig::default(), &dir.path().join("data"));
    let rt = rt();
    let before = rt.block_on(trust.refresh(PRODUCTION)).unwrap();
    let app = before.targets.iter().find(|t| t.name == "app-2.0.bin").unwrap().clone();
    let offer = |variant: &str| {
        std::fs::remove_dir_all(served.join("metadata")).unwrap();
        copy_dir(&fixtures().join("repos").join(variant).join("metadata"), &served.join("metadata"));
    };
    // The server now offers older metadata: refused, and the last verified state stays.
    offer("rollback");
    assert!(matches!(rt.block_on(trust.refresh(PRODUCTION)), Err(TufError::Verify { .. })));
    assert_eq!(trust.verified(PRODUCTION).unwrap(), before, "the last verified state stays");
    assert_eq!(trust.admit(true, &app.sha256, app.length, Some("release"), 1_800_000_000), Ok(()));
    // Tampered targets under an unchanged timestamp version are never fetched (as the
    // reference client: the timestamp says nothing changed), so the verified state is the
    // same and the tampered length is not admitted.
    offer("tampered-target");
    assert_eq!(rt.block_on(trust.refresh(PRODUCTION)).unwrap(), before);
    let tampered = trust.admit(true, &app.sha256, app.length + 1, Some("release"), 1_800_000_000);
    assert!(matches!(tampered, Err(Refusal::NotATarget { .. })), "{tampered:?}");
}

/// The fixture repositories are signed to expire on 2036-01-01 (`make_repos.py`'s `VALID`).
/// When that is near, every TUF test would fail with "metadata expired": this one fails first
/// and says how to re-sign them.
#[test]
fn the_fixture_repositories_are_not_about_to_expire() {
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 30);
    let repos = fixtures().join("repos");
    for entry in std::fs::read_dir(&repos).unwrap() {
        let repo = entry.unwrap().path();
        let variant = repo.file_name().unwrap().to_string_lossy().into_owned();
        if variant.starts_with("expired-") {
            continue; // expired on purpose
        }
        for file in std::fs::read_dir(repo.join("metadata")).unwrap() {
            let file = file.unwrap().path();
            let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            let expires: jiff::Timestamp = doc["signed"]["expires"].as_str().unwrap().parse().unwrap();
            assert!(
                expires > soon,
                "{} expires {expires}: regenerate every fixture repository with \
                 `pip install 'tuf==7.0.1' && python3 fixtures/tuf/make_repos.py` (new keys, new dates; \
                 raise VALID in that script first) and commit fixtures/tuf/",
                file.display()
            );
        }
    }
}
