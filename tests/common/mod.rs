//! Shared by the integration tests: a gateway on ephemeral ports with RocksDB in a temp dir,
//! an admin client, and a simulated device that speaks DFU over real MQTT (rumqttc).
#![allow(dead_code)]

pub mod cluster;
pub mod mosquitto;
pub mod raw;
pub mod serve;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fwgate::config::Config;
use fwgate::loadgen::mqtt::{MqttDevice, MqttDeviceConfig};
use fwgate::loadgen::stats::Stats;
use fwgate::protocol::Form;
use rumqttc::QoS;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A config for tests: everything on 127.0.0.1 with ephemeral ports, data in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.store.data_dir = dir.to_owned();
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.coap.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.token = "test-token".into();
    c
}

/// The python-tuf fixture repositories (`fixtures/tuf/`).
pub fn tuf_fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tuf")
}

/// Points the gateway's production (and, with `ci`, CI) TUF repository at the fixtures.
pub fn with_tuf(c: &mut Config, ci: bool) {
    let url =
        |repo: &str, what: &str| format!("file://{}/", tuf_fixtures().join("repos").join(repo).join(what).display());
    c.tuf.production_root = tuf_fixtures().join("production-root.json");
    c.tuf.production_metadata_url = url("production", "metadata");
    c.tuf.production_targets_url = url("production", "targets");
    if ci {
        c.tuf.ci_root = tuf_fixtures().join("ci-root.json");
        c.tuf.ci_metadata_url = url("ci", "metadata");
        c.tuf.ci_targets_url = url("ci", "targets");
    }
}

