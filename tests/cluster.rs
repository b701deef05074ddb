//! Scale-out: one planner and data-plane nodes (`fwgate serve --role …`, the binary) behind a
//! real Mosquitto 2 started by the test; devices talk only to the broker.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::serve::{Serve, BIN};
use common::*;
use fwgate::protocol::Form;
use serde_json::Value;

/// A value from a node's /metrics (0 when the series is not there yet).
async fn metric(admin: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (up to `secs`) until a metric reaches `at_least`.
async fn wait_metric(admin: &str, series: &str, at_least: f64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = metric(admin, series).await;
        if v >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{admin}: {series} is {v}, not {at_least}, after {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const BLOCKS: &str = "fwgate_blocks_served_total{transport=\"mqtt\"}";
const SUCCEEDED: &str = "fwgate_operations{state=\"succeeded\"}";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn broker_env(broker: &Mosquitto, id: &str, role: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FWGATE_MQTT__MODE", "external".into()),
        ("FWGATE_MQTT__BROKER_URL", broker.url()),
        ("FWGATE_MQTT__CLIENT_ID", id.into()),
        ("FWGATE_CLUSTER__ROLE", role.into()),
    ]
}

/// The planner, on a fixed admin port so a restart keeps its address.
async fn planner(dir: &std::path::Path, broker: &Mosquitto, admin_port: u16) -> Serve {
    let mut env = broker_env(broker, "planner", "planner");
    env.push(("FWGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")));
    let p = Serve::start_with(dir, &env).await;
    assert_eq!((p.mqtt, p.coap), (0, 0), "a planner serves no device");
    wait_metric(&p.admin, "fwgate_cluster_events_total{event=\"bus_subscribed\"}", 1.0, 20).await;
    p
}

async fn dataplane(dir: &std::path::Path, broker: &Mosquitto, id: &str, planner: &str) -> Serve {
    let mut env = broker_env(broker, id, "dataplane");
    env.push(("FWGATE_CLUSTER__PLANNER_URL", planner.into()));
    env.push(("FWGATE_CLUSTER__PLANNER_TOKEN", "test-token".into()));
    env.push(("FWGATE_DFU__WAIT_POLL_SECS", "1".into()));
    let n = Serve::start_with(dir, &env).await;
    wait_metric(&n.admin, "fwgate_broker_events_total{event=\"subscribed\"}", 1.0, 20).await;
    wait_metric(&n.admin, "fwgate_cluster_events_total{event=\"bus_subscribed\"}", 1.0, 20).await;
    n
}

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
    let args = ["--devices", "2000", "--image-kib", "64", "--mtu", "512", "--connect-rate", "1000", "--timeout", "240"];
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
