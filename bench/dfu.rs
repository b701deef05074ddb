//! Codec, engine and block-serving costs per message: `cargo bench --bench dfu`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fwgate::config::FirmwareConfig;
use fwgate::engine::{handle_status, EngineConfig, OpState, Target};
use fwgate::firmware::Firmware;
use fwgate::protocol::{Command, Form, Status, UpdateProgress};
use fwgate::store::Store;

const CFG: EngineConfig =
    EngineConfig { max_block: 4096, default_mtu: 512, max_window: 8, sync_poll: 300, wait_poll: 30 };

fn status(form: Form) -> Vec<u8> {
    let s = Status {
        mtu: Some(512),
        correlation_id: Some(7),
        update: Some(UpdateProgress { version: "2.0.0", offset: 131_072 }),
        ..Status::new("1.0.0")
    };
    let mut out = Vec::new();
    s.encode(form, &mut out);
    out
}

fn codec(c: &mut Criterion) {
    let image = vec![0xA5u8; 256 * 1024];
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for form in [Form::Named, Form::Packed] {
        let bytes = status(form);
        g.bench_function(format!("status_decode/{}", form.as_str()), |b| {
            b.iter(|| Status::decode(black_box(&bytes)).unwrap())
        });
        let write = Command::Write {
            version: "2.0.0",
            correlation_id: Some(7),
            offset: 131_072,
            data: &image[131_072..131_584],
        };
        let mut buf = Vec::with_capacity(1024);
        g.bench_function(format!("write512_encode/{}", form.as_str()), |b| {
            b.iter(|| {
                buf.clear();
                black_box(&write).encode(form, &mut buf);
                black_box(buf.len())
            })
        });
        // What the gateway does per Status: decode it, encode one WRITE in a fresh buffer.
        g.bench_function(format!("status_to_write512/{}", form.as_str()), |b| {
            b.iter(|| {
                let (s, f) = Status::decode(black_box(&bytes)).unwrap();
                let offset = s.update.map(|u| u.offset).unwrap_or(0) as usize;
                let c = Command::Write {
                    version: "2.0.0",
                    correlation_id: s.correlation_id,
                    offset: offset as u32,
                    data: &image[offset..offset + 512],
                };
                let mut out = Vec::with_capacity(c.encoded_len_hint());
                c.encode(f, &mut out);
                out
            })
        });
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    let image = vec![0xA5u8; 256 * 1024];
    let target = Target { version: "2.0.0", image: &image, sha256: [1; 32] };
    let bytes = status(Form::Packed);
    let (s, _) = Status::decode(&bytes).unwrap();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("step/write512", |b| {
        b.iter(|| handle_status(&CFG, black_box(&s), Some((OpState::Downloading, target))))
    });
    let windowed = Status { window: Some(8), ..s };
    g.bench_function("step/window8x512", |b| {
        b.iter(|| handle_status(&CFG, black_box(&windowed), Some((OpState::Downloading, target))))
    });
    g.finish();
}

/// Serving one 512-byte block: a slice of the hot image (what the gateway does), against
/// reading it from RocksDB (what it would cost without the hot cache).
fn blocks(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let cfg = FirmwareConfig { max_image_bytes: 1 << 24, hot_cache_bytes: 1 << 24, chunk_bytes: 65_536 };
    let fw = Firmware::open(store, cfg).unwrap();
    let image: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 + 7) as u8).collect();
    fw.add("app", "2.0.0", vec![], image.into(), 0).unwrap();
    let meta = fw.get("app", "2.0.0").unwrap();
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes(512));
    let mut offset = 0u64;
    g.bench_function("hot_slice512", |b| {
        b.iter(|| {
            offset = (offset + 512) % (256 * 1024);
            let m = fw.get("app", "2.0.0").unwrap();
            let bytes = fw.bytes(&m).unwrap();
            bytes.slice(offset as usize..offset as usize + 512)
        })
    });
    let mut out = Vec::with_capacity(512);
    g.bench_function("cold_rocksdb_pinned512", |b| {
        b.iter(|| {
            offset = (offset + 512) % (256 * 1024);
            out.clear();
            fw.read_cold(&meta, offset, 512, &mut out).unwrap();
            black_box(out.len())
        })
    });
    g.finish();
}

