//! The MQTT data plane end to end: a gateway in-process on ephemeral ports with RocksDB in a
//! temp dir, and devices simulated with rumqttc.

mod common;

use std::time::Duration;

use common::*;
use fwgate::protocol::Form;
use sha2::{Digest, Sha256};

const KIB: usize = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_and_packed_devices_download_256_kib_and_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(256 * KIB, 1);
    let meta = add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    assert_eq!(meta["sha256"], hex::encode(Sha256::digest(&img)));
    for id in ["dev-named", "dev-packed"] {
        add_device(&gw.admin, id).await;
        assign(&gw.admin, id, "app@2.0.0").await;
    }
    let mut named = SimDevice::connect(gw.mqtt, "dev-named", Form::Named, "1.0.0", None).await;
    let mut packed = SimDevice::connect(gw.mqtt, "dev-packed", Form::Packed, "1.0.0", None).await;
    let (a, b) = tokio::join!(named.run(None), packed.run(None));
    assert_eq!((a, b), (Ended::Updated, Ended::Updated));
    for dev in [&named, &packed] {
        assert_eq!(dev.last_image, img, "{} assembled the image byte for byte", dev.id);
        assert_eq!(dev.running, "2.0.0");
        assert_eq!(dev.offsets.len(), 512, "{}: 256 KiB in 512-byte blocks, each sent once", dev.id);
        let v = device_state(&gw.admin, &dev.id).await;
        assert_eq!(v["operations"][0]["state"], "succeeded", "{v}");
        assert_eq!(v["running"]["main"], "2.0.0");
    }
    // The broker reports its connections once a second; both devices are still connected.
    let mut connected = String::new();
    for _ in 0..50 {
        connected = gw.gw().telemetry.render();
        if connected.contains("fwgate_connected_devices 2\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(connected.contains("fwgate_connected_devices 2\n"), "{connected}");
    let metrics = gw.gw().telemetry.render();
    assert!(metrics.contains("fwgate_blocks_served_total{transport=\"mqtt\"} 1024"), "{metrics}");
    assert!(metrics.contains(&format!("fwgate_bytes_served_total{{transport=\"mqtt\"}} {}", 2 * 256 * KIB)));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_at_its_offset_after_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(64 * KIB, 2);
    add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    add_device(&gw.admin, "dev-1").await;
    assign(&gw.admin, "dev-1", "app@2.0.0").await;

    let mut dev = SimDevice::connect(gw.mqtt, "dev-1", Form::Named, "1.0.0", None).await;
    let forty = (img.len() * 40 / 100) as u32;
    let Ended::Paused(at) = dev.run(Some(forty)).await else { panic!("expected a pause") };
    assert!(at >= forty);
    let v = device_state(&gw.admin, "dev-1").await;
    assert_eq!(v["operations"][0]["state"], "downloading");
    assert_eq!(v["operations"][0]["offset"].as_u64().unwrap() as u32 + 512, at, "progress is the last reported offset");
    let download = dev.download.take();
    dev.disconnect().await;

    // A new connection, same device, same partial image.
    let mut dev = SimDevice::connect(gw.mqtt, "dev-1", Form::Named, "1.0.0", None).await;
    dev.download = download;
    assert_eq!(dev.run(None).await, Ended::Updated);
    assert_eq!(dev.offsets.first(), Some(&at), "the first block after reconnecting is at the reported offset");
    assert!(dev.offsets.iter().all(|&o| o >= at), "no byte before the offset is sent again");
    assert_eq!(dev.last_image, img);
    assert_eq!(device_state(&gw.admin, "dev-1").await["operations"][0]["state"], "succeeded");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_update_version_restarts_at_zero_and_a_rollback_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(8 * KIB, 3);
    add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    add_device(&gw.admin, "dev-2").await;
    assign(&gw.admin, "dev-2", "app@2.0.0").await;
    let mut dev = SimDevice::connect(gw.mqtt, "dev-2", Form::Packed, "1.0.0", None).await;

    // The device claims to be 4 KiB into some other version: the gateway starts it over.
    dev.download = Some(Download::claimed("1.9.9", 4 * KIB as u32));
    dev.send_status().await;
    let first = dev.next_payload(STEP_TIMEOUT).await.expect("a reply");
    match fwgate::protocol::Command::decode(&first).unwrap().0 {
        fwgate::protocol::Command::Write { offset, version, .. } => assert_eq!((offset, version), (0, "2.0.0")),
        other => panic!("expected WRITE at 0, got {other:?}"),
    }

    // Download everything up to the SWAP, then come back on the old version: rolled back.
    dev.download = None;
    let len = img.len() as u32;
    assert_eq!(dev.run(Some(len)).await, Ended::Paused(len));
    dev.send_status().await;
    let swap = dev.next_payload(STEP_TIMEOUT).await.unwrap();
    assert!(matches!(fwgate::protocol::Command::decode(&swap).unwrap().0, fwgate::protocol::Command::Swap { .. }));
    assert_eq!(device_state(&gw.admin, "dev-2").await["operations"][0]["state"], "swapping");
    dev.download = None;
    dev.running = "1.0.0".into();
    assert_eq!(dev.run(None).await, Ended::Synced);
    let v = device_state(&gw.admin, "dev-2").await;
    assert_eq!(v["operations"][0]["state"], "failed", "{v}");
    assert!(v["operations"][0]["detail"].as_str().unwrap().contains("after SWAP"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_sends_several_blocks_per_status() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(40 * KIB, 4);
    add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    add_device(&gw.admin, "dev-w").await;
    assign(&gw.admin, "dev-w", "app@2.0.0").await;
    let mut dev = SimDevice::connect(gw.mqtt, "dev-w", Form::Named, "1.0.0", None).await;
    dev.mtu = 1024;
    dev.window = Some(4);
    assert_eq!(dev.run(None).await, Ended::Updated);
    assert_eq!(dev.last_image, img);
    assert_eq!(dev.offsets.len(), 40);
    let statuses = gw.gw().telemetry.status_count("write");
    assert_eq!(statuses, 10, "40 blocks in windows of 4 take 10 Status messages");
    gw.stop().await;
}

fn invalid_vectors() -> Vec<(String, Vec<u8>)> {
    let all: serde_json::Value = serde_json::from_str(include_str!("../fixtures/dfu.json")).unwrap();
    all["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["form"] == "invalid")
        .map(|v| (v["name"].as_str().unwrap().to_owned(), hex::decode(v["hex"].as_str().unwrap()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Large enough that even the 100 KB vector reaches the decoder.
    config.mqtt.max_payload_bytes = 128 * KIB;
    let gw = TestGateway::start(config).await;
    let img = image(4 * KIB, 5);
    add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    for id in ["bad-1", "good-1"] {
        add_device(&gw.admin, id).await;
        assign(&gw.admin, id, "app@2.0.0").await;
    }
    let mut bad = SimDevice::connect(gw.mqtt, "bad-1", Form::Named, "1.0.0", None).await;
    let vectors = invalid_vectors();
    assert_eq!(vectors.len(), 13);
    for (_, bytes) in &vectors {
        bad.publish_raw(bytes.clone()).await;
    }
    // The device's client sends while it is polled: poll it until the gateway has counted
    // every message — nothing may come back for garbage meanwhile, nor just after...
    let t = &gw.gw().telemetry;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while t.status_count("bad_input") < 13 && tokio::time::Instant::now() < deadline {
        assert_eq!(bad.next_payload(Duration::from_millis(20)).await, None, "no reply to bad input");
    }
    assert_eq!(bad.next_payload(Duration::from_millis(200)).await, None, "no reply to bad input");
    // ...and every message was counted, by kind...
    assert_eq!(t.status_count("bad_input"), 13);
    for (kind, n) in [
        ("empty", 1),
        ("truncated", 3),
        ("not_a_map", 2),
        ("wrong_type", 1),
        ("missing_field", 1),
        ("out_of_range", 3),
        ("trailing_bytes", 1),
        ("too_long", 1),
    ] {
        assert_eq!(t.bad_input_count(kind), n, "{kind}");
    }
    // ...nothing changed for that device...
    let v = device_state(&gw.admin, "bad-1").await;
    assert_eq!(v["operations"][0]["state"], "pending");
    assert!(v["running"].as_object().unwrap().is_empty());
    // ...and the gateway keeps serving, that device included.
    let mut good = SimDevice::connect(gw.mqtt, "good-1", Form::Packed, "1.0.0", None).await;
    assert_eq!(good.run(None).await, Ended::Updated);
    assert_eq!(bad.run(None).await, Ended::Updated);

    // A Status from a device nobody registered gets WAIT, and is counted.
    let mut ghost = SimDevice::connect(gw.mqtt, "ghost", Form::Named, "1.0.0", None).await;
    assert_eq!(ghost.run(None).await, Ended::Waited);
    assert_eq!(t.status_count("unknown_device"), 1);
    assert!(gw.gw().fleet.get("ghost").is_none(), "an unknown device is not registered by talking");
    let metrics = t.render();
    assert!(metrics.contains("fwgate_bad_input_total{kind=\"too_long\"} 1"), "{metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_refused_by_the_broker_with_the_default_limit() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    add_image(&gw.admin, "app", "2.0.0", image(2 * KIB, 6)).await;
    add_device(&gw.admin, "good-2").await;
    assign(&gw.admin, "good-2", "app@2.0.0").await;
    let (_, huge) = invalid_vectors().into_iter().find(|(n, _)| n == "invalid/version_too_long").unwrap();
    let mut bad = SimDevice::connect(gw.mqtt, "big-1", Form::Named, "1.0.0", None).await;
    bad.publish_raw(huge).await;
    assert!(
        bad.closed_by_broker(Duration::from_secs(10)).await,
        "a payload over mqtt.max_payload_bytes closes the connection"
    );
    let mut good = SimDevice::connect(gw.mqtt, "good-2", Form::Named, "1.0.0", None).await;
    assert_eq!(good.run(None).await, Ended::Updated);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_authentication_takes_the_derived_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.mqtt.auth = true;
    config.mqtt.device_secret = "a-long-enough-test-secret".into();
    let gw = TestGateway::start(config).await;
    add_image(&gw.admin, "app", "2.0.0", image(2 * KIB, 7)).await;
    add_device(&gw.admin, "auth-1").await;
    assign(&gw.admin, "auth-1", "app@2.0.0").await;
    let (status, v) = admin(&gw.admin, reqwest::Method::POST, "/api/v1/devices/auth-1/token", None, None).await;
    assert_eq!(status, 200);
    let token = v["token"].as_str().unwrap().to_owned();
    // A second registered device with a valid token of its own.
    add_device(&gw.admin, "auth-2").await;
    let (status, v) = admin(&gw.admin, reqwest::Method::POST, "/api/v1/devices/auth-2/token", None, None).await;
    assert_eq!(status, 200);
    let other = v["token"].as_str().unwrap().to_owned();
    assert_ne!(token, other);

    assert!(SimDevice::connect_raw(gw.mqtt, "auth-1", None).await.is_err(), "no password");
    assert!(SimDevice::connect_raw(gw.mqtt, "auth-1", Some("00ff")).await.is_err(), "wrong password");
    assert!(SimDevice::connect_raw(gw.mqtt, "auth-1", Some(&other)).await.is_err(), "another device's valid token");
    assert!(SimDevice::connect_raw(gw.mqtt, "auth-2", Some(&token)).await.is_err(), "and the other way round");
    assert!(SimDevice::connect_raw(gw.mqtt, "stranger", Some(&token)).await.is_err(), "an unregistered id");
    // Each token opens its own device's connection.
    assert!(SimDevice::connect_raw(gw.mqtt, "auth-2", Some(&other)).await.is_ok(), "auth-2 with its own token");
    let mut dev = SimDevice::connect(gw.mqtt, "auth-1", Form::Named, "1.0.0", Some(&token)).await;
    assert_eq!(dev.run(None).await, Ended::Updated);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_mutations_need_the_token_and_bad_requests_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let c = reqwest::Client::new();
    let r = c.post(format!("{}/api/v1/devices", gw.admin)).json(&serde_json::json!({"id": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/api/v1/devices", gw.admin))
        .bearer_auth("wrong")
        .json(&serde_json::json!({"id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(gw.gw().fleet.get("x").is_none());
    for probe in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(c.get(format!("{}{probe}", gw.admin)).send().await.unwrap().status(), 200, "{probe}");
    }
    let (s, v) = admin(
        &gw.admin,
        reqwest::Method::POST,
        "/api/v1/devices",
        None,
        Some(serde_json::json!([{"id": "ok-1"}, {"id": "bad id"}])),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(gw.gw().fleet.get("ok-1").is_none(), "a bad batch writes nothing");
    // A fleet-sized import is one request, past axum's 2 MB default body limit.
    let many: Vec<_> =
        (0..80_000).map(|i| serde_json::json!({"id": format!("bulk-{i:06}"), "groups": ["g"]})).collect();
    let (s, v) =
        admin(&gw.admin, reqwest::Method::POST, "/api/v1/devices", None, Some(serde_json::Value::Array(many))).await;
    assert_eq!((s, v["created"].as_u64()), (200, Some(80_000)), "{v}");
    assert_eq!(gw.gw().fleet.len(), 80_000);
    add_image(&gw.admin, "app", "1", vec![1, 2, 3]).await;
    let (s, v) =
        admin(&gw.admin, reqwest::Method::POST, "/api/v1/images?name=app&version=1", Some(vec![9u8].into()), None)
            .await;
    assert_eq!((s, v["kind"].as_str()), (409, Some("conflict")), "re-upload with other bytes is refused");
    let (s, _) = admin(
        &gw.admin,
        reqwest::Method::PUT,
        "/api/v1/devices/nobody/assignment",
        None,
        Some(serde_json::json!({"image": "app@1"})),
    )
    .await;
    assert_eq!(s, 404);
    gw.stop().await;
}
