//! The real `fwgate` binary as an operator runs it: started by `fwgate serve`, driven by the
//! CLI and by stock MQTT clients (mosquitto), killed with SIGKILL and started again.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::serve::*;
use common::*;
use fwgate::protocol::{Form, Status};

/// One Status/Command pair through mosquitto_pub and mosquitto_sub.
async fn mosquitto_exchange(port: u16, version_flag: &str, device: &str, status_file: &Path) -> Vec<u8> {
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version_flag, "-i", &format!("{device}-sub")])
        .args(["-t", &format!("dfu/{device}/command"), "-C", "1", "-W", "20", "-F", "%x"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub runs");
    // The subscription may not be in place yet: publish until the reply arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version_flag, "-i", device])
            .args(["-t", &format!("dfu/{device}/status"), "-q", "1", "-f"])
            .arg(status_file)
            .status()
            .unwrap();
        assert!(ok.success(), "mosquitto_pub failed");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(Some(_)) = sub.try_wait() {
            break;
        }
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "mosquitto_sub got no command");
    hex::decode(String::from_utf8(out.stdout).unwrap().trim()).expect("hex payload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_exchange_status_and_command_with_fwgate_serve() {
    require("mosquitto_pub", "mosquitto-clients");
    require("mosquitto_sub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let img = image(4096, 11);
    std::fs::write(dir.path().join("app.bin"), &img).unwrap();
    let file = dir.path().join("app.bin");
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.0.0"]);
    assert!(ok, "{out}");
    for id in ["mq-3", "mq-5"] {
        assert!(serve.cli(&["devices", "add", id]).0);
        assert!(serve.cli(&["devices", "assign", id, "app@2.0.0"]).0);
    }
    let status_file = dir.path().join("status.cbor");
    let mut bytes = Vec::new();
    Status { mtu: Some(256), ..Status::new("1.0.0") }.encode(Form::Named, &mut bytes);
    std::fs::write(&status_file, &bytes).unwrap();

    for (device, port, flag) in [("mq-3", serve.mqtt, "mqttv311"), ("mq-5", serve.mqtt, "mqttv5")] {
        let reply = mosquitto_exchange(port, flag, device, &status_file).await;
        let (cmd, form) = fwgate::protocol::Command::decode(&reply).expect("a valid command");
        assert_eq!(form, Form::Named);
        match cmd {
            fwgate::protocol::Command::Write { version, offset, data, .. } => {
                assert_eq!((version, offset), ("2.0.0", 0), "{flag}");
                assert_eq!(data, &img[..256], "{flag}: the first block of the image");
            }
            other => panic!("{flag}: expected WRITE, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_transfer_loses_nothing_and_the_device_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let img = image(128 * 1024, 12);
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    let csv = dir.path().join("devices.csv");
    std::fs::write(&csv, "id,tag,groups,production,hardware\nkill-1,stable,eu;lab,false,\nkill-2,,,,\n").unwrap();
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.0.0"]);
    assert!(ok, "{out}");
    let (ok, out) = serve.cli(&["devices", "import", csv.to_str().unwrap()]);
    assert!(ok && out.contains("2 added"), "{out}");
    let (ok, out) = serve.cli(&["devices", "assign", "kill-1", "app@2.0.0"]);
    assert!(ok, "{out}");

    let mut dev =
        SimDevice::connect(format!("127.0.0.1:{}", serve.mqtt).parse().unwrap(), "kill-1", Form::Packed, "1.0.0", None)
            .await;
    let Ended::Paused(at) = dev.run(Some(40 * 1024)).await else { panic!("expected a pause") };
    let download = dev.download.take();
    drop(dev);
    let mut serve = serve;
    serve.child.kill().unwrap(); // SIGKILL
    serve.child.wait().unwrap();
    drop(serve);

    let serve = Serve::start(dir.path()).await;
    let (ok, out) = serve.cli(&["images", "list"]);
    assert!(ok && out.contains("app") && out.contains("2.0.0"), "{out}");
    let (ok, out) = serve.cli(&["devices", "list"]);
    assert!(ok && out.contains("kill-1") && out.contains("kill-2"), "{out}");
    let (ok, out) = serve.cli(&["devices", "show", "kill-1"]);
    assert!(ok && out.contains("app@2.0.0") && out.contains("downloading"), "{out}");

    let mut dev =
        SimDevice::connect(format!("127.0.0.1:{}", serve.mqtt).parse().unwrap(), "kill-1", Form::Packed, "1.0.0", None)
            .await;
    dev.download = download;
    assert_eq!(dev.run(None).await, Ended::Updated);
    assert_eq!(dev.offsets.first(), Some(&at), "resumed at the offset it had before the kill");
    assert_eq!(dev.last_image, img);
    let (ok, out) = serve.cli(&["devices", "show", "kill-1"]);
    assert!(ok && out.contains("succeeded") && out.contains("100.0%"), "{out}");

    // SIGTERM is a clean stop.
    let mut serve = serve;
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "fwgate did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

#[test]
fn config_check_names_the_first_invalid_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[mqtt]\nmax_conections = 5\n").unwrap();
    let out = Command::new(BIN).args(["config", "check", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.max_conections"), "{err}");

    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&bad)
        .env("FWGATE_MQTT__MAX_CONECTIONS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());

    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fwgate.toml");
    let out = Command::new(BIN).args(["config", "check", "--config"]).arg(&shipped).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&shipped)
        .env("FWGATE_DFU__MAX_BLOCK_SIZE", "8")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dfu.max_block_size"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_client_downloads_the_assigned_image_block_wise() {
    require("coap-client-notls", "libcoap3-bin");
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let img = image(256 * 1024, 13);
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.0.0"]);
    assert!(ok, "{out}");
    assert!(serve.cli(&["devices", "add", "co-1"]).0);
    assert!(serve.cli(&["devices", "assign", "co-1", "app@2.0.0"]).0);

    for block in ["512", "64", "1024"] {
        let out_file = dir.path().join(format!("out-{block}.bin"));
        let url = format!("coap://127.0.0.1:{}/fw/co-1", serve.coap);
        let run = Command::new("coap-client-notls")
            .args(["-b", block, "-B", "60", "-o"])
            .arg(&out_file)
            .arg(&url)
            .output()
            .expect("coap-client-notls runs");
        assert!(run.status.success(), "-b {block}: {}", String::from_utf8_lossy(&run.stderr));
        let got = std::fs::read(&out_file).unwrap_or_default();
        assert!(got == img, "-b {block}: {} bytes, not the 256 KiB image", got.len());
    }
    let (ok, out) = serve.cli(&["devices", "show", "co-1"]);
    assert!(ok && out.contains("downloading"), "{out}");

    // Nothing assigned: 4.04, which the client reports as a failure.
    assert!(serve.cli(&["devices", "add", "co-2"]).0);
    let run = Command::new("coap-client-notls")
        .args(["-B", "10", &format!("coap://127.0.0.1:{}/fw/co-2", serve.coap)])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(text.contains("4.04"), "{text}");
}

/// `fwgate load` against `fwgate serve`: every transport, with every fault it injects, ends
/// with each device verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwgate_load_verifies_every_device_over_every_transport_with_faults() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let runs: [(&str, usize, &[&str]); 3] = [
        ("mqtt", 60, &["--disconnect-at", "50", "--corrupt", "20", "--window", "4", "--sync-start"]),
        ("coap", 30, &["--drop", "5", "--disconnect-at", "50", "--corrupt", "20", "--form", "packed"]),
        ("coap-block2", 30, &["--drop", "5", "--disconnect-at", "50", "--mtu", "256"]),
    ];
    for (transport, n, faults) in runs {
        let report = dir.path().join(format!("{transport}.json"));
        let out = Command::new(BIN)
            .args(["load", "--transport", transport, "--devices", &n.to_string(), "--register", "--quiet"])
            .args(["--image-kib", "32", "--prefix", &format!("{transport}-"), "--seed", "7"])
            .args(["--mqtt", &format!("127.0.0.1:{}", serve.mqtt), "--coap", &format!("127.0.0.1:{}", serve.coap)])
            .args(["--gateway-pid", &serve.child.id().to_string(), "--report"])
            .arg(&report)
            .args(faults)
            .env("FWGATE_SERVER", &serve.admin)
            .env("FWGATE_TOKEN", "test-token")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{transport}: {text}");
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(n as u64), Some(0)), "{transport}: {r:#}");
        assert_eq!(r["reconnects"], n, "{transport}: every device disconnected once at 50%");
        assert_eq!(r["checksum_failures"], 0);
        assert!(r["blocks"].as_u64().unwrap() > 0);
        let rss = &r["gateway_rss"];
        for moment in ["before_connect_kib", "peak_downloading_kib", "after_kib"] {
            assert!(rss[moment].as_u64().is_some_and(|k| k > 0), "{transport}: {moment} sampled: {rss}");
        }
        // Only a --sync-start run has a moment when every device is connected and none
        // downloads.
        assert_eq!(rss["connected_idle_kib"].as_u64().is_some(), transport == "mqtt", "{transport}: {rss}");
        assert!(text.contains("gateway RSS before connect"), "{text}");
        if transport != "mqtt" {
            assert!(r["drops"].as_u64().unwrap() > 0, "{transport}: datagrams were lost: {r:#}");
        }
        if transport != "coap-block2" {
            assert!(r["corrupt_sent"].as_u64().unwrap() > 0, "{transport}: garbage was sent: {r:#}");
        }
        assert!(text.contains("all verified"), "{text}");
    }
    let metrics = reqwest::get(format!("{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fwgate_status_messages_total{outcome=\"bad_input\"}"), "garbage was counted");
    assert!(
        metrics.contains("fwgate_coap_datagrams_total{result=\"duplicate\"}"),
        "retransmissions were answered from the cache"
    );
    // Operations are recorded for each device, as for any other device.
    let (ok, out) = serve.cli(&["devices", "show", "coap-00007"]);
    assert!(ok && out.contains("succeeded"), "{out}");

    // Devices that --duration stops before they verified make the run fail: 2 MiB in 64-byte
    // blocks is 32,768 round trips per device, far more than 0.3 s holds.
    let report = dir.path().join("cut-short.json");
    let out = Command::new(BIN)
        .args(["load", "--transport", "coap", "--devices", "2", "--register", "--quiet", "--duration", "0.3"])
        .args(["--image-kib", "2048", "--mtu", "64", "--prefix", "short-", "--seed", "8"])
        .args(["--coap", &format!("127.0.0.1:{}", serve.coap), "--report"])
        .arg(&report)
        .env("FWGATE_SERVER", &serve.admin)
        .env("FWGATE_TOKEN", "test-token")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "unfinished devices fail the run: {text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!((r["ok"].as_u64(), r["unfinished"].as_u64()), (Some(0), Some(2)), "{r:#}");
    assert!(text.contains("NOT all verified") && text.contains("2 unfinished"), "{text}");
}

/// (seq, state, origin, image) of every operation of every device: what a restart must keep.
async fn operation_states(admin_url: &str, ids: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for id in ids {
        let v = device_state(admin_url, id).await;
        for op in v["operations"].as_array().unwrap() {
            out.push((id.clone(), format!("{} {} {} {}", op["seq"], op["state"], op["origin"], op["image"])));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_through_the_cli_survive_sigkill_mid_rollout_and_devices_continue() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let img = image(16 * 1024, 21);
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    let ids: Vec<String> = (0..20).map(|i| format!("w{i:02}")).collect();
    let mut csv = String::from("id,tag,groups,production\n");
    for (i, id) in ids.iter().enumerate() {
        // Test (CI) devices: with no CI TUF repository configured, any uploaded image may reach
        // them (the TUF rules have their own tests).
        csv.push_str(&format!("{id},release,{},false\n", if i < 5 { "canary" } else { "eu" }));
    }
    std::fs::write(dir.path().join("devices.csv"), csv).unwrap();
    let (ok, out) = serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.0"]);
    assert!(ok, "{out}");
    let (ok, out) = serve.cli(&["devices", "import", dir.path().join("devices.csv").to_str().unwrap()]);
    assert!(ok && out.contains("20 added"), "{out}");
    let (ok, out) = serve.cli(&["waves", "init", "v2", "2.0", "release", "--ci"]);
    assert!(ok && out.contains("initialized"), "{out}");
    let (ok, out) = serve.cli(&["waves", "init", "v2b", "2.0", "release", "--ci"]);
    assert!(!ok && out.contains("already has an active wave: v2"), "{out}");

    // The canaries from a file that mixes every separator; w05 is not a canary.
    let list = dir.path().join("canary.lst");
    std::fs::write(&list, "w00, w01;w02|w03\nw04\tw05\n").unwrap();
    let uuids = format!("@{}", list.display());
    let (ok, out) = serve.cli(&["waves", "rollout", "v2", "canary", "--uuids", &uuids]);
    assert!(ok && out.contains("staged 5 of 5") && out.contains("w05: not in the group"), "{out}");
    // A dry run with a seed prints the sample the real rollout then stages.
    let args = ["waves", "rollout", "v2", "--limit", "25%", "--seed", "3", "--print-uuids"];
    let (ok, dry) = serve.cli(&[&args[..], &["--dry-run"]].concat());
    assert!(ok && dry.contains("would stage 5 (dry run)"), "{dry}");
    let (ok, real) = serve.cli(&args);
    assert!(ok && real.contains("staged 5 of 5"), "{real}");
    let printed = |text: &str| -> Vec<String> {
        text.lines().filter(|l| ids.contains(&l.to_string())).map(String::from).collect()
    };
    let sample = printed(&real);
    assert_eq!(printed(&dry), sample);
    assert_eq!(sample.len(), 5);
    assert!(sample.iter().all(|d| d.as_str() >= "w05"), "canaries are already in the wave: {sample:?}");

    let mqtt = format!("127.0.0.1:{}", serve.mqtt).parse().unwrap();
    for id in &ids[..3] {
        let mut dev = SimDevice::connect(mqtt, id, Form::Named, "1.0", None).await;
        assert_eq!(dev.run(None).await, Ended::Updated);
        dev.disconnect().await;
    }
    let mut dev = SimDevice::connect(mqtt, &ids[3], Form::Named, "1.0", None).await;
    let Ended::Paused(at) = dev.run(Some(8 * 1024)).await else { panic!("expected a pause") };
    let download = dev.download.take();
    drop(dev);

    let (ok, status_before) = serve.cli(&["waves", "status", "v2", "--json"]);
    assert!(ok, "{status_before}");
    let before: serde_json::Value = serde_json::from_str(&status_before).unwrap();
    assert_eq!((before[0]["updated"].as_u64(), before[0]["scheduled"].as_u64()), (Some(3), Some(7)), "{before}");
    assert_eq!(before[0]["in_progress"], 1);
    let ops_before = operation_states(&serve.admin, &ids).await;
    let (_, show_before) = serve.cli(&["waves", "show", "v2", "--json"]);

    let mut serve = serve;
    serve.child.kill().unwrap(); // SIGKILL, mid-rollout and mid-transfer
    serve.child.wait().unwrap();
    drop(serve);
    let serve = Serve::start(dir.path()).await;

    let (ok, status_after) = serve.cli(&["waves", "status", "v2", "--json"]);
    assert!(ok, "{status_after}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&status_after).unwrap(), before);
    assert_eq!(operation_states(&serve.admin, &ids).await, ops_before, "every operation state is unchanged");
    assert_eq!(serve.cli(&["waves", "show", "v2", "--json"]).1, show_before, "the rollout history is unchanged");
    let (ok, table) = serve.cli(&["waves", "status"]);
    assert!(ok && table.contains("GROUP") && table.contains("NEED-UPDATE") && table.contains("canary"), "{table}");

    // Devices continue: the interrupted one resumes where it was, the staged ones update.
    let mqtt = format!("127.0.0.1:{}", serve.mqtt).parse().unwrap();
    let mut dev = SimDevice::connect(mqtt, &ids[3], Form::Named, "1.0", None).await;
    dev.download = download;
    assert_eq!(dev.run(None).await, Ended::Updated);
    assert_eq!(dev.offsets.first(), Some(&at));
    dev.disconnect().await;
    for id in std::iter::once(&ids[4]).chain(&sample) {
        let mut dev = SimDevice::connect(mqtt, id, Form::Named, "1.0", None).await;
        assert_eq!(dev.run(None).await, Ended::Updated, "{id}");
        dev.disconnect().await;
    }
    let (ok, out) = serve.cli(&["waves", "status", "v2", "--json"]);
    assert!(ok, "{out}");
    let after: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((after[0]["updated"].as_u64(), after[0]["scheduled"].as_u64()), (Some(10), Some(0)), "{after}");
    let (ok, out) = serve.cli(&["waves", "complete", "v2"]);
    assert!(ok && out.contains("10 more devices staged"), "{out}");
    let (ok, out) = serve.cli(&["waves", "cancel", "v2"]);
    assert!(!ok && out.contains("cannot be canceled"), "{out}");
    let (ok, out) = serve.cli(&["waves", "list", "--status", "complete"]);
    assert!(ok && out.contains("v2") && out.contains("release"), "{out}");
}

/// Serves the fixture TUF repositories over HTTP on loopback: `/REPO/metadata/...`,
/// `/REPO/targets/...`. Missing files are 404.
async fn serve_fixture_repos() -> String {
    use axum::extract::Path as UrlPath;
    let root = tuf_fixtures().join("repos");
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::get(move |UrlPath(path): UrlPath<String>| {
            let root = root.clone();
            async move {
                if path.split('/').any(|p| p == ".." || p.is_empty()) {
                    return Err(axum::http::StatusCode::BAD_REQUEST);
                }
                std::fs::read(root.join(&path)).map_err(|_| axum::http::StatusCode::NOT_FOUND)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn tuf_client(metadata: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(["tuf", "client", "--metadata-dir"]).arg(metadata).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.code() == Some(0) || out.status.code() == Some(1), "exit 0 or 1: {out:?}");
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tuf_client_downloads_a_verified_target_over_http_and_refuses_tampered_ones() {
    let base = serve_fixture_repos().await;
    let dir = tempfile::tempdir().unwrap();
    let (md, td) = (dir.path().join("metadata"), dir.path().join("targets"));
    let root = tuf_fixtures().join("production-root.json");
    let (ok, out) = tuf_client(&md, &["init", root.to_str().unwrap()]);
    assert!(ok, "{out}");
    let metadata_url = format!("{base}/production/metadata/");
    let (ok, out) = tuf_client(&md, &["--metadata-url", &metadata_url, "refresh"]);
    assert!(ok, "{out}");
    for f in ["root.json", "timestamp.json", "snapshot.json", "targets.json"] {
        assert!(md.join(f).exists(), "{f} kept under its non-versioned name");
    }
    let download = |repo: &str, name: &str| {
        let (mu, tu) = (format!("{base}/{repo}/metadata/"), format!("{base}/{repo}/targets/"));
        let args = ["--metadata-url", &mu, "--target-name", name, "--target-base-url", &tu, "--target-dir"];
        let mut all: Vec<&str> = args.to_vec();
        let td = td.to_str().unwrap().to_owned();
        all.push(&td);
        all.push("download");
        tuf_client(&md, &all)
    };
    let (ok, out) = download("production", "app-2.0.bin");
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(td.join("app-2.0.bin")).unwrap(), target_bytes("production", "app-2.0.bin"));
    // Cached: verified again from disk, not fetched (the server now has other bytes for it).
    let (ok, out) = download("bad-target-bytes", "app-2.0.bin");
    assert!(ok, "{out}");
    // Other bytes than the metadata says: refused, and nothing written.
    let (ok, out) = download("bad-target-bytes", "app-2.1.bin");
    assert!(!ok && out.contains("app-2.1.bin"), "{out}");
    assert!(!td.join("app-2.1.bin").exists());
    // Tampered metadata: a client that has not verified this version yet refuses it. (One
    // that has is not told anything changed — the timestamp's version is the same — so it
    // fetches nothing, as the reference client.)
    let fresh = dir.path().join("fresh-metadata");
    let (ok, out) = tuf_client(&fresh, &["init", root.to_str().unwrap()]);
    assert!(ok, "{out}");
    let tampered = format!("{base}/tampered-target/metadata/");
    let (ok, out) = tuf_client(&fresh, &["--metadata-url", &tampered, "refresh"]);
    assert!(!ok && out.contains("targets: 0 of the 2 signatures it needs"), "{out}");
    assert!(!fresh.join("targets.json").exists(), "refused metadata is not stored");
    // An expired timestamp, to a client with nothing newer verified, is refused as such.
    let fresh = dir.path().join("fresh-metadata-2");
    let (ok, out) = tuf_client(&fresh, &["init", root.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = tuf_client(&fresh, &["--metadata-url", &format!("{base}/expired-timestamp/metadata/"), "refresh"]);
    assert!(!ok && out.contains("timestamp: expired"), "{out}");
    let (ok, _) = download("production", "nope.bin");
    assert!(!ok);
}

/// Copies a fixture repository's metadata into `to` (replacing what is there): the "server"
/// of a file:// repository changes what it offers.
fn offer(variant: &str, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(tuf_fixtures().join("repos").join(variant).join("metadata")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refreshes_its_production_repository_and_keeps_its_trust_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served-metadata");
    offer("production", &served);
    let env = [
        ("FWGATE_TUF__PRODUCTION_ROOT", tuf_fixtures().join("production-root.json").display().to_string()),
        ("FWGATE_TUF__PRODUCTION_METADATA_URL", format!("file://{}/", served.display())),
        (
            "FWGATE_TUF__PRODUCTION_TARGETS_URL",
            format!("file://{}/", tuf_fixtures().join("repos/production/targets").display()),
        ),
    ];
    let serve = Serve::start_with(dir.path(), &env).await;
    let (ok, out) = serve.cli(&["tuf", "status"]);
    assert!(ok && out.contains("production: targets v2") && out.contains("app-2.1.bin"), "{out}");
    // An upload is checked against the target it claims to be.
    let good = dir.path().join("app-2.1.bin");
    std::fs::write(&good, target_bytes("production", "app-2.1.bin")).unwrap();
    let bad = dir.path().join("other.bin");
    std::fs::write(&bad, image(4096, 5)).unwrap();
    let add = |file: &Path| {
        serve.cli(&[
            "images",
            "add",
            file.to_str().unwrap(),
            "--name",
            "app",
            "--version",
            "2.1",
            "--target",
            "app-2.1.bin",
        ])
    };
    let (ok, out) = add(&bad);
    assert!(!ok && out.contains("is not production target app-2.1.bin"), "{out}");
    let (ok, out) = add(&good);
    assert!(ok, "{out}");
    // The repository rotates its root key; a refresh follows the chain.
    offer("rotated", &served);
    let (ok, out) = serve.cli(&["tuf", "refresh", "production"]);
    assert!(ok && out.contains("production: verified — root v2"), "{out}");
    // A refresh that does not verify (older metadata than verified before) is reported and
    // changes nothing.
    offer("rollback", &served);
    let (ok, out) = serve.cli(&["tuf", "refresh"]);
    assert!(!ok && out.contains("timestamp: version 1 is older than the trusted 2"), "{out}");
    let (ok, out) = serve.cli(&["tuf", "status"]);
    assert!(ok && out.contains("production: targets v2"), "{out}");

    let mut serve = serve;
    serve.child.kill().unwrap(); // SIGKILL
    serve.child.wait().unwrap();
    drop(serve);
    // After the restart the gateway starts from the root it verified (version 2), not the one
    // in its config, and still refuses metadata older than what it has seen.
    offer("rollback", &served);
    let serve = Serve::start_with(dir.path(), &env).await;
    let (ok, out) = serve.cli(&["tuf", "status"]);
    assert!(ok && out.contains("production: not verified"), "rolled-back metadata is not trusted: {out}");
    // Refused as a rollback (timestamp version 1 after 2), not for any other reason.
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains("timestamp: version 1 is older than the trusted 2"), "refused as a rollback: {log}");
    // The production repository's metadata has no 2.root.json: only a client that kept the
    // rotated root reports version 2.
    offer("production", &served);
    let (ok, out) = serve.cli(&["tuf", "refresh", "production"]);
    assert!(ok && out.contains("root v2"), "{out}");
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains("TUF repository does not verify"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_takes_an_rsql_filter_and_names_where_a_bad_one_goes_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    for args in [
        &["devices", "add", "f-1", "--tag", "release", "--group", "eu", "--hw", "nrf52", "--production"][..],
        &["devices", "add", "f-2", "--tag", "release", "--group", "us", "--hw", "esp32"][..],
        &["devices", "add", "g-3", "--tag", "beta", "--hw", "nrf52"][..],
    ] {
        let (ok, out) = serve.cli(args);
        assert!(ok, "{out}");
    }
    // A device reports its running version over MQTT.
    let mqtt = format!("127.0.0.1:{}", serve.mqtt).parse().unwrap();
    let mut dev = SimDevice::connect(mqtt, "f-2", Form::Named, "2.10", None).await;
    dev.send_status().await;
    dev.next_payload(Duration::from_secs(5)).await;
    dev.disconnect().await;

    let listed = |filter: &str| {
        let (ok, out) = serve.cli(&["devices", "list", "--filter", filter]);
        assert!(ok, "{filter}: {out}");
        let mut ids: Vec<String> =
            out.lines().skip(1).filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect();
        ids.sort();
        ids
    };
    assert_eq!(listed("tag==release;hardware==nrf52"), ["f-1"]);
    assert_eq!(listed("hardware==nrf52,group==us"), ["f-1", "f-2", "g-3"]);
    assert_eq!(listed("id==f-*;production==false"), ["f-2"]);
    assert_eq!(listed("version=ge=2.9"), ["f-2"]);
    let (ok, out) = serve.cli(&["devices", "list", "--filter", "tag==release;colour==red"]);
    assert!(!ok && out.contains("filter position 13: unknown field \"colour\""), "{out}");
    let (ok, out) = serve.cli(&["devices", "list", "--filter", "tag=release"]);
    assert!(!ok && out.contains("filter position 3: expected an operator"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fas_inventory_and_image_identities_go_in_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path()).await;
    let (ok, out) = serve.cli(&[
        "devices",
        "add",
        "x0c0s1b0",
        "--device-type",
        "nodeBMC",
        "--manufacturer",
        "intel",
        "--model",
        "s2600",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = serve.cli(&["devices", "show", "x0c0s1b0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok);
    assert_eq!(v["inventory"], serde_json::json!({"deviceType": "nodeBMC", "manufacturer": "intel", "model": "s2600"}));

    // The seed's imagefile, FAS's fields fwgate does not use included.
    let meta = |fw: &str| {
        serde_json::json!({"imageID": "3fa8", "deviceType": "nodeBMC", "manufacturer": "intel",
            "model": ["s2600", "s2600_REV_a"], "target": "BIOS", "tag": ["recovery", "default"],
            "firmwareVersion": fw, "semanticFirmwareVersion": "v1.2.252", "pollingSpeedSeconds": 30,
            "s3URL": "s3://firmware/f1.iso", "needManualReboot": true})
    };
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (bin, json) = (write("bios.bin", "bios image".into()), write("bios.json", meta("f1.123").to_string()));
    let (ok, out) = serve.cli(&["images", "add", &bin, "--name", "bios", "--version", "1.2.252", "--meta", &json]);
    assert!(ok && out.contains("identity: target BIOS, firmwareVersion f1.123"), "{out}");
    // A second image tagged default for the same hardware, target and version is refused, and
    // says the bytes were kept without an identity.
    let other = write("copy.bin", "another build".into());
    let (ok, out) = serve.cli(&["images", "add", &other, "--name", "bios-b", "--version", "1.2.252", "--meta", &json]);
    assert!(!ok && out.contains("image bios@1.2.252 is already tagged default"), "{out}");
    assert!(out.contains("the image was stored, its identity was not"), "{out}");
    // A file that is not an imagefile is refused before anything is uploaded.
    let bad = write("bad.json", r#"{"deviceType": "nodeBMC"}"#.into());
    let (ok, out) = serve.cli(&["images", "add", &other, "--name", "bios-c", "--version", "1", "--meta", &bad]);
    assert!(!ok && out.contains("is not a FAS imagefile") && out.contains("target"), "{out}");
    let (ok, out) = serve.cli(&["images", "list", "--json"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ided: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["identity"].is_object())
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(ided, ["bios"]);
    assert!(!list.as_array().unwrap().iter().any(|i| i["name"] == "bios-c"), "nothing uploaded");
}
