//! hawkBit-style rollouts end to end: a gateway (in-process, or the real binary where it is
//! killed) on ephemeral ports with RocksDB in a temp dir, the admin API and the CLI, and
//! devices that update over real MQTT and CoAP; failures are devices that come back on the
//! old version after SWAP.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::serve::Serve;
use common::*;
use fwgate::loadgen::coap::{ClientConfig, CoapClient};
use fwgate::loadgen::stats::Stats;
use fwgate::protocol::{Command, Form};
use reqwest::Method;
use serde_json::{json, Value};

const KIB: usize = 1024;

static NO_STATS: std::sync::LazyLock<Stats> = std::sync::LazyLock::new(Stats::default);

/// How a simulated device takes its update.
#[derive(Clone, Copy, Debug)]
enum Via {
    Mqtt,
    Coap,
}

/// How it ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Updates,
    /// Downloads, gets SWAP, comes back on the old version: the gateway records a failure.
    RollsBack,
}

struct Gw {
    admin: String,
    mqtt: SocketAddr,
    coap: SocketAddr,
}

impl Gw {
    fn of(gw: &TestGateway) -> Gw {
        Gw { admin: gw.admin.clone(), mqtt: gw.mqtt, coap: gw.coap() }
    }

    fn of_serve(s: &Serve) -> Gw {
        Gw { admin: s.admin.clone(), mqtt: ([127, 0, 0, 1], s.mqtt).into(), coap: ([127, 0, 0, 1], s.coap).into() }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = admin(&self.admin, method, path, None, body).await;
        assert!((200..300).contains(&status), "{path}: {status} {v}");
        v
    }

    async fn status(&self, name: &str) -> Value {
        self.call(Method::GET, &format!("/api/v1/rollouts/{name}/status"), None).await
    }

    async fn act(&self, name: &str, action: &str) -> Value {
        self.call(Method::POST, &format!("/api/v1/rollouts/{name}/{action}"), None).await
    }

