//! The two MQTT versions behind one small vocabulary: what a device can send us, and what we
//! answer. Framing and encoding are rumqttc's `mqttbytes` codecs (v4 = MQTT 3.1.1, v5); this
//! file only maps between their packet types and the listener's, so the state machine in
//! `conn` is written once for both versions.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// A CONNECT, either version.
#[derive(Debug)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    pub password: Option<String>,
    pub will: bool,
    /// MQTT 5: the client's Receive Maximum (how many QoS 1 messages it takes unacknowledged).
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: extended authentication was asked for (not offered).
    pub auth_method: bool,
}

/// What a connected client can send.
#[derive(Debug)]
pub enum Inbound {
    Publish {
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
        alias: bool,
    },
    PubAck,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// A packet a client must not send us now (CONNECT again, QoS 2 flow, server packets).
    Unexpected(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// More bytes are needed; at least this many.
    Incomplete(usize),
    /// The packet announces more bytes than the limit: refused before it is buffered.
    TooLarge,
    /// Not a CONNECT of MQTT 3.1.1 or 5: the protocol level it asked for.
    Level(u8),
    /// The bytes do not form a packet of the version.
    Malformed,
}

fn v4_error(e: rumqttc::mqttbytes::Error) -> ReadError {
    use rumqttc::mqttbytes::Error as E;
    match e {
        E::InsufficientBytes(n) => ReadError::Incomplete(n),
        E::PayloadSizeLimitExceeded(_) => ReadError::TooLarge,
        E::InvalidProtocolLevel(l) => ReadError::Level(l),
        _ => ReadError::Malformed,
    }
}

fn v5_error(e: rumqttc::v5::mqttbytes::Error) -> ReadError {
    use rumqttc::v5::mqttbytes::Error as E;
    match e {
        E::InsufficientBytes(n) => ReadError::Incomplete(n),
        E::PayloadSizeLimitExceeded { .. } => ReadError::TooLarge,
        E::InvalidProtocolLevel(l) => ReadError::Level(l),
        _ => ReadError::Malformed,
    }
}

/// Reads the first packet of a connection, which must be a CONNECT; its protocol level picks
/// the codec for the rest of the connection (Mosquitto and EMQX serve both on one port).
pub fn read_connect(buf: &mut BytesMut, max: usize) -> Result<Connect, ReadError> {
    if let Some(&b) = buf.first() {
        if b >> 4 != 1 {
            return Err(ReadError::Malformed);
        }
    }
    // MQTT 3.1.1 first, on a copy. rumqttc's 3.1.1 reader also takes level 5 when the
    // CONNECT happens to parse without its properties, and fails on most level-5 CONNECTs
    // otherwise: anything but a level-4 CONNECT is read again as MQTT 5.
    let mut probe = buf.clone();
    let first = match v4::Packet::read(&mut probe, max) {
        Ok(v4::Packet::Connect(c)) if c.protocol == rumqttc::mqttbytes::Protocol::V4 => {
            *buf = probe;
            return Ok(Connect {
                version: Version::V4,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                password: c.login.map(|l| l.password),
                will: c.last_will.is_some(),
                receive_maximum: None,
                max_packet_size: None,
                auth_method: false,
            });
        }
        Ok(_) => ReadError::Malformed,
        Err(e) => v4_error(e),
    };
    if first == ReadError::TooLarge {
        return Err(first);
    }
    match v5::Packet::read(buf, Some(max as u32)).map_err(v5_error)? {
        v5::Packet::Connect(c, will, login) => {
            let p = c.properties.as_ref();
            Ok(Connect {
                version: Version::V5,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                password: login.map(|l| l.password),
                will: will.is_some(),
                receive_maximum: p.and_then(|p| p.receive_maximum),
                max_packet_size: p.and_then(|p| p.max_packet_size),
                auth_method: p.is_some_and(|p| p.authentication_method.is_some()),
            })
        }
        _ => Err(ReadError::Malformed),
    }
}

/// Reads the next packet of a connected client.
pub fn read(version: Version, buf: &mut BytesMut, max: usize) -> Result<Inbound, ReadError> {
    match version {
        Version::V4 => read_v4(buf, max),
        Version::V5 => read_v5(buf, max),
    }
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<Inbound, ReadError> {
    use v4::Packet as P;
    Ok(match P::read(buf, max).map_err(v4_error)? {
        P::Publish(p) => Inbound::Publish {
            topic: Bytes::from(p.topic.into_bytes()),
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
            retain: p.retain,
            alias: false,
        },
        P::PubAck(_) => Inbound::PubAck,
        P::Subscribe(s) => {
            Inbound::Subscribe { pkid: s.pkid, filters: s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect() }
        }
        P::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics },
        P::PingReq => Inbound::PingReq,
        P::Disconnect => Inbound::Disconnect,
        P::Connect(_) => Inbound::Unexpected("second CONNECT"),
        P::PubRec(_) | P::PubRel(_) | P::PubComp(_) => Inbound::Unexpected("QoS 2 flow"),
        P::ConnAck(_) | P::SubAck(_) | P::UnsubAck(_) | P::PingResp => Inbound::Unexpected("server packet"),
    })
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Inbound, ReadError> {
    use v5::Packet as P;
    // A DISCONNECT without a reason code (remaining length 0) is valid MQTT 5 (reason 0x00),
    // which the codec refuses as a missing payload.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Inbound::Disconnect);
    }
    Ok(match P::read(buf, Some(max as u32)).map_err(v5_error)? {
        P::Publish(p) => Inbound::Publish {
            alias: p.properties.as_ref().is_some_and(|p| p.topic_alias.is_some()),
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
            retain: p.retain,
        },
        P::PubAck(_) => Inbound::PubAck,
        P::Subscribe(s) => {
            Inbound::Subscribe { pkid: s.pkid, filters: s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect() }
        }
        P::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters },
        P::PingReq(_) => Inbound::PingReq,
        P::Disconnect(_) => Inbound::Disconnect,
        P::Connect(..) => Inbound::Unexpected("second CONNECT"),
        P::Auth(_) => Inbound::Unexpected("AUTH"),
        P::PubRec(_) | P::PubRel(_) | P::PubComp(_) => Inbound::Unexpected("QoS 2 flow"),
        P::ConnAck(_) | P::SubAck(_) | P::UnsubAck(_) | P::PingResp(_) => Inbound::Unexpected("server packet"),
    })
}