/// The per-Status lookup of a device's operation and image, for a CI device (no CI
/// repository: no TUF check) and for a production device (its image checked against the
/// verified production targets on every Status).
fn lookup(c: &mut Criterion) {
    use std::sync::Arc;

    use fwgate::fleet::{DeviceSpec, Fleet};
    use fwgate::planner::Planner;
    use fwgate::tuf::{RepoConfig, Trust};

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db"), false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 10).unwrap());
    let fw = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tuf");
    let repo = fixtures.join("repos/production");
    let config = RepoConfig {
        root: fixtures.join("production-root.json"),
        metadata_url: format!("file://{}/", repo.join("metadata").display()),
        targets_url: format!("file://{}/", repo.join("targets").display()),
    };
    let trust = Arc::new(Trust::new(&config, &RepoConfig::default(), dir.path()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(trust.refresh("production")).expect("the fixture repository verifies");
    let target = std::fs::read_dir(repo.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".app-2.0.bin"))
        .unwrap();
    fw.add("app", "2.0", vec![], std::fs::read(target).unwrap().into(), 0).unwrap();
    let spec = |id: &str, production| DeviceSpec { id: id.into(), production, ..Default::default() };
    fleet.upsert(vec![spec("prod-1", true), spec("ci-1", false)], 0).unwrap();
    let planner = Planner::open(store, fleet, fw, 3600, 0).unwrap().with_trust(trust, false);
    let mut g = c.benchmark_group("lookup");
    for id in ["ci-1", "prod-1"] {
        let seq = planner.assign(id, "main", "app@2.0", 1).unwrap().seq;
        planner.record(id, seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 1).unwrap();
        let what = if id == "ci-1" { "ci_device" } else { "production_device_tuf_checked" };
        g.bench_function(what, |b| {
            b.iter(|| match planner.lookup(black_box(id), "main", 1_800_000_000).unwrap() {
                fwgate::planner::Lookup::Active(a) => a.seq,
                _ => panic!("{id}: not served"),
            })
        });
    }
    g.finish();
}

/// One Status through the whole shared DFU step, as either transport runs it
/// (`transport::session::Dfu::handle`): decode, fleet observe (last seen, running version),
/// operation and hot-image lookup, engine, progress record, encode of the 512-byte WRITE into
/// a fresh buffer, telemetry. RocksDB in a temp dir; a device mid-download, the Status's
/// offset moving through the image as a real download's does.
fn session(c: &mut Criterion) {
    use std::sync::Arc;

    use fwgate::fleet::{DeviceSpec, Fleet};
    use fwgate::planner::Planner;
    use fwgate::telemetry::Telemetry;
    use fwgate::transport::{Dfu, Handled};

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db"), false).unwrap();
    let fleet = Arc::new(Fleet::open(store.clone(), 10).unwrap());
    let fw = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
    const LEN: u32 = 256 * 1024;
    fw.add("app", "2.0.0", vec![], (0..LEN).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>().into(), 0).unwrap();
    fleet.upsert(vec![DeviceSpec { id: "dev-1".into(), ..Default::default() }], 0).unwrap();
    let planner = Arc::new(Planner::open(store, fleet.clone(), fw, 3600, 0).unwrap());
    let seq = planner.assign("dev-1", "main", "app@2.0.0", 1).unwrap().seq;
    planner.record("dev-1", seq, OpState::Pending, Some(OpState::Downloading), Some(0), None, 1).unwrap();
    let dfu = Dfu::new(planner, fleet, CFG, Arc::new(Telemetry::new()));
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));
    for form in [Form::Named, Form::Packed] {
        // Every Status of a 512-byte-block download, in order, over and over.
        let statuses: Vec<Vec<u8>> = (0..LEN / 512)
            .map(|n| {
                let s = Status {
                    mtu: Some(512),
                    correlation_id: Some(n),
                    update: Some(UpdateProgress { version: "2.0.0", offset: n * 512 }),
                    ..Status::new("1.0.0")
                };
                let mut out = Vec::new();
                s.encode(form, &mut out);
                out
            })
            .collect();
        let mut out = Vec::with_capacity(1);
        let mut n = 0;
        g.bench_function(format!("status_to_write512/{}", form.as_str()), |b| {
            b.iter(|| {
                out.clear();
                n = (n + 1) % statuses.len();
                let h = dfu.handle(
                    "mqtt",
                    "dev-1",
                    black_box(&statuses[n]),
                    1_800_000_000,
                    fwgate::transport::Shape::One { max_block: 1024 },
                    &mut out,
                );
                assert_eq!(h, Handled::Replied);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, engine, blocks, lookup, session);
criterion_main!(benches);
