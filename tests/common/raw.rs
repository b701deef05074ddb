//! Test-side MQTT at the packet level (rumqttc's `mqttbytes` codecs, both versions), for what
//! a well-behaved client library never does — and a device's flash, driven by any client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use fwgate::protocol::{Command, Form, Status, UpdateProgress};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A packet from the gateway, either version.
#[derive(Debug)]
pub enum Got {
    V4(v4::Packet),
    V5(v5::Packet),
}

impl Got {
    pub fn publish_topic(&self) -> Option<String> {
        match self {
            Got::V4(v4::Packet::Publish(p)) => Some(p.topic.clone()),
            Got::V5(v5::Packet::Publish(p)) => Some(String::from_utf8_lossy(&p.topic).into_owned()),
            _ => None,
        }
    }
}

pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
    pub v5: bool,
}

impl Raw {
    pub async fn open(addr: SocketAddr, v5: bool) -> Raw {
        Raw { s: TcpStream::connect(addr).await.expect("connect"), buf: BytesMut::new(), v5 }
    }

    /// Opens a connection and sends CONNECT; returns the CONNACK's code as the version's
    /// enum, formatted (`Success`, `NotAuthorized`, ...).
    pub async fn connect(
        addr: SocketAddr,
        v5: bool,
        id: &str,
        password: Option<&str>,
        keep_alive: u16,
    ) -> (Raw, String) {
        let mut r = Raw::open(addr, v5).await;
        r.send_connect(id, password, keep_alive).await;
        let code = match r.recv(Duration::from_secs(10)).await {
            Some(Got::V4(v4::Packet::ConnAck(a))) => format!("{:?}", a.code),
            Some(Got::V5(v5::Packet::ConnAck(a))) => format!("{:?}", a.code),
            other => panic!("expected a CONNACK, got {other:?}"),
        };
        (r, code)
    }

    pub async fn send_connect(&mut self, id: &str, password: Option<&str>, keep_alive: u16) {
        let mut out = BytesMut::new();
        if self.v5 {
            let c = v5::Connect { keep_alive, client_id: id.into(), clean_start: true, properties: None };
            let login = password.map(|p| v5::Login { username: "device".into(), password: p.into() });
            v5::Packet::Connect(c, None, login).write(&mut out, None).unwrap();
        } else {
            let mut c = v4::Connect::new(id);
            c.keep_alive = keep_alive;
            if let Some(p) = password {
                c.set_login("device", p);
            }
            c.write(&mut out).unwrap();
        }
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b).await;
    }

    pub async fn subscribe(&mut self, pkid: u16, filter: &str, qos: u8) {
        let mut out = BytesMut::new();
        if self.v5 {
            let q = if qos == 0 {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce
            } else {
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce
            };
            let q = if qos == 2 { rumqttc::v5::mqttbytes::QoS::ExactlyOnce } else { q };
            let mut f = v5::Filter::new(filter, q);
            f.nolocal = false;
            v5::Subscribe { pkid, filters: vec![f], properties: None }.write(&mut out).unwrap();
        } else {
            let q = match qos {
                0 => rumqttc::QoS::AtMostOnce,
                1 => rumqttc::QoS::AtLeastOnce,
                _ => rumqttc::QoS::ExactlyOnce,
            };
            let mut s = v4::Subscribe::new(filter, q);
            s.pkid = pkid;
            s.write(&mut out).unwrap();
        }
        self.send_bytes(&out).await;
    }

    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>, qos: u8, pkid: u16) {
        let mut out = BytesMut::new();
        if self.v5 {
            let q = if qos == 0 {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce
            } else {
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce
            };
            let mut p = v5::Publish::new(topic, q, payload, None);
            p.pkid = pkid;
            p.write(&mut out).unwrap();
        } else {
            let q = if qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
            let mut p = v4::Publish::new(topic, q, payload);
            p.pkid = pkid;
            p.write(&mut out).unwrap();
        }
        self.send_bytes(&out).await;
    }

    pub async fn puback(&mut self, pkid: u16) {
        let mut out = BytesMut::new();
        if self.v5 {
            v5::PubAck::new(pkid, None).write(&mut out).unwrap();
        } else {
            v4::PubAck::new(pkid).write(&mut out).unwrap();
        }
        self.send_bytes(&out).await;
    }

    pub async fn ping(&mut self) {
        self.send_bytes(&[0xC0, 0x00]).await;
    }

    /// The next packet within `within`, or `None` (nothing came, or the connection closed).
    pub async fn recv(&mut self, within: Duration) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let parsed = if self.v5 {
                match v5::Packet::read(&mut self.buf, None) {
                    Ok(p) => Some(Ok(Got::V5(p))),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(e) => Some(Err(format!("{e:?}"))),
                }
            } else {
                match v4::Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => Some(Ok(Got::V4(p))),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(e) => Some(Err(format!("{e:?}"))),
                }
            };
            match parsed {
                Some(Ok(p)) => return Some(p),
                Some(Err(e)) => panic!("the gateway sent a packet that does not decode: {e}"),
                None => {}
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// Whether the gateway closes the connection within `within` (packets before the close,
    /// such as an MQTT 5 DISCONNECT, are returned too).
    pub async fn closed(&mut self, within: Duration) -> (bool, Vec<Got>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return (false, seen);
            }
            match self.recv(left).await {
                Some(p) => seen.push(p),
                None => {
                    // Either closed or quiet: a read of 0 bytes tells.
                    let mut probe = [0u8; 1];
                    let quiet = tokio::time::timeout(Duration::from_millis(1), self.s.read(&mut probe)).await;
                    return (matches!(quiet, Ok(Ok(0)) | Ok(Err(_))), seen);
                }
            }
        }
    }
}

