//! What the fuzz targets (`tests/fuzz`, cargo-fuzz) and the replay of their saved inputs
//! (`tests/fuzz_replay.rs`) run: a real gateway — RocksDB in a temp dir, one registered device
//! `dev-1` with an image assigned — and every decoder a device reaches, each through the path
//! a real message takes: a Status in both CBOR forms, one MQTT connection's bytes through the
//! listener's state machine (auth off and on), one CoAP datagram through the exchange layer.

use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::fleet::{DeviceSpec, MAIN_COMPONENT};
use crate::protocol::Status;
use crate::transport::coap::exchange::Exchange;
use crate::transport::mqtt::harness::Session;
use crate::Gateway;

pub struct Fixture {
    rt: tokio::runtime::Runtime,
    gw: Gateway,
    open: Session,
    authenticated: Session,
    coap: Mutex<Exchange>,
    coap_gw: crate::transport::coap::Gateway,
    dir: PathBuf,
}

impl Fixture {
    /// Starts the gateway (no listeners) in a fresh directory under the system temp dir.
    pub fn start() -> Fixture {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fwgate-fuzz-{}-{}-{n}", std::process::id(), crate::now_millis()));
        let mut config = Config::default();
        config.store.data_dir = dir.clone();
        config.mqtt.enabled = false;
        config.coap.enabled = false;
        config.admin.listen = "127.0.0.1:0".parse().expect("an address");
        config.admin.token = "fuzz".into();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let gw = rt.block_on(crate::start(config.clone(), CancellationToken::new())).expect("the gateway starts");
        let now = crate::now_secs();
        let spec = DeviceSpec { id: "dev-1".into(), ..DeviceSpec::default() };
        gw.fleet.upsert(vec![spec], now).expect("a device");
        let image: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
        gw.firmware.add("app", "2.0.0", Vec::new(), Bytes::from(image), now).expect("an image");
        gw.planner.assign("dev-1", MAIN_COMPONENT, "app@2.0.0", now).expect("an assignment");
        let open = Session::new(&config.mqtt, &config.dfu, gw.dfu.clone(), gw.fleet.clone(), gw.telemetry.clone());
        let mut auth = config.mqtt.clone();
        auth.auth = true;
        auth.device_secret = "fuzzing-device-secret".into();
        let authenticated = Session::new(&auth, &config.dfu, gw.dfu.clone(), gw.fleet.clone(), gw.telemetry.clone());
        // Without the amplification limit, so inputs reach the resources and not only the
        // Echo challenge.
        let mut xc = crate::transport::coap::exchange_config(&config.coap);
        xc.amplification_limit = false;
        let coap = Mutex::new(Exchange::new(xc));
        let coap_gw = crate::transport::coap::Gateway {
            dfu: gw.dfu.clone(),
            planner: gw.planner.clone(),
            telemetry: gw.telemetry.clone(),
            max_block: config.coap.max_block_size,
        };
        Fixture { rt, gw, open, authenticated, coap, coap_gw, dir }
    }

    /// A Status in either form: decoded, and what decodes encodes back to the same value.
    pub fn status(&self, input: &[u8]) {
        if let Ok((status, form)) = Status::decode(input) {
            let mut again = Vec::new();
            status.encode(form, &mut again);
            let (back, _) = Status::decode(&again).expect("an encoded Status decodes");
            assert_eq!(back, status, "a Status survives encode → decode");
        }
        let mut out = Vec::new();
        self.gw.dfu.handle("fuzz", "dev-1", input, crate::now_secs(), crate::transport::Shape::Window, &mut out);
    }

    /// One MQTT connection: the first byte picks auth off or on, the rest is the stream.
    pub fn mqtt(&self, input: &[u8]) -> Vec<u8> {
        let Some((&pick, stream)) = input.split_first() else { return Vec::new() };
        let session = if pick & 1 == 0 { &self.open } else { &self.authenticated };
        let out = self.rt.block_on(session.run(stream));
        assert_eq!(session.residue(), 0, "a finished connection leaves nothing registered");
        out
    }

    /// One CoAP datagram from a fixed peer.
    pub fn coap(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ex = self.coap.lock().unwrap_or_else(|p| p.into_inner());
        ex.handle(
            ([127, 0, 0, 1], 5683).into(),
            input,
            crate::now_millis(),
            crate::now_secs(),
            crate::transport::coap::exchange::Access::Open,
            &self.coap_gw,
            &mut out,
        );
        out
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
