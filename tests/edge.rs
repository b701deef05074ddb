//! The device and operator edge: what a device may write (versions), how strings from outside
//! are shown, who may read the admin API, and a TUF repository that never answers. Real
//! `fwgate serve` processes where memory, the store and the log are what is measured.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use common::serve::Serve;
use common::*;
use fwgate::loadgen::coap::{ClientConfig, CoapClient};
use fwgate::loadgen::run::rss_kib;
use fwgate::loadgen::stats::Stats;
use fwgate::protocol::{Form, Status};
use tokio::net::UdpSocket;

const KIB: usize = 1024;

fn status_post(mid: u16, device: &str, version: &str, echo: Option<&[u8]>) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    p.add_option(CoapOption::UriPath, b"dfu".to_vec());
    p.add_option(CoapOption::UriPath, device.as_bytes().to_vec());
    if let Some(e) = echo {
        p.add_option(CoapOption::from(ECHO), e.to_vec());
    }
    let mut body = Vec::new();
    Status::new(version).encode(Form::Packed, &mut body);
    p.payload = body;
    p.to_bytes().unwrap()
}

const ECHO: u16 = 252;

/// One Status over plain CoAP; the answer's code. An Echo challenge (the first request from
/// an address) is answered as a device does: the request again, with the Echo.
async fn post_version(sock: &UdpSocket, mid: u16, device: &str, version: &str) -> Option<MessageClass> {
    let mut echo = None;
    for retry in [0u16, 0x8000] {
        sock.send(&status_post(mid ^ retry, device, version, echo.as_deref())).await.unwrap();
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await.ok()?.ok()?;
        let answer = Packet::from_bytes(&buf[..n]).ok()?;
        match answer.get_first_option(CoapOption::from(ECHO)) {
            Some(e) if echo.is_none() => echo = Some(e.clone()),
            _ => return Some(answer.header.code),
        }
    }
    None
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

async fn plain_socket(serve: &Serve) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(("127.0.0.1", serve.coap)).await.unwrap();
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_distinct_versions_cost_bounded_memory_and_store() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(dir.path(), &[("FWGATE_FLEET__LAST_SEEN_FLUSH_SECS", "1".into())]).await;
    assert!(serve.cli(&["devices", "add", "churn"]).0);
    let sock = plain_socket(&serve).await;
    let pid = serve.child.id();
    // Warm up: the first Statuses allocate the receive path's buffers.
    for i in 0..1000u16 {
        assert_eq!(
            post_version(&sock, i, "churn", &format!("warm-{i}")).await,
            Some(MessageClass::Response(coap_lite::ResponseType::Changed))
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss0, store0) = (rss_kib(pid).unwrap(), dir_bytes(&dir.path().join("data")));

    let started = Instant::now();
    let mut last_valid = String::new();
    for i in 0..100_000u32 {
        let mid = (i % 60_000) as u16 + 2000;
        // Every tenth is not one line of text, and the very last is such a one.
        let bad = i % 10 == 9 || i == 99_999;
        let version = if bad { format!("v{i}\nforged") } else { format!("1.{i}.0+build{}", i * 7) };
        let code = post_version(&sock, mid, "churn", &version).await.expect("every Status is answered");
        if bad {
            assert_eq!(code, MessageClass::Response(coap_lite::ResponseType::BadRequest), "{version:?}");
        } else {
            last_valid = version;
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await; // a last-seen flush writes what was deferred
    let (rss1, store1) = (rss_kib(pid).unwrap(), dir_bytes(&dir.path().join("data")));
    eprintln!(
        "100,000 Statuses in {took:.1?}: RSS {rss0} → {rss1} KiB ({:+} KiB), store {store0} → {store1} bytes ({:+})",
        rss1 as i64 - rss0 as i64,
        store1 as i64 - store0 as i64
    );
    assert!(rss1 < rss0 + 16 * 1024, "RSS grew from {rss0} to {rss1} KiB");
    assert!(store1 < store0 + (1 << 20), "the store grew from {store0} to {store1} bytes");
    let (ok, show) = serve.cli(&["devices", "show", "churn", "--json"]);
    assert!(ok, "{show}");
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["running"]["main"], last_valid.as_str(), "{v}");
    let metrics = reqwest::get(format!("{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fwgate_bad_input_total{kind=\"bad_text\"} 10000"), "refusals are counted by kind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_with_terminal_escapes_is_shown_escaped_in_the_cli_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(dir.path(), &[("RUST_LOG", "fwgate=debug".into())]).await;
    assert!(serve.cli(&["devices", "add", "tty-1"]).0);
    let sock = plain_socket(&serve).await;
    let code = post_version(&sock, 1, "tty-1", "\x1b[2J\x1b]0;owned\x07").await;
    assert_eq!(code, Some(MessageClass::Response(coap_lite::ResponseType::Changed)));
    for args in [&["devices", "list"][..], &["devices", "show", "tty-1"][..]] {
        let (ok, out) = serve.cli(args);
        assert!(ok, "{out}");
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{args:?} wrote control characters: {out:?}");
        assert!(out.contains("\\x1b[2J\\x1b]0;owned\\x07"), "{args:?} does not show the version escaped: {out}");
    }
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(!log.contains('\x1b'), "the log holds a raw ESC");
    let line =
        log.lines().find(|l| l.contains("running version changed")).unwrap_or_else(|| panic!("no version line: {log}"));
    // The log quotes strings as Rust does: ESC is `\u{1b}`.
    assert!(line.contains("version=\"\\u{1b}[2J\\u{1b}]0;owned\\u{7}\""), "the version is logged escaped: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_need_a_token_the_read_token_cannot_write_and_other_hosts_get_421() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.admin.read_token = "read-only-token-0123".into();
    let gw = TestGateway::start(config).await;
    add_device(&gw.admin, "dev-1").await;
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", gw.admin);
    for path in ["/api/v1/devices", "/api/v1/devices/dev-1", "/api/v1/images", "/api/v1/waves", "/api/v1/tuf"] {
        assert_eq!(c.get(url(path)).send().await.unwrap().status(), 401, "{path} without a token");
        let r = c.get(url(path)).bearer_auth("read-only-token-0123").send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} with the read-only token");
    }
    let add = |token: &'static str| {
        c.post(url("/api/v1/devices")).bearer_auth(token).json(&serde_json::json!({"id": "dev-2"})).send()
    };
    let r = add("read-only-token-0123").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("read-only"));
    let r = c.post(url("/api/v1/devices/dev-1/token")).bearer_auth("read-only-token-0123").send().await.unwrap();
    assert_eq!(r.status(), 403, "device tokens are not for the read-only token");
    assert_eq!(add("test-token").await.unwrap().status(), 200);
    // DNS rebinding: the browser sends the attacker's name.
    let r = c
        .get(url("/api/v1/devices"))
        .bearer_auth("test-token")
        .header("Host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    let r = c.get(url("/api/v1/devices")).header("Host", "attacker.example:8080").send().await.unwrap();
    assert_eq!(r.status(), 421);
    // localhost by name is this gateway; probes and metrics stay open.
    let port = gw.gw().admin.port();
    let r = c
        .get(url("/api/v1/devices"))
        .bearer_auth("test-token")
        .header("Host", format!("localhost:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for open in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(c.get(url(open)).header("Host", "attacker.example").send().await.unwrap().status(), 200, "{open}");
    }
    let metrics = c.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    for reason in ["host", "no_token", "read_only"] {
        assert!(metrics.contains(&format!("fwgate_admin_refused_total{{reason=\"{reason}\"}}")), "{reason} counted");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_never_answers_fails_the_refresh_and_downloads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    // Accepts every connection and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let root = tuf_fixtures().join("production-root.json");
    let serve = Serve::start_with(
        dir.path(),
        &[
            ("FWGATE_TUF__PRODUCTION_ROOT", root.display().to_string()),
            ("FWGATE_TUF__PRODUCTION_METADATA_URL", format!("http://{at}/metadata/")),
            ("FWGATE_TUF__PRODUCTION_TARGETS_URL", format!("http://{at}/targets/")),
            ("FWGATE_TUF__FETCH_TIMEOUT_SECS", "2".into()),
        ],
    )
    .await;
    // A test device (not production) takes any uploaded image.
    let img = image(64 * KIB, 61);
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    assert!(serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.0.0"]).0);
    assert!(serve.cli(&["devices", "add", "dl-1"]).0);
    assert!(serve.cli(&["devices", "assign", "dl-1", "app@2.0.0"]).0);
    let coap = format!("127.0.0.1:{}", serve.coap).parse().unwrap();
    let download = tokio::spawn(async move {
        let mut dev = DfuDevice::new("dl-1", Form::Named, "1.0.0");
        dev.mtu = 256;
        let stats = Stats::default();
        let mut c = CoapClient::connect(coap, ClientConfig::default()).await.unwrap();
        let ended = c.run_dfu(&mut dev, None, &stats).await;
        (ended, dev.last_image)
    });
    let started = Instant::now();
    let (ok, out) = tokio::task::spawn_blocking({
        let admin = serve.admin.clone();
        move || {
            let o = std::process::Command::new(common::serve::BIN)
                .args(["tuf", "refresh", "production"])
                .env("FWGATE_SERVER", admin)
                .env("FWGATE_TOKEN", "test-token")
                .output()
                .unwrap();
            (
                o.status.success(),
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            )
        }
    })
    .await
    .unwrap();
    eprintln!("tuf refresh against a silent repository returned after {:.1?}: {out}", started.elapsed());
    assert!(!ok, "the refresh cannot succeed: {out}");
    assert!(out.contains("within 2 s"), "the error says what happened: {out}");
    let (ended, bytes) = download.await.unwrap();
    assert_eq!(ended.expect("the download completes"), Ended::Updated);
    assert!(bytes == img, "the image arrived intact");
    let (ok, status) = serve.cli(&["devices", "show", "dl-1"]);
    assert!(ok && status.contains("succeeded"), "{status}");
    held.abort();
}

/// `name{label="value"} N` of a Prometheus text, 0 when absent.
fn metric(text: &str, name: &str, label: &str) -> u64 {
    let key = format!("{name}{{{label}}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Sum of a counter family over the label values `keep` accepts.
fn metric_sum(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> u64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once("} "))
        .filter(|(labels, _)| keep(labels))
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_bad_inputs_beside_a_download_are_counted_and_barely_logged() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(dir.path(), &[("FWGATE_MQTT__CONNECTION_TIMEOUT_MS", "1000".into())]).await;
    let img = image(256 * KIB, 71);
    let file = dir.path().join("app.bin");
    std::fs::write(&file, &img).unwrap();
    assert!(serve.cli(&["images", "add", file.to_str().unwrap(), "--name", "app", "--version", "2.0.0"]).0);
    assert!(serve.cli(&["devices", "add", "dl-1"]).0);
    assert!(serve.cli(&["devices", "assign", "dl-1", "app@2.0.0"]).0);
    let coap: std::net::SocketAddr = format!("127.0.0.1:{}", serve.coap).parse().unwrap();
    let mqtt: std::net::SocketAddr = format!("127.0.0.1:{}", serve.mqtt).parse().unwrap();
    let download = tokio::spawn(async move {
        let mut dev = DfuDevice::new("dl-1", Form::Packed, "1.0.0");
        dev.mtu = 128; // 2,048 blocks: the download runs all through the flood
        let mut c = CoapClient::connect(coap, ClientConfig::default()).await.unwrap();
        let ended = c.run_dfu(&mut dev, None, &Stats::default()).await;
        (ended, dev.last_image)
    });
    let log_before = std::fs::read_to_string(&serve.log).unwrap().lines().count();
    let mut rng = fastrand::Rng::with_seed(20_000);
    let mut sent = 0;
    // 3,000 connections of TCP garbage (never a CONNECT: the first byte is no packet type).
    for _ in 0..3_000 {
        let mut s = tokio::net::TcpStream::connect(mqtt).await.unwrap();
        let mut junk: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
        junk[0] = 0xf0 | (junk[0] & 0x0f);
        let _ = s.write_all(&junk).await;
        sent += 1;
    }
    // 2,000 CONNECTs declaring 268 MB.
    for _ in 0..2_000 {
        let mut s = tokio::net::TcpStream::connect(mqtt).await.unwrap();
        let _ = s.write_all(&[0x10, 0xff, 0xff, 0xff, 0x7f, 0x00]).await;
        sent += 1;
    }
    // 1,000 half CONNECTs and 1,000 silent sockets, held until the gateway gives up on them.
    let mut held = Vec::new();
    for i in 0..2_000 {
        let mut s = tokio::net::TcpStream::connect(mqtt).await.unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(&[0x10, 0x20, 0x00, 0x04, b'M', b'Q']).await;
        }
        held.push(s);
        sent += 1;
    }
    // 3,000 malformed Statuses, from 1 byte to 1 MiB, from a client that may publish them.
    let (mut client, code) = raw::Raw::connect(mqtt, false, "flooder", None, 0).await;
    assert_eq!(code, "Success");
    for i in 0..3_000 {
        if i % 300 == 0 {
            // A 1 MiB Status is over the payload limit: that connection is closed.
            let (mut big, _) = raw::Raw::connect(mqtt, false, &format!("big-{i}"), None, 0).await;
            big.publish("dfu/flooder/status", vec![0x5a; 1 << 20], 0, 0).await;
        } else {
            let junk: Vec<u8> = (0..rng.usize(1..2048)).map(|_| rng.u8(..)).collect();
            client.publish("dfu/flooder/status", junk, 0, 0).await;
        }
        sent += 1;
    }
    // 10,000 random CoAP datagrams.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..10_000 {
        let d: Vec<u8> = (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect();
        let _ = udp.send_to(&d, coap).await;
        sent += 1;
    }
    assert_eq!(sent, 20_000);

    let (ended, bytes) = download.await.unwrap();
    assert_eq!(ended.expect("the download completes"), Ended::Updated);
    assert!(bytes == img, "the image arrived intact");
    tokio::time::sleep(Duration::from_secs(3)).await; // the held sockets time out
    drop(held);
    let m = reqwest::get(format!("{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&m, "fwgate_bad_input_total", "kind=\"mqtt_malformed\""), 3_000, "TCP garbage");
    // Packets declaring more than the limit: the 2,000 CONNECTs and the ten 1 MiB Statuses.
    assert_eq!(metric(&m, "fwgate_bad_input_total", "kind=\"mqtt_too_large\""), 2_010, "huge remaining lengths");
    assert_eq!(metric(&m, "fwgate_mqtt_disconnects_total", "why=\"half_connect\""), 1_000, "half CONNECTs");
    assert_eq!(metric(&m, "fwgate_mqtt_disconnects_total", "why=\"connect_timeout\""), 1_000, "silent sockets");
    assert_eq!(metric(&m, "fwgate_mqtt_disconnects_total", "why=\"too_large\""), 2_010, "each closed");
    let statuses = metric_sum(&m, "fwgate_bad_input_total", |l| !l.contains("mqtt_"));
    assert!(statuses >= 2_900, "malformed Statuses counted by kind: {statuses}");
    let datagrams = metric_sum(&m, "fwgate_coap_datagrams_total", |_| true);
    assert!(datagrams >= 10_000, "every CoAP datagram counted: {datagrams}");
    let log = std::fs::read_to_string(&serve.log).unwrap();
    let lines = log.lines().count() - log_before;
    eprintln!("20,000 bad inputs: {lines} log lines; {statuses} Statuses refused by kind, {datagrams} datagrams");
    assert!(lines < 100, "{lines} log lines:\n{log}");
}
