//! External-broker mode end to end: a real Mosquitto 2 started by the test, `fwgate serve`
//! (the binary) as an MQTT 5 client of it, and devices that talk only to the broker —
//! `fwgate load` runs and simulated devices, plus mosquitto_sub/mosquitto_pub for the ACL.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::serve::{Serve, BIN};
use common::*;
use fwgate::protocol::Form;
use serde_json::Value;

/// A value from the gateway's /metrics (0 when the series is not there yet).
async fn metric(admin: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (up to 20 s) until a metric reaches `at_least`.
async fn wait_metric(admin: &str, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(admin, series).await;
        if v >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {v}, not {at_least}, after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SUBSCRIBED: &str = "fwgate_broker_events_total{event=\"subscribed\"}";
const STATUSES: &str = "fwgate_broker_events_total{event=\"status\"}";

async fn external(dir: &std::path::Path, broker: &Mosquitto, extra: &[(&str, String)]) -> Serve {
    let mut env = vec![
        ("FWGATE_MQTT__MODE", "external".to_string()),
        ("FWGATE_MQTT__BROKER_URL", broker.url()),
        ("FWGATE_MQTT__CLIENT_ID", "node-a".to_string()),
    ];
    env.extend(extra.iter().cloned());
    let serve = Serve::start_with(dir, &env).await;
    assert_eq!(serve.mqtt, 0, "no MQTT listener of its own in external mode");
    wait_metric(&serve.admin, SUBSCRIBED, 1.0).await;
    serve
}

/// `fwgate load` against the broker; its JSON report.
fn load(serve: &Serve, broker: &Mosquitto, dir: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .args(["load", "--transport", "mqtt", "--register", "--quiet", "--mqtt", &broker.addr().to_string()])
        .args(["--report", dir.join("report.json").to_str().unwrap()])
        .args(args)
        .env("FWGATE_SERVER", &serve.admin)
        .env("FWGATE_TOKEN", "test-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: std::process::Child, dir: &std::path::Path) -> Value {
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fwgate load: {text}");
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_behind_mosquitto_update_through_an_external_node_that_rides_out_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), "").await;
    let serve = external(dir.path(), &broker, &[]).await;

    // Devices that know only the broker update and verify.
    let r = finished(
        load(&serve, &broker, dir.path(), &["--devices", "60", "--image-kib", "64", "--prefix", "a-"]),
        dir.path(),
    );
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(60), Some(0)), "{r:#}");
    assert!(metric(&serve.admin, STATUSES).await >= 60.0 * 128.0, "every block was asked for through the broker");

    // The broker restarts while a fleet downloads: devices reconnect and go on, the node
    // connects and subscribes again, and every device still verifies.
    let before = metric(&serve.admin, "fwgate_blocks_served_total{transport=\"mqtt\"}").await;
    let args = ["--devices", "40", "--image-kib", "512", "--mtu", "256", "--prefix", "b-", "--seed", "2"];
    let run = load(&serve, &broker, dir.path(), &args);
    wait_metric(&serve.admin, "fwgate_blocks_served_total{transport=\"mqtt\"}", before + 4000.0).await;
    broker.restart().await;
    wait_metric(&serve.admin, SUBSCRIBED, 2.0).await;
    let r = finished(run, dir.path());
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(40), Some(0)), "{r:#}");
    assert!(r["reconnects"].as_u64().unwrap() >= 40, "every device lost its connection mid-run: {r:#}");
    assert_eq!(r["checksum_failures"], 0);
    assert_eq!(metric(&serve.admin, "fwgate_broker_connected").await, 1.0);
    assert!(metric(&serve.admin, "fwgate_broker_events_total{event=\"connection_failed\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_mosquitto_acl_confines_each_device_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for (i, (user, password)) in
        [("fwgate", "node-secret"), ("dev-a", "token-a"), ("dev-b", "token-b")].iter().enumerate()
    {
        let mut c = Command::new("mosquitto_passwd");
        c.arg("-b");
        if i == 0 {
            c.arg("-c");
        }
        let out = c.arg(&passwd).args([user, password]).output().expect("mosquitto_passwd runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let acl = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mosquitto.acl");
    let conf = format!("allow_anonymous false\npassword_file {}\nacl_file {acl}", passwd.display());
    let broker = Mosquitto::start(dir.path(), &conf).await;
    let login = [("FWGATE_MQTT__USERNAME", "fwgate".to_string()), ("FWGATE_MQTT__PASSWORD", "node-secret".to_string())];
    let serve = external(dir.path(), &broker, &login).await;
    let base = serve.admin.clone();
    for id in ["dev-a", "dev-b"] {
        let (status, v) =
            admin(&base, reqwest::Method::POST, "/api/v1/devices", None, Some(serde_json::json!({"id": id}))).await;
        assert_eq!(status, 200, "{v}");
    }
    add_image(&base, "app", "2.0.0", image(8192, 3)).await;
    assign(&base, "dev-b", "app@2.0.0").await;

    // dev-a, with its own valid login, listens to dev-b's commands and to everyone's (the
    // broker lets it subscribe to wildcards, but delivers only what the ACL lets it read).
    let port = broker.port.to_string();
    let thief = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "dev-a", "-P", "token-a", "-i", "dev-a-thief", "-v"])
        .args(["-t", "dfu/dev-b/command", "-t", "dfu/+/command", "-t", "#", "-W", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // dev-b updates through the broker with its own login.
    let mut b = SimDevice::connect(broker.addr(), "dev-b", Form::Named, "1.0.0", Some("token-b")).await;
    assert_eq!(b.run(None).await, Ended::Updated);
    b.disconnect().await;
    // dev-a's own topics work (so the silence below is the ACL, not a broken login).
    let mut a = SimDevice::connect(broker.addr(), "dev-a", Form::Named, "1.0.0", Some("token-a")).await;
    assert_eq!(a.run(None).await, Ended::Synced);
    a.disconnect().await;

    // dev-a posing as dev-b: the broker drops the Status, the gateway never sees it.
    let seen = metric(&base, STATUSES).await;
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "dev-a", "-P", "token-a", "-i", "dev-a-spoof"])
        .args(["-t", "dfu/dev-b/status", "-m", "spoofed"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A Status dev-a may send still arrives, so the count would have moved within this wait.
    let mut again = SimDevice::connect(broker.addr(), "dev-a", Form::Named, "1.0.0", Some("token-a")).await;
    assert_eq!(again.run(None).await, Ended::Synced);
    again.disconnect().await;
    assert_eq!(metric(&base, STATUSES).await, seen + 1.0, "only dev-a's own Status reached the gateway");

    // The cluster's topics (a planner's views, nodes' reports) are the fwgate user's only:
    // dev-a neither reads a view nor forges a report the planner would read.
    let listener = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "fwgate", "-P", "node-secret", "-i", "planner-probe", "-v"])
        .args(["-t", "fwgate/report/+", "-W", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publish = |user: &str, password: &str, topic: &str, message: &str| {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-u", user, "-P", password, "-t", topic, "-m", message])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    publish("fwgate", "node-secret", "fwgate/view/dev-b", "view-of-dev-b");
    publish("dev-a", "token-a", "fwgate/report/dev-a", "forged-report");
    publish("fwgate", "node-secret", "fwgate/report/node-1", "a-node-report");
    let heard = String::from_utf8_lossy(&listener.wait_with_output().unwrap().stdout).into_owned();
    assert!(heard.contains("a-node-report"), "the fwgate user's own report was not delivered: {heard}");
    assert!(!heard.contains("forged-report"), "a device forged a report: {heard}");

    // Through its wildcard subscriptions dev-a got its own commands (so they were live) and
    // none of dev-b's.
    let out = thief.wait_with_output().unwrap();
    let read = String::from_utf8_lossy(&out.stdout);
    assert!(read.contains("dfu/dev-a/command"), "dev-a's subscriptions saw nothing at all: {read}");
    assert!(!read.contains("dev-b"), "dev-a read dev-b's messages: {read}");
    assert!(!read.contains("fwgate/"), "dev-a read the cluster's topics: {read}");
    // A wrong password is refused outright.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "dev-a", "-P", "wrong", "-t", "dfu/dev-a/command", "-W", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
}

/// A CA, the broker's certificate (127.0.0.1) and a client certificate for the fwgate node.
fn pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "broker test CA");
    let ca_key = KeyPair::generate().unwrap();
    write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for (name, sans) in [("broker", vec!["127.0.0.1".to_string()]), ("node", vec![])] {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        write(&format!("{name}.pem"), p.signed_by(&key, &issuer).unwrap().pem());
        write(&format!("{name}.key"), key.serialize_pem());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_node_reaches_a_tls_broker_with_its_client_certificate_and_not_without() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    // TLS with client certificates for fwgate; a plain listener for the devices.
    let devices = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nlistener {devices} 127.0.0.1\n",
        path("ca.pem"),
        path("broker.pem"),
        path("broker.key")
    );
    let broker = Mosquitto::start(dir.path(), &conf).await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let tls = [
        ("FWGATE_MQTT__BROKER_URL", url.clone()),
        ("FWGATE_MQTT__BROKER_CA", path("ca.pem")),
        ("FWGATE_MQTT__CLIENT_CERT", path("node.pem")),
        ("FWGATE_MQTT__CLIENT_KEY", path("node.key")),
    ];
    let serve = external(dir.path(), &broker, &tls).await;
    let base = serve.admin.clone();
    let (status, v) =
        admin(&base, reqwest::Method::POST, "/api/v1/devices", None, Some(serde_json::json!({"id": "d1"}))).await;
    assert_eq!(status, 200, "{v}");
    add_image(&base, "app", "2.0.0", image(8192, 5)).await;
    assign(&base, "d1", "app@2.0.0").await;
    let mut d = SimDevice::connect(([127, 0, 0, 1], devices).into(), "d1", Form::Packed, "1.0.0", None).await;
    assert_eq!(d.run(None).await, Ended::Updated, "served through the TLS connection");
    d.disconnect().await;
    drop(serve);

    // Without its certificate the node is refused, says so, and keeps trying.
    let sub = tempfile::tempdir().unwrap();
    let env = [("FWGATE_MQTT__BROKER_URL", url), ("FWGATE_MQTT__BROKER_CA", path("ca.pem"))];
    let mut all = vec![("FWGATE_MQTT__MODE", "external".to_string())];
    all.extend(env);
    let bare = Serve::start_with(sub.path(), &all).await;
    wait_metric(&bare.admin, "fwgate_broker_events_total{event=\"connection_failed\"}", 2.0).await;
    assert_eq!(metric(&bare.admin, "fwgate_broker_connected").await, 0.0);
    assert_eq!(metric(&bare.admin, SUBSCRIBED).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_prefix_namespaces_a_tenant_and_nothing_outside_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "").await;
    let prefix =
        [("FWGATE_MQTT__TOPIC_PREFIX", "tenant-a/".to_string()), ("FWGATE_MQTT__SHARE_GROUP", "gw-a".to_string())];
    let serve = external(dir.path(), &broker, &prefix).await;
    let r = finished(
        load(&serve, &broker, dir.path(), &["--devices", "20", "--image-kib", "16", "--topic-prefix", "tenant-a/"]),
        dir.path(),
    );
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(20), Some(0)), "{r:#}");
    // The same device on the bare topics is outside the tenant: no answer, nothing read.
    let seen = metric(&serve.admin, STATUSES).await;
    let mut bare = SimDevice::connect(broker.addr(), "load-00000", Form::Named, "1.0.0", None).await;
    bare.send_status().await;
    assert_eq!(bare.next_payload(Duration::from_secs(2)).await, None);
    bare.disconnect().await;
    assert_eq!(metric(&serve.admin, STATUSES).await, seen);
}

/// A FAS action through the broker: multi-target devices (`fwgate load --targets`) behind
/// Mosquitto, which restarts mid-run; every target still ends verified and the action
/// completes with each operation succeeded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_over_multi_target_devices_behind_the_broker_survives_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), "").await;
    let serve = external(dir.path(), &broker, &[]).await;
    let before = metric(&serve.admin, "fwgate_blocks_served_total{transport=\"mqtt\"}").await;
    let args = ["--devices", "20", "--targets", "BIOS,BMC", "--image-kib", "256", "--mtu", "256"];
    let run = load(&serve, &broker, dir.path(), &args);
    wait_metric(&serve.admin, "fwgate_blocks_served_total{transport=\"mqtt\"}", before + 2000.0).await;
    broker.restart().await;
    let r = finished(run, dir.path());
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64()), (Some(20), Some(0)), "{r:#}");
    assert!(r["reconnects"].as_u64().unwrap() >= 20, "every device lost its connection mid-run: {r:#}");
    assert_eq!(r["action"]["state"], "completed", "{r:#}");
    assert_eq!(r["action"]["operationCounts"]["succeeded"], 40, "{r:#}");
    assert_eq!(r["action"]["operationCounts"]["total"], 40, "{r:#}");
}