/// Why a CONNECT is refused; each maps to the version's return or reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    ProtocolVersion,
    IdentifierRejected,
    BadCredentials,
    NotAuthorized,
    ServerBusy,
    BadAuthMethod,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::ProtocolVersion => "protocol_version",
            Refused::IdentifierRejected => "identifier_rejected",
            Refused::BadCredentials => "bad_credentials",
            Refused::NotAuthorized => "not_authorized",
            Refused::ServerBusy => "server_busy",
            Refused::BadAuthMethod => "bad_auth_method",
        }
    }
}

/// What the server tells an MQTT 5 client it supports, in the CONNACK.
pub struct ServerLimits {
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    /// The client id the server gave a client that sent an empty one.
    pub assigned_id: Option<String>,
}

/// The CONNACK: accepted (`None`) or refused. Session present is always 0: no session
/// outlives its connection.
pub fn connack(version: Version, out: &mut BytesMut, refused: Option<Refused>, limits: &ServerLimits) {
    match version {
        Version::V4 => {
            use v4::ConnectReturnCode as C;
            let code = match refused {
                None => C::Success,
                Some(Refused::ProtocolVersion) => C::RefusedProtocolVersion,
                Some(Refused::IdentifierRejected) => C::BadClientId,
                Some(Refused::BadCredentials) => C::BadUserNamePassword,
                Some(Refused::NotAuthorized | Refused::BadAuthMethod) => C::NotAuthorized,
                Some(Refused::ServerBusy) => C::ServiceUnavailable,
            };
            let _ = v4::ConnAck::new(code, false).write(out);
        }
        Version::V5 => {
            use v5::ConnectReturnCode as C;
            let code = match refused {
                None => C::Success,
                Some(Refused::ProtocolVersion) => C::UnsupportedProtocolVersion,
                Some(Refused::IdentifierRejected) => C::ClientIdentifierNotValid,
                Some(Refused::BadCredentials) => C::BadUserNamePassword,
                Some(Refused::NotAuthorized) => C::NotAuthorized,
                Some(Refused::ServerBusy) => C::ServerBusy,
                Some(Refused::BadAuthMethod) => C::BadAuthenticationMethod,
            };
            let properties = refused.is_none().then(|| v5::ConnAckProperties {
                // No session outlives its connection, no retained messages, QoS 1 at most,
                // no wildcard, shared or identified subscriptions.
                session_expiry_interval: Some(0),
                receive_max: Some(limits.receive_maximum),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(limits.max_packet_size),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                assigned_client_identifier: limits.assigned_id.clone(),
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            let _ = v5::ConnAck { session_present: false, code, properties }.write(out);
        }
    }
}

/// One SUBACK entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    QoS(u8),
    NotAuthorized,
    FilterInvalid,
    WildcardsNotSupported,
    SharedNotSupported,
    Quota,
}

pub fn suback(version: Version, out: &mut BytesMut, pkid: u16, codes: &[Granted]) {
    match version {
        Version::V4 => {
            use rumqttc::mqttbytes::QoS;
            let codes = codes
                .iter()
                .map(|g| match g {
                    Granted::QoS(0) => v4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                    Granted::QoS(_) => v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            let _ = v4::SubAck::new(pkid, codes).write(out);
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::QoS;
            use v5::SubscribeReasonCode as R;
            let return_codes = codes
                .iter()
                .map(|g| match g {
                    Granted::QoS(0) => R::Success(QoS::AtMostOnce),
                    Granted::QoS(_) => R::Success(QoS::AtLeastOnce),
                    Granted::NotAuthorized => R::NotAuthorized,
                    Granted::FilterInvalid => R::TopicFilterInvalid,
                    Granted::WildcardsNotSupported => R::WildcardSubscriptionsNotSupported,
                    Granted::SharedNotSupported => R::SharedSubscriptionsNotSupported,
                    Granted::Quota => R::QuotaExceeded,
                })
                .collect();
            let _ = v5::SubAck { pkid, return_codes, properties: None }.write(out);
        }
    }
}

/// The UNSUBACK; `existed[i]` says whether filter i was subscribed (MQTT 5 reports it).
pub fn unsuback(version: Version, out: &mut BytesMut, pkid: u16, existed: &[bool]) {
    match version {
        Version::V4 => {
            let _ = v4::UnsubAck::new(pkid).write(out);
        }
        Version::V5 => {
            let reasons = existed
                .iter()
                .map(|&e| if e { v5::UnsubAckReason::Success } else { v5::UnsubAckReason::NoSubscriptionExisted })
                .collect();
            let _ = v5::UnsubAck { pkid, reasons, properties: None }.write(out);
        }
    }
}

/// How a QoS 1 PUBLISH from a client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubOutcome {
    Accepted,
    NoSubscribers,
    NotAuthorized,
    TopicInvalid,
}

pub fn puback(version: Version, out: &mut BytesMut, pkid: u16, outcome: PubOutcome) {
    match version {
        Version::V4 => {
            let _ = v4::PubAck::new(pkid).write(out);
        }
        Version::V5 => {
            use v5::PubAckReason as R;
            let reason = match outcome {
                PubOutcome::Accepted => R::Success,
                PubOutcome::NoSubscribers => R::NoMatchingSubscribers,
                PubOutcome::NotAuthorized => R::NotAuthorized,
                PubOutcome::TopicInvalid => R::TopicNameInvalid,
            };
            let _ = v5::PubAck { pkid, reason, properties: None }.write(out);
        }
    }
}

pub fn publish(version: Version, out: &mut BytesMut, topic: &str, payload: Bytes, qos: u8, pkid: u16) {
    match version {
        Version::V4 => {
            use rumqttc::mqttbytes::QoS;
            let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            let p = v4::Publish { dup: false, qos, retain: false, topic: topic.to_owned(), pkid, payload };
            let _ = p.write(out);
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::QoS;
            let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            let p = v5::Publish {
                dup: false,
                qos,
                retain: false,
                topic: Bytes::copy_from_slice(topic.as_bytes()),
                pkid,
                payload,
                properties: None,
            };
            let _ = p.write(out);
        }
    }
}

pub fn pingresp(version: Version, out: &mut BytesMut) {
    match version {
        Version::V4 => {
            let _ = v4::PingResp.write(out);
        }
        Version::V5 => {
            let _ = v5::PingResp::write(out);
        }
    }
}

/// Why the server closes a connection; MQTT 5 says so in a DISCONNECT, MQTT 3.1.1 just closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    Malformed,
    ProtocolError,
    NotAuthorized,
    ShuttingDown,
    KeepAliveTimeout,
    TakenOver,
    TopicNameInvalid,
    PacketTooLarge,
    QuotaExceeded,
    RetainNotSupported,
    QoSNotSupported,
    TopicAliasInvalid,
}

pub fn disconnect(version: Version, out: &mut BytesMut, why: Closing) {
    if version == Version::V4 {
        return;
    }
    use v5::DisconnectReasonCode as R;
    let (reason, text) = match why {
        Closing::Malformed => (R::MalformedPacket, "malformed packet"),
        Closing::ProtocolError => (R::ProtocolError, "packet not expected now"),
        Closing::NotAuthorized => (R::NotAuthorized, "this connection may act only as its own device"),
        Closing::ShuttingDown => (R::ServerShuttingDown, "the gateway is shutting down"),
        Closing::KeepAliveTimeout => (R::KeepAliveTimeout, "nothing received for 1.5 keep-alive intervals"),
        Closing::TakenOver => (R::SessionTakenOver, "another connection took this client id"),
        Closing::TopicNameInvalid => (R::TopicNameInvalid, "only dfu/{id}/status may be published"),
        Closing::PacketTooLarge => (R::PacketTooLarge, "packet over mqtt.max_payload_bytes"),
        Closing::QuotaExceeded => (R::QuotaExceeded, "messages for this connection were not read in time"),
        Closing::RetainNotSupported => (R::RetainNotSupported, "retained messages are not kept"),
        Closing::QoSNotSupported => (R::QoSNotSupported, "QoS 2 is not served"),
        Closing::TopicAliasInvalid => (R::TopicAliasInvalid, "topic aliases are not accepted"),
    };
    // With a reason string: rumqttc writes a DISCONNECT without properties (or with empty
    // ones) with a wrong remaining length.
    let properties = v5::DisconnectProperties {
        session_expiry_interval: None,
        reason_string: Some(text.into()),
        user_properties: Vec::new(),
        server_reference: None,
    };
    let _ = v5::Disconnect { reason_code: reason, properties: Some(properties) }.write(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_connect(id: &str) -> BytesMut {
        let mut out = BytesMut::new();
        let c = v5::Connect { keep_alive: 30, client_id: id.into(), clean_start: true, properties: None };
        v5::Packet::Connect(c, None, None).write(&mut out, None).unwrap();
        out
    }

    #[test]
    fn the_protocol_level_picks_the_codec() {
        let mut b = v5_connect("dev-1");
        let c = read_connect(&mut b, 4096).unwrap();
        assert_eq!((c.version, c.client_id.as_str()), (Version::V5, "dev-1"));
        assert!(b.is_empty(), "the CONNECT is consumed");
        let mut b = BytesMut::new();
        v4::Connect::new("dev-2").write(&mut b).unwrap();
        let c = read_connect(&mut b, 4096).unwrap();
        assert_eq!((c.version, c.client_id.as_str()), (Version::V4, "dev-2"));
        let mut half = v5_connect("dev-1");
        half.truncate(5);
        assert!(matches!(read_connect(&mut half, 4096), Err(ReadError::Incomplete(_))));
        // Mosquitto 2.0's MQTT 5 CONNECT, with a Receive Maximum property.
        let mut b = BytesMut::from(&b"\x10\x15\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x14\x00\x05dev-x"[..]);
        let c = read_connect(&mut b, 4096).unwrap();
        assert_eq!((c.version, c.client_id.as_str(), c.receive_maximum), (Version::V5, "dev-x", Some(20)));
        let mut b = BytesMut::from(&[0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 30, 0, 0][..]);
        assert_eq!(read_connect(&mut b, 4096).unwrap_err(), ReadError::Level(3));
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(read_connect(&mut b, 4096).unwrap_err(), ReadError::Malformed);
        let mut b = BytesMut::from(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert_eq!(read_connect(&mut b, 4096).unwrap_err(), ReadError::TooLarge);
    }

    #[test]
    fn what_we_write_the_clients_codec_reads() {
        let limits = ServerLimits { receive_maximum: 10, max_packet_size: 2048, assigned_id: Some("fwgate-1".into()) };
        for version in [Version::V4, Version::V5] {
            let mut out = BytesMut::new();
            connack(version, &mut out, None, &limits);
            connack(version, &mut out, Some(Refused::ServerBusy), &limits);
            suback(version, &mut out, 3, &[Granted::QoS(1), Granted::NotAuthorized]);
            unsuback(version, &mut out, 4, &[true]);
            puback(version, &mut out, 5, PubOutcome::NotAuthorized);
            publish(version, &mut out, "dfu/dev-1/command", Bytes::from_static(b"abc"), 1, 6);
            pingresp(version, &mut out);
            disconnect(version, &mut out, Closing::TakenOver);
            let mut n = 0;
            let all = out.clone();
            while !out.is_empty() {
                let ok = match version {
                    Version::V4 => v4::Packet::read(&mut out, 1 << 16).map(drop).map_err(|e| format!("{e:?}")),
                    Version::V5 => v5::Packet::read(&mut out, None).map(drop).map_err(|e| format!("{e:?}")),
                };
                assert!(ok.is_ok(), "{version:?} packet {n}: {ok:?} in {all:02x?}");
                n += 1;
            }
            assert_eq!(n, if version == Version::V4 { 7 } else { 8 }, "{version:?}");
        }
    }
}
