//! Scale-out: one planner and data-plane nodes (`fwgate serve --role …`, the binary) behind a
//! real Mosquitto 2 started by the test; devices talk only to the broker.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::mosquitto::Mosquitto;
use common::serve::{Serve, BIN};
use common::*;
use fwgate::protocol::Form;
use serde_json::Value;

fn load(planner: &str, broker: &Mosquitto, report: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .args(["load", "--transport", "mqtt", "--register", "--quiet", "--mqtt", &broker.addr().to_string()])
        .args(["--report", report.to_str().unwrap()])
        .args(args)
        .env("FWGATE_SERVER", planner)
        .env("FWGATE_TOKEN", "test-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: std::process::Child, report: &std::path::Path) -> Value {
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fwgate load: {text}");
    serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_devices_update_through_two_dataplane_nodes_across_a_node_kill_and_planner_and_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sub = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut broker = Mosquitto::start(dir.path(), "").await;
    let port = free_port();
    let mut p = planner(&sub("planner"), &broker, port).await;
    let base = p.admin.clone();
    let n1 = dataplane(&sub("n1"), &broker, "dp-1", &base).await;
    let n2 = dataplane(&sub("n2"), &broker, "dp-2", &base).await;

    let report = dir.path().join("report.json");
    let args = ["--devices", "2000", "--image-kib", "64", "--mtu", "512", "--connect-rate", "1000"];
    let run = load(&base, &broker, &report, &args);
    // 2,000 × 128 blocks. Both nodes serve a share of them (the shared subscription).
    wait_metric(&n1.admin, BLOCKS, 5_000.0, 120).await;
    wait_metric(&n2.admin, BLOCKS, 5_000.0, 60).await;
    let n2_blocks = metric(&n2.admin, BLOCKS).await;
    // One data-plane node dies: the broker gives its share to the other.
    n2.kill();
    let n1_blocks = metric(&n1.admin, BLOCKS).await;
    wait_metric(&n1.admin, BLOCKS, n1_blocks + 10_000.0, 60).await;
    // The planner restarts: it loads its operations from its store, and publishes every view again.
    p.kill();
    p = planner(&sub("planner"), &broker, port).await;
    assert_eq!(p.admin, base);
    let n1_blocks = metric(&n1.admin, BLOCKS).await;
    wait_metric(&n1.admin, BLOCKS, n1_blocks + 10_000.0, 60).await;
    // The broker restarts (no persistence: every retained view is gone, and published again).
    broker.restart().await;
    let r = finished(run, &report);
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(2000), Some(0)), "{r:#}");
    assert_eq!(r["checksum_failures"], 0);
    assert!(n2_blocks > 0.0);
    // Every operation ended succeeded on the planner, from the nodes' reports.
    wait_metric(&p.admin, SUCCEEDED, 2000.0, 60).await;
    for state in ["pending", "downloading", "swapping", "failed", "timed_out"] {
        assert_eq!(metric(&p.admin, &format!("fwgate_operations{{state=\"{state}\"}}")).await, 0.0, "{state}");
    }
    // `fwgate nodes` lists the living node, and the killed one until it is forgotten.
    let (ok, text) = p.cli(&["nodes", "--json"]);
    assert!(ok, "{text}");
    let nodes: Value = serde_json::from_str(&text).unwrap();
    let dp1 = nodes.as_array().unwrap().iter().find(|n| n["node"] == "dp-1").expect("dp-1 listed");
    assert!(dp1["views"].as_u64().unwrap() >= 2000, "{dp1}");
    assert!(dp1["blocks"].as_u64().unwrap() > 0, "{dp1}");
    let (ok, text) = p.cli(&["nodes"]);
    assert!(ok && text.contains("dp-1"), "{text}");
}

