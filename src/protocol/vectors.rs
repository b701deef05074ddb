//! Every vector of `fixtures/dfu.json` (copied from shared/vectors) is a test: real
//! implementations' bytes decode to their stated meaning and re-encode identically (packed)
//! or to an equivalent map (named); every `invalid/*` input is a typed error.

use serde_json::Value;

use super::{Command, DecodeError, Form, Status, UpdateProgress};

fn vectors() -> Vec<Value> {
    let all: Value = serde_json::from_str(include_str!("../../fixtures/dfu.json")).expect("fixture parses");
    all["vectors"].as_array().expect("vectors array").clone()
}

fn text<'a>(m: &'a Value, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn num(m: &Value, k: &str) -> Option<u32> {
    m.get(k).and_then(Value::as_u64).map(|v| v as u32)
}

/// A CBOR map as an order-insensitive JSON-ish value, to compare named encodings.
fn canonical(bytes: &[u8]) -> Value {
    fn item(d: &mut minicbor::Decoder) -> Value {
        use minicbor::data::Type;
        match d.datatype().unwrap() {
            Type::Map => {
                let n = d.map().unwrap().unwrap();
                let mut m = serde_json::Map::new();
                for _ in 0..n {
                    let k = match item(d) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    m.insert(k, item(d));
                }
                Value::Object(m)
            }
            Type::String => Value::String(d.str().unwrap().to_owned()),
            Type::Bytes => Value::String(format!("h'{}'", hex::encode(d.bytes().unwrap()))),
            Type::Null => {
                d.skip().unwrap();
                Value::Null
            }
            _ => Value::from(d.u64().unwrap()),
        }
    }
    item(&mut minicbor::Decoder::new(bytes))
}

