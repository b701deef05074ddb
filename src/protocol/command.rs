//! The gateway's Command message: WAIT, SYNC, WRITE, SWAP.

use minicbor::Encoder;

use super::reader::{once, KeyKind, Reader};
use super::{infallible, DecodeError, Form, MAX_DATA_LEN};

/// One command to a device. Borrowed: the gateway encodes a WRITE straight from a slice of the
/// hot image, and a device decodes one without copying the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Nothing for you now; ask again in `poll` seconds.
    Wait { correlation_id: Option<u32>, poll: Option<u32> },
    /// You are up to date.
    Sync { version: &'a str, correlation_id: Option<u32>, poll: Option<u32> },
    /// Write `data` at `offset`.
    Write { version: &'a str, correlation_id: Option<u32>, offset: u32, data: &'a [u8] },
    /// The image is complete: verify its sha256, switch to it and report back.
    Swap { version: &'a str, correlation_id: Option<u32>, checksum: [u8; 32] },
}

type EncodeResult = Result<(), minicbor::encode::Error<std::convert::Infallible>>;

impl<'a> Command<'a> {
    pub fn op(&self) -> &'static str {
        match self {
            Command::Wait { .. } => "WAIT",
            Command::Sync { .. } => "SYNC",
            Command::Write { .. } => "WRITE",
            Command::Swap { .. } => "SWAP",
        }
    }

    /// An upper bound of the encoded size, for sizing buffers before encoding.
    pub fn encoded_len_hint(&self) -> usize {
        let data = match self {
            Command::Write { data, .. } => data.len(),
            Command::Swap { .. } => 64,
            _ => 0,
        };
        96 + super::MAX_TEXT_LEN + data
    }

    pub fn encode(&self, form: Form, out: &mut Vec<u8>) {
        match form {
            Form::Named => infallible(self.encode_named(out)),
            Form::Packed => infallible(self.encode_packed(out)),
        }
    }

    fn encode_named(&self, out: &mut Vec<u8>) -> EncodeResult {
        let cid = self.correlation_id();
        let mut e = Encoder::new(out);
        match *self {
            Command::Wait { poll, .. } => {
                e.map(1 + poll.is_some() as u64 + cid.is_some() as u64)?.str("op")?.str("WAIT")?;
                if let Some(p) = poll {
                    e.str("poll")?.u32(p)?;
                }
            }
            Command::Sync { version, poll, .. } => {
                e.map(2 + poll.is_some() as u64 + cid.is_some() as u64)?;
                e.str("op")?.str("SYNC")?.str("version")?.str(version)?;
                if let Some(p) = poll {
                    e.str("poll")?.u32(p)?;
                }
            }
            Command::Write { version, offset, data, .. } => {
                e.map(5 + cid.is_some() as u64)?;
                e.str("op")?.str("WRITE")?.str("version")?.str(version)?;
                e.str("offset")?.u32(offset)?.str("size")?.u64(data.len() as u64)?;
                e.str("data")?.bytes(data)?;
            }
            Command::Swap { version, checksum, .. } => {
                e.map(3 + cid.is_some() as u64)?;
                e.str("op")?.str("SWAP")?.str("version")?.str(version)?;
                let mut hex = [0u8; 64];
                // Both lengths are fixed (32 bytes in, 64 out), so this cannot fail.
                if hex::encode_to_slice(checksum, &mut hex).is_ok() {
                    e.str("checksum")?.str(std::str::from_utf8(&hex).unwrap_or_default())?;
                }
            }
        }
        if let Some(c) = cid {
            e.str("correlation_id")?.u32(c)?;
        }
        Ok(())
    }

    fn encode_packed(&self, out: &mut Vec<u8>) -> EncodeResult {
        let mut e = Encoder::new(out);
        let opt = |e: &mut Encoder<&mut Vec<u8>>, v: Option<u32>| -> EncodeResult {
            match v {
                Some(v) => e.u32(v)?,
                None => e.null()?,
            };
            Ok(())
        };
        match *self {
            Command::Wait { correlation_id, poll } => {
                e.map(1)?.u8(0)?.map(2)?.u8(0)?;
                opt(&mut e, correlation_id)?;
                e.u8(1)?;
                opt(&mut e, poll)?;
            }
            Command::Sync { version, correlation_id, poll } => {
                e.map(1)?.u8(1)?.map(3)?.u8(0)?.bytes(version.as_bytes())?.u8(1)?;
                opt(&mut e, correlation_id)?;
                e.u8(2)?;
                opt(&mut e, poll)?;
            }
            Command::Write { version, correlation_id, offset, data } => {
                e.map(1)?.u8(2)?.map(4)?.u8(0)?.bytes(version.as_bytes())?.u8(1)?;
                opt(&mut e, correlation_id)?;
                e.u8(2)?.u32(offset)?.u8(3)?.bytes(data)?;
            }
            Command::Swap { version, correlation_id, checksum } => {
                e.map(1)?.u8(3)?.map(3)?.u8(0)?.bytes(version.as_bytes())?.u8(1)?;
                opt(&mut e, correlation_id)?;
                e.u8(2)?.bytes(&checksum)?;
            }
        }
        Ok(())
    }

    pub fn correlation_id(&self) -> Option<u32> {
        match *self {
            Command::Wait { correlation_id, .. }
            | Command::Sync { correlation_id, .. }
            | Command::Write { correlation_id, .. }
            | Command::Swap { correlation_id, .. } => correlation_id,
        }
    }

    /// Decodes a Command in either form (the device side of the protocol).
    pub fn decode(input: &'a [u8]) -> Result<(Command<'a>, Form), DecodeError> {
        let mut r = Reader::new(input)?;
        let len = r.map("message")?;
        let out = match (len, r.first_key_kind()?) {
            (Some(0), _) | (None, KeyKind::None) => return Err(DecodeError::Missing("op")),
            (_, KeyKind::Int) => (decode_packed(&mut r, len)?, Form::Packed),
            (_, KeyKind::Text) => (decode_named(&mut r, len)?, Form::Named),
            _ => return Err(DecodeError::WrongType("key")),
        };
        r.finish()?;
        Ok(out)
    }
}

