//! The CoAP data plane end to end: a gateway in-process on ephemeral ports with RocksDB in a
//! temp dir, and devices simulated with coap-lite over tokio UDP sockets (`loadgen::coap`).

mod common;

use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, RequestType};
use common::*;
use fwgate::loadgen::coap::{ClientConfig, ClientError, CoapClient};
use fwgate::loadgen::stats::Stats;
use fwgate::protocol::{Command, Form};
use sha2::{Digest, Sha256};

const KIB: usize = 1024;

static NO_STATS: std::sync::LazyLock<Stats> = std::sync::LazyLock::new(Stats::default);

/// A client that gives up well within a test's patience.
fn quick() -> ClientConfig {
    ClientConfig { ack_timeout: Duration::from_millis(500), max_retransmit: 4, ..ClientConfig::default() }
}

async fn client(gw: &TestGateway) -> CoapClient {
    CoapClient::connect(gw.coap(), quick()).await.expect("udp socket")
}

async fn op_state(gw: &TestGateway, id: &str) -> String {
    device_state(&gw.admin, id).await["operations"][0]["state"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_and_packed_devices_update_over_post_dfu() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(256 * KIB, 21);
    setup(&gw, &img, &["co-named", "co-packed"]).await;
    let sha: [u8; 32] = Sha256::digest(&img).into();

    for (id, form) in [("co-named", Form::Named), ("co-packed", Form::Packed)] {
        let mut dev = DfuDevice::new(id, form, "1.0.0");
        // A window is an MQTT feature: over CoAP each Status gets exactly one WRITE.
        dev.window = Some(8);
        let ended = client(&gw).await.run_dfu(&mut dev, None, &NO_STATS).await.expect("the download completes");
        assert_eq!(ended, Ended::Updated, "{id}");
        assert_eq!(dev.last_image, img, "{id} assembled the image byte for byte");
        assert_eq!(dev.swaps, [sha], "{id}: one SWAP, with the image's sha256");
        assert_eq!(dev.offsets.len(), 512, "{id}: 256 KiB in 512-byte blocks, each sent once");
        let v = device_state(&gw.admin, id).await;
        assert_eq!(v["operations"][0]["state"], "succeeded", "{v}");
        assert_eq!(v["running"]["main"], "2.0.0");
    }
    let metrics = gw.gw().telemetry.render();
    assert!(metrics.contains("fwgate_blocks_served_total{transport=\"coap\"} 1024"), "{metrics}");
    assert!(metrics.contains(&format!("fwgate_bytes_served_total{{transport=\"coap\"}} {}", 2 * 256 * KIB)));
    assert_eq!(gw.gw().telemetry.coap_count("dfu"), 2 * (512 + 2), "512 WRITEs, a SWAP and a SYNC each");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coap_device_resumes_restarts_and_rolls_back_as_over_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(64 * KIB, 22);
    setup(&gw, &img, &["co-resume", "co-rollback"]).await;

    // Resume: stop at 40%, come back from another port (a new NAT binding) with update.offset.
    let mut dev = DfuDevice::new("co-resume", Form::Packed, "1.0.0");
    let forty = (img.len() * 40 / 100) as u32;
    let Ended::Paused(at) = client(&gw).await.run_dfu(&mut dev, Some(forty), &NO_STATS).await.unwrap() else {
        panic!("expected a pause")
    };
    assert_eq!(op_state(&gw, "co-resume").await, "downloading");
    dev.offsets.clear();
    assert_eq!(client(&gw).await.run_dfu(&mut dev, None, &NO_STATS).await.unwrap(), Ended::Updated);
    assert_eq!(dev.offsets.first(), Some(&at), "the first block after coming back is at the reported offset");
    assert!(dev.offsets.iter().all(|&o| o >= at), "no byte before the offset is sent again");
    assert_eq!(dev.last_image, img);
    assert_eq!(op_state(&gw, "co-resume").await, "succeeded");

    // Another update.version: the gateway starts over at 0.
    let mut c = client(&gw).await;
    let mut dev = DfuDevice::new("co-rollback", Form::Named, "1.0.0");
    dev.download = Some(Download::claimed("1.9.9", 4 * KIB as u32));
    let first = c.post_status("co-rollback", &dev.status_bytes()).await.unwrap();
    match Command::decode(&first).unwrap().0 {
        Command::Write { offset, version, .. } => assert_eq!((offset, version), (0, "2.0.0")),
        other => panic!("expected WRITE at 0, got {other:?}"),
    }

    // Download up to the SWAP, then come back on the old version: rolled back.
    dev.download = None;
    let len = img.len() as u32;
    assert_eq!(c.run_dfu(&mut dev, Some(len), &NO_STATS).await.unwrap(), Ended::Paused(len));
    let swap = c.post_status("co-rollback", &dev.status_bytes()).await.unwrap();
    assert!(matches!(Command::decode(&swap).unwrap().0, Command::Swap { .. }));
    assert_eq!(op_state(&gw, "co-rollback").await, "swapping");
    dev.download = None;
    assert_eq!(c.run_dfu(&mut dev, None, &NO_STATS).await.unwrap(), Ended::Synced);
    let v = device_state(&gw.admin, "co-rollback").await;
    assert_eq!(v["operations"][0]["state"], "failed", "{v}");
    assert!(v["operations"][0]["detail"].as_str().unwrap().contains("after SWAP"));

    // An unknown device is told to WAIT, and counted.
    let mut ghost = DfuDevice::new("co-ghost", Form::Named, "1.0.0");
    assert_eq!(c.run_dfu(&mut ghost, None, &NO_STATS).await.unwrap(), Ended::Waited);
    assert_eq!(gw.gw().telemetry.status_count("unknown_device"), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block2_downloads_the_assigned_image_and_a_status_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(100 * KIB + 17, 23);
    setup(&gw, &img, &["co-b2"]).await;
    let mut c = client(&gw).await;

    for szx in [0, 2, 5, 6] {
        let body = c.download("/fw/co-b2", szx, 0, None, &NO_STATS).await.expect("block2 download");
        assert!(body == img, "szx {szx}: {} bytes, not the image", body.len());
    }
    // Larger than the cap (1024): the gateway answers in 1024-byte blocks.
    let b = c.get_block("/fw/co-b2", 0, 6).await.unwrap();
    assert_eq!((b.szx, b.more, b.size2), (6, true, Some(img.len() as u32)));
    assert_eq!(b.etag.as_deref(), Some(&Sha256::digest(&img)[..8]), "the etag is the digest's prefix");
    // Random access: resume in the middle.
    let tail = c.download("/fw/co-b2", 4, 50 * 256, None, &NO_STATS).await.unwrap();
    assert!(tail == img[50 * 256..]);
    let v = device_state(&gw.admin, "co-b2").await;
    assert_eq!(v["operations"][0]["state"], "downloading", "{v}");
    assert_eq!(v["operations"][0]["offset"], img.len(), "progress is the end of the last block sent: {v}");

    // The device installs what it downloaded and reports in: succeeded.
    let mut dev = DfuDevice::new("co-b2", Form::Named, "2.0.0");
    dev.last_sha256 = Some(Sha256::digest(&img).into());
    assert_eq!(c.run_dfu(&mut dev, None, &NO_STATS).await.unwrap(), Ended::Updated);
    assert_eq!(op_state(&gw, "co-b2").await, "succeeded");

    // Nothing assigned, or an unknown device: 4.04.
    add_device(&gw.admin, "co-none").await;
    for path in ["/fw/co-none", "/fw/co-unknown"] {
        match c.get_block(path, 0, 5).await {
            Err(ClientError::Status(s)) => assert_eq!(s, "4.04", "{path}"),
            other => panic!("{path}: expected 4.04, got {other:?}"),
        }
    }
    let metrics = gw.gw().telemetry.render();
    let blocks = (img.len().div_ceil(16) + img.len().div_ceil(64) + img.len().div_ceil(512) + img.len().div_ceil(1024))
        + 1
        + (img.len() - 50 * 256).div_ceil(256);
    assert!(
        metrics.contains(&format!("fwgate_blocks_served_total{{transport=\"coap-block2\"}} {blocks}")),
        "{blocks} blocks expected: {metrics}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_losing_5_percent_of_datagrams_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(32 * KIB, 24);
    let ids: Vec<String> = (0..50).map(|i| format!("lossy-{i:02}")).collect();
    add_image(&gw.admin, "app", "2.0.0", img.clone()).await;
    let specs: Vec<_> = ids.iter().map(|id| serde_json::json!({"id": id})).collect();
    let (status, v) =
        admin(&gw.admin, reqwest::Method::POST, "/api/v1/devices", None, Some(serde_json::json!(specs))).await;
    assert_eq!(status, 200, "{v}");
    for id in &ids {
        assign(&gw.admin, id, "app@2.0.0").await;
    }

    let coap = gw.coap();
    let runs = ids.iter().enumerate().map(|(i, id)| {
        let (id, img) = (id.clone(), img.clone());
        tokio::spawn(async move {
            let cfg = ClientConfig {
                ack_timeout: Duration::from_millis(100),
                max_retransmit: 8,
                loss: 0.05,
                seed: 1000 + i as u64,
            };
            let mut c = CoapClient::connect(coap, cfg).await.unwrap();
            let mut dev = DfuDevice::new(&id, if i % 2 == 0 { Form::Named } else { Form::Packed }, "1.0.0");
            let ended = c.run_dfu(&mut dev, None, &NO_STATS).await.unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(ended, Ended::Updated, "{id}");
            assert!(dev.last_image == img, "{id}: the assembled image differs");
            c.stats
        })
    });
    let runs: Vec<_> = runs.collect();
    let mut total = fwgate::loadgen::coap::ClientStats::default();
    for r in runs {
        let s = r.await.expect("device task");
        total.requests += s.requests;
        total.retransmissions += s.retransmissions;
        total.lost_out += s.lost_out;
        total.lost_in += s.lost_in;
        total.echo_challenges += s.echo_challenges;
    }
    for id in &ids {
        assert_eq!(op_state(&gw, id).await, "succeeded", "{id}");
    }
    let t = &gw.gw().telemetry;
    let duplicates = t.coap_count("duplicate");
    assert!(total.lost_out > 0 && total.lost_in > 0, "loss happened both ways: {total:?}");
    assert!(duplicates > 0, "retransmissions after a lost answer are answered from the cache: {total:?}");
    // Every request reached the gateway at least once (each got its answer), and each was
    // executed exactly once: the retransmissions of answered ones came from the cache. Each
    // device's first Status came from an address not yet verified: it was answered with an
    // Echo challenge, not executed, and sent again with the Echo.
    assert_eq!(total.echo_challenges, ids.len() as u64, "{total:?}");
    let executed: u64 = ["write", "swap", "sync", "wait", "unknown_device", "bad_input", "error", "stale"]
        .map(|o| t.status_count(o))
        .iter()
        .sum();
    assert_eq!(
        executed,
        total.requests - total.echo_challenges,
        "requests executed once each ({total:?}, {duplicates} duplicates)"
    );
    gw.stop().await;
}

/// Datagrams a hostile or broken peer sends: truncated headers, bad token lengths, garbage
/// options, random bytes. Each gets its own message id, so none is taken for a retransmission.
fn garbage(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let valid_get = {
        let mut p = coap_lite::Packet::new();
        p.header.code = MessageClass::Request(RequestType::Get);
        p.set_token(vec![1, 2]);
        p.add_option(CoapOption::UriPath, b"fw".to_vec());
        p.add_option(CoapOption::UriPath, b"co-busy".to_vec());
        p.to_bytes().unwrap()
    };
    (0..n)
        .map(|i| {
            let mut d = match i % 6 {
                0 => valid_get[..rng.usize(0..4)].to_vec(),          // a truncated header
                1 => vec![0x4f, 0x01, 0, 0, 1, 2],                   // token length 15
                2 => vec![0x48, 0x01, 0, 0, 1, 2],                   // a token longer than the datagram
                3 => [&valid_get[..], &[0xd1, 0xff, 0xee]].concat(), // unknown critical option 279
                4 => {
                    let mut d = valid_get.clone();
                    let at = rng.usize(4..d.len());
                    d[at] = rng.u8(..);
                    d
                }
                _ => (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(), // random bytes
            };
            if d.len() >= 4 {
                d[2..4].copy_from_slice(&(i as u16).to_be_bytes());
            }
            d
        })
        .collect()
}

/// Every datagram the gateway counted, whatever its result, from `/metrics`.
fn coap_datagrams_counted(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("fwgate_coap_datagrams_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_leave_a_concurrent_download_undisturbed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(test_config(dir.path())).await;
    let img = image(256 * KIB, 25);
    setup(&gw, &img, &["co-busy"]).await;
    let coap = gw.coap();

    // 16,384 blocks of 16 bytes: a download that lasts while the garbage goes out.
    const BLOCKS: u64 = 256 * KIB as u64 / 16;
    let progress = std::sync::Arc::new(Stats::default());
    let seen = progress.clone();
    let download = tokio::spawn(async move {
        let mut c = CoapClient::connect(coap, quick()).await.unwrap();
        let body = c.download("/fw/co-busy", 0, 0, None, &seen).await;
        (body, c.stats)
    });
    while Stats::get(&progress.blocks) < 16 {
        assert!(!download.is_finished(), "the download ended before it began");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let junk = garbage(6000, 7);
    for (i, d) in junk.iter().enumerate() {
        sock.send_to(d, coap).await.unwrap();
        // Paced, so the kernel's socket buffer never overflows: a datagram it dropped would
        // never reach the gateway to be counted.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let during = Stats::get(&progress.blocks);
    assert!(
        during < BLOCKS && !download.is_finished(),
        "the garbage went out while the download was in flight ({during} of {BLOCKS} blocks)"
    );
    let (body, download_stats) = download.await.unwrap();
    let body = body.expect("the download completes while garbage arrives");
    assert!(body == img, "the download is byte-identical");

    // The gateway still answers...
    let t = &gw.gw().telemetry;
    let mut c = client(&gw).await;
    assert_eq!(c.get_block("/fw/co-busy", 0, 6).await.unwrap().payload, img[..1024]);
    // Over coap.max_request_bytes (1024): 4.13, whether the datagram fits the receive buffer
    // (a 1,400-byte Status) or was cut by the kernel (a 3,000-byte one).
    for len in [1400, 3000] {
        match c.post_status("co-busy", &vec![0xa0; len]).await {
            Err(ClientError::Status(s)) => assert_eq!(s, "4.13", "{len} bytes"),
            other => panic!("{len} bytes: expected 4.13, got {other:?}"),
        }
    }
    assert_eq!(t.coap_count("too_large"), 2);
    // ...and counted every datagram that reached it: each garbage one, and each the two
    // clients sent (requests and their retransmissions).
    let sent = junk.len() as u64
        + download_stats.requests
        + download_stats.retransmissions
        + c.stats.requests
        + c.stats.retransmissions;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while coap_datagrams_counted(&t.render()) < sent && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = t.render();
    assert_eq!(coap_datagrams_counted(&metrics), sent, "every datagram is counted once:\n{metrics}");
    // A third of the garbage cannot even be parsed (short headers, bad token lengths), a sixth
    // carries an unknown critical option; the mutated and random rest may land anywhere.
    assert!(t.coap_count("malformed") >= 3000, "{metrics}");
    assert!(t.coap_count("bad_option") >= 1000, "{metrics}");
    gw.stop().await;
}
