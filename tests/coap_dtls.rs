//! Device identity on CoAP: stock libcoap clients (coap-client-openssl, -gnutls, -notls)
//! against a gateway in-process on ephemeral ports, over DTLS with the device's token as its
//! PSK, and on the plain listener with devices required to authenticate or with the Echo
//! amplification limit.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use common::serve::require;
use common::*;
use fwgate::config::Config;
use fwgate::fleet::device_token;
use fwgate::loadgen::device::DfuDevice;
use fwgate::protocol::{Command as DfuCommand, Form};
use serde_json::Value;
use tokio::net::UdpSocket;

const SECRET: &str = "coap-dtls-test-device-secret";
const KIB: usize = 1024;

fn dtls_config(dir: &Path) -> Config {
    let mut c = test_config(dir);
    c.mqtt.auth = true;
    c.mqtt.device_secret = SECRET.into();
    c.coap.dtls_listen = "127.0.0.1:0".into();
    c
}

/// Runs a libcoap client (bounded by `timeout`); returns (stdout + stderr).
async fn coap_client(bin: &'static str, args: Vec<String>) -> String {
    require(bin, "libcoap3-bin");
    tokio::task::spawn_blocking(move || {
        let out = Command::new("timeout").arg("30").arg(bin).args(&args).output().expect("client runs");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn status_file(dir: &Path, name: &str, running: &str) -> String {
    let dev = DfuDevice::new("any", Form::Named, running);
    let path = dir.join(name);
    std::fs::write(&path, dev.status_bytes()).unwrap();
    path.display().to_string()
}

/// A device's record without what a read changes by itself.
async fn record(gw: &TestGateway, id: &str) -> Value {
    device_state(&gw.admin, id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_clients_download_and_post_status_over_coaps_as_their_own_device_only() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dtls_config(dir.path())).await;
    let dtls = gw.gw().coap_dtls.expect("dtls listening");
    let img = image(40 * KIB + 123, 41);
    setup(&gw, &img, &["dev-a", "dev-b"]).await;
    let (key_a, key_b) = (device_token(SECRET, "dev-a"), device_token(SECRET, "dev-b"));
    let base = format!("coaps://{dtls}");

    for (bin, block) in [
        ("coap-client-openssl", "64"),
        ("coap-client-openssl", "512"),
        ("coap-client-openssl", "1024"),
        ("coap-client-gnutls", "1024"),
    ] {
        let out = dir.path().join(format!("{bin}-{block}.bin"));
        let o = out.display().to_string();
        let log =
            coap_client(bin, args(&["-u", "dev-a", "-k", &key_a, "-b", block, "-o", &o, &format!("{base}/fw/dev-a")]))
                .await;
        let got = std::fs::read(&out).unwrap_or_else(|_| panic!("{bin} -b {block} wrote nothing: {log}"));
        assert!(got == img, "{bin} -b {block}: {} bytes, not the image's {}: {log}", got.len(), img.len());
    }
    assert!(gw.gw().telemetry.dtls_count("handshake_ok") >= 4);

    // A Status over coaps gets a Command, and is recorded as dev-a's.
    let status = status_file(dir.path(), "status-a.cbor", "1.0.0");
    let reply = dir.path().join("reply.cbor");
    let r = reply.display().to_string();
    let log = coap_client(
        "coap-client-openssl",
        args(&[
            "-u",
            "dev-a",
            "-k",
            &key_a,
            "-m",
            "post",
            "-t",
            "60",
            "-f",
            &status,
            "-o",
            &r,
            &format!("{base}/dfu/dev-a"),
        ]),
    )
    .await;
    let bytes = std::fs::read(&reply).unwrap_or_else(|_| panic!("no Command came back: {log}"));
    let (cmd, _) = DfuCommand::decode(&bytes).expect("the answer is a DFU Command");
    assert!(matches!(cmd, DfuCommand::Write { offset: 0, .. }), "{cmd:?}");
    assert_eq!(record(&gw, "dev-a").await["running"]["main"], "1.0.0");

    // The wrong key: no session, nothing served.
    let ok_before = gw.gw().telemetry.dtls_count("handshake_ok");
    let wrong = dir.path().join("wrong.bin");
    let w = wrong.display().to_string();
    coap_client("coap-client-openssl", args(&["-u", "dev-a", "-k", &key_b, "-o", &w, &format!("{base}/fw/dev-a")]))
        .await;
    assert!(std::fs::read(&wrong).map_or(true, |b| b.is_empty()), "a wrong key got bytes");
    assert_eq!(gw.gw().telemetry.dtls_count("handshake_ok"), ok_before, "a wrong key established a session");

    // dev-a's credentials for dev-b's resources: 4.03, and dev-b's record does not move.
    let b_before = record(&gw, "dev-b").await;
    let log =
        coap_client("coap-client-openssl", args(&["-u", "dev-a", "-k", &key_a, &format!("{base}/fw/dev-b")])).await;
    assert!(log.contains("4.03"), "{log}");
    let forged = status_file(dir.path(), "status-forged.cbor", "6.6.6");
    let log = coap_client(
        "coap-client-openssl",
        args(&["-u", "dev-a", "-k", &key_a, "-m", "post", "-t", "60", "-f", &forged, &format!("{base}/dfu/dev-b")]),
    )
    .await;
    assert!(log.contains("4.03"), "{log}");
    assert_eq!(record(&gw, "dev-b").await, b_before, "dev-b changed through dev-a's session");
    assert_eq!(gw.gw().telemetry.coap_count("forbidden"), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_refuses_device_resources_when_devices_must_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(dtls_config(dir.path())).await;
    let img = image(8 * KIB, 42);
    setup(&gw, &img, &["dev-a"]).await;
    let before = record(&gw, "dev-a").await;
    let base = format!("coap://{}", gw.coap());

    let log = coap_client("coap-client-notls", args(&["-b", "1024", &format!("{base}/fw/dev-a")])).await;
    assert!(log.contains("4.01"), "{log}");
    let forged = status_file(dir.path(), "forged.cbor", "6.6.6");
    let log = coap_client(
        "coap-client-notls",
        args(&["-m", "post", "-t", "60", "-f", &forged, &format!("{base}/dfu/dev-a")]),
    )
    .await;
    assert!(log.contains("4.01"), "{log}");
    assert_eq!(record(&gw, "dev-a").await, before, "a stranger's Status changed the device");
    assert_eq!(gw.gw().telemetry.coap_count("unauthorized"), 2);
    gw.stop().await;
}

/// One request of the amplification probe, as bytes.
fn probe_request(kind: usize, mid: u16, status: &[u8]) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.message_id = mid;
    p.set_token(vec![(mid >> 8) as u8, mid as u8]);
    let (method, path) =
        if kind == 0 { (RequestType::Get, ["fw", "dev-a"]) } else { (RequestType::Post, ["dfu", "dev-a"]) };
    p.header.code = MessageClass::Request(method);
    for seg in path {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    if kind == 0 {
        // Block 0..40 of 1024 bytes.
        p.add_option(CoapOption::Block2, fwgate::protocol::coap::uint(((mid as u32 % 40) << 4) | 6));
    } else {
        p.payload = status.to_vec();
    }
    p.to_bytes().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_an_unverified_address_stay_within_three_times_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(40 * KIB, 43);
    setup(&gw, &img, &["dev-a"]).await;
    // A Status asking for the largest block there is.
    let mut dev = DfuDevice::new("dev-a", Form::Packed, "1.0.0");
    dev.mtu = u32::MAX;
    let status = dev.status_bytes();

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(gw.coap()).await.unwrap();
    let (mut sent, mut answered, mut answers) = (0usize, 0usize, 0usize);
    let mut buf = vec![0u8; 4096];
    let mut last: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    for i in 0..10_000u32 {
        // GET, POST, then a duplicate of each (the same message id and token).
        let kind = (i % 2) as usize;
        let d = if i % 4 < 2 {
            last[kind] = probe_request(kind, i as u16, &status);
            last[kind].clone()
        } else {
            last[kind].clone()
        };
        sock.send(&d).await.unwrap();
        sent += d.len();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
            answered += n;
            answers += 1;
        }
    }
    eprintln!("amplification probe: {answered} bytes answered ({answers} datagrams) to {sent} bytes sent");
    assert!(answers >= 9_990, "the gateway answered only {answers} of 10,000");
    assert!(answered <= 3 * sent, "answered {answered} bytes to {sent} from an unverified address");
    assert!(gw.gw().telemetry.coap_count("echo") > 0, "large answers were replaced by Echo challenges");

    // A stock client answers the challenge by itself and gets the whole image.
    let out = dir.path().join("notls.bin");
    let o = out.display().to_string();
    let log =
        coap_client("coap-client-notls", args(&["-b", "1024", "-o", &o, &format!("coap://{}/fw/dev-a", gw.coap())]))
            .await;
    assert!(std::fs::read(&out).is_ok_and(|b| b == img), "coap-client-notls did not get the image: {log}");
    gw.stop().await;
}

/// A UDP socket as OpenSSL's DTLS client sees it, which loses every datagram the client sends
/// after its first `pass`, and keeps the handshake message type of each datagram it receives.
struct Lossy {
    sock: std::net::UdpSocket,
    pass: usize,
    sent: usize,
    received: Vec<u8>,
}

impl std::io::Read for Lossy {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.recv(buf)?;
        // Record header (13 bytes), then the handshake message type.
        self.received.push(if n > 13 && buf[0] == 22 { buf[13] } else { 0 });
        Ok(n)
    }
}

impl std::io::Write for Lossy {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent += 1;
        if self.sent <= self.pass {
            self.sock.send(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a PSK handshake whose client flights after the two ClientHellos are lost; the
/// handshake message types the client received.
fn silent_after_hello(server: std::net::SocketAddr, key: &str) -> Vec<u8> {
    use openssl::ssl::{Ssl, SslContextBuilder, SslMethod, SslStream, SslVersion};
    let mut b = SslContextBuilder::new(SslMethod::dtls()).unwrap();
    b.set_min_proto_version(Some(SslVersion::DTLS1_2)).unwrap();
    b.set_cipher_list("PSK-AES128-CCM8").unwrap();
    let key = key.as_bytes().to_vec();
    b.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
        identity[..6].copy_from_slice(b"dev-a\0");
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ssl = Ssl::new(&b.build()).unwrap();
    ssl.set_mtu(1280).unwrap();
    let mut s = SslStream::new(ssl, Lossy { sock, pass: 2, sent: 0, received: Vec::new() }).unwrap();
    assert!(s.connect().is_err(), "a handshake completed although the client's flight was lost");
    std::mem::take(&mut s.get_mut().received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_whose_client_falls_silent_is_sent_again_then_expires_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = dtls_config(dir.path());
    c.coap.dtls_handshake_timeout_secs = 3;
    let gw = TestGateway::start(c).await;
    let dtls = gw.gw().coap_dtls.expect("dtls listening");
    let img = image(8 * KIB, 44);
    setup(&gw, &img, &["dev-a"]).await;
    let key = device_token(SECRET, "dev-a");

    // HelloVerifyRequest (3), then the server's flight (ServerHello, 2, first): when no answer
    // comes, the server's retransmission timer sends that flight again.
    let k = key.clone();
    let received = tokio::task::spawn_blocking(move || silent_after_hello(dtls, &k)).await.unwrap();
    assert_eq!(received.first(), Some(&3), "no HelloVerifyRequest first: {received:?}");
    let server_hellos = received.iter().filter(|t| **t == 2).count();
    assert!(server_hellos >= 2, "the server's flight was not sent again: {received:?}");
    assert!(gw.gw().telemetry.dtls_count("expired_handshake") >= 1, "the silent handshake did not expire");

    // The gateway still serves.
    let out = dir.path().join("after.bin");
    let o = out.display().to_string();
    let log = coap_client(
        "coap-client-openssl",
        args(&["-u", "dev-a", "-k", &key, "-o", &o, &format!("coaps://{dtls}/fw/dev-a")]),
    )
    .await;
    assert!(std::fs::read(&out).is_ok_and(|b| b == img), "no download after the silent handshake: {log}");
    gw.stop().await;
}
