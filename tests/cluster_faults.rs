//! The cluster under the faults of issue 28: multi-target devices whose Statuses a shared
//! subscription spreads over two data-plane nodes (one transfer per device, granted by the
//! planner), and TUF metadata that expires while the planner is busy and while it is down
//! (the nodes answer WAIT on their own). One planner, two nodes (`fwgate serve --role …`, the
//! binary) and a real Mosquitto 2; the devices talk only to the broker.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::mosquitto::Mosquitto;
use common::serve;
use common::*;
use fwgate::protocol::{Command, Form};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

const TARGETS: [&str; 3] = ["BIOS", "BMC", "NIC"];

/// One firmware target of a device, as its own MQTT client (client id `{device}-{target}`) on
/// the device's topics. Every client of the device hears every Command; it keeps the ones that
/// carry its correlation id.
struct TargetClient {
    dev: DfuDevice,
    client: AsyncClient,
    events: EventLoop,
    topic: String,
}

/// How one target's update went, by the device's own clock.
#[derive(Debug, Default)]
struct Trace {
    /// From the first WRITE to the SWAP.
    transfer: Option<(Instant, Instant)>,
    waits: u32,
    writes: u32,
}

impl TargetClient {
    async fn connect(broker: std::net::SocketAddr, device: &str, target: &str, cid: u32, running: &str) -> Self {
        let mut opts = MqttOptions::new(format!("{device}-{target}"), broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(opts, 16);
        client.subscribe(format!("dfu/{device}/command"), QoS::AtLeastOnce).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("{device}-{target}: no SUBACK: {other:?}"),
            }
        }
        let mut dev = DfuDevice::new(device, Form::Named, running);
        dev.component = Some(target.into());
        dev.correlation_id = Some(cid);
        TargetClient { dev, client, events, topic: format!("dfu/{device}/status") }
    }

    /// Sends a Status and returns the Command that answers it (asking again after 5 s silence).
    async fn ask(&mut self) -> Vec<u8> {
        for _ in 0..6 {
            let status = self.dev.status_bytes();
            self.client.publish(&self.topic, QoS::AtLeastOnce, false, status).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::time::timeout_at(deadline, self.events.poll()).await {
                    Err(_) => break,
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let ours =
                            Command::decode(&p.payload).is_ok_and(|(c, _)| correlation(&c) == self.dev.correlation_id);
                        if ours {
                            return p.payload.to_vec();
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("{}: connection lost: {e}", self.dev.id),
                }
            }
        }
        panic!("{}/{:?}: no answer to 6 Statuses", self.dev.id, self.dev.component)
    }

    /// Asks until the target runs `to`; WAIT (held behind a sibling) and SYNC on the old
    /// version (the node has no view of the operation yet) mean: ask again soon.
    async fn update(mut self, to: &str) -> Trace {
        let mut trace = Trace::default();
        let mut first_write = None;
        for _ in 0..3000 {
            let reply = self.ask().await;
            match Command::decode(&reply).unwrap().0 {
                Command::Write { .. } => {
                    trace.writes += 1;
                    first_write.get_or_insert_with(Instant::now);
                }
                Command::Swap { .. } => {
                    let start = first_write.take().expect("a SWAP after WRITEs");
                    trace.transfer = Some((start, Instant::now()));
                }
                Command::Wait { .. } => trace.waits += 1,
                Command::Sync { .. } => {}
            }
            match self.dev.apply(&reply).unwrap_or_else(|e| panic!("{}: {e}", self.dev.id)) {
                None => {}
                Some(Ended::Updated) => {
                    assert_eq!(self.dev.running, to);
                    self.client.disconnect().await.ok();
                    return trace;
                }
                Some(Ended::Waited | Ended::Synced) => tokio::time::sleep(Duration::from_millis(150)).await,
                Some(other) => panic!("{}/{to}: {other:?}", self.dev.id),
            }
        }
        panic!("{}: not on {to} after 3000 Statuses", self.dev.id)
    }
}

fn correlation(c: &Command<'_>) -> Option<u32> {
    match c {
        Command::Wait { correlation_id, .. }
        | Command::Sync { correlation_id, .. }
        | Command::Write { correlation_id, .. }
        | Command::Swap { correlation_id, .. } => *correlation_id,
    }
}