#[test]
fn valid_statuses_decode_to_their_meaning_and_reencode() {
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v["direction"] == "device->gateway" && v["form"] != "invalid") {
        let name = v["name"].as_str().unwrap();
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        let m = &v["meaning"];
        let (s, form) = Status::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(form.as_str(), v["form"].as_str().unwrap(), "{name}");
        let want = Status {
            version: text(m, "version").unwrap(),
            mtu: num(m, "mtu"),
            correlation_id: num(m, "correlation_id"),
            update: m
                .get("update")
                .map(|u| UpdateProgress { version: text(u, "version").unwrap(), offset: num(u, "offset").unwrap() }),
            component: text(m, "component"),
            window: num(m, "window"),
        };
        assert_eq!(s, want, "{name}");
        let mut out = Vec::new();
        s.encode(form, &mut out);
        match form {
            Form::Packed => assert_eq!(hex::encode(&out), v["hex"].as_str().unwrap(), "{name}"),
            Form::Named => assert_eq!(canonical(&out), canonical(&bytes), "{name}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "every valid Status vector was checked");
}

#[test]
fn valid_commands_decode_to_their_meaning_and_reencode() {
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v["direction"] == "gateway->device") {
        let name = v["name"].as_str().unwrap();
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        let m = &v["meaning"];
        let (c, form) = Command::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(form.as_str(), v["form"].as_str().unwrap(), "{name}");
        let data = m.get("data_hex").map(|d| hex::decode(d.as_str().unwrap()).unwrap());
        let checksum = m.get("checksum_hex").map(|d| {
            let mut c = [0u8; 32];
            hex::decode_to_slice(d.as_str().unwrap(), &mut c).unwrap();
            c
        });
        let cid = num(m, "correlation_id");
        let want = match text(m, "op").unwrap() {
            "WAIT" => Command::Wait { correlation_id: cid, poll: num(m, "poll") },
            "SYNC" => Command::Sync { version: text(m, "version").unwrap(), correlation_id: cid, poll: num(m, "poll") },
            "WRITE" => Command::Write {
                version: text(m, "version").unwrap(),
                correlation_id: cid,
                offset: num(m, "offset").unwrap(),
                data: data.as_deref().unwrap(),
            },
            "SWAP" => {
                Command::Swap { version: text(m, "version").unwrap(), correlation_id: cid, checksum: checksum.unwrap() }
            }
            op => panic!("{name}: unexpected op {op}"),
        };
        assert_eq!(c, want, "{name}");
        let mut out = Vec::new();
        c.encode(form, &mut out);
        match form {
            Form::Packed => assert_eq!(hex::encode(&out), v["hex"].as_str().unwrap(), "{name}"),
            Form::Named => assert_eq!(canonical(&out), canonical(&bytes), "{name}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 9, "every Command vector was checked");
}

#[test]
fn invalid_inputs_are_typed_errors() {
    let expected: &[(&str, DecodeError)] = &[
        ("invalid/empty", DecodeError::Empty),
        ("invalid/truncated_map", DecodeError::Truncated),
        ("invalid/not_a_map", DecodeError::NotAMap),
        ("invalid/version_wrong_type", DecodeError::WrongType("version")),
        ("invalid/missing_version", DecodeError::Missing("version")),
        ("invalid/negative_offset", DecodeError::OutOfRange("update.offset")),
        ("invalid/offset_too_large", DecodeError::OutOfRange("update.offset")),
        ("invalid/mtu_zero", DecodeError::OutOfRange("mtu")),
        ("invalid/huge_declared_length", DecodeError::Truncated),
        ("invalid/deep_nesting", DecodeError::NotAMap),
        ("invalid/trailing_garbage", DecodeError::Trailing(2)),
        ("invalid/indefinite_never_closed", DecodeError::Truncated),
        ("invalid/version_too_long", DecodeError::TooLong { field: "version", max: super::MAX_TEXT_LEN }),
    ];
    let all = vectors();
    let invalid: Vec<_> = all.iter().filter(|v| v["form"] == "invalid").collect();
    assert_eq!(invalid.len(), expected.len(), "a new invalid vector needs an expectation here");
    for v in invalid {
        let name = v["name"].as_str().unwrap();
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        let want = &expected.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no expectation for {name}")).1;
        assert_eq!(Status::decode(&bytes).err().as_ref(), Some(want), "{name}");
        // A device decoding the same garbage as a Command must fail just as cleanly.
        assert!(Command::decode(&bytes).is_err(), "{name} as a command");
    }
}

#[test]
fn hostile_unknown_fields_are_bounded() {
    // An unknown key whose value nests 100 arrays deep is refused, not recursed into.
    let mut b = vec![0xa2, 0x67];
    b.extend_from_slice(b"version");
    b.extend_from_slice(&[0x65]);
    b.extend_from_slice(b"0.1.0");
    b.extend_from_slice(&[0x61, b'x']);
    b.extend(std::iter::repeat_n(0x81, 100));
    b.push(0x00);
    assert_eq!(Status::decode(&b), Err(DecodeError::TooDeep(super::MAX_SKIP_DEPTH)));
    // A duplicate field is refused rather than silently overwritten.
    let dup = hex::decode("a26776657273696f6e65302e312e306776657273696f6e65302e312e31").unwrap();
    assert_eq!(Status::decode(&dup), Err(DecodeError::Duplicate("version")));
}

#[test]
fn every_prefix_and_every_byte_flip_of_a_real_message_is_total() {
    // Exhaustive over one message: no truncation or single-byte corruption panics.
    for v in vectors().iter().filter(|v| v["form"] != "invalid") {
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        for cut in 0..bytes.len() {
            let _ = Status::decode(&bytes[..cut]);
            let _ = Command::decode(&bytes[..cut]);
        }
        for i in 0..bytes.len() {
            for x in [0x00u8, 0x1b, 0x5b, 0x7b, 0x9f, 0xbf, 0xff] {
                let mut b = bytes.clone();
                b[i] = x;
                let _ = Status::decode(&b);
                let _ = Command::decode(&b);
            }
        }
    }
}