    /// Waits (up to 20 s) until the rollout's state and its groups' states are as given:
    /// outcomes are handled on the rollouts' own thread, a moment after the device's reply.
    async fn wait_for(&self, name: &str, state: &str, groups: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.status(name).await;
            let got: Vec<&str> = v["groups"].as_array().unwrap().iter().map(|g| g["state"].as_str().unwrap()).collect();
            if v["state"] == state && got == groups {
                return v;
            }
            assert!(Instant::now() < deadline, "rollout {name} never became {state} {groups:?}: {v:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs one device's DFU exchange to its end.
    async fn device(&self, id: &str, via: Via, outcome: Outcome, len: u32) -> Ended {
        let pause = (outcome == Outcome::RollsBack).then_some(len);
        match via {
            Via::Mqtt => {
                let mut d = SimDevice::connect(self.mqtt, id, Form::Named, "1.0.0", None).await;
                d.mtu = 1024;
                let ended = d.run(pause).await;
                if outcome == Outcome::RollsBack {
                    assert_eq!(ended, Ended::Paused(len), "{id}");
                    d.send_status().await;
                    let swap = d.next_payload(STEP_TIMEOUT).await.expect("a SWAP");
                    assert!(matches!(Command::decode(&swap).unwrap().0, Command::Swap { .. }), "{id}");
                    // The new image did not boot: back on 1.0.0 with nothing downloaded.
                    d.download = None;
                    let ended = d.run(None).await;
                    d.disconnect().await;
                    return ended;
                }
                d.disconnect().await;
                ended
            }
            Via::Coap => {
                let mut dev = DfuDevice::new(id, Form::Named, "1.0.0");
                dev.mtu = 1024;
                let cfg =
                    ClientConfig { ack_timeout: Duration::from_millis(500), max_retransmit: 4, ..Default::default() };
                let mut c = CoapClient::connect(self.coap, cfg).await.unwrap();
                let ended = c.run_dfu(&mut dev, pause, &NO_STATS).await.unwrap();
                if outcome == Outcome::RollsBack {
                    assert_eq!(ended, Ended::Paused(len), "{id}");
                    let swap = c.post_status(id, &dev.status_bytes()).await.unwrap();
                    assert!(matches!(Command::decode(&swap).unwrap().0, Command::Swap { .. }), "{id}");
                    dev.download = None;
                    return c.run_dfu(&mut dev, None, &NO_STATS).await.unwrap();
                }
                ended
            }
        }
    }

    /// The device's operations (newest last).
    async fn ops(&self, id: &str) -> Vec<Value> {
        let v = self.call(Method::GET, &format!("/api/v1/devices/{id}"), None).await;
        v["operations"].as_array().cloned().unwrap_or_default()
    }
}

async fn fleet(gw: &Gw, ids: &[&str], tag: &str) {
    let devices: Vec<Value> = ids.iter().map(|id| json!({"id": id, "tag": tag, "hardware": "nrf52"})).collect();
    gw.call(Method::POST, "/api/v1/devices", Some(Value::Array(devices))).await;
}

fn group_row(v: &Value, g: usize) -> (String, u64, u64, u64) {
    let r = &v["groups"][g];
    (
        r["state"].as_str().unwrap().to_owned(),
        r["succeeded"].as_u64().unwrap(),
        r["failed"].as_u64().unwrap(),
        r["total"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_group_rollout_cascades_pauses_on_errors_in_group_2_and_resumes_over_mqtt_and_coap() {
    let dir = tempfile::tempdir().unwrap();
    let tg = TestGateway::start(test_config(dir.path())).await;
    let gw = Gw::of(&tg);
    let img = image(16 * KIB, 31);
    let len = img.len() as u32;
    add_image(&gw.admin, "app", "2.1.0", img).await;
    let ids = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8"];
    fleet(&gw, &ids, "release").await;
    fleet(&gw, &["other"], "beta").await;
    let body = json!({"name": "r1", "filter": "tag==release;hardware==nrf52", "image": "app@2.1.0", "groups": 3,
        "success": 100, "error": "1"});
    let r = gw.call(Method::POST, "/api/v1/rollouts", Some(body)).await;
    assert_eq!(r["state"], "ready");
    gw.act("r1", "start").await;
    gw.wait_for("r1", "running", &["running", "scheduled", "scheduled"]).await;

    // Group 1 over both transports: it succeeds and group 2 starts by itself.
    assert_eq!(gw.device("r0", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("r1", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    // Group 3's devices are not touched while group 2 runs.
    assert!(gw.ops("r6").await.is_empty());
    assert_eq!(gw.device("r2", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("r1", "running", &["finished", "running", "scheduled"]).await;

    // Group 2: two devices roll back after SWAP — more than the threshold of 1: emergency stop.
    assert_eq!(gw.device("r3", Via::Mqtt, Outcome::RollsBack, len).await, Ended::Synced);
    assert_eq!(gw.device("r4", Via::Coap, Outcome::RollsBack, len).await, Ended::Synced);
    let detail = gw.ops("r3").await[0]["detail"].as_str().unwrap().to_owned();
    assert_eq!(detail, "device came back on 1.0.0 after SWAP, not on 2.1.0", "both versions named");
    let v = gw.wait_for("r1", "paused", &["finished", "error", "scheduled"]).await;
    assert_eq!(group_row(&v, 1), ("error".into(), 0, 2, 3));
    assert_eq!(v["groups"][1]["toward_error"], 100.0);
    // Group 3 received nothing: no operation, and a device that asks is told nothing new.
    for id in ["r6", "r7", "r8"] {
        assert!(gw.ops(id).await.is_empty(), "{id}");
    }
    assert_eq!(gw.device("r6", Via::Mqtt, Outcome::Updates, len).await, Ended::Synced);
    assert!(gw.ops("other").await.is_empty(), "outside the filter");

    // Resume: group 3 starts; group 2's last device still gets its update.
    gw.act("r1", "resume").await;
    gw.wait_for("r1", "running", &["finished", "error", "running"]).await;
    assert_eq!(gw.device("r5", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("r6", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("r7", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("r8", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    let v = gw.wait_for("r1", "finished", &["finished", "error", "finished"]).await;
    assert_eq!(group_row(&v, 0), ("finished".into(), 3, 0, 3));
    assert_eq!(group_row(&v, 1), ("error".into(), 1, 2, 3));
    assert_eq!(group_row(&v, 2), ("finished".into(), 3, 0, 3));
    // An illegal action is refused with the state named.
    let (status, e) = post(&gw.admin, "/api/v1/rollouts/r1/pause", json!({})).await;
    assert_eq!((status, e["error"].as_str().unwrap()), (409, "cannot pause a rollout that is finished"));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_success_action_waits_for_resume_and_trigger_next_group_starts_the_next_now() {
    let dir = tempfile::tempdir().unwrap();
    let tg = TestGateway::start(test_config(dir.path())).await;
    let gw = Gw::of(&tg);
    let img = image(8 * KIB, 32);
    let len = img.len() as u32;
    add_image(&gw.admin, "app", "2.1.0", img).await;
    fleet(&gw, &["p0", "p1", "p2"], "release").await;
    let body = json!({"name": "p", "filter": "tag==release", "image": "app@2.1.0", "groups": 3,
        "success_action": "pause"});
    gw.call(Method::POST, "/api/v1/rollouts", Some(body)).await;
    gw.act("p", "start").await;
    assert_eq!(gw.device("p0", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("p", "paused", &["finished", "scheduled", "scheduled"]).await;
    assert!(gw.ops("p1").await.is_empty(), "paused: the next group waits for resume");
    gw.act("p", "resume").await;
    gw.wait_for("p", "running", &["finished", "running", "scheduled"]).await;
    // By hand, before group 2's device has done anything.
    gw.act("p", "trigger-next-group").await;
    gw.wait_for("p", "running", &["finished", "finished", "running"]).await;
    assert_eq!(gw.device("p2", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("p1", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    let v = gw.wait_for("p", "paused", &["finished", "finished", "finished"]).await;
    assert_eq!((group_row(&v, 1).1, group_row(&v, 2).1), (1, 1), "both updated and counted");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_needs_approval_cannot_start_until_approved_and_deny_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.rollouts.approval_required = true;
    let tg = TestGateway::start(config).await;
    let gw = Gw::of(&tg);
    let img = image(4 * KIB, 33);
    let len = img.len() as u32;
    add_image(&gw.admin, "app", "2.1.0", img).await;
    fleet(&gw, &["a0", "a1"], "release").await;
    for name in ["a", "b"] {
        let body = json!({"name": name, "filter": "tag==release", "image": "app@2.1.0"});
        let r = gw.call(Method::POST, "/api/v1/rollouts", Some(body)).await;
        assert_eq!(r["state"], "waiting_for_approval");
    }
    let (status, e) = post(&gw.admin, "/api/v1/rollouts/a/start", json!({})).await;
    assert_eq!((status, e["error"].as_str().unwrap()), (409, "cannot start a rollout that is waiting_for_approval"));
    assert!(gw.ops("a0").await.is_empty());
    let r = post(&gw.admin, "/api/v1/rollouts/a/approve", json!({"remark": "change 4711"})).await.1;
    assert_eq!((r["state"].as_str(), r["remark"].as_str()), (Some("ready"), Some("change 4711")));
    gw.act("a", "start").await;
    assert_eq!(gw.device("a0", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("a1", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("a", "finished", &["finished"]).await;

    let r = post(&gw.admin, "/api/v1/rollouts/b/deny", json!({"remark": "not this week"})).await.1;
    assert_eq!(r["state"], "approval_denied");
    let (status, e) = post(&gw.admin, "/api/v1/rollouts/b/start", json!({})).await;
    assert_eq!((status, e["error"].as_str().unwrap()), (409, "cannot start a rollout that is approval_denied"));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_registered_after_start_join_a_dynamic_rollout_and_update() {
    let dir = tempfile::tempdir().unwrap();
    let tg = TestGateway::start(test_config(dir.path())).await;
    let gw = Gw::of(&tg);
    let img = image(4 * KIB, 34);
    let len = img.len() as u32;
    add_image(&gw.admin, "app", "2.1.0", img).await;
    fleet(&gw, &["e0"], "edge").await;
    let body = json!({"name": "dyn", "filter": "tag==edge", "image": "app@2.1.0", "dynamic_group_size": 2,
        "success": 100});
    gw.call(Method::POST, "/api/v1/rollouts", Some(body)).await;
    gw.act("dyn", "start").await;
    assert_eq!(gw.device("e0", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("dyn", "running", &["finished"]).await;
    // Registered later: they match the filter and join trailing groups of two.
    fleet(&gw, &["e1", "e2", "e3"], "edge").await;
    fleet(&gw, &["x1"], "core").await;
    gw.wait_for("dyn", "running", &["finished", "running", "scheduled"]).await;
    assert_eq!(gw.device("e1", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("e2", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("dyn", "running", &["finished", "finished", "running"]).await;
    assert_eq!(gw.device("e3", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    let v = gw.wait_for("dyn", "running", &["finished", "finished", "finished"]).await;
    assert_eq!(v["total"], 4);
    assert!(gw.ops("x1").await.is_empty());
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_holds_operations_back_as_the_planners_records_show() {
    let dir = tempfile::tempdir().unwrap();
    let tg = TestGateway::start(test_config(dir.path())).await;
    let gw = Gw::of(&tg);
    add_image(&gw.admin, "app", "2.1.0", image(4 * KIB, 35)).await;
    let ids = ["s0", "s1", "s2", "s3", "s4"];
    fleet(&gw, &ids, "slow").await;
    let body = json!({"name": "slow", "filter": "tag==slow", "image": "app@2.1.0", "rate": {"per_minute": 2}});
    gw.call(Method::POST, "/api/v1/rollouts", Some(body)).await;
    gw.act("slow", "start").await;
    // The worker ticks every second; three ticks later still only two operations exist.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let mut created = Vec::new();
    for id in ids {
        for op in gw.ops(id).await {
            assert_eq!(op["origin"], "rollout:slow/1");
            created.push(op["created_at"].as_u64().unwrap());
        }
    }
    assert_eq!(created.len(), 2, "two a minute: {created:?}");
    let v = gw.status("slow").await;
    assert_eq!((v["groups"][0]["waiting"].as_u64(), v["groups"][0]["scheduled"].as_u64()), (Some(3), Some(2)));
    tg.stop().await;
}

async fn row(gw: &Gw, name: &str) -> Vec<(String, u64, u64, u64)> {
    let v = gw.status(name).await;
    (0..v["groups"].as_array().unwrap().len()).map(|g| group_row(&v, g)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_group_2_loses_nothing_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let gw = Gw::of_serve(&serve);
    let img = image(8 * KIB, 36);
    let len = img.len() as u32;
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.1.0"]);
    assert!(ok, "{out}");
    let ids = ["k0", "k1", "k2", "k3", "k4", "k5"];
    fleet(&gw, &ids, "release").await;
    let (ok, out) = serve.cli(&[
        "rollouts",
        "create",
        "k",
        "--filter",
        "tag==release",
        "--image",
        "app@2.1.0",
        "--groups",
        "3",
        "--success",
        "100",
        "--error",
        "50%",
    ]);
    assert!(ok && out.contains("6 devices in 3 groups (2, 2, 2), state ready"), "{out}");
    let (ok, out) = serve.cli(&["rollouts", "start", "k"]);
    assert!(ok && out.contains("running"), "{out}");
    assert_eq!(gw.device("k0", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("k1", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("k", "running", &["finished", "running", "scheduled"]).await;
    // In the middle of group 2: one device updated, then the gateway dies at once.
    assert_eq!(gw.device("k2", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    serve.kill();

    let serve = Serve::start(dir.path()).await;
    let gw = Gw::of_serve(&serve);
    let rows = row(&gw, "k").await;
    assert_eq!(rows[0], ("finished".into(), 2, 0, 2));
    assert_eq!(rows[1], ("running".into(), 1, 0, 2), "group 2's outcome survived, counted once");
    assert_eq!(rows[2], ("scheduled".into(), 0, 0, 2));
    assert!(gw.ops("k4").await.is_empty());
    // The cascade goes on.
    assert_eq!(gw.device("k3", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("k", "running", &["finished", "finished", "running"]).await;
    assert_eq!(gw.device("k4", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("k5", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    gw.wait_for("k", "finished", &["finished", "finished", "finished"]).await;
    let rows = row(&gw, "k").await;
    assert!(rows.iter().all(|(_, ok, failed, total)| (ok, failed, total) == (&2, &0, &2)), "{rows:?}");
    let (ok, out) = serve.cli(&["rollouts", "status", "k"]);
    assert!(ok && out.contains("group-2") && out.contains("finished"), "{out}");
    let (ok, out) = serve.cli(&["rollouts", "list"]);
    assert!(ok && out.lines().any(|l| l.starts_with("k ") && l.contains("finished")), "{out}");
    let (ok, out) = serve.cli(&["rollouts", "show", "k"]);
    assert!(ok && out.contains("group-3") && out.contains("tag==release"), "{out}");
    let (ok, out) = serve.cli(&["rollouts", "pause", "k"]);
    assert!(!ok && out.contains("cannot pause a rollout that is finished"), "{out}");
    // Killed again after it finished: it stays finished with the same counts.
    serve.kill();
    let serve = Serve::start(dir.path()).await;
    let gw = Gw::of_serve(&serve);
    assert_eq!(row(&gw, "k").await, rows);
    assert_eq!(gw.status("k").await["state"], "finished");
    drop(serve);
}

/// The first sequence: a member deleted while its group runs, then a SIGKILL. The
/// deletion is stored with the group (its total drops to 3), so after the restart the group
/// ends when the other three have updated — before, it waited for the deleted one forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_deleted_while_its_group_runs_then_a_sigkill_does_not_stall_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let gw = Gw::of_serve(&serve);
    let img = image(4 * KIB, 37);
    let len = img.len() as u32;
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.1.0"]);
    assert!(ok, "{out}");
    let ids = ["st-0", "st-1", "st-2", "st-3"];
    fleet(&gw, &ids, "stall").await;
    let create = ["rollouts", "create", "r1", "--filter", "tag==stall", "--image", "app@2.1.0", "--success", "100"];
    let (ok, out) = serve.cli(&create);
    assert!(ok && out.contains("4 devices in 1 groups"), "{out}");
    let (ok, out) = serve.cli(&["rollouts", "start", "r1"]);
    assert!(ok && out.contains("running"), "{out}");
    assert_eq!(gw.device("st-0", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    let (ok, out) = serve.cli(&["devices", "delete", "st-2"]);
    assert!(ok && out.contains("deleted st-2 (1 unfinished operations withdrawn)"), "{out}");
    serve.kill();

    let serve = Serve::start(dir.path()).await;
    let gw = Gw::of_serve(&serve);
    let v = gw.status("r1").await;
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(group_row(&v, 0), ("running".into(), 1, 0, 3), "the deleted member left the group's total");
    assert_eq!(gw.device("st-1", Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    assert_eq!(gw.device("st-3", Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    let v = gw.wait_for("r1", "finished", &["finished"]).await;
    assert_eq!(group_row(&v, 0), ("finished".into(), 3, 0, 3));
    let (ok, out) = serve.cli(&["rollouts", "status", "r1"]);
    assert!(ok && out.contains("finished"), "{out}");
    drop(serve);
}

/// The second sequence: a rate-limited group whose success threshold (50 %) is met by
/// its first slice. The next group would start there; the group itself keeps handing out its
/// rest at its rate, and the rollout finishes only when every member has updated — before, it
/// finished with two devices never handed out. Takes a rate period (a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_rollout_finishes_only_when_every_member_has_updated() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let gw = Gw::of_serve(&serve);
    let img = image(4 * KIB, 38);
    let len = img.len() as u32;
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.1.0"]);
    assert!(ok, "{out}");
    let ids = ["rt-0", "rt-1", "rt-2", "rt-3"];
    fleet(&gw, &ids, "rated").await;
    let (ok, out) =
        serve.cli(&["rollouts", "create", "r2", "--filter", "tag==rated", "--image", "app@2.1.0", "--rate", "2"]);
    assert!(ok, "{out}");
    let (ok, out) = serve.cli(&["rollouts", "start", "r2"]);
    assert!(ok && out.contains("running"), "{out}");
    let mut handed: Vec<&str> = Vec::new();
    for id in ids {
        if !gw.ops(id).await.is_empty() {
            handed.push(id);
        }
    }
    assert_eq!(handed.len(), 2, "two a minute");
    for id in &handed {
        assert_eq!(gw.device(id, Via::Mqtt, Outcome::Updates, len).await, Ended::Updated);
    }
    // 2 of 4 succeeded: the group's 50 % threshold is met, its turn is over — but the rollout
    // runs on for the two not handed out yet.
    let v = gw.wait_for("r2", "running", &["finished"]).await;
    assert_eq!(v["groups"][0]["waiting"], 2, "{v:#}");
    let rest: Vec<&str> = ids.iter().copied().filter(|id| !handed.contains(id)).collect();
    // The next slice comes a minute after the first.
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in &rest {
        while gw.ops(id).await.is_empty() {
            assert!(Instant::now() < deadline, "{id} was never handed out");
            assert_eq!(gw.status("r2").await["state"], "running", "finished with {id} never updated");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for id in &rest {
        assert_eq!(gw.device(id, Via::Coap, Outcome::Updates, len).await, Ended::Updated);
    }
    let v = gw.wait_for("r2", "finished", &["finished"]).await;
    assert_eq!(group_row(&v, 0), ("finished".into(), 4, 0, 4));
    drop(serve);
}
