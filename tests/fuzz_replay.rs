//! Replays every saved fuzz input (`fixtures/fuzz/{mqtt,status,coap}/`: the seeds the fuzz
//! runs started from, what they found worth keeping, and any input that once failed) through
//! the same entry points the fuzz targets use, so what fuzzing found stays fixed in `cargo
//! test`. The targets themselves run outside it (`tests/fuzz`, nightly).

use std::path::Path;

use fwgate::fuzzing::Fixture;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn saved_fuzz_inputs_replay_without_a_failure() {
    let f = Fixture::start();
    let mut counts = Vec::new();
    for (target, run) in [
        ("mqtt", &(|f: &Fixture, d: &[u8]| drop(f.mqtt(d))) as &dyn Fn(&Fixture, &[u8])),
        ("status", &|f: &Fixture, d: &[u8]| f.status(d)),
        ("coap", &|f: &Fixture, d: &[u8]| drop(f.coap(d))),
    ] {
        let saved = inputs(target);
        assert!(!saved.is_empty(), "fixtures/fuzz/{target} has inputs");
        for (name, data) in &saved {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&f, data)));
            assert!(outcome.is_ok(), "{target}/{name} failed again");
        }
        counts.push((target, saved.len()));
    }
    eprintln!("replayed {counts:?}");
}

#[test]
fn a_connection_that_downloads_is_answered_through_the_harness() {
    // The harness itself is exercised: a CONNECT, a SUBSCRIBE and a Status get a CONNACK, a
    // SUBACK and a WRITE, so a fuzz run that never reached the DFU step would not go unseen.
    let f = Fixture::start();
    let out = f.mqtt(&seed_download());
    assert_eq!(&out[..4], &[0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    assert_eq!(&out[4..9], &[0x90, 0x03, 0x00, 0x01, 0x01], "SUBACK QoS 1");
    let publish = &out[9..];
    assert_eq!(publish[0] >> 4, 3, "then a PUBLISH");
    let cmd = &publish[publish.len() - 256..];
    let tail = String::from_utf8_lossy(&publish[..publish.len() - 256]);
    assert!(tail.contains("dfu/dev-1/command") && tail.contains("WRITE"), "{tail}");
    assert_eq!(cmd.len(), 256);
}

/// MQTT 3.1.1 bytes of a device that connects, subscribes and asks for 256-byte blocks (the
/// first byte 0 picks the fixture's session without auth).
fn seed_download() -> Vec<u8> {
    let mut s = vec![0u8];
    s.extend([0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 5, b'd', b'e', b'v', b'-', b'1']);
    s.extend([0x82, 22, 0, 1, 0, 17]);
    s.extend(b"dfu/dev-1/command");
    s.push(1);
    let mut status = Vec::new();
    fwgate::protocol::Status { mtu: Some(256), ..fwgate::protocol::Status::new("1.0.0") }
        .encode(fwgate::protocol::Form::Named, &mut status);
    let topic = b"dfu/dev-1/status";
    s.extend([0x30, (2 + topic.len() + status.len()) as u8, 0, topic.len() as u8]);
    s.extend(topic);
    s.extend(status);
    s
}
