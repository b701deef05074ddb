//! Waves end to end (the Foundries seeds' production workflow): a gateway in-process on
//! ephemeral ports with RocksDB in a temp dir and the python-tuf fixture repository as its
//! production TUF repository, the admin API, and production devices that update over real
//! MQTT to verified production targets.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
use fwgate::protocol::Form;
use reqwest::Method;
use serde_json::{json, Value};

const KIB: usize = 1024;

fn tuf_config(dir: &std::path::Path) -> fwgate::config::Config {
    let mut c = test_config(dir);
    with_tuf(&mut c, false);
    c
}

async fn register(base: &str, devices: Value) {
    let (status, v) = admin(base, Method::POST, "/api/v1/devices", None, Some(devices)).await;
    assert_eq!(status, 200, "register: {v}");
}

/// `{"id", "tag": "release", "production": true, "groups"}` for each id.
fn fleet(ids: &[String], groups: &[&str], production: bool) -> Value {
    Value::Array(
        ids.iter().map(|id| json!({"id": id, "tag": "release", "production": production, "groups": groups})).collect(),
    )
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

async fn call(base: &str, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, v) = admin(base, method, path, None, body).await;
    assert!((200..300).contains(&status), "{path}: {status} {v}");
    v
}

async fn status(base: &str, wave: &str) -> Value {
    call(base, Method::GET, &format!("/api/v1/waves/{wave}/status"), None).await
}