fn sub(dir: &Path, name: &str) -> std::path::PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn call(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let (status, v) = admin(base, method, path, None, body).await;
    assert!((200..300).contains(&status), "{path}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_target_devices_over_two_nodes_never_run_two_transfers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "").await;
    let p = planner(&sub(dir.path(), "planner"), &broker, free_port()).await;
    let base = p.admin.clone();
    let n1 = dataplane(&sub(dir.path(), "n1"), &broker, "dp-1", &base).await;
    let n2 = dataplane(&sub(dir.path(), "n2"), &broker, "dp-2", &base).await;
    fas_images(&base, &TARGETS).await;
    let xnames: Vec<String> = (0..8).map(|i| format!("x1c0s{i}b0")).collect();
    let devices: Vec<Value> = xnames
        .iter()
        .map(|x| json!({"id": x, "inventory": {"deviceType": "nodeBMC", "manufacturer": "Intel", "model": "s2600"}}))
        .collect();
    call(&base, reqwest::Method::POST, "/api/v1/devices", Some(Value::Array(devices))).await;

    // Every target reports what it runs (through either node) before the action is made.
    let mut clients = Vec::new();
    for x in &xnames {
        for (i, t) in TARGETS.iter().enumerate() {
            let mut c = TargetClient::connect(broker.addr(), x, t, i as u32 + 1, &format!("{t}-1")).await;
            // SYNC (nothing assigned) once a node holds the device's view; until then WAIT.
            let mut told = Vec::new();
            loop {
                let reply = c.ask().await;
                let op = Command::decode(&reply).unwrap().0.op();
                told.push(op);
                if op == "SYNC" {
                    break;
                }
                assert!(op == "WAIT" && told.len() < 100, "{x}/{t}: nothing is assigned yet, told {told:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            clients.push((x.clone(), *t, c));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for x in &xnames {
        loop {
            let d = device_state(&base, x).await;
            if TARGETS.iter().all(|t| d["running"][t] == format!("{t}-1")) {
                break;
            }
            assert!(Instant::now() < deadline, "the planner did not learn {x}'s targets in 30 s: {d}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let live = json!({"command": {"version": "latest", "overrideDryrun": true}});
    let a = call(&base, reqwest::Method::POST, "/api/v1/actions", Some(live)).await;
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(a["operationCounts"]["total"], 3 * xnames.len(), "{a}");
    let id = a["actionID"].as_str().unwrap().to_owned();

    // All three targets of every xname ask at once, each on its own connection, and the
    // broker hands each Status to whichever node it likes.
    let mut tasks = tokio::task::JoinSet::new();
    for (x, t, c) in clients {
        tasks.spawn(async move { (x, t, c.update(&format!("{t}-2")).await) });
    }
    let mut traces: BTreeMap<String, Vec<(&str, Trace)>> = BTreeMap::new();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(r) = tasks.join_next().await {
            let (x, t, trace) = r.expect("target task");
            traces.entry(x).or_default().push((t, trace));
        }
    })
    .await
    .expect("every target updated within 300 s");

    // The devices' own record: no xname ever had two transfers at once, and siblings asking
    // at the same moment were told to wait.
    let waits: u32 = traces.values().flatten().map(|(_, t)| t.waits).sum();
    assert!(waits > 0, "no target was ever held back: the overlap check below would prove nothing");
    for (x, ts) in &traces {
        assert_eq!(ts.len(), 3, "{x}");
        let mut windows: Vec<(Instant, Instant)> =
            ts.iter().map(|(t, tr)| tr.transfer.unwrap_or_else(|| panic!("{x}/{t}: no transfer"))).collect();
        windows.sort();
        for pair in windows.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{x}: two transfers at once: {ts:?}");
        }
    }
    // Both nodes served blocks: the transfers really crossed nodes.
    for n in [&n1, &n2] {
        assert!(metric(&n.admin, BLOCKS).await > 0.0, "{} served no block", n.admin);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = call(&base, reqwest::Method::GET, &format!("/api/v1/actions/{id}/status"), None).await;
        if s["state"] == "completed" || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["operationCounts"]["succeeded"], 3 * xnames.len(), "{status}");
}

/// A device through the broker that downloads part of its image and stops, its connection
/// open. Told to wait or that it is up to date (the operation's view, or fresh trust, not at
/// the nodes yet), it asks again, for up to 30 s.
async fn paused(broker: &Mosquitto, id: &str, at: u32, base: &str) -> SimDevice {
    let mut d = SimDevice::connect(broker.addr(), id, Form::Packed, "1.0.0", None).await;
    d.mtu = 256;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match d.run(Some(at)).await {
            Ended::Paused(_) => return d,
            // WAIT: fresh trust not at the nodes yet; SYNC: the node has no view of the
            // operation yet.
            Ended::Waited | Ended::Synced if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("{id} did not pause mid-transfer: {other:?}; {}", device_state(base, id).await),
        }
    }
}

/// The Command a paused device gets when it asks again.
async fn asks(d: &mut SimDevice) -> String {
    d.send_status().await;
    let reply = d.next_payload(STEP_TIMEOUT).await.expect("an answer");
    Command::decode(&reply).unwrap().0.op().to_owned()
}

async fn publish_and_refresh(repo: &Path, base: &str, expires_in: u64) -> u64 {
    live_repo(&["publish", repo.to_str().unwrap(), "--expires-in", &expires_in.to_string()]);
    let v = call(base, reqwest::Method::POST, "/api/v1/tuf/ci/refresh", None).await;
    v["expires"].as_u64().expect("the refresh says when the metadata expires")
}

async fn until(moment: u64) {
    while fwgate::now_secs() <= moment {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_expiring_while_the_planner_is_busy_and_while_it_is_down_makes_the_nodes_answer_wait() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = image(4096, 23);
    let img_file = dir.path().join("app.bin");
    std::fs::write(&img_file, &img).unwrap();
    live_repo(&["init", repo.to_str().unwrap(), "--target", &format!("app.bin={}", img_file.display())]);
    let url = |p: &Path| format!("file://{}/", p.display());
    let tuf = [
        ("FWGATE_TUF__CI_ROOT", repo.join("root.json").display().to_string()),
        ("FWGATE_TUF__CI_METADATA_URL", url(&repo.join("metadata"))),
        ("FWGATE_TUF__CI_TARGETS_URL", url(&repo.join("targets"))),
    ];
    let broker = Mosquitto::start(dir.path(), "").await;
    let port = free_port();
    let mut p = planner_with(&sub(dir.path(), "planner"), &broker, port, &tuf).await;
    let base = p.admin.clone();
    let _n1 = dataplane(&sub(dir.path(), "n1"), &broker, "dp-1", &base).await;
    let _n2 = dataplane(&sub(dir.path(), "n2"), &broker, "dp-2", &base).await;
    let path = "/api/v1/images?name=app&version=2.0.0&target=app.bin&repo=ci";
    let (code, v) = admin(&base, reqwest::Method::POST, path, Some(img.clone().into()), None).await;
    assert_eq!(code, 201, "{v}");
    // Two CI devices in a wave of the signed image; 100,000 bystanders to keep the planner
    // busy (it publishes some 20,000 views a second here).
    let canary = |id: &str| json!({"id": id, "tag": "release", "groups": ["canary"]});
    call(&base, reqwest::Method::POST, "/api/v1/devices", Some(json!([canary("o1"), canary("o2")]))).await;
    for chunk in 0..5 {
        let specs: Vec<Value> = (chunk * 20_000..(chunk + 1) * 20_000)
            .map(|i| json!({"id": format!("b{i:06}"), "tag": "release", "groups": ["bulk"]}))
            .collect();
        call(&base, reqwest::Method::POST, "/api/v1/devices", Some(Value::Array(specs))).await;
    }
    call(
        &base,
        reqwest::Method::POST,
        "/api/v1/waves",
        Some(json!({"name": "w", "version": "2.0.0", "tag": "release", "production": false})),
    )
    .await;
    let r = call(&base, reqwest::Method::POST, "/api/v1/waves/w/rollout", Some(json!({"group": "canary"}))).await;
    assert_eq!(r["staged"], 2, "{r}");

    // While the planner is busy: metadata that expires in 30 s (the refresh republishes all
    // 100,002 views first); o1 downloads part of the image; just before the expiry the planner
    // gets 100,000 views to publish.
    let expires = publish_and_refresh(&repo, &base, 30).await;
    let mut o1 = paused(&broker, "o1", 1024, &base).await;
    assert!(fwgate::now_secs() < expires, "o1 paused before the expiry (a slow machine: give the metadata longer)");
    until(expires.saturating_sub(1)).await;
    let body = json!({"name": "bulk", "filter": "group==bulk", "image": "app@2.0.0", "groups": 1, "success": 100});
    call(&base, reqwest::Method::POST, "/api/v1/rollouts", Some(body)).await;
    call(&base, reqwest::Method::POST, "/api/v1/rollouts/bulk/start", Some(json!({}))).await;
    until(expires).await;
    let backlog = metric(&base, "fwgate_cluster_backlog").await;
    // The first Status after the expiry, whichever node takes it, is told to WAIT, and so is
    // every one after it.
    for _ in 0..5 {
        assert_eq!(asks(&mut o1).await, "WAIT", "o1 after the expiry, the planner busy (backlog {backlog})");
    }
    assert!(backlog > 0.0, "the planner had views to publish at the expiry: it was busy");

    // Trust comes back (and every view with it: 100,002 to publish, so it has time); o2
    // downloads part; the planner is killed; the metadata expires.
    let expires = publish_and_refresh(&repo, &base, 30).await;
    let mut o2 = paused(&broker, "o2", 1024, &base).await;
    assert!(fwgate::now_secs() < expires, "o2 paused before the expiry (a slow machine: give the metadata longer)");
    p.kill();
    until(expires).await;
    for _ in 0..5 {
        assert_eq!(asks(&mut o2).await, "WAIT", "o2 after the expiry, the planner down");
        assert_eq!(asks(&mut o1).await, "WAIT", "o1 after the expiry, the planner down");
    }

    // The planner comes back, fresh metadata: both finish where they stopped, with the right bytes.
    p = planner_with(&sub(dir.path(), "planner"), &broker, port, &tuf).await;
    publish_and_refresh(&repo, &p.admin, 86_400).await;
    for mut d in [o1, o2] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ended = d.run(None).await;
        while ended == Ended::Waited && Instant::now() < deadline {
            // Until the restarted planner's views with fresh trust reach the nodes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            ended = d.run(None).await;
        }
        assert_eq!(ended, Ended::Updated, "{}", d.id);
        assert!(d.last_image == img, "{}: the image's bytes", d.id);
        d.disconnect().await;
    }
    // The planner learnt both outcomes from the nodes' reports: nothing failed on the way.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in ["o1", "o2"] {
        loop {
            let d = device_state(&p.admin, id).await;
            if d["operations"][0]["state"] == "succeeded" {
                break;
            }
            assert!(Instant::now() < deadline, "{id}: {d}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_deleted_just_before_a_planner_crash_is_not_served_by_the_nodes_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "").await;
    let port = free_port();
    let p = planner(&sub(dir.path(), "planner"), &broker, port).await;
    let base = p.admin.clone();
    let n1 = dataplane(&sub(dir.path(), "n1"), &broker, "dp-1", &base).await;
    add_image(&base, "app", "2.0.0", image(4096, 3)).await;
    add_device(&base, "gone").await;
    assign(&base, "gone", "app@2.0.0").await;
    for chunk in 0..5 {
        let specs: Vec<Value> = (chunk * 20_000..(chunk + 1) * 20_000)
            .map(|i| json!({"id": format!("b{i:06}"), "groups": ["bulk"]}))
            .collect();
        call(&base, reqwest::Method::POST, "/api/v1/devices", Some(Value::Array(specs))).await;
    }
    settled(&base, &n1.admin).await;
    // 100,000 views to publish; the deletion's (an empty retained message) is somewhere among
    // them when the planner is killed right after the deletion is committed.
    let body = json!({"name": "bulk", "filter": "group==bulk", "image": "app@2.0.0", "groups": 1, "success": 100});
    call(&base, reqwest::Method::POST, "/api/v1/rollouts", Some(body)).await;
    call(&base, reqwest::Method::POST, "/api/v1/rollouts/bulk/start", Some(json!({}))).await;
    let (status, v) = admin(&base, reqwest::Method::DELETE, "/api/v1/devices/gone", None, None).await;
    assert_eq!(status, 200, "{v}");
    p.kill();

    // The restarted planner clears the deleted device's view again, whether or not it got out.
    let p = planner(&sub(dir.path(), "planner"), &broker, port).await;
    wait_metric(&p.admin, "fwgate_cluster_events_total{event=\"tombstone_cleared\"}", 1.0, 20).await;
    settled(&p.admin, &n1.admin).await;
    let mut d = SimDevice::connect(broker.addr(), "gone", Form::Named, "1.0.0", None).await;
    let ended = d.run(None).await;
    assert!(matches!(ended, Ended::Synced | Ended::Waited), "a deleted device was served: {ended:?}");
    assert!(d.offsets.is_empty(), "a deleted device got blocks");
    d.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_an_hour_behind_does_not_set_the_planners_activity_times() {
    serve::require("faketime", "faketime");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "").await;
    let p = planner(&sub(dir.path(), "planner"), &broker, free_port()).await;
    let base = p.admin.clone();
    // libfaketime moves the node's wall clock only: its timers (monotonic) run true.
    let behind = ["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", "-1h"];
    let n1 = dataplane_wrapped(&sub(dir.path(), "n1"), &broker, "dp-1", &base, &behind).await;
    add_image(&base, "app", "2.0.0", image(4096, 4)).await;
    add_device(&base, "d1").await;
    assign(&base, "d1", "app@2.0.0").await;
    settled(&base, &n1.admin).await;
    let mut d = SimDevice::connect(broker.addr(), "d1", Form::Named, "1.0.0", None).await;
    assert_eq!(d.run(None).await, Ended::Updated);
    d.disconnect().await;
    // The node's reports reached the planner, which timed them by its own clock.
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = device_state(&base, "d1").await;
        if v["operations"][0]["state"] == "succeeded" && v["running"]["main"] == "2.0.0" {
            break v;
        }
        assert!(Instant::now() < deadline, "the planner did not learn the outcome: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = fwgate::now_secs();
    let recent = |t: &Value| t.as_u64().is_some_and(|t| t + 120 >= now && t <= now);
    assert!(recent(&v["last_seen"]), "last_seen {} is not the planner's now {now}: {v}", v["last_seen"]);
    assert!(recent(&v["operations"][0]["updated_at"]), "updated_at is not the planner's now {now}: {v}");
}
