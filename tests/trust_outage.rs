//! The outage scenario: the TUF metadata expires while 1,000 simulated devices are in the
//! middle of a rollout. No operation fails; every device waits, and after a refresh with
//! fresh metadata every one of them completes. The repository is signed while the test runs
//! by python-tuf (`fixtures/tuf/live_repo.py`), so its expiry is seconds away, not years.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use fwgate::protocol::{Command as DfuCommand, Form};
use serde_json::{json, Value};

const DEVICES: usize = 1000;

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64
}

async fn metrics(base: &str) -> String {
    admin(base, reqwest::Method::GET, "/metrics", None, None).await.1.as_str().unwrap().to_owned()
}

async fn refresh(base: &str) -> Value {
    let (code, v) = admin(base, reqwest::Method::POST, "/api/v1/tuf/ci/refresh", None, None).await;
    assert_eq!(code, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_expiring_mid_rollout_fails_no_operation_and_a_refresh_lets_every_device_finish() {
    fwgate::cli::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = image(2048, 17);
    let img_file = dir.path().join("app.bin");
    std::fs::write(&img_file, &img).unwrap();
    live_repo(&["init", repo.to_str().unwrap(), "--target", &format!("app.bin={}", img_file.display())]);

    let mut c = test_config(&dir.path().join("gw"));
    let url = |p: &Path| format!("file://{}/", p.display());
    c.tuf.ci_root = repo.join("root.json");
    c.tuf.ci_metadata_url = url(&repo.join("metadata"));
    c.tuf.ci_targets_url = url(&repo.join("targets"));
    let gw = TestGateway::start(c).await;
    let base = gw.admin.clone();
    let (code, v) = admin(
        &base,
        reqwest::Method::POST,
        "/api/v1/images?name=app&version=2.0.0&target=app.bin&repo=ci",
        Some(img.clone().into()),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("o{i:04}")).collect();
    let specs: Vec<Value> = ids.iter().map(|id| json!({"id": id, "tag": "release", "production": false})).collect();
    let (code, v) = post(&base, "/api/v1/devices", Value::Array(specs)).await;
    assert_eq!(code, 200, "{v}");
    let (code, v) =
        post(&base, "/api/v1/waves", json!({"name": "w", "version": "2.0.0", "tag": "release", "production": false}))
            .await;
    assert_eq!(code, 201, "{v}");
    let (code, r) = post(&base, "/api/v1/waves/w/rollout", json!({"limit": "100%"})).await;
    assert_eq!((code, r["staged"].as_u64()), (200, Some(DEVICES as u64)), "{r}");

    // Every device downloads half of the image and pauses, its connection open.
    let mqtt = gw.mqtt;
    let mut devices: Vec<SimDevice> = futures::stream::iter(ids.clone())
        .map(|id| async move {
            let mut dev = SimDevice::connect(mqtt, &id, Form::Packed, "1.0.0", None).await;
            dev.mtu = 256;
            assert!(matches!(dev.run(Some(1024)).await, Ended::Paused(_)), "{id} pauses mid-transfer");
            dev
        })
        .buffer_unordered(64)
        .collect()
        .await;

    // The repository publishes metadata that expires in 2 s; the gateway verifies it, and
    // then it expires.
    live_repo(&["publish", repo.to_str().unwrap(), "--expires-in", "2"]);
    let v = refresh(&base).await;
    let expires = v["expires"].as_u64().unwrap();
    while fwgate::now_secs() <= expires {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every device asks again: each is told to WAIT, and no operation fails.
    for dev in devices.iter_mut() {
        dev.send_status().await;
        let reply = dev.next_payload(STEP_TIMEOUT).await.expect("an answer");
        let (cmd, _) = DfuCommand::decode(&reply).unwrap();
        assert!(matches!(cmd, DfuCommand::Wait { .. }), "{}: {cmd:?}", dev.id);
    }
    let m = metrics(&base).await;
    assert_eq!(metric(&m, "fwgate_operations_waiting_for_trust "), DEVICES as u64, "{m}");
    assert_eq!(metric(&m, "fwgate_operations{state=\"failed\"} "), 0);
    assert_eq!(metric(&m, "fwgate_operations{state=\"downloading\"} "), DEVICES as u64);
    let (_, status) = admin(&base, reqwest::Method::GET, "/api/v1/waves/w/status", None, None).await;
    assert!(status["waiting"].as_str().is_some_and(|w| w.starts_with("waiting for trust:")), "{status}");

    // Fresh metadata: every device finishes where it stopped, with the right bytes.
    live_repo(&["publish", repo.to_str().unwrap(), "--expires-in", "86400"]);
    refresh(&base).await;
    let finished: Vec<(String, Ended, Vec<u8>)> = futures::stream::iter(devices)
        .map(|mut dev| async move {
            let ended = dev.run(None).await;
            let out = (dev.id.clone(), ended, std::mem::take(&mut dev.last_image));
            dev.disconnect().await;
            out
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (id, ended, bytes) in &finished {
        assert_eq!(*ended, Ended::Updated, "{id}");
        assert!(*bytes == img, "{id}: the image's bytes");
    }
    let m = metrics(&base).await;
    assert_eq!(metric(&m, "fwgate_operations{state=\"succeeded\"} "), DEVICES as u64, "{m}");
    assert_eq!(metric(&m, "fwgate_operations{state=\"failed\"} "), 0);
    assert_eq!(metric(&m, "fwgate_operations_waiting_for_trust "), 0);
    gw.stop().await;
}
