//! The device's Status message: what it runs, how much it can take, how far it got.

use minicbor::Encoder;

use super::reader::{once, KeyKind, Reader};
use super::{infallible, DecodeError, Form};

/// A device's report. Borrowed from the input: decoding allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status<'a> {
    /// The firmware version the device runs.
    pub version: &'a str,
    /// Largest block the device accepts; `None` means the protocol default.
    pub mtu: Option<u32>,
    pub correlation_id: Option<u32>,
    /// The transfer in progress, if any.
    pub update: Option<UpdateProgress<'a>>,
    /// Extension: which firmware target of the device this Status is about.
    pub component: Option<&'a str>,
    /// Extension: how many WRITE blocks the device accepts per Status.
    pub window: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateProgress<'a> {
    /// The version whose blocks the device is writing.
    pub version: &'a str,
    /// The next byte the device expects.
    pub offset: u32,
}

impl<'a> Status<'a> {
    /// A first Status: just the running version.
    pub fn new(version: &'a str) -> Self {
        Status { version, mtu: None, correlation_id: None, update: None, component: None, window: None }
    }

    /// Decodes a Status in either form and says which form it was.
    pub fn decode(input: &'a [u8]) -> Result<(Status<'a>, Form), DecodeError> {
        let mut r = Reader::new(input)?;
        let len = r.map("message")?;
        let (status, form) = match (len, r.first_key_kind()?) {
            (Some(0), _) | (None, KeyKind::None) => return Err(DecodeError::Missing("version")),
            (_, KeyKind::Int) => (decode_fields(&mut r, len, Form::Packed)?, Form::Packed),
            (_, KeyKind::Text) => (decode_fields(&mut r, len, Form::Named)?, Form::Named),
            _ => return Err(DecodeError::WrongType("key")),
        };
        r.finish()?;
        if status.mtu == Some(0) {
            return Err(DecodeError::OutOfRange("mtu"));
        }
        Ok((status, form))
    }

    /// Encodes as a device would (used by simulated devices and tests).
    pub fn encode(&self, form: Form, out: &mut Vec<u8>) {
        match form {
            Form::Named => infallible(self.encode_named(out)),
            Form::Packed => infallible(self.encode_packed(out)),
        }
    }

    fn encode_named(&self, out: &mut Vec<u8>) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
        let n = 1
            + self.mtu.is_some() as u64
            + self.correlation_id.is_some() as u64
            + self.component.is_some() as u64
            + self.window.is_some() as u64
            + self.update.is_some() as u64;
        let mut e = Encoder::new(out);
        e.map(n)?.str("version")?.str(self.version)?;
        if let Some(mtu) = self.mtu {
            e.str("mtu")?.u32(mtu)?;
        }
        if let Some(cid) = self.correlation_id {
            e.str("correlation_id")?.u32(cid)?;
        }
        if let Some(c) = self.component {
            e.str("component")?.str(c)?;
        }
        if let Some(w) = self.window {
            e.str("window")?.u32(w)?;
        }
        if let Some(u) = self.update {
            e.str("status")?.map(2)?.str("version")?.str(u.version)?.str("offset")?.u32(u.offset)?;
        }
        Ok(())
    }

    fn encode_packed(&self, out: &mut Vec<u8>) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
        // serde_cbor's packed form writes every field of embedded-update's Status, nulls
        // included; the two extensions follow only when present so old devices' bytes match.
        let n = 4 + self.component.is_some() as u64 + self.window.is_some() as u64;
        let mut e = Encoder::new(out);
        e.map(n)?.u8(0)?.bytes(self.version.as_bytes())?;
        e.u8(1)?;
        match self.mtu {
            Some(v) => e.u32(v)?,
            None => e.null()?,
        };
        e.u8(2)?;
        match self.correlation_id {
            Some(v) => e.u32(v)?,
            None => e.null()?,
        };
        e.u8(3)?;
        match self.update {
            Some(u) => e.map(2)?.u8(0)?.bytes(u.version.as_bytes())?.u8(1)?.u32(u.offset)?,
            None => e.null()?,
        };
        if let Some(c) = self.component {
            e.u8(4)?.bytes(c.as_bytes())?;
        }
        if let Some(w) = self.window {
            e.u8(5)?.u32(w)?;
        }
        Ok(())
    }
}

/// The fields of a Status, whichever form names them.
#[derive(Clone, Copy)]
enum Field {
    Version,
    Mtu,
    CorrelationId,
    Update,
    Component,
    Window,
    Unknown,
}

impl Field {
    fn named(key: &str) -> Field {
        match key {
            "version" => Field::Version,
            "mtu" => Field::Mtu,
            "correlation_id" => Field::CorrelationId,
            // The seed names the in-progress map `status`; DESIGN.md also accepts `update`.
            "status" | "update" => Field::Update,
            "component" => Field::Component,
            "window" => Field::Window,
            _ => Field::Unknown,
        }
    }

    /// embedded-update's field order, then our two extensions.
    fn packed(key: u64) -> Field {
        match key {
            0 => Field::Version,
            1 => Field::Mtu,
            2 => Field::CorrelationId,
            3 => Field::Update,
            4 => Field::Component,
            5 => Field::Window,
            _ => Field::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Version => "version",
            Field::Mtu => "mtu",
            Field::CorrelationId => "correlation_id",
            Field::Update => "update",
            Field::Component => "component",
            Field::Window => "window",
            Field::Unknown => "unknown",
        }
    }
}

fn decode_fields<'a>(r: &mut Reader<'a>, len: Option<u64>, form: Form) -> Result<Status<'a>, DecodeError> {
    let mut s = Status::new("");
    let mut seen = 0u32;
    r.entries(len, "message", |r| {
        let field = match form {
            Form::Named => Field::named(r.text_key()?),
            Form::Packed => Field::packed(r.int_key()?),
        };
        if let Field::Unknown = field {
            return r.skip();
        }
        let name = field.name();
        once(&mut seen, 1 << field as u32, name)?;
        match field {
            Field::Version => s.version = r.text(name)?,
            Field::Mtu => s.mtu = r.opt_u32(name)?,
            Field::CorrelationId => s.correlation_id = r.opt_u32(name)?,
            Field::Update => s.update = decode_progress(r, form)?,
            Field::Component => s.component = if r.null(name)? { None } else { Some(r.text(name)?) },
            Field::Window => s.window = r.opt_u32(name)?,
            Field::Unknown => {}
        }
        Ok(())
    })?;
    if seen & (1 << Field::Version as u32) == 0 {
        return Err(DecodeError::Missing("version"));
    }
    Ok(s)
}

fn decode_progress<'a>(r: &mut Reader<'a>, form: Form) -> Result<Option<UpdateProgress<'a>>, DecodeError> {
    if r.null("update")? {
        return Ok(None);
    }
    let len = r.map("update")?;
    let mut version = None;
    let mut offset = None;
    let mut seen = 0u32;
    r.entries(len, "update", |r| {
        let key = match form {
            Form::Named => match r.text_key()? {
                "version" => 0,
                "offset" => 1,
                _ => u64::MAX,
            },
            Form::Packed => r.int_key()?,
        };
        match key {
            0 => {
                once(&mut seen, 1, "update.version")?;
                version = Some(r.text("update.version")?);
            }
            1 => {
                once(&mut seen, 2, "update.offset")?;
                offset = Some(r.u32("update.offset")?);
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(UpdateProgress {
        version: version.ok_or(DecodeError::Missing("update.version"))?,
        offset: offset.ok_or(DecodeError::Missing("update.offset"))?,
    }))
}
