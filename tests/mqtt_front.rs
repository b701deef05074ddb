//! fwgate's own MQTT listener, against real clients (mosquitto_pub/sub, Paho for Python,
//! rumqttc) and against clients that misbehave on purpose: both protocol versions on one port,
//! per-device isolation, TLS with device certificates, bounded connections.

mod common;

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::time::Duration;

use common::raw::{Flash, Got, Next, Raw};
use common::serve::require;
use common::*;
use fwgate::protocol::Form;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::AsyncBufReadExt;

const KIB: usize = 1024;
const SECRET: &str = "a-long-enough-test-secret";

async fn token(gw: &TestGateway, id: &str) -> String {
    let (status, v) = admin(&gw.admin, reqwest::Method::POST, &format!("/api/v1/devices/{id}/token"), None, None).await;
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

/// Registers `ids` and assigns each `app@2.0.0` (an image of `len` bytes).
async fn fleet(gw: &TestGateway, ids: &[&str], len: usize) -> Vec<u8> {
    let img = image(len, 11);
    add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    for id in ids {
        add_device(&gw.admin, id).await;
        assign(&gw.admin, id, "app@2.0.0").await;
    }
    img
}

fn auth_config(dir: &std::path::Path) -> fwgate::config::Config {
    let mut c = test_config(dir);
    c.mqtt.auth = true;
    c.mqtt.device_secret = SECRET.into();
    c
}

/// Downloads with mosquitto_sub (one long-running subscriber printing each Command as hex)
/// and mosquitto_pub (one process per Status): two connections, as in the README.
async fn mosquitto_download(flash: &mut Flash, version: &str, conn: &[String]) -> Next {
    let topic_cmd = format!("dfu/{}/command", flash.id);
    let topic_status = format!("dfu/{}/status", flash.id);
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args(conn)
        .args(["-V", version, "-q", "1", "-t", &topic_cmd, "-F", "%x", "-i", &format!("{}-sub", flash.id)])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub runs");
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    let pub_id = format!("{}-pub", flash.id);
    let publish = |payload: Vec<u8>| {
        let mut args = conn.to_vec();
        args.extend(["-V", version, "-q", "1", "-t", &topic_status, "-s", "-i", &pub_id].map(String::from));
        async move {
            let mut p = tokio::process::Command::new("mosquitto_pub")
                .args(&args)
                .stdin(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("mosquitto_pub runs");
            use tokio::io::AsyncWriteExt;
            let mut stdin = p.stdin.take().unwrap();
            stdin.write_all(&payload).await.unwrap();
            drop(stdin);
            let status = p.wait().await.unwrap();
            assert!(status.success(), "mosquitto_pub {args:?}: {status}");
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = Next::More;
    // The subscriber may not be subscribed yet when the first Status goes out: ask again
    // until the first answer comes (a Status is idempotent).
    let mut pending = 0u32;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{}: the download did not end in time", flash.id);
        if pending == 0 {
            if last == Next::Synced {
                return last;
            }
            publish(flash.status()).await;
            pending = flash.window;
        }
        match tokio::time::timeout(Duration::from_millis(700), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                last = flash.apply(&hex::decode(line.trim()).expect("hex"));
                pending = match last {
                    Next::More => pending - 1,
                    _ => 0,
                };
            }
            Ok(_) => panic!("mosquitto_sub ended"),
            // A window shorter than asked (the image's end), or the first Status unheard.
            Err(_) => pending = 0,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_download_over_311_and_5_on_one_port() {
    require("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = fleet(&gw, &["mosq-311", "mosq-5"], 16 * KIB).await;
    let port = gw.mqtt.port().to_string();
    let conn = vec!["-h".into(), "127.0.0.1".into(), "-p".into(), port];
    for (id, version) in [("mosq-311", "mqttv311"), ("mosq-5", "mqttv5")] {
        let mut flash = Flash::new(id, "1.0.0", 1024, 4);
        assert_eq!(mosquitto_download(&mut flash, version, &conn).await, Next::Synced, "{id}");
        assert_eq!(flash.running, "2.0.0");
        assert_eq!(flash.blocks, img.len() / 1024, "{id}: every block once");
        let v = device_state(&gw.admin, id).await;
        assert_eq!(v["operations"][0]["state"], "succeeded", "{v}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_downloads_over_311_and_5() {
    let python = std::env::var("FWGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(auth_config(dir.path())).await;
    let img = fleet(&gw, &["paho-311", "paho-5"], 16 * KIB).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mqtt/paho_device.py");
    for (id, protocol) in [("paho-311", "3.1.1"), ("paho-5", "5")] {
        let password = token(&gw, id).await;
        let out = tokio::process::Command::new(&python)
            .arg(&script)
            .args(["--port", &gw.mqtt.port().to_string(), "--device", id, "--running", "1.0.0"])
            .args(["--protocol", protocol, "--password", &password, "--mtu", "1024", "--window", "4"])
            .output()
            .await
            .expect("python runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("No module named"),
            "{python} lacks paho-mqtt or cbor2 (.ci/run installs them in its venv and sets FWGATE_PYTHON): {stderr}"
        );
        assert!(out.status.success(), "{id}: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        assert_eq!(v["running"], "2.0.0", "{v}");
        assert_eq!(v["blocks"], img.len() / 1024);
        assert_eq!(v["sha256"], hex::encode(sha2::Sha256::digest(&img)));
        assert_eq!(device_state(&gw.admin, id).await["operations"][0]["state"], "succeeded");
    }
    gw.stop().await;
}

use sha2::Digest;

/// Device A, authenticated, tries everything that would let it act as or listen to B; B
/// downloads meanwhile, undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_acts_only_as_itself_with_both_protocol_versions() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(auth_config(dir.path())).await;
    fleet(&gw, &["dev-a", "dev-b"], 64 * KIB).await;
    let (ta, tb) = (token(&gw, "dev-a").await, token(&gw, "dev-b").await);
    let t = gw.gw().telemetry.clone();
    for v5 in [false, true] {
        let (mut a, code) = Raw::connect(gw.mqtt, v5, "dev-a", Some(&ta), 30).await;
        assert_eq!(code, "Success");
        // Subscriptions: only its own command topic.
        let filters = ["dfu/dev-b/command", "dfu/+/command", "dfu/#", "#", "dfu/dev-a/command"];
        for (i, f) in filters.iter().enumerate() {
            a.subscribe(i as u16 + 1, f, 1).await;
        }
        let mut codes = Vec::new();
        for _ in filters {
            match a.recv(Duration::from_secs(5)).await {
                Some(Got::V4(v4::Packet::SubAck(s))) => codes.push(format!("{:?}", s.return_codes[0])),
                Some(Got::V5(v5::Packet::SubAck(s))) => codes.push(format!("{:?}", s.return_codes[0])),
                other => panic!("expected a SUBACK, got {other:?}"),
            }
        }
        let refused = if v5 { "NotAuthorized" } else { "Failure" };
        assert_eq!(codes, [refused, refused, refused, refused, "Success(AtLeastOnce)"], "v5={v5}");

        // B downloads half its image while A listens: none of B's blocks reach A.
        let running = if v5 { "2.0.0" } else { "1.0.0" };
        let mut b = SimDevice::connect(gw.mqtt, "dev-b", Form::Named, running, Some(&tb)).await;
        assert!(matches!(b.run(Some(16 * KIB as u32)).await, Ended::Paused(_)));
        let before = device_state(&gw.admin, "dev-b").await["operations"][0].clone();
        assert!(a.recv(Duration::from_millis(300)).await.is_none(), "A hears nothing of B");

        // A publishes a Status as B: refused, and B's operation does not move.
        let forged = Flash::new("dev-b", "2.0.0", 512, 1).status();
        if v5 {
            a.publish("dfu/dev-b/status", forged.clone(), 1, 7).await;
            match a.recv(Duration::from_secs(5)).await {
                Some(Got::V5(v5::Packet::PubAck(p))) => {
                    assert_eq!((p.pkid, format!("{:?}", p.reason)), (7, "NotAuthorized".into()))
                }
                other => panic!("expected a PUBACK 0x87, got {other:?}"),
            }
            a.publish("dfu/dev-b/status", forged, 0, 0).await;
            let (closed, seen) = a.closed(Duration::from_secs(5)).await;
            assert!(closed, "QoS 0 as another device closes the connection");
            assert!(
                matches!(seen.last(), Some(Got::V5(v5::Packet::Disconnect(d))) if format!("{:?}", d.reason_code) == "NotAuthorized"),
                "with a DISCONNECT 0x87 first: {seen:?}"
            );
        } else {
            a.publish("dfu/dev-b/status", forged, 1, 7).await;
            let (closed, seen) = a.closed(Duration::from_secs(5)).await;
            assert!(closed && seen.is_empty(), "MQTT 3.1.1 has no refusal code: the connection closes ({seen:?})");
        }
        let after = device_state(&gw.admin, "dev-b").await["operations"][0].clone();
        assert_eq!(before, after, "B's operation is unchanged");
        assert_eq!(b.run(None).await, Ended::Updated, "B finishes");
        b.disconnect().await;
        // A new version for B, for the other protocol version.
        if !v5 {
            add_image(&gw.admin, "app", "3.0.0", image(64 * KIB, 12)).await;
            assign(&gw.admin, "dev-b", "app@3.0.0").await;
        }

        // CONNECT: an unknown device, a wrong token, another device's token, no token, no id.
        for (id, pw, want4, want5) in [
            ("", Some(ta.as_str()), "BadClientId", "ClientIdentifierNotValid"),
            ("stranger", Some(ta.as_str()), "NotAuthorized", "NotAuthorized"),
            ("dev-a", Some("00ff"), "BadUserNamePassword", "BadUserNamePassword"),
            ("dev-a", Some(tb.as_str()), "BadUserNamePassword", "BadUserNamePassword"),
            ("dev-a", None, "BadUserNamePassword", "BadUserNamePassword"),
        ] {
            let (mut r, code) = Raw::connect(gw.mqtt, v5, id, pw, 30).await;
            assert_eq!(code, if v5 { want5 } else { want4 }, "{id} v5={v5}");
            assert!(r.closed(Duration::from_secs(5)).await.0, "a refused CONNECT closes");
        }
    }
    for (reason, n) in [
        ("identifier_rejected", 2),
        ("subscribe_not_authorized", 8),
        ("publish_not_authorized", 3),
        ("not_authorized", 2),
        ("bad_credentials", 6),
    ] {
        assert_eq!(t.mqtt_refused_count(reason), n, "{reason}");
    }
    let metrics = t.render();
    assert!(metrics.contains("fwgate_mqtt_refused_total{reason=\"publish_not_authorized\"} 3"), "{metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_basics_for_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.mqtt.max_connections = 3;
    config.mqtt.connection_timeout_ms = 500;
    let gw = TestGateway::start(config).await;
    fleet(&gw, &["p-1"], 2 * KIB).await;
    let t = gw.gw().telemetry.clone();

    // A protocol level other than 4 and 5 gets 0x01 and the connection closes.
    let mut r = Raw::open(gw.mqtt, false).await;
    r.send_bytes(&[0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 30, 0, 0]).await;
    match r.recv(Duration::from_secs(5)).await {
        Some(Got::V4(v4::Packet::ConnAck(a))) => assert_eq!(format!("{:?}", a.code), "RefusedProtocolVersion"),
        other => panic!("{other:?}"),
    }
    assert!(r.closed(Duration::from_secs(5)).await.0);
    // An empty client id, without auth: the gateway names the client (MQTT 5 is told the
    // name in the CONNACK, as mosquitto_pub -V 5 without -i expects).
    let (_, code) = Raw::connect(gw.mqtt, false, "", None, 30).await;
    assert_eq!(code, "Success");
    let mut r = Raw::open(gw.mqtt, true).await;
    r.send_connect("", None, 30).await;
    match r.recv(Duration::from_secs(5)).await {
        Some(Got::V5(v5::Packet::ConnAck(a))) => {
            let id = a.properties.and_then(|p| p.assigned_client_identifier).expect("an assigned client id");
            assert!(id.starts_with("fwgate-"), "{id}");
        }
        other => panic!("{other:?}"),
    }
    drop(r);
    // No CONNECT within the time limit: closed.
    let mut silent = Raw::open(gw.mqtt, false).await;
    assert!(silent.closed(Duration::from_secs(5)).await.0, "connect timeout");

    for v5 in [false, true] {
        let (mut c, code) = Raw::connect(gw.mqtt, v5, "p-1", None, 30).await;
        assert_eq!(code, "Success");
        c.ping().await;
        assert!(matches!(
            c.recv(Duration::from_secs(5)).await,
            Some(Got::V4(v4::Packet::PingResp) | Got::V5(v5::Packet::PingResp(_)))
        ));
        // QoS 2 asked, QoS 1 granted.
        c.subscribe(3, "dfu/p-1/command", 2).await;
        match c.recv(Duration::from_secs(5)).await {
            Some(Got::V4(v4::Packet::SubAck(s))) => {
                assert_eq!(format!("{:?}", s.return_codes), "[Success(AtLeastOnce)]")
            }
            Some(Got::V5(v5::Packet::SubAck(s))) => {
                assert_eq!(format!("{:?}", s.return_codes), "[Success(AtLeastOnce)]")
            }
            other => panic!("{other:?}"),
        }
        // A QoS 1 Status: PUBACK first, then the answer at QoS 1 with a packet id.
        let flash = Flash::new("p-1", "1.0.0", 512, 1);
        c.publish("dfu/p-1/status", flash.status(), 1, 9).await;
        let (ack, answer) = (c.recv(Duration::from_secs(5)).await, c.recv(Duration::from_secs(5)).await);
        let pkid = match (ack, answer) {
            (Some(Got::V4(v4::Packet::PubAck(a))), Some(Got::V4(v4::Packet::Publish(p)))) => {
                assert_eq!((a.pkid, p.topic.as_str(), p.qos), (9, "dfu/p-1/command", rumqttc::QoS::AtLeastOnce));
                p.pkid
            }
            (Some(Got::V5(v5::Packet::PubAck(a))), Some(Got::V5(v5::Packet::Publish(p)))) => {
                assert_eq!((a.pkid, &p.topic[..], p.qos as u8), (9, &b"dfu/p-1/command"[..], 1));
                p.pkid
            }
            other => panic!("{other:?}"),
        };
        assert_ne!(pkid, 0);
        c.puback(pkid).await;
        // UNSUBSCRIBE: nothing comes any more.
        let mut out = bytes::BytesMut::new();
        if v5 {
            v5::Unsubscribe { pkid: 4, filters: vec!["dfu/p-1/command".into()], properties: None }
                .write(&mut out)
                .unwrap();
        } else {
            let mut u = v4::Unsubscribe::new("dfu/p-1/command");
            u.pkid = 4;
            u.write(&mut out).unwrap();
        }
        c.send_bytes(&out).await;
        assert!(matches!(
            c.recv(Duration::from_secs(5)).await,
            Some(Got::V4(v4::Packet::UnsubAck(_)) | Got::V5(v5::Packet::UnsubAck(_)))
        ));
        c.publish("dfu/p-1/status", flash.status(), 0, 0).await;
        assert!(c.recv(Duration::from_millis(300)).await.is_none(), "no subscriber, no answer");
        // A clean DISCONNECT.
        c.send_bytes(&[0xE0, 0x00]).await;
        assert!(c.closed(Duration::from_secs(5)).await.0);
    }

    // At max_connections (3), the next CONNECT is told the server is busy (once the sessions
    // above are gone).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !t.render().contains("fwgate_connected_devices 0\n") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut held = Vec::new();
    for i in 0..3 {
        let (c, code) = Raw::connect(gw.mqtt, false, &format!("held-{i}"), None, 30).await;
        assert_eq!(code, "Success");
        held.push(c);
    }
    let (_, code) = Raw::connect(gw.mqtt, false, "one-too-many", None, 30).await;
    assert_eq!(code, "ServiceUnavailable");
    let (_, code) = Raw::connect(gw.mqtt, true, "one-too-many", None, 30).await;
    assert_eq!(code, "ServerBusy");
    assert_eq!(t.mqtt_refused_count("server_busy"), 2);
    assert!(t.mqtt_closed_count("connect_timeout") >= 1);
    assert_eq!(t.mqtt_refused_count("protocol_version"), 1);
    gw.stop().await;
}

/// A download runs while clients misbehave in every way the issue lists; it completes, each
/// misbehaviour is counted, and the gateway holds nothing for them afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_do_not_disturb_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.mqtt.connection_timeout_ms = 1000;
    config.mqtt.write_timeout_ms = 1000;
    config.dfu.max_window = 16;
    let gw = TestGateway::start(config).await;
    let img = fleet(&gw, &["good", "sloth", "twin"], 256 * KIB).await;
    let t = gw.gw().telemetry.clone();
    let mqtt = gw.mqtt;

    let download = tokio::spawn(async move {
        let mut good = SimDevice::connect(mqtt, "good", Form::Packed, "1.0.0", None).await;
        let ended = good.run(None).await;
        (ended, good.last_image.clone())
    });

    // Garbage bytes instead of a CONNECT.
    let mut g = Raw::open(mqtt, false).await;
    g.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(g.closed(Duration::from_secs(5)).await.0, "garbage closes");
    // Half a packet, then silence: closed at the connect timeout.
    let mut half = Raw::open(mqtt, false).await;
    half.send_bytes(&[0x10, 0x20, 0, 4, b'M', b'Q']).await;
    // A remaining length far over the limit: refused before anything is buffered.
    let (mut big, code) = Raw::connect(mqtt, true, "big", None, 30).await;
    assert_eq!(code, "Success");
    big.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    let (closed, seen) = big.closed(Duration::from_secs(5)).await;
    assert!(closed, "an oversized remaining length closes");
    assert!(
        matches!(seen.last(), Some(Got::V5(v5::Packet::Disconnect(d))) if format!("{:?}", d.reason_code) == "PacketTooLarge"),
        "{seen:?}"
    );
    // 1,000 connections that never send CONNECT.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(mqtt).await.unwrap());
    }
    // A keep-alive of 1 s, then silence: closed after 1.5 s.
    let (mut lapse, code) = Raw::connect(mqtt, true, "lapse", None, 1).await;
    assert_eq!(code, "Success");
    let (closed, seen) = lapse.closed(Duration::from_secs(5)).await;
    assert!(closed, "keep-alive lapse closes");
    assert!(
        matches!(seen.last(), Some(Got::V5(v5::Packet::Disconnect(d))) if format!("{:?}", d.reason_code) == "KeepAliveTimeout"),
        "{seen:?}"
    );
    // A client-id takeover: the first connection is closed, with 0x8E for MQTT 5.
    let (mut first, _) = Raw::connect(mqtt, true, "twin", None, 30).await;
    let (mut second, code) = Raw::connect(mqtt, false, "twin", None, 30).await;
    assert_eq!(code, "Success");
    let (closed, seen) = first.closed(Duration::from_secs(5)).await;
    assert!(closed, "the older connection is closed");
    assert!(
        matches!(seen.last(), Some(Got::V5(v5::Packet::Disconnect(d))) if format!("{:?}", d.reason_code) == "SessionTakenOver"),
        "{seen:?}"
    );
    second.ping().await;
    assert!(
        matches!(second.recv(Duration::from_secs(5)).await, Some(Got::V4(v4::Packet::PingResp))),
        "the new one serves"
    );

    // A client that asks for blocks and never reads them: its socket fills, the write times
    // out, it is disconnected.
    let (mut sloth, _) = Raw::connect(mqtt, false, "sloth", None, 30).await;
    sloth.subscribe(1, "dfu/sloth/command", 0).await;
    let mut flash = Flash::new("sloth", "1.0.0", 1024, 16);
    flash.form = Form::Packed;
    let status = flash.status();
    let mut closed = false;
    for _ in 0..2000 {
        use tokio::io::AsyncWriteExt;
        let mut out = bytes::BytesMut::new();
        let mut p = v4::Publish::new("dfu/sloth/status", rumqttc::QoS::AtMostOnce, status.clone());
        p.pkid = 0;
        p.write(&mut out).unwrap();
        // Once the gateway stops reading this client (its own write is stuck), our writes
        // stall too: give each a moment, then go on asking.
        let _ = tokio::time::timeout(Duration::from_millis(50), sloth.s.write_all(&out)).await;
        if t.mqtt_closed_count("slow_reader") > 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(closed, "a client that never reads is disconnected");

    let (ended, got) = download.await.unwrap();
    assert_eq!(ended, Ended::Updated, "the download beside them completes");
    assert_eq!(got, img);

    // The 1,000 silent sockets and the half packet are closed at the connect timeout, each
    // counted as what it was.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let timed_out = || t.mqtt_closed_count("connect_timeout") + t.mqtt_closed_count("half_connect");
    while timed_out() < 1001 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.mqtt_closed_count("connect_timeout"), 1000);
    assert_eq!(t.mqtt_closed_count("half_connect"), 1);
    drop(idle);
    assert!(t.mqtt_closed_count("malformed") >= 1);
    assert_eq!(t.mqtt_closed_count("too_large"), 1);
    assert_eq!(t.mqtt_closed_count("keep_alive"), 1);
    assert_eq!(t.mqtt_closed_count("taken_over"), 1);
    gw.stop().await;
}

/// Writes PEM files of a CA, a server certificate for 127.0.0.1, and device certificates.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert, key, p)
        };
        let (ca_cert, ca_key, ca_params) = ca("fwgate test CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        write("ca.pem", ca_cert.pem());
        let (other_cert, other_key, other_params) = ca("another CA");
        let other = rcgen::Issuer::new(other_params, other_key);
        write("other-ca.pem", other_cert.pem());
        let leaf = |name: &str, cn: &str, sans: Vec<String>, by: &rcgen::Issuer<'_, KeyPair>, expired: bool| {
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, by).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        leaf("server", "fwgate", vec!["127.0.0.1".into(), "localhost".into()], &issuer, false);
        leaf("dev-tls", "dev-tls", vec![], &issuer, false);
        leaf("stranger", "dev-tls", vec![], &other, false);
        leaf("expired", "dev-tls", vec![], &issuer, true);
        Pki { dir }
    }
}

fn mosquitto_pub_ok(port: u16, pki: &Pki, id: &str, cert: &str) -> (bool, String) {
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", id, "-t", &format!("dfu/{id}/status")])
        .args(["-m", "x", "-q", "1", "--cafile", &pki.path("ca.pem")])
        .args(["--cert", &pki.path(&format!("{cert}.pem")), "--key", &pki.path(&format!("{cert}.key"))])
        .output()
        .expect("mosquitto_pub runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_device_certificates() {
    require("mosquitto_pub", "mosquitto-clients");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = auth_config(dir.path());
    config.mqtt.tls_listen = "127.0.0.1:0".into();
    config.mqtt.tls_cert = pki.path("server.pem").into();
    config.mqtt.tls_key = pki.path("server.key").into();
    config.mqtt.tls_client_ca = pki.path("ca.pem").into();
    let gw = TestGateway::start(config).await;
    let tls: SocketAddr = gw.gw().mqtt.unwrap().tls.expect("tls listener");
    // 7,777 bytes in 1,000-byte blocks: no offset's CBOR has a zero byte (see below).
    let img = fleet(&gw, &["dev-tls"], 7777).await;
    let t = gw.gw().telemetry.clone();

    // Refused: a certificate from another CA, an expired one, a client id other than the CN.
    let (ok, err) = mosquitto_pub_ok(tls.port(), &pki, "dev-tls", "stranger");
    assert!(!ok, "another CA's certificate: {err}");
    let (ok, err) = mosquitto_pub_ok(tls.port(), &pki, "dev-tls", "expired");
    assert!(!ok, "an expired certificate: {err}");
    let (ok, err) = mosquitto_pub_ok(tls.port(), &pki, "dev-other", "dev-tls");
    assert!(!ok, "a client id that is not the certificate's CN: {err}");
    assert!(t.mqtt_refused_count("tls_handshake") >= 2, "{}", t.render());
    assert_eq!(t.mqtt_refused_count("not_authorized"), 1);

    // The device downloads over TLS, authenticated by its certificate alone: mosquitto_rr
    // publishes each Status and waits for the answer on one connection, whose client id must
    // be the CN (so mosquitto_sub and mosquitto_pub, two connections, would take over each
    // other). mosquitto_rr 2.0.11 sends only `-m` payloads (it ignores -f and -s), and an
    // argument cannot hold a zero byte: the block size and image length keep them out.
    let mut flash = Flash::new("dev-tls", "1.0.0", 1000, 1);
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 50, "the download over TLS did not end");
        let status = flash.status();
        assert!(!status.contains(&0), "a Status without zero bytes: {status:02x?}");
        let out = tokio::process::Command::new("mosquitto_rr")
            .args(["-h", "127.0.0.1", "-p", &tls.port().to_string(), "-i", "dev-tls", "-q", "1", "-W", "10"])
            .args(["-t", "dfu/dev-tls/status", "-e", "dfu/dev-tls/command", "-F", "%x", "-m"])
            .arg(std::ffi::OsStr::from_bytes(&status))
            .args([
                "--cafile",
                &pki.path("ca.pem"),
                "--cert",
                &pki.path("dev-tls.pem"),
                "--key",
                &pki.path("dev-tls.key"),
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .expect("mosquitto_rr runs");
        assert!(out.status.success(), "mosquitto_rr: {}", out.status);
        let line = String::from_utf8(out.stdout).unwrap();
        if flash.apply(&hex::decode(line.trim()).expect("hex")) == Next::Synced {
            break;
        }
    }
    assert_eq!(flash.running, "2.0.0");
    assert_eq!(flash.blocks, img.len().div_ceil(1000));
    assert_eq!(device_state(&gw.admin, "dev-tls").await["operations"][0]["state"], "succeeded");
    gw.stop().await;
}