/// Runs `fixtures/tuf/live_repo.py` with the Python that has python-tuf (`FWGATE_PYTHON`,
/// which .ci/run sets, else `python3`).
pub fn live_repo(args: &[&str]) {
    let python = std::env::var("FWGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = tuf_fixtures().join("live_repo.py");
    let out = std::process::Command::new(&python).arg(&script).args(args).output().unwrap_or_else(|e| {
        panic!("{python} does not run ({e}): this test signs a TUF repository with python-tuf; .ci/run installs it")
    });
    assert!(
        out.status.success(),
        "{python} {} failed (python-tuf 7 is needed: pip install tuf==7.0.1 'securesystemslib[crypto]'; .ci/run installs it):\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bytes of a fixture repository's target file.
pub fn target_bytes(repo: &str, name: &str) -> Vec<u8> {
    // A target in a directory is stored there, as `<sha256>.<file name>` (consistent snapshots).
    let (sub, file) = name.rsplit_once('/').unwrap_or(("", name));
    let dir = tuf_fixtures().join("repos").join(repo).join("targets").join(sub);
    let suffix = format!(".{file}");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(&suffix))
        .unwrap_or_else(|| panic!("no target {name} in {}", dir.display()));
    std::fs::read(file).unwrap()
}

pub struct TestGateway {
    pub gw: Option<fwgate::Gateway>,
    pub mqtt: SocketAddr,
    pub admin: String,
    pub shutdown: CancellationToken,
}

impl TestGateway {
    pub async fn start(config: Config) -> TestGateway {
        let shutdown = CancellationToken::new();
        let gw = fwgate::start(config, shutdown.clone()).await.expect("gateway starts");
        let mqtt = gw.mqtt.expect("mqtt enabled").tcp;
        let admin = format!("http://{}", gw.admin);
        TestGateway { gw: Some(gw), mqtt, admin, shutdown }
    }

    pub fn coap(&self) -> SocketAddr {
        self.gw().coap.expect("coap enabled")
    }

    pub fn gw(&self) -> &fwgate::Gateway {
        self.gw.as_ref().unwrap()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(gw) = self.gw.take() {
            gw.wait().await;
        }
    }
}

/// Calls the admin API with the test token; returns (status, JSON body).
pub async fn admin(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<reqwest::Body>,
    json: Option<Value>,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut req = c.request(method, format!("{base}{path}")).bearer_auth("test-token");
    if let Some(b) = body {
        req = req.body(b);
    }
    if let Some(j) = json {
        req = req.json(&j);
    }
    let resp = req.send().await.expect("admin reachable");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// POSTs JSON to the admin API with the test token; returns (status, JSON body).
pub async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    admin(base, reqwest::Method::POST, path, None, Some(body)).await
}

pub async fn add_image(base: &str, name: &str, version: &str, data: Vec<u8>) -> Value {
    let (status, v) = admin(
        base,
        reqwest::Method::POST,
        &format!("/api/v1/images?name={name}&version={version}"),
        Some(data.into()),
        None,
    )
    .await;
    assert!(status == 201 || status == 200, "image upload: {status} {v}");
    v
}

/// Images v1 and v2 of each FAS target (`bios@1`, `bios@2`, …), both tagged default, for
/// nodeBMCs; a device held back from one is asked to come back after 7 s
/// (`pollingSpeedSeconds`).
pub async fn fas_images(base: &str, targets: &[&str]) {
    for target in targets {
        for v in ["1", "2"] {
            let name = target.to_lowercase();
            let seed = v.parse::<u64>().unwrap() * 10 + target.len() as u64;
            add_image(base, &name, v, image(4096, seed)).await;
            let identity = serde_json::json!({"deviceType": "nodeBMC", "manufacturer": "intel", "models": ["s2600"],
                "target": target, "tags": ["default"], "firmwareVersion": format!("{target}-{v}"),
                "semanticFirmwareVersion": format!("{v}.0.0"), "pollingSpeedSeconds": 7});
            let path = format!("/api/v1/images/{name}/{v}/identity");
            let (status, body) = admin(base, reqwest::Method::PUT, &path, None, Some(identity)).await;
            assert!((200..300).contains(&status), "{path}: {status} {body}");
        }
    }
}

pub async fn add_device(base: &str, id: &str) {
    let (status, v) =
        admin(base, reqwest::Method::POST, "/api/v1/devices", None, Some(serde_json::json!({"id": id}))).await;
    assert_eq!(status, 200, "device add: {v}");
}

pub async fn assign(base: &str, id: &str, image: &str) {
    let (status, v) = admin(
        base,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{id}/assignment"),
        None,
        Some(serde_json::json!({"image": image})),
    )
    .await;
    assert_eq!(status, 200, "assign: {v}");
}

/// Uploads `img` as app@2.0.0 and registers each device with it assigned.
pub async fn setup(gw: &TestGateway, img: &[u8], devices: &[&str]) {
    add_image(&gw.admin, "app", "2.0.0", img.to_vec()).await;
    for id in devices {
        add_device(&gw.admin, id).await;
        assign(&gw.admin, id, "app@2.0.0").await;
    }
}

pub async fn device_state(base: &str, id: &str) -> Value {
    let (status, v) = admin(base, reqwest::Method::GET, &format!("/api/v1/devices/{id}"), None, None).await;
    assert_eq!(status, 200, "device show: {v}");
    v
}

/// Deterministic, non-repeating-looking image bytes.
pub fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[allow(unused_imports)]
pub use fwgate::loadgen::device::{DfuDevice, Download, Ended};

/// A device over MQTT for tests: [`MqttDevice`] with Status at QoS 1, where anything a real
/// device would refuse fails the test.
pub struct SimDevice(pub MqttDevice);

impl std::ops::Deref for SimDevice {
    type Target = MqttDevice;
    fn deref(&self) -> &MqttDevice {
        &self.0
    }
}

impl std::ops::DerefMut for SimDevice {
    fn deref_mut(&mut self) -> &mut MqttDevice {
        &mut self.0
    }
}

impl SimDevice {
    pub async fn connect(mqtt: SocketAddr, id: &str, form: Form, running: &str, password: Option<&str>) -> SimDevice {
        let mut dev = SimDevice::connect_raw(mqtt, id, password).await.expect("device connects");
        dev.form = form;
        dev.running = running.into();
        dev
    }

    pub async fn connect_raw(mqtt: SocketAddr, id: &str, password: Option<&str>) -> Result<SimDevice, String> {
        let cfg = MqttDeviceConfig {
            status_qos: QoS::AtLeastOnce,
            reply_timeout: STEP_TIMEOUT,
            max_attempts: 1,
            ..MqttDeviceConfig::default()
        };
        let dev = DfuDevice::new(id, Form::Named, "");
        MqttDevice::connect(mqtt, dev, password, cfg).await.map(SimDevice).map_err(|e| e.to_string())
    }

    /// Publishes raw bytes on this device's Status topic.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) {
        self.0.publish_raw(payload).await.expect("publish")
    }

    pub async fn send_status(&mut self) {
        self.0.send_status().await.expect("publish")
    }

    /// The next Command payload, or `None` once `wait` passes or the connection is lost.
    pub async fn next_payload(&mut self, wait: Duration) -> Option<Vec<u8>> {
        self.0.next_payload(wait).await.ok().flatten()
    }

    /// Runs the DFU exchange until it ends, or until `pause_at` bytes are written.
    pub async fn run(&mut self, pause_at: Option<u32>) -> Ended {
        let id = self.id.clone();
        self.0.run(pause_at, &Stats::default()).await.unwrap_or_else(|e| panic!("{id}: {e}"))
    }

    pub async fn disconnect(self) {
        self.0.disconnect().await
    }
}
