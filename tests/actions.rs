//! FAS-style actions end to end: a gateway in-process on ephemeral ports with RocksDB in a temp
//! dir, images with FAS identities, and 100 xnames × 3 targets (BIOS, BMC, NIC) updated by one
//! live action — half over CoAP asking for their three targets at once, half over MQTT.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use fwgate::loadgen::coap::{ClientConfig, CoapClient};
use fwgate::protocol::{Command, Form};
use reqwest::Method;
use serde_json::{json, Value};

const TARGETS: [&str; 3] = ["BIOS", "BMC", "NIC"];

async fn call(base: &str, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, v) = admin(base, method, path, None, body).await;
    assert!((200..300).contains(&status), "{path}: {status} {v}");
    v
}

/// BIOS and BMC images 1 and 2 for nodeBMCs, uploaded with their FAS imagefiles through
/// the CLI (`images add --meta`).
fn cli_images(serve: &common::serve::Serve, dir: &std::path::Path) {
    for (t, v) in [("BIOS", "1"), ("BIOS", "2"), ("BMC", "1"), ("BMC", "2")] {
        let bin = dir.join(format!("{t}-{v}.bin"));
        std::fs::write(&bin, format!("{t} firmware {v}")).unwrap();
        let meta = dir.join(format!("{t}-{v}.json"));
        let identity = json!({"deviceType": "nodeBMC", "target": t, "tag": ["default"],
            "firmwareVersion": format!("{t}-{v}"), "semanticFirmwareVersion": format!("{v}.0.0")});
        std::fs::write(&meta, identity.to_string()).unwrap();
        let name = t.to_lowercase();
        let (bin, meta) = (bin.to_str().unwrap().to_owned(), meta.to_str().unwrap().to_owned());
        let (ok, out) = serve.cli(&["images", "add", &bin, "--name", &name, "--version", v, "--meta", &meta]);
        assert!(ok, "{out}");
    }
}

fn coap_cfg() -> ClientConfig {
    ClientConfig { ack_timeout: Duration::from_millis(500), max_retransmit: 4, ..ClientConfig::default() }
}