/// A device's flash: what it runs, the image it is writing, and the next Status it sends.
pub struct Flash {
    pub id: String,
    pub running: String,
    writing: Option<(String, Vec<u8>)>,
    pub mtu: u32,
    pub window: u32,
    pub form: Form,
    pub blocks: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send the next Status.
    More,
    /// The device verified and switched to a new image; one more Status reports it.
    Swapped,
    /// The gateway says the device is up to date.
    Synced,
    Waited,
}

impl Flash {
    pub fn new(id: &str, running: &str, mtu: u32, window: u32) -> Flash {
        Flash { id: id.into(), running: running.into(), writing: None, mtu, window, form: Form::Named, blocks: 0 }
    }

    pub fn status(&self) -> Vec<u8> {
        let mut s = Status::new(&self.running);
        s.mtu = Some(self.mtu);
        s.window = Some(self.window);
        s.update = self.writing.as_ref().map(|(v, data)| UpdateProgress { version: v, offset: data.len() as u32 });
        let mut out = Vec::new();
        s.encode(self.form, &mut out);
        out
    }

    /// Applies one Command; panics on a Command a correct gateway would not send.
    pub fn apply(&mut self, bytes: &[u8]) -> Next {
        let (cmd, _) = Command::decode(bytes).expect("a Command decodes");
        match cmd {
            Command::Write { version, offset, data, .. } => {
                let buf = match &mut self.writing {
                    Some((v, buf)) if v == version => buf,
                    _ => {
                        self.writing = Some((version.to_owned(), Vec::new()));
                        &mut self.writing.as_mut().unwrap().1
                    }
                };
                assert_eq!(offset as usize, buf.len(), "{}: blocks arrive in order", self.id);
                buf.extend_from_slice(data);
                self.blocks += 1;
                Next::More
            }
            Command::Swap { version, checksum, .. } => {
                let (v, data) = self.writing.take().expect("a SWAP follows WRITEs");
                assert_eq!(v, version);
                assert_eq!(Sha256::digest(&data).as_slice(), &checksum, "{}: the image verifies", self.id);
                self.running = v;
                Next::Swapped
            }
            Command::Sync { .. } => Next::Synced,
            Command::Wait { .. } => Next::Waited,
        }
    }
}
