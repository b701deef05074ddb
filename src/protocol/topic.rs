//! Where DFU messages travel: MQTT topics `dfu/{device_id}/status` and
//! `dfu/{device_id}/command`, CoAP paths `/dfu/{device_id}` and `/fw/{device_id}`, and the
//! device-id grammar they share.

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// A device id: UUIDs, Cray xnames and plain names. Letters, digits and `-_.:`, so it can
/// never contain an MQTT wildcard or separator.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

pub fn status_topic(device_id: &str) -> String {
    format!("dfu/{device_id}/status")
}

pub fn command_topic(device_id: &str) -> String {
    format!("dfu/{device_id}/command")
}

/// The device id of a Status topic, or `None` if the topic is not one.
pub fn parse_status_topic(topic: &[u8]) -> Option<&str> {
    let topic = std::str::from_utf8(topic).ok()?;
    let id = topic.strip_prefix("dfu/")?.strip_suffix("/status")?;
    valid_device_id(id).then_some(id)
}

/// The device id of a command topic (`dfu/{id}/command`), or `None`: the only filter a device
/// may subscribe to. A wildcard can never be part of a valid id.
pub fn parse_command_topic(topic: &str) -> Option<&str> {
    let id = topic.strip_prefix("dfu/")?.strip_suffix("/command")?;
    valid_device_id(id).then_some(id)
}

/// A CoAP resource of the gateway, named by the request's Uri-Path segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoapPath<'a> {
    /// `POST /dfu/{device_id}`: a Status in, a Command out.
    Dfu(&'a str),
    /// `GET /fw/{device_id}`: the assigned image, block-wise.
    Firmware(&'a str),
}

pub fn parse_coap_path<'a>(segments: &[&'a [u8]]) -> Option<CoapPath<'a>> {
    let [kind, id] = segments else { return None };
    let id = std::str::from_utf8(id).ok().filter(|id| valid_device_id(id))?;
    match *kind {
        b"dfu" => Some(CoapPath::Dfu(id)),
        b"fw" => Some(CoapPath::Firmware(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_topics_name_one_device() {
        assert_eq!(parse_command_topic("dfu/dev-1/command"), Some("dev-1"));
        for refused in ["dfu/+/command", "dfu/#", "#", "dfu/a/b/command", "dfu//command", "dfu/dev-1/status"] {
            assert_eq!(parse_command_topic(refused), None, "{refused}");
        }
    }

    #[test]
    fn coap_paths() {
        assert_eq!(parse_coap_path(&[b"dfu", b"dev-1"]), Some(CoapPath::Dfu("dev-1")));
        assert_eq!(parse_coap_path(&[b"fw", b"x3000c0s19b1n0"]), Some(CoapPath::Firmware("x3000c0s19b1n0")));
        assert_eq!(parse_coap_path(&[b"fw"]), None);
        assert_eq!(parse_coap_path(&[b"fw", b"a", b"b"]), None);
        assert_eq!(parse_coap_path(&[b"fw", b"a+b"]), None);
        assert_eq!(parse_coap_path(&[b"other", b"a"]), None);
    }

    #[test]
    fn status_topics_round_trip() {
        assert_eq!(parse_status_topic(status_topic("x3000c0s19b1n0").as_bytes()), Some("x3000c0s19b1n0"));
        assert_eq!(parse_status_topic(b"dfu/a/b/status"), None);
        assert_eq!(parse_status_topic(b"dfu//status"), None);
        assert_eq!(parse_status_topic(b"dfu/dev1/command"), None);
        assert_eq!(parse_status_topic(b"dfu/\xff/status"), None);
    }

    #[test]
    fn ids_exclude_wildcards_and_bounds() {
        assert!(valid_device_id("9d5b1a4e-7c1f-4a55-9a0e-1f6ad1c2b3e4"));
        assert!(!valid_device_id("a+b"));
        assert!(!valid_device_id("a#"));
        assert!(!valid_device_id(&"a".repeat(MAX_DEVICE_ID_LEN + 1)));
    }
}