#[derive(Default)]
struct Fields<'a> {
    op: Option<&'a str>,
    version: Option<&'a str>,
    correlation_id: Option<u32>,
    poll: Option<u32>,
    offset: Option<u32>,
    data: Option<&'a [u8]>,
    checksum: Option<[u8; 32]>,
}

fn checksum_from_hex(hex_text: &str) -> Result<[u8; 32], DecodeError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).map_err(|_| DecodeError::WrongType("checksum"))?;
    Ok(out)
}

fn decode_named<'a>(r: &mut Reader<'a>, len: Option<u64>) -> Result<Command<'a>, DecodeError> {
    let mut f = Fields::default();
    let mut seen = 0u32;
    r.entries(len, "message", |r| {
        match r.text_key()? {
            "op" => {
                once(&mut seen, 1, "op")?;
                f.op = Some(r.text("op")?);
            }
            "version" => {
                once(&mut seen, 2, "version")?;
                f.version = Some(r.text("version")?);
            }
            "correlation_id" => {
                once(&mut seen, 4, "correlation_id")?;
                f.correlation_id = r.opt_u32("correlation_id")?;
            }
            "poll" => {
                once(&mut seen, 8, "poll")?;
                f.poll = r.opt_u32("poll")?;
            }
            "offset" => {
                once(&mut seen, 16, "offset")?;
                f.offset = Some(r.u32("offset")?);
            }
            "data" => {
                once(&mut seen, 32, "data")?;
                f.data = Some(r.bytes("data", MAX_DATA_LEN)?);
            }
            "checksum" => {
                once(&mut seen, 64, "checksum")?;
                f.checksum = Some(checksum_from_hex(r.text("checksum")?)?);
            }
            // `size` repeats data's length (the seed sends it); anything else is skipped.
            _ => r.skip()?,
        }
        Ok(())
    })?;
    let version = || f.version.ok_or(DecodeError::Missing("version"));
    Ok(match f.op.ok_or(DecodeError::Missing("op"))? {
        "WAIT" => Command::Wait { correlation_id: f.correlation_id, poll: f.poll },
        "SYNC" => Command::Sync { version: version()?, correlation_id: f.correlation_id, poll: f.poll },
        "WRITE" => Command::Write {
            version: version()?,
            correlation_id: f.correlation_id,
            offset: f.offset.ok_or(DecodeError::Missing("offset"))?,
            data: f.data.ok_or(DecodeError::Missing("data"))?,
        },
        "SWAP" => Command::Swap {
            version: version()?,
            correlation_id: f.correlation_id,
            checksum: f.checksum.ok_or(DecodeError::Missing("checksum"))?,
        },
        _ => return Err(DecodeError::UnknownOp),
    })
}

fn decode_packed<'a>(r: &mut Reader<'a>, len: Option<u64>) -> Result<Command<'a>, DecodeError> {
    if len != Some(1) {
        return Err(DecodeError::WrongType("command"));
    }
    let variant = r.int_key()?;
    if variant > 3 {
        return Err(DecodeError::UnknownVariant(variant));
    }
    let inner = r.map("command")?;
    let mut f = Fields::default();
    let mut seen = 0u32;
    r.entries(inner, "command", |r| {
        let key = r.int_key()?;
        // Field numbers per variant: Wait{cid, poll}, Sync{version, cid, poll},
        // Write{version, cid, offset, data}, Swap{version, cid, checksum}.
        match (variant, key) {
            (0, 0) | (1..=3, 1) => {
                once(&mut seen, 4, "correlation_id")?;
                f.correlation_id = r.opt_u32("correlation_id")?;
            }
            (0, 1) | (1, 2) => {
                once(&mut seen, 8, "poll")?;
                f.poll = r.opt_u32("poll")?;
            }
            (1..=3, 0) => {
                once(&mut seen, 2, "version")?;
                f.version = Some(r.text("version")?);
            }
            (2, 2) => {
                once(&mut seen, 16, "offset")?;
                f.offset = Some(r.u32("offset")?);
            }
            (2, 3) => {
                once(&mut seen, 32, "data")?;
                f.data = Some(r.bytes("data", MAX_DATA_LEN)?);
            }
            (3, 2) => {
                once(&mut seen, 64, "checksum")?;
                let raw = r.bytes("checksum", 32)?;
                f.checksum = Some(raw.try_into().map_err(|_| DecodeError::WrongType("checksum"))?);
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    let version = || f.version.ok_or(DecodeError::Missing("version"));
    Ok(match variant {
        0 => Command::Wait { correlation_id: f.correlation_id, poll: f.poll },
        1 => Command::Sync { version: version()?, correlation_id: f.correlation_id, poll: f.poll },
        2 => Command::Write {
            version: version()?,
            correlation_id: f.correlation_id,
            offset: f.offset.ok_or(DecodeError::Missing("offset"))?,
            data: f.data.ok_or(DecodeError::Missing("data"))?,
        },
        _ => Command::Swap {
            version: version()?,
            correlation_id: f.correlation_id,
            checksum: f.checksum.ok_or(DecodeError::Missing("checksum"))?,
        },
    })
}