/// One target of an xname over CoAP, asking again while the gateway says WAIT: when its first
/// WRITE and its SWAP arrived, and how many WAITs it was told.
async fn coap_target(gw: std::net::SocketAddr, xname: String, target: &'static str) -> ((Instant, Instant), u32) {
    let mut c = CoapClient::connect(gw, coap_cfg()).await.unwrap();
    let mut dev = DfuDevice::new(&xname, Form::Packed, &format!("{target}-1"));
    dev.component = Some(target.into());
    let (mut first, mut swap, mut waits) = (None, None, 0);
    for _ in 0..5000 {
        let reply = c.post_status(&xname, &dev.status_bytes()).await.unwrap();
        match Command::decode(&reply).unwrap().0 {
            Command::Write { .. } => {
                first.get_or_insert_with(Instant::now);
            }
            Command::Swap { .. } => swap = Some(Instant::now()),
            Command::Wait { poll, .. } => {
                // Held back behind a sibling: told to come back as the image asks.
                assert_eq!(poll, Some(7), "the WAIT's poll is the image's pollingSpeedSeconds");
                waits += 1;
            }
            _ => {}
        }
        match dev.apply(&reply).unwrap() {
            None => {}
            Some(Ended::Updated) => {
                assert_eq!(dev.running, format!("{target}-2"));
                return ((first.expect("a WRITE"), swap.expect("a SWAP")), waits);
            }
            Some(Ended::Waited) | Some(Ended::Synced) => tokio::time::sleep(Duration::from_millis(10)).await,
            Some(other) => panic!("{xname}/{target}: {other:?}"),
        }
    }
    panic!("{xname}/{target}: not updated after 5000 Status messages")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_live_action_updates_100_xnames_times_3_targets_one_transfer_per_xname_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let tg = TestGateway::start(test_config(dir.path())).await;
    let base = tg.admin.clone();
    fas_images(&base, &TARGETS).await;
    let xnames: Vec<String> = (0..100).map(|i| format!("x0c0s{i}b0")).collect();
    let devices: Vec<Value> = xnames
        .iter()
        .map(|x| json!({"id": x, "inventory": {"deviceType": "nodeBMC", "manufacturer": "Intel", "model": "s2600"}}))
        .collect();
    call(&base, Method::POST, "/api/v1/devices", Some(Value::Array(devices))).await;
    // Each xname reports what its three targets run (over CoAP; the transport does not matter).
    let mut c = CoapClient::connect(tg.coap(), coap_cfg()).await.unwrap();
    for x in &xnames {
        for t in TARGETS {
            let mut dev = DfuDevice::new(x, Form::Packed, &format!("{t}-1"));
            dev.component = Some(t.into());
            c.post_status(x, &dev.status_bytes()).await.unwrap();
        }
    }

    // The dry run: nothing changes, every operation listed.
    let dry = call(&base, Method::POST, "/api/v1/actions", Some(json!({"command": {"version": "latest"}}))).await;
    assert_eq!((dry["state"].as_str(), dry["dryrun"].as_bool()), (Some("completed"), Some(true)));
    assert_eq!(dry["operationCounts"]["configured"], 100);
    assert_eq!(dry["operationCounts"]["blocked"], 200, "two siblings of each xname wait");
    assert!(device_state(&base, &xnames[0]).await["operations"].as_array().unwrap().is_empty());
    let planned: Vec<(String, String, String)> = dry["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["xname"].as_str().unwrap().into(),
                o["target"].as_str().unwrap().into(),
                o["toImageID"].as_str().unwrap().into(),
            )
        })
        .collect();

    let live = json!({"command": {"version": "latest", "overrideDryrun": true, "description": "all to v2"}});
    let a = call(&base, Method::POST, "/api/v1/actions", Some(live)).await;
    assert_eq!(a["state"], "running");
    let id = a["actionID"].as_str().unwrap().to_owned();

    let mut tasks = tokio::task::JoinSet::new();
    for (i, x) in xnames.iter().enumerate() {
        let x = x.clone();
        if i % 2 == 0 {
            // CoAP: all three targets at once; the gateway must serve one at a time.
            let gw = tg.coap();
            for t in TARGETS {
                let x = x.clone();
                tasks.spawn(async move { (x.clone(), coap_target(gw, x, t).await) });
            }
        } else {
            // MQTT: one connection, the targets one after another.
            let mqtt = tg.mqtt;
            tasks.spawn(async move {
                let mut d = SimDevice::connect(mqtt, &x, Form::Named, "", None).await;
                let start = Instant::now();
                for t in TARGETS {
                    d.component = Some(t.into());
                    d.running = format!("{t}-1");
                    assert_eq!(d.run(None).await, Ended::Updated, "{x}/{t}");
                }
                d.disconnect().await;
                (x, ((start, Instant::now()), 0))
            });
        }
    }
    let mut windows: BTreeMap<String, Vec<(Instant, Instant)>> = BTreeMap::new();
    let mut waits = 0;
    let deadline = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(r) = tasks.join_next().await {
            let (x, (w, n)) = r.expect("device task");
            windows.entry(x).or_default().push(w);
            waits += n;
        }
    });
    deadline.await.expect("every device finished within 240 s");
    // The devices' own record: no xname ever had two transfers at once (from its first WRITE
    // to its SWAP), and the CoAP ones, asking for three targets at once, were told to wait.
    assert!(waits > 0, "siblings were never made to wait: the check above would be empty");
    assert_eq!(windows.values().filter(|w| w.len() == 3).count(), 50, "each CoAP xname updated 3 targets");
    for (x, mut w) in windows {
        w.sort();
        for pair in w.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{x}: two transfers at once");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = call(&base, Method::GET, &format!("/api/v1/actions/{id}/status"), None).await;
        if s["state"] == "completed" || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["operationCounts"]["succeeded"], 300, "{status}");
    // The dry run listed exactly what the live action did.
    let ops = call(&base, Method::GET, &format!("/api/v1/actions/{id}/operations"), None).await;
    let done: Vec<(String, String, String)> = ops
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["state"] == "succeeded")
        .map(|o| {
            (
                o["xname"].as_str().unwrap().into(),
                o["target"].as_str().unwrap().into(),
                o["toImageID"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(done, planned);
    // Each operation by its id, as FAS's /operations/{id}.
    let one = &ops[4];
    let by_id =
        call(&base, Method::GET, &format!("/api/v1/operations/{}", one["operationID"].as_str().unwrap()), None).await;
    assert_eq!(&by_id, one);
    let (status, _) = admin(&base, Method::GET, &format!("/api/v1/operations/{id}-9999"), None, None).await;
    assert_eq!(status, 404);
    let v = device_state(&base, "x0c0s0b0").await;
    assert_eq!(v["running"], json!({"BIOS": "BIOS-2", "BMC": "BMC-2", "NIC": "NIC-2"}));
    tg.stop().await;
}

/// Runs each listed target of an xname over CoAP, one after another, from `{target}-{from}`
/// until it runs `{target}-{to}` (asking again while told WAIT).
async fn update(gw: std::net::SocketAddr, xname: &str, targets: &[&str], to: &str) {
    let from = if to == "2" { "1" } else { "2" };
    let mut c = CoapClient::connect(gw, coap_cfg()).await.unwrap();
    for target in targets {
        let mut dev = DfuDevice::new(xname, Form::Packed, &format!("{target}-{from}"));
        dev.component = Some(target.to_string());
        let mut done = false;
        for _ in 0..5000 {
            let reply = c.post_status(xname, &dev.status_bytes()).await.unwrap();
            match dev.apply(&reply).unwrap() {
                None => {}
                Some(Ended::Updated) => {
                    done = true;
                    break;
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert!(done && dev.running == format!("{target}-{to}"), "{xname}/{target}: not updated to {to}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_action_loses_nothing_and_a_snapshot_restore_skips_a_deleted_device() {
    use common::serve::Serve;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let coap: std::net::SocketAddr = ([127, 0, 0, 1], serve.coap).into();
    let ok = |(ok, out): (bool, String)| {
        assert!(ok, "{out}");
        out
    };
    cli_images(&serve, dir.path());
    let xnames = ["x1", "x2", "x3", "x4"];
    for x in xnames {
        ok(serve.cli(&["devices", "add", x, "--device-type", "nodeBMC"]));
        let mut c = CoapClient::connect(coap, coap_cfg()).await.unwrap();
        for t in ["BIOS", "BMC"] {
            let mut dev = DfuDevice::new(x, Form::Packed, &format!("{t}-1"));
            dev.component = Some(t.into());
            c.post_status(x, &dev.status_bytes()).await.unwrap();
        }
    }
    let out = ok(serve.cli(&["snapshots", "create", "before"]));
    assert!(out.contains("snapshot before: 4 xnames, 8 targets"), "{out}");
    let file = dir.path().join("all.json");
    std::fs::write(&file, json!({"command": {"version": "latest", "overrideDryrun": true}}).to_string()).unwrap();
    let out = ok(serve.cli(&["actions", "create", file.to_str().unwrap()]));
    assert!(out.contains("(running): 8 operations"), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().to_owned();
    update(coap, "x1", &["BIOS", "BMC"], "2").await;
    update(coap, "x2", &["BIOS"], "2").await;
    serve.kill();

    let serve = Serve::start(dir.path()).await;
    let coap: std::net::SocketAddr = ([127, 0, 0, 1], serve.coap).into();
    let out = ok(serve.cli(&["actions", "status", &id]));
    assert!(out.contains("(running)") && out.contains("succeeded 3"), "after the restart: {out}");
    update(coap, "x2", &["BMC"], "2").await;
    for x in ["x3", "x4"] {
        update(coap, x, &["BIOS", "BMC"], "2").await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = ok(serve.cli(&["actions", "status", &id]));
        if out.contains("(completed)") || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(out.contains("(completed): 8 operations: succeeded 8"), "each once, none twice: {out}");

    // Restore the snapshot after x4 left: it is skipped and named.
    ok(serve.cli(&["devices", "delete", "x4"]));
    let out = ok(serve.cli(&["snapshots", "restore", "before"]));
    assert!(out.contains("dry run") && out.contains("skipped x4"), "{out}");
    let out = ok(serve.cli(&["snapshots", "restore", "before", "--live"]));
    assert!(out.contains("(running)"), "{out}");
    for x in ["x1", "x2", "x3"] {
        update(coap, x, &["BIOS", "BMC"], "1").await;
    }
    for x in ["x1", "x2", "x3"] {
        let (status, v) = admin(&serve.admin, Method::GET, &format!("/api/v1/devices/{x}"), None, None).await;
        assert_eq!(status, 200);
        assert_eq!(v["running"], json!({"BIOS": "BIOS-1", "BMC": "BMC-1"}), "{x} is back on its snapshot versions");
    }
}

/// `fwgate load --targets`: the harness registers multi-target devices, starts one live action
/// once every device has reported its targets, and verifies each target against its own image
/// — one run over CoAP, one over MQTT. The action ends with every operation succeeded and the
/// gateway's record of each target agrees with the devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwgate_load_drives_multi_target_devices_through_one_live_action() {
    use common::serve::Serve;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let (mqtt, coap) = (format!("127.0.0.1:{}", serve.mqtt), format!("127.0.0.1:{}", serve.coap));
    let mut versions = BTreeMap::new();
    // The third run makes the same images as the first: its action must still touch its own
    // devices only.
    let runs = [
        ("coap", "c-", 40u64, "BIOS,BMC,NIC"),
        ("mqtt", "m-", 30, "BIOS,BMC=3.1"),
        ("mqtt", "again-", 10, "BIOS,BMC,NIC"),
    ];
    for (transport, prefix, n, targets) in runs {
        let report = dir.path().join(format!("{prefix}.json"));
        let (ok, text) = serve.cli(&[
            "load",
            "--transport",
            transport,
            "--devices",
            &n.to_string(),
            "--targets",
            targets,
            "--register",
            "--quiet",
            "--image-kib",
            "16",
            "--prefix",
            prefix,
            "--mqtt",
            &mqtt,
            "--coap",
            &coap,
            "--report",
            report.to_str().unwrap(),
        ]);
        assert!(ok, "{transport}: {text}");
        let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let planned = n * r["targets"].as_array().unwrap().len() as u64;
        assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(n), Some(0)), "{transport}: {r:#}");
        assert_eq!(r["action"]["state"], "completed", "{transport}: {r:#}");
        assert_eq!(r["action"]["operationCounts"]["succeeded"], planned, "{transport}: {r:#}");
        assert_eq!(r["action"]["operationCounts"]["total"], planned, "{transport}: {r:#}");
        assert!(text.contains(&format!("{planned} operations planned")), "{text}");
        for i in [0, n - 1] {
            let v = device_state(&serve.admin, &format!("{prefix}{i:05}")).await;
            for t in r["targets"].as_array().unwrap() {
                let name = t["name"].as_str().unwrap();
                assert_eq!(v["running"][name], t["expected"]["version"], "{transport} device {i}, {name}");
                versions.insert(format!("{prefix}{name}"), t["expected"]["version"].as_str().unwrap().to_owned());
            }
        }
    }
    // Images are newer than every first version (BMC ran 3.1), or the gateway would refuse
    // the downgrade.
    assert!(versions["m-BIOS"].starts_with("4.0.0-") && versions["c-NIC"].starts_with("2.0.0-"), "{versions:?}");
    assert_eq!(versions["c-NIC"], versions["again-NIC"], "the third run made the first run's images");
    // Bad --targets are refused before anything is registered.
    let (ok, text) = serve.cli(&["load", "--targets", "BIOS,bios", "--register", "--coap", &coap]);
    assert!(!ok && text.contains("named twice"), "{text}");
    let (ok, text) = serve.cli(&["load", "--targets", "BIOS", "--coap", &coap]);
    assert!(!ok && text.contains("--register"), "{text}");
    let (ok, text) = serve.cli(&["load", "--targets", "BIOS", "--register", "--transport", "coap-block2"]);
    assert!(!ok && text.contains("Block2"), "{text}");
}

/// Issue 28: starting an action was one write for its state, then one per operation; a kill
/// in between left it running with operations never queued. Through the binary: 5,000 xnames
/// × 2 targets, the gateway SIGKILLed while `actions create` of a 10,000-operation live action
/// runs, at a later moment on each try until one lands after the action's record was written.
/// After each restart the action either does not exist, or all 10,000 of its operations are
/// queued, none twice (the gateway's operation counts, which see every queued operation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_while_a_10000_operation_action_starts_queues_all_of_it_or_none() {
    use common::serve::Serve;
    const XNAMES: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path()).await;
    let ok = |(ok, out): (bool, String)| {
        assert!(ok, "{out}");
        out
    };
    cli_images(&serve, dir.path());
    let csv = dir.path().join("devices.csv");
    let mut text = String::from("id,deviceType\n");
    for i in 0..XNAMES {
        text.push_str(&format!("x{i:05},nodeBMC\n"));
    }
    std::fs::write(&csv, text).unwrap();
    ok(serve.cli(&["devices", "import", csv.to_str().unwrap()]));
    // Each xname reports what its two targets run: that is what an action plans from.
    let coap: std::net::SocketAddr = ([127, 0, 0, 1], serve.coap).into();
    let mut c = CoapClient::connect(coap, coap_cfg()).await.unwrap();
    for i in 0..XNAMES {
        let x = format!("x{i:05}");
        for t in ["BIOS", "BMC"] {
            let mut dev = DfuDevice::new(&x, Form::Packed, &format!("{t}-1"));
            dev.component = Some(t.into());
            c.post_status(&x, &dev.status_bytes()).await.unwrap();
        }
    }
    let file = dir.path().join("all.json");
    std::fs::write(&file, json!({"command": {"version": "latest", "overrideDryrun": true}}).to_string()).unwrap();
    let mut landed = None;
    for delay_ms in [5u64, 40, 80, 120, 160, 240, 400, 800, 1600] {
        let create = std::process::Command::new(common::serve::BIN)
            .args(["actions", "create", file.to_str().unwrap()])
            .env("FWGATE_SERVER", &serve.admin)
            .env("FWGATE_TOKEN", "test-token")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        serve.kill();
        let _ = create.wait_with_output();
        serve = Serve::start(dir.path()).await;
        let actions = call(&serve.admin, Method::GET, "/api/v1/actions", None).await;
        let metrics = reqwest::get(format!("{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
        let queued: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("fwgate_operations{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|n| n as u64)
            .sum();
        match actions.as_array().unwrap().as_slice() {
            [] => {
                assert_eq!(queued, 0, "killed {delay_ms} ms in, no action, yet {queued} operations");
                println!("killed {delay_ms} ms after `actions create` started: no action yet, nothing queued");
            }
            [a] => {
                assert_eq!(queued, 2 * XNAMES as u64, "killed {delay_ms} ms in: all 10,000 queued, none twice");
                assert_eq!(a["state"], "running", "{a}");
                landed = Some((delay_ms, a["actionID"].as_str().unwrap().to_owned()));
                break;
            }
            more => panic!("one create, {} actions", more.len()),
        }
    }
    let (delay_ms, id) = landed.expect("no try killed the gateway after the action was written");
    println!("killed {delay_ms} ms after `actions create` started: action {id} running with all 10,000 queued");
    let a = call(&serve.admin, Method::GET, &format!("/api/v1/actions/{id}"), None).await;
    let ops = a["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 2 * XNAMES, "killed {delay_ms} ms in");
    assert!(ops.iter().all(|o| o["state"] == "configured" || o["state"] == "blocked"), "all queued, none started");
    drop(serve);
}
