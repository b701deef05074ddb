//! Shared by the integration tests: a gateway on ephemeral ports with RocksDB in a temp dir,
//! an admin client, and a simulated device that speaks DFU over real MQTT (rumqttc).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fwgate::config::Config;
use fwgate::protocol::{Command, Form};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A config for tests: everything on 127.0.0.1 with ephemeral ports, data in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.store.data_dir = dir.to_owned();
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.listen_v5 = String::new();
    c.coap.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.token = "test-token".into();
    c
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
        let mqtt = gw.mqtt.expect("mqtt enabled").v4;
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

pub use fwgate::loadgen::device::{DfuDevice, Ended};

/// A device over MQTT: a real rumqttc client around the transport-free [`DfuDevice`], which
/// writes blocks, verifies the SWAP checksum and "reboots".
pub struct SimDevice {
    pub dev: DfuDevice,
    client: AsyncClient,
    events: EventLoop,
}

impl std::ops::Deref for SimDevice {
    type Target = DfuDevice;
    fn deref(&self) -> &DfuDevice {
        &self.dev
    }
}

impl std::ops::DerefMut for SimDevice {
    fn deref_mut(&mut self) -> &mut DfuDevice {
        &mut self.dev
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
        let mut opts = MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        if let Some(p) = password {
            opts.set_credentials("device", p);
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        // A latency-aware device: without this, each Status waits out a delayed ACK.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        client.subscribe(format!("dfu/{id}/command"), QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        // Wait for CONNACK and SUBACK so no command can be missed.
        let acked = tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no SUBACK".to_string())?;
        acked?;
        Ok(SimDevice { dev: DfuDevice::new(id, Form::Named, ""), client, events })
    }

    /// Publishes raw bytes on this device's Status topic.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) {
        self.client.publish(format!("dfu/{}/status", self.id), QoS::AtLeastOnce, false, payload).await.unwrap();
    }

    pub async fn send_status(&mut self) {
        let b = self.status_bytes();
        self.publish_raw(b).await;
    }

    /// The next Command payload, driving the event loop meanwhile.
    pub async fn next_payload(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let topic = format!("dfu/{}/command", self.id);
        tokio::time::timeout(wait, async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => return Some(p.payload.to_vec()),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Drives the event loop until the broker closes the connection (or `wait` passes).
    pub async fn closed_by_broker(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, async {
            loop {
                if self.events.poll().await.is_err() {
                    return true;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Applies one command; a command a real device would refuse fails the test.
    fn apply(&mut self, payload: &[u8]) -> Option<Ended> {
        let id = self.dev.id.clone();
        self.dev.apply(payload).unwrap_or_else(|e| panic!("{id}: {e}"))
    }

    /// Runs the DFU exchange until it ends, or until `pause_at` bytes are written.
    pub async fn run(&mut self, pause_at: Option<u32>) -> Ended {
        loop {
            if let Some(end) = self.paused_at(pause_at) {
                return end;
            }
            self.send_status().await;
            let expect = self.window.unwrap_or(1).max(1);
            let mut got = 0;
            loop {
                // The first reply must come; further window blocks arrive right behind it.
                let wait = if got == 0 { STEP_TIMEOUT } else { Duration::from_millis(300) };
                let Some(p) = self.next_payload(wait).await else {
                    assert!(got > 0, "{}: no reply to a Status", self.id);
                    break;
                };
                got += 1;
                if let Some(end) = self.apply(&p) {
                    return end;
                }
                let is_write = matches!(Command::decode(&p), Ok((Command::Write { .. }, _)));
                if !is_write || got >= expect {
                    break;
                }
            }
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let mut events = self.events;
        let _ = tokio::time::timeout(Duration::from_secs(2), async move { while events.poll().await.is_ok() {} }).await;
    }
}