/// Each device connects as running `running`, runs its DFU exchange to the end, and reports
/// how it ended and what it runs then.
async fn run_devices(mqtt: SocketAddr, ids: &[String], running: &str) -> BTreeMap<String, (Ended, String)> {
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (id, running) = (id.clone(), running.to_owned());
        tasks.spawn(async move {
            let mut dev = SimDevice::connect(mqtt, &id, Form::Named, &running, None).await;
            dev.mtu = 1024;
            let ended = dev.run(None).await;
            let now = dev.running.clone();
            dev.disconnect().await;
            (id, (ended, now))
        });
    }
    let mut out = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (id, v) = r.expect("device task");
        out.insert(id, v);
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().expect("a list").iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_workflow_from_canary_to_complete_and_a_late_joiner() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(tuf_config(dir.path())).await;
    let base = gw.admin.clone();
    add_image(&base, "app", "2.0", target_bytes("production", "app-2.0.bin")).await;
    let canary = ids("canary-", 5);
    let rest = ids("dev-", 25);
    register(&base, fleet(&canary, &["canary"], true)).await;
    register(&base, fleet(&rest, &["eu"], true)).await;
    register(&base, fleet(&["test-0".to_string()], &[], false)).await;

    let w = call(&base, Method::POST, "/api/v1/waves", Some(json!({"name": "v2", "version": "2.0", "tag": "release"})))
        .await;
    assert_eq!(w["state"], "active");
    // Init delivers nothing.
    let before = run_devices(gw.mqtt, &rest[..1], "1.0").await;
    assert_eq!(before[&rest[0]], (Ended::Synced, "1.0".into()));

    let r = call(&base, Method::POST, "/api/v1/waves/v2/rollout", Some(json!({"group": "canary"}))).await;
    assert_eq!(r["staged"], 5, "{r}");
    let ran = run_devices(gw.mqtt, &canary, "1.0").await;
    assert!(ran.values().all(|v| *v == (Ended::Updated, "2.0".into())), "{ran:?}");

    let r = call(
        &base,
        Method::POST,
        "/api/v1/waves/v2/rollout",
        Some(json!({"limit": 20, "seed": 5, "print_uuids": true})),
    )
    .await;
    assert_eq!((r["staged"].as_u64(), r["population"].as_u64()), (Some(20), Some(30)), "{r}");
    let sample = strings(&r["devices"]);
    assert!(sample.iter().all(|d| d.starts_with("dev-")), "the canaries are in the wave already: {sample:?}");
    let ran = run_devices(gw.mqtt, &sample, "1.0").await;
    assert!(ran.values().all(|v| *v == (Ended::Updated, "2.0".into())), "{ran:?}");
    let left: Vec<String> = rest.iter().filter(|d| !sample.contains(d)).cloned().collect();
    assert_eq!(left.len(), 5);
    let ran = run_devices(gw.mqtt, &left, "1.0").await;
    assert!(ran.values().all(|v| v.0 == Ended::Synced), "not rolled out to yet: {ran:?}");

    let s = status(&base, "v2").await;
    assert_eq!((s["total"].as_u64(), s["updated"].as_u64(), s["need_update"].as_u64()), (Some(30), Some(25), Some(5)));
    let groups: BTreeMap<String, Value> =
        s["groups"].as_array().unwrap().iter().map(|g| (g["group"].as_str().unwrap().to_owned(), g.clone())).collect();
    assert_eq!(groups["canary"]["updated"], 5);
    assert_eq!((groups["eu"]["total"].as_u64(), groups["eu"]["updated"].as_u64()), (Some(25), Some(20)));

    let c = call(&base, Method::POST, "/api/v1/waves/v2/complete", None).await;
    assert_eq!((c["wave"]["state"].as_str(), c["operations"].as_u64()), (Some("complete"), Some(5)), "{c}");
    let ran = run_devices(gw.mqtt, &left, "1.0").await;
    assert!(ran.values().all(|v| *v == (Ended::Updated, "2.0".into())), "{ran:?}");
    // A test device on the same tag is another class: untouched.
    let ran = run_devices(gw.mqtt, &["test-0".into()], "1.0").await;
    assert_eq!(ran["test-0"].0, Ended::Synced);
    let tag = call(&base, Method::GET, "/api/v1/tags/release", None).await;
    assert_eq!(tag["production_versions"], json!(["2.0"]));

    // A device that joins the tag afterwards updates too.
    register(&base, fleet(&["late-0".to_string()], &[], true)).await;
    let ran = run_devices(gw.mqtt, &["late-0".into()], "1.0").await;
    assert_eq!(ran["late-0"], (Ended::Updated, "2.0".into()));
    let s = status(&base, "v2").await;
    assert_eq!((s["total"].as_u64(), s["updated"].as_u64(), s["scheduled"].as_u64()), (Some(31), Some(31), Some(0)));
    // The next wave must be newer than the production version.
    add_image(&base, "app", "1.5", image(4 * KIB, 2)).await;
    let (code, v) = post(&base, "/api/v1/waves", json!({"name": "old", "version": "1.5", "tag": "release"})).await;
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not newer than 2.0"), "{v}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_rollout_keeps_updated_devices_and_stops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(tuf_config(dir.path())).await;
    let base = gw.admin.clone();
    add_image(&base, "app", "2.1", target_bytes("production", "app-2.1.bin")).await;
    let all = ids("d", 20);
    register(&base, fleet(&all, &[], true)).await;
    call(&base, Method::POST, "/api/v1/waves", Some(json!({"name": "v3", "version": "2.1", "tag": "release"}))).await;
    let r = call(
        &base,
        Method::POST,
        "/api/v1/waves/v3/rollout",
        Some(json!({"limit": "50%", "seed": 11, "print_uuids": true})),
    )
    .await;
    let staged = strings(&r["devices"]);
    assert_eq!(staged.len(), 10);
    let ran = run_devices(gw.mqtt, &staged[..4], "1.0").await;
    assert!(ran.values().all(|v| *v == (Ended::Updated, "2.1".into())), "{ran:?}");
    // One device is half-way through its download when the wave is canceled.
    let mut mid = SimDevice::connect(gw.mqtt, &staged[4], Form::Named, "1.0", None).await;
    assert_eq!(mid.run(Some(2 * KIB as u32)).await, Ended::Paused(2 * KIB as u32));
    let s = status(&base, "v3").await;
    assert_eq!((s["scheduled"].as_u64(), s["in_progress"].as_u64()), (Some(6), Some(1)), "{s}");

    let c = call(&base, Method::POST, "/api/v1/waves/v3/cancel", None).await;
    assert_eq!((c["wave"]["state"].as_str(), c["operations"].as_u64()), (Some("canceled"), Some(6)), "{c}");
    // The transfer under way stops at the device's next Status: it stays on its version.
    assert_eq!(mid.run(None).await, Ended::Synced);
    assert_eq!(mid.running, "1.0");
    mid.disconnect().await;
    let ran = run_devices(gw.mqtt, &staged[5..], "1.0").await;
    assert!(ran.values().all(|v| *v == (Ended::Synced, "1.0".into())), "staged ones do not update: {ran:?}");
    let (code, v) = post(&base, "/api/v1/waves/v3/rollout", json!({})).await;
    assert_eq!(code, 409, "a canceled wave rolls out no more: {v}");

    // The counts agree with what the devices themselves report.
    let s = status(&base, "v3").await;
    let mut reported = BTreeMap::new();
    for id in &all {
        let v = device_state(&base, id).await;
        *reported.entry(v["running"]["main"].as_str().unwrap_or("none").to_owned()).or_insert(0u64) += 1;
    }
    assert_eq!(s["updated"].as_u64(), reported.get("2.1").copied(), "{s} vs {reported:?}");
    assert_eq!(s["updated"], 4);
    assert_eq!((s["total"].as_u64(), s["need_update"].as_u64()), (Some(20), Some(16)));
    assert_eq!(
        (s["scheduled"].as_u64(), s["in_progress"].as_u64(), s["canceled"].as_u64()),
        (Some(0), Some(0), Some(6))
    );
    let v = device_state(&base, &staged[4]).await;
    let op = v["operations"].as_array().unwrap().iter().find(|o| o["origin"] == "wave:v3").unwrap().clone();
    assert_eq!(op["state"], "canceled", "{op}");
    assert!(op["detail"].as_str().unwrap().contains("canceled while downloading"), "{op}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mistakes_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(tuf_config(dir.path())).await;
    let base = gw.admin.clone();
    add_image(&base, "app", "2.0", target_bytes("production", "app-2.0.bin")).await;
    register(&base, fleet(&ids("d", 3), &[], true)).await;
    call(&base, Method::POST, "/api/v1/waves", Some(json!({"name": "a", "version": "2.0", "tag": "release"}))).await;
    let cases = [
        ("/api/v1/waves", json!({"name": "b", "version": "2.0", "tag": "release"}), 409, "active wave: a"),
        ("/api/v1/waves", json!({"name": "c", "version": "7.0", "tag": "x"}), 404, "no image"),
        ("/api/v1/waves", json!({"name": "c", "version": "2.0", "tag": "x", "colour": 1}), 422, "unknown field"),
        ("/api/v1/waves/a/rollout", json!({"limit": "0%"}), 422, "invalid --limit"),
        ("/api/v1/waves/a/rollout", json!({"limit": "all"}), 422, "invalid --limit"),
        ("/api/v1/waves/nope/rollout", json!({}), 404, "no wave nope"),
    ];
    for (path, body, code, text) in cases {
        let (got, v) = admin(&base, Method::POST, path, None, Some(body.clone())).await;
        assert_eq!(got, code, "{path} {body}: {v}");
        assert!(v.to_string().contains(text), "{path} {body}: {v}");
    }
    let list = call(&base, Method::GET, "/api/v1/waves", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["rollouts"], json!([]));
    // Without the token nothing changes either.
    let (code, _) = admin(&base, Method::GET, "/api/v1/waves?status=sleeping", None, None).await;
    assert_eq!(code, 422);
    let r = reqwest::Client::new().post(format!("{base}/api/v1/waves/a/complete")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(call(&base, Method::GET, "/api/v1/waves/a", None).await["state"], "active");
    gw.stop().await;
}
