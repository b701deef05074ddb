//! TUF at the gateway: production devices receive only verified production targets — checked
//! when a wave is planned and again where blocks are served — and CI devices CI targets. The
//! repositories are the python-tuf fixtures (`fixtures/tuf/`); devices update over real MQTT.

mod common;

use common::*;
use fwgate::protocol::Form;
use reqwest::Method;
use serde_json::{json, Value};

async fn gateway(dir: &std::path::Path) -> TestGateway {
    let mut c = test_config(dir);
    with_tuf(&mut c, true);
    TestGateway::start(c).await
}

async fn register(base: &str, id: &str, production: bool) {
    let (status, v) = admin(
        base,
        Method::POST,
        "/api/v1/devices",
        None,
        Some(json!({"id": id, "tag": "release", "production": production})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

async fn op_of(base: &str, id: &str) -> Value {
    device_state(base, id).await["operations"].as_array().unwrap().last().cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_device_is_never_served_a_ci_image_even_when_assigned_one_directly() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path()).await;
    let base = gw.admin.clone();
    add_image(&base, "app", "2.2-ci", target_bytes("ci", "app-2.2-ci.bin")).await;
    register(&base, "prod-1", true).await;
    // An operator assigning the CI build to a production device is refused with the reason…
    let (code, v) =
        admin(&base, Method::PUT, "/api/v1/devices/prod-1/assignment", None, Some(json!({"image": "app@2.2-ci"})))
            .await;
    assert_eq!((code, v["kind"].as_str()), (422, Some("not_admissible")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("not a verified production target"), "{v}");
    assert!(device_state(&base, "prod-1").await["operations"].as_array().unwrap().is_empty());
    // …and one assigned while the device was a CI device is refused where blocks are served,
    // once the device is registered as a production device.
    register(&base, "prod-1", false).await;
    assign(&base, "prod-1", "app@2.2-ci").await;
    register(&base, "prod-1", true).await;
    let mut dev = SimDevice::connect(gw.mqtt, "prod-1", Form::Named, "2.0", None).await;
    // …and the device gets no block of it: SYNC on what it runs, and the operation fails.
    assert_eq!(dev.run(None).await, Ended::Synced);
    assert!(dev.offsets.is_empty() && dev.running == "2.0");
    let op = op_of(&base, "prod-1").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert!(op["detail"].as_str().unwrap().contains("not a verified production target"), "{op}");
    // Nor over CoAP: a stock client's Block2 GET of the device's firmware gets 4.04.
    let mut coap = fwgate::loadgen::coap::CoapClient::connect(gw.coap(), Default::default()).await.unwrap();
    match coap.get_block("/fw/prod-1", 0, 5).await {
        Err(fwgate::loadgen::coap::ClientError::Status(s)) => assert_eq!(s, "4.04"),
        other => panic!("expected 4.04, got {other:?}"),
    }
    // A verified production target for the same device is served.
    add_image(&base, "app", "2.1", target_bytes("production", "app-2.1.bin")).await;
    assign(&base, "prod-1", "app@2.1").await;
    assert_eq!(dev.run(None).await, Ended::Updated);
    assert_eq!(dev.running, "2.1");
    // Downgrades are refused by default: back to 2.0 (a production target too) fails.
    add_image(&base, "app", "2.0", target_bytes("production", "app-2.0.bin")).await;
    assign(&base, "prod-1", "app@2.0").await;
    dev.disconnect().await;
    let mut dev = SimDevice::connect(gw.mqtt, "prod-1", Form::Named, "2.1", None).await;
    assert_eq!(dev.run(None).await, Ended::Synced);
    assert!(dev.offsets.is_empty() && dev.running == "2.1");
    let op = op_of(&base, "prod-1").await;
    assert_eq!(op["state"], "failed");
    assert!(op["detail"].as_str().unwrap().contains("downgrade from 2.1 to 2.0 refused"), "{op}");
    dev.disconnect().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_waves_need_a_verified_production_target_of_their_tag() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path()).await;
    let base = gw.admin.clone();
    register(&base, "prod-1", true).await;
    // An image the production repository does not list.
    add_image(&base, "app", "2.5", image(4096, 9)).await;
    let (code, v) = post(&base, "/api/v1/waves", json!({"name": "w", "version": "2.5", "tag": "release"})).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not a verified production target"), "{v}");
    // A production target, but released for another tag.
    add_image(&base, "app", "3.0", target_bytes("production", "beta-3.0.bin")).await;
    let (code, v) = post(&base, "/api/v1/waves", json!({"name": "w", "version": "3.0", "tag": "release"})).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not for tag release"), "{v}");
    // The CI build is not a production target either, though the CI repository verifies it.
    add_image(&base, "app", "2.2-ci", target_bytes("ci", "app-2.2-ci.bin")).await;
    let (code, _) = post(&base, "/api/v1/waves", json!({"name": "w", "version": "2.2-ci", "tag": "release"})).await;
    assert_eq!(code, 422);
    let (_, list) = admin(&base, Method::GET, "/api/v1/waves", None, None).await;
    assert_eq!(list, json!([]), "nothing was created");
    // An upload that claims to be a target must be it.
    let (code, v) = admin(
        &base,
        Method::POST,
        "/api/v1/images?name=app&version=2.0&target=app-2.0.bin",
        Some(image(4096, 1).into()),
        None,
    )
    .await;
    assert_eq!(code, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("is not production target app-2.0.bin"), "{v}");
    let (code, v) = admin(
        &base,
        Method::POST,
        "/api/v1/images?name=app&version=2.0&target=app-2.0.bin",
        Some(target_bytes("production", "app-2.0.bin").into()),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let (code, w) = post(&base, "/api/v1/waves", json!({"name": "w", "version": "2.0", "tag": "release"})).await;
    assert_eq!(code, 201, "{w}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_device_updates_from_ci_targets_and_only_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path()).await;
    let base = gw.admin.clone();
    add_image(&base, "app", "2.2-ci", target_bytes("ci", "app-2.2-ci.bin")).await;
    add_image(&base, "app", "2.1", target_bytes("production", "app-2.1.bin")).await;
    register(&base, "ci-1", false).await;
    register(&base, "ci-2", false).await;
    let (code, v) = post(
        &base,
        "/api/v1/waves",
        json!({"name": "nightly", "version": "2.2-ci", "tag": "release", "production": false}),
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let (code, r) = post(&base, "/api/v1/waves/nightly/rollout", json!({"uuids": "ci-1"})).await;
    assert_eq!((code, r["staged"].as_u64()), (200, Some(1)), "{r}");
    let mut dev = SimDevice::connect(gw.mqtt, "ci-1", Form::Packed, "2.0", None).await;
    assert_eq!(dev.run(None).await, Ended::Updated);
    assert_eq!(dev.last_image, target_bytes("ci", "app-2.2-ci.bin"));
    dev.disconnect().await;
    // With a CI repository configured, a production build is not a CI target: refused at
    // assignment, and at serving for a device that was a production device when assigned.
    let (code, v) =
        admin(&base, Method::PUT, "/api/v1/devices/ci-2/assignment", None, Some(json!({"image": "app@2.1"}))).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not a verified ci target"), "{v}");
    register(&base, "ci-2", true).await;
    assign(&base, "ci-2", "app@2.1").await;
    register(&base, "ci-2", false).await;
    let mut dev = SimDevice::connect(gw.mqtt, "ci-2", Form::Named, "2.0", None).await;
    assert_eq!(dev.run(None).await, Ended::Synced);
    assert!(op_of(&base, "ci-2").await["detail"].as_str().unwrap().contains("not a verified ci target"));
    dev.disconnect().await;
    let (_, tuf) = admin(&base, Method::GET, "/api/v1/tuf", None, None).await;
    assert_eq!(tuf["repositories"].as_array().unwrap().len(), 2, "{tuf}");
    let (code, v) = admin(&base, Method::POST, "/api/v1/tuf/production/refresh", None, None).await;
    assert_eq!((code, v["targets"].as_array().map(Vec::len)), (200, Some(3)), "{v}");
    assert_eq!(v["targets_version"], 2);
    let (code, _) = admin(&base, Method::POST, "/api/v1/tuf/staging/refresh", None, None).await;
    assert_eq!(code, 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_wave_of_a_target_signed_only_by_a_delegated_role_updates_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    // The production repository's top-level targets role lists nothing itself: it delegates
    // board-a/* to the role board-a, which also signs a board-b path it was not delegated.
    let url = |what: &str| format!("file://{}/", tuf_fixtures().join("repos/delegated").join(what).display());
    c.tuf.production_root = tuf_fixtures().join("delegated-root.json");
    c.tuf.production_metadata_url = url("metadata");
    c.tuf.production_targets_url = url("targets");
    let gw = TestGateway::start(c).await;
    let base = gw.admin.clone();
    let (_, tuf) = admin(&base, Method::GET, "/api/v1/tuf", None, None).await;
    let targets = &tuf["repositories"][0]["verified"]["targets"];
    let names: Vec<&str> = targets.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["board-a/fw-4.0.bin"], "only the delegated path is trusted: {tuf}");

    // The target outside board-a's paths is refused, with the reason.
    add_image(&base, "fw", "9.0", target_bytes("delegated", "board-b/fw-9.0.bin")).await;
    let (code, v) = post(&base, "/api/v1/waves", json!({"name": "w9", "version": "9.0", "tag": "release"})).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not a verified production target"), "{v}");

    // The delegated target goes to production devices over MQTT.
    add_image(&base, "fw", "4.0", target_bytes("delegated", "board-a/fw-4.0.bin")).await;
    for id in ["prod-1", "prod-2"] {
        register(&base, id, true).await;
    }
    let (code, w) = post(&base, "/api/v1/waves", json!({"name": "w4", "version": "4.0", "tag": "release"})).await;
    assert_eq!(code, 201, "{w}");
    let (code, r) = post(&base, "/api/v1/waves/w4/rollout", json!({})).await;
    assert_eq!((code, r["staged"].as_u64()), (200, Some(2)), "{r}");
    for id in ["prod-1", "prod-2"] {
        let mut dev = SimDevice::connect(gw.mqtt, id, Form::Named, "3.0", None).await;
        assert_eq!(dev.run(None).await, Ended::Updated, "{id}");
        assert_eq!(dev.running, "4.0");
        dev.disconnect().await;
    }
    gw.stop().await;
}