/// One device through the broker, from `running`; how it ended and what it runs then.
async fn device(broker: &Mosquitto, id: &str, running: &str) -> (Ended, String) {
    let mut d = SimDevice::connect(broker.addr(), id, Form::Named, running, None).await;
    let ended = d.run(None).await;
    let now = d.running.clone();
    d.disconnect().await;
    (ended, now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_a_wave_and_a_rollout_made_on_the_planner_reach_devices_served_by_a_dataplane_node_and_a_cancel_stops_them(
) {
    let dir = tempfile::tempdir().unwrap();
    let sub = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let broker = Mosquitto::start(dir.path(), "").await;
    let fixtures = tuf_fixtures();
    let url = |what: &str| format!("file://{}/", fixtures.join("repos/production").join(what).display());
    let mut env = broker_env(&broker, "planner", "planner");
    env.push(("FWGATE_TUF__PRODUCTION_ROOT", fixtures.join("production-root.json").display().to_string()));
    env.push(("FWGATE_TUF__PRODUCTION_METADATA_URL", url("metadata")));
    env.push(("FWGATE_TUF__PRODUCTION_TARGETS_URL", url("targets")));
    let p = Serve::start_with(&sub("planner"), &env).await;
    let base = p.admin.clone();
    let node = dataplane(&sub("n1"), &broker, "dp-1", &base).await;

    let register = |devices: Value| {
        let base = base.clone();
        async move {
            let (status, v) = admin(&base, reqwest::Method::POST, "/api/v1/devices", None, Some(devices)).await;
            assert_eq!(status, 200, "register: {v}");
        }
    };
    register(serde_json::json!([
        {"id": "w0", "tag": "release", "production": true, "groups": ["canary"]},
        {"id": "w1", "tag": "release", "production": true, "groups": ["eu"]},
        {"id": "r0", "tag": "beta", "hardware": "nrf52"},
        {"id": "r1", "tag": "beta", "hardware": "nrf52"},
        {"id": "a0"},
    ]))
    .await;
    add_image(&base, "app", "2.0", target_bytes("production", "app-2.0.bin")).await;
    add_image(&base, "app", "3.0.0", image(20_000, 9)).await;

    // An operator's assignment.
    assign(&base, "a0", "app@3.0.0").await;
    settled(&base, &node.admin).await;
    assert_eq!(device(&broker, "a0", "1.0").await, (Ended::Updated, "3.0.0".into()));

    // A wave: its canary rollout reaches the canary; a cancel withdraws what it staged for the
    // rest before they ask.
    let (status, w) =
        post(&base, "/api/v1/waves", serde_json::json!({"name": "v2", "version": "2.0", "tag": "release"})).await;
    assert_eq!(status, 201, "{w}");
    let (_, r) = post(&base, "/api/v1/waves/v2/rollout", serde_json::json!({"group": "canary"})).await;
    assert_eq!(r["staged"], 1, "{r}");
    settled(&base, &node.admin).await;
    assert_eq!(device(&broker, "w0", "1.0").await, (Ended::Updated, "2.0".into()));
    let (_, r) = post(&base, "/api/v1/waves/v2/rollout", serde_json::json!({"group": "eu"})).await;
    assert_eq!(r["staged"], 1, "{r}");
    let (status, c) = post(&base, "/api/v1/waves/v2/cancel", serde_json::json!({})).await;
    assert_eq!(status, 200, "{c}");
    settled(&base, &node.admin).await;
    assert_eq!(device(&broker, "w1", "1.0").await, (Ended::Synced, "1.0".into()), "canceled on the node too");

    // A rollout over the beta devices, in one group.
    let body = serde_json::json!({"name": "b1", "filter": "tag==beta", "image": "app@3.0.0", "groups": 1,
        "success": 100, "error": "1"});
    let (status, r) = post(&base, "/api/v1/rollouts", body).await;
    assert_eq!(status, 201, "{r}");
    let (status, r) = post(&base, "/api/v1/rollouts/b1/start", serde_json::json!({})).await;
    assert_eq!(status, 200, "{r}");
    settled(&base, &node.admin).await;
    for id in ["r0", "r1"] {
        assert_eq!(device(&broker, id, "1.0").await, (Ended::Updated, "3.0.0".into()), "{id}");
    }
    // The planner learnt every outcome from the node's reports: the rollout finished.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, r) = admin(&base, reqwest::Method::GET, "/api/v1/rollouts/b1", None, None).await;
        if r["state"] == "finished" {
            break;
        }
        assert!(Instant::now() < deadline, "rollout not finished: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, d) = admin(&base, reqwest::Method::GET, "/api/v1/devices/a0", None, None).await;
    assert_eq!(d["operations"][0]["state"], "succeeded", "{d}");
}
