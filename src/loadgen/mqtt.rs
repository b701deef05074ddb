//! A device over MQTT: a rumqttc client around the transport-free [`DfuDevice`]. It publishes
//! its Status on `dfu/{id}/status`, takes Commands from `dfu/{id}/command`, and asks again
//! when an answer does not come (the DFU exchange is idempotent).

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::time::Instant;

use super::device::{DeviceError, DfuDevice, Ended};
use super::stats::Stats;
use crate::protocol::Command;

#[derive(Debug, Clone, Copy)]
pub struct MqttDeviceConfig {
    /// QoS of Status messages. 0 is what we recommend (see the README's known limitations).
    pub status_qos: QoS,
    /// How long to wait for the first answer to a Status before asking again.
    pub reply_timeout: Duration,
    /// Status messages sent without an answer before the device gives up.
    pub max_attempts: u32,
    pub keep_alive: Duration,
}

impl Default for MqttDeviceConfig {
    fn default() -> Self {
        MqttDeviceConfig {
            status_qos: QoS::AtMostOnce,
            reply_timeout: Duration::from_secs(5),
            max_attempts: 3,
            keep_alive: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("no answer to {0} Status messages")]
    NoReply(u32),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

pub struct MqttDevice {
    pub dev: DfuDevice,
    pub cfg: MqttDeviceConfig,
    client: AsyncClient,
    events: EventLoop,
    status_topic: String,
    command_topic: String,
}

impl std::ops::Deref for MqttDevice {
    type Target = DfuDevice;
    fn deref(&self) -> &DfuDevice {
        &self.dev
    }
}

impl std::ops::DerefMut for MqttDevice {
    fn deref_mut(&mut self) -> &mut DfuDevice {
        &mut self.dev
    }
}

impl MqttDevice {
    /// Connects as `dev.id`, subscribes to its command topic and waits for the SUBACK, so
    /// no command can be missed.
    pub async fn connect(
        broker: SocketAddr,
        dev: DfuDevice,
        password: Option<&str>,
        cfg: MqttDeviceConfig,
    ) -> Result<MqttDevice, MqttError> {
        MqttDevice::connect_prefixed(broker, dev, password, cfg, "").await
    }

    /// A device whose DFU topics carry a prefix (`{prefix}dfu/{id}/status`), as on a broker
    /// that namespaces tenants.
    pub async fn connect_prefixed(
        broker: SocketAddr,
        dev: DfuDevice,
        password: Option<&str>,
        cfg: MqttDeviceConfig,
        prefix: &str,
    ) -> Result<MqttDevice, MqttError> {
        let topics = (format!("{prefix}dfu/{}/status", dev.id), format!("{prefix}dfu/{}/command", dev.id));
        MqttDevice::connect_on(broker, dev, password, cfg, topics).await
    }

    /// A device for the echo benchmark: it publishes on `echo/{id}/ping` and listens on
    /// `echo/{id}/pong` (the gateway's `mqtt.echo`).
    pub async fn connect_echo(
        broker: SocketAddr,
        dev: DfuDevice,
        cfg: MqttDeviceConfig,
    ) -> Result<MqttDevice, MqttError> {
        let topics = (format!("echo/{}/ping", dev.id), format!("echo/{}/pong", dev.id));
        MqttDevice::connect_on(broker, dev, None, cfg, topics).await
    }

    async fn connect_on(
        broker: SocketAddr,
        dev: DfuDevice,
        password: Option<&str>,
        cfg: MqttDeviceConfig,
        (status_topic, command_topic): (String, String),
    ) -> Result<MqttDevice, MqttError> {
        let id = dev.id.clone();
        let mut opts = MqttOptions::new(&id, broker.ip().to_string(), broker.port());
        opts.set_keep_alive(cfg.keep_alive);
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        // The device id is both the client id and the username: fwgate's listener checks the
        // client id, a broker's ACL (`%u`) the username.
        if let Some(p) = password {
            opts.set_credentials(&id, p);
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        // A latency-aware device: without this, each Status waits out a delayed ACK.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(30);
        events.set_network_options(net);
        client.subscribe(&command_topic, QoS::AtLeastOnce).await.map_err(|e| MqttError::Connect(e.to_string()))?;
        let acked = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(MqttError::Connect(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| MqttError::Connect("no SUBACK within 30 s".into()))?;
        acked?;
        Ok(MqttDevice { status_topic, command_topic, dev, cfg, client, events })
    }

    /// Publishes raw bytes on this device's Status topic.
    pub async fn publish_raw(&mut self, payload: Vec<u8>) -> Result<(), MqttError> {
        self.client
            .publish(&self.status_topic, self.cfg.status_qos, false, payload)
            .await
            .map_err(|e| MqttError::Lost(e.to_string()))
    }

    pub async fn send_status(&mut self) -> Result<(), MqttError> {
        let b = self.dev.status_bytes();
        self.publish_raw(b).await
    }

    /// The next Command payload, driving the event loop meanwhile; `None` when `wait` passes.
    pub async fn next_payload(&mut self, wait: Duration) -> Result<Option<Vec<u8>>, MqttError> {
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == self.command_topic => {
                    return Ok(Some(p.payload.to_vec()))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(MqttError::Lost(e.to_string())),
            }
        }
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

    /// Runs the DFU exchange until it ends, or until the device holds `pause_at` bytes. Each
    /// Status's round trip is recorded in `stats`, with the blocks and bytes it brought.
    pub async fn run(&mut self, pause_at: Option<u32>, stats: &Stats) -> Result<Ended, MqttError> {
        let mut silent = 0;
        loop {
            if let Some(end) = self.dev.paused_at(pause_at) {
                return Ok(end);
            }
            self.send_status().await?;
            let sent = Instant::now();
            let expect = self.dev.window.unwrap_or(1).max(1);
            let mut got = 0;
            loop {
                // The first answer must come; further window blocks arrive right behind it.
                let wait = if got == 0 { self.cfg.reply_timeout } else { Duration::from_millis(300) };
                let Some(p) = self.next_payload(wait).await? else { break };
                if got == 0 {
                    stats.rtt(sent.elapsed());
                }
                got += 1;
                let block = match Command::decode(&p) {
                    Ok((Command::Write { data, .. }, _)) => Some(data.len()),
                    _ => None,
                };
                if let Some(end) = self.dev.apply(&p)? {
                    return Ok(end);
                }
                match block {
                    Some(len) => stats.block(len),
                    None => break,
                }
                // A short block is the image's last: no more are coming for this Status.
                if got >= expect || block < Some(self.dev.mtu as usize) {
                    break;
                }
            }
            if got == 0 {
                silent += 1;
                stats.retry();
                if silent >= self.cfg.max_attempts {
                    return Err(MqttError::NoReply(silent));
                }
            } else {
                silent = 0;
            }
        }
    }

    /// The echo benchmark: `count` round trips, each asking for `size` bytes back.
    pub async fn echo(&mut self, count: u32, size: u16, stats: &Stats) -> Result<(), MqttError> {
        for _ in 0..count {
            let mut attempts = 0;
            loop {
                self.publish_raw(size.to_be_bytes().to_vec()).await?;
                let sent = Instant::now();
                if let Some(p) = self.next_payload(self.cfg.reply_timeout).await? {
                    stats.rtt(sent.elapsed());
                    stats.block(p.len());
                    break;
                }
                attempts += 1;
                stats.retry();
                if attempts >= self.cfg.max_attempts {
                    return Err(MqttError::NoReply(attempts));
                }
            }
        }
        Ok(())
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let mut events = self.events;
        let _ = tokio::time::timeout(Duration::from_secs(2), async move { while events.poll().await.is_ok() {} }).await;
    }
}
