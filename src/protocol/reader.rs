//! A bounded CBOR reader over one message: every read names the field it is for, so a
//! failure becomes a precise [`DecodeError`], and nothing here allocates.

use minicbor::data::Type;
use minicbor::Decoder;

use super::{DecodeError, MAX_MAP_ENTRIES, MAX_SKIP_DEPTH, MAX_TEXT_LEN};

pub(crate) struct Reader<'b> {
    d: Decoder<'b>,
}

/// The type of a map's first key tells the two wire forms apart.
pub(crate) enum KeyKind {
    Text,
    Int,
    Other,
    /// The map is empty.
    None,
}

impl<'b> Reader<'b> {
    pub(crate) fn new(input: &'b [u8]) -> Result<Self, DecodeError> {
        if input.is_empty() {
            return Err(DecodeError::Empty);
        }
        Ok(Reader { d: Decoder::new(input) })
    }

    fn err(&self, e: minicbor::decode::Error, field: &'static str) -> DecodeError {
        if e.is_end_of_input() {
            DecodeError::Truncated
        } else if e.is_type_mismatch() {
            DecodeError::WrongType(field)
        } else {
            DecodeError::Malformed(e.position().unwrap_or(self.d.position()))
        }
    }

    pub(crate) fn datatype(&self, field: &'static str) -> Result<Type, DecodeError> {
        self.d.datatype().map_err(|e| self.err(e, field))
    }

    /// Reads a map header: `Some(n)` for a definite map, `None` for an indefinite one.
    pub(crate) fn map(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.datatype(field)? {
            Type::Map | Type::MapIndef => {}
            _ if field == "message" => return Err(DecodeError::NotAMap),
            _ => return Err(DecodeError::WrongType(field)),
        }
        let len = self.d.map().map_err(|e| self.err(e, field))?;
        if let Some(n) = len {
            if n > MAX_MAP_ENTRIES as u64 {
                return Err(DecodeError::TooManyEntries(MAX_MAP_ENTRIES));
            }
        }
        Ok(len)
    }

    /// Calls `entry` once per key/value pair of a map whose header was just read, for both
    /// definite and indefinite maps, never more than [`MAX_MAP_ENTRIES`] times.
    pub(crate) fn entries(
        &mut self,
        len: Option<u64>,
        field: &'static str,
        mut entry: impl FnMut(&mut Self) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        match len {
            Some(n) => {
                for _ in 0..n {
                    entry(self)?;
                }
            }
            None => {
                let mut seen = 0;
                loop {
                    if self.datatype(field)? == Type::Break {
                        self.d.skip().map_err(|e| self.err(e, field))?;
                        break;
                    }
                    seen += 1;
                    if seen > MAX_MAP_ENTRIES {
                        return Err(DecodeError::TooManyEntries(MAX_MAP_ENTRIES));
                    }
                    entry(self)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn first_key_kind(&self) -> Result<KeyKind, DecodeError> {
        Ok(match self.datatype("key")? {
            Type::String => KeyKind::Text,
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => KeyKind::Int,
            Type::Break => KeyKind::None,
            _ => KeyKind::Other,
        })
    }

    pub(crate) fn text_key(&mut self) -> Result<&'b str, DecodeError> {
        match self.datatype("key")? {
            Type::String => self.d.str().map_err(|e| self.err(e, "key")),
            _ => Err(DecodeError::WrongType("key")),
        }
    }

    pub(crate) fn int_key(&mut self) -> Result<u64, DecodeError> {
        match self.datatype("key")? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => self.d.u64().map_err(|e| self.err(e, "key")),
            _ => Err(DecodeError::WrongType("key")),
        }
    }

    /// True (and consumed) if the next value is CBOR null or undefined.
    pub(crate) fn null(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.datatype(field)? {
            Type::Null | Type::Undefined => {
                self.d.skip().map_err(|e| self.err(e, field))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A version or component name: text, or a UTF-8 byte string (the packed form's type).
    pub(crate) fn text(&mut self, field: &'static str) -> Result<&'b str, DecodeError> {
        let raw: &'b [u8] = match self.datatype(field)? {
            Type::String => self.d.str().map_err(|e| self.err(e, field))?.as_bytes(),
            Type::Bytes => self.d.bytes().map_err(|e| self.err(e, field))?,
            _ => return Err(DecodeError::WrongType(field)),
        };
        if raw.len() > MAX_TEXT_LEN {
            return Err(DecodeError::TooLong { field, max: MAX_TEXT_LEN });
        }
        let text = std::str::from_utf8(raw).map_err(|_| DecodeError::NotUtf8(field))?;
        // A version or component is one line of text: it is kept, compared and shown (escaped
        // where it holds other control characters), but never splits a line.
        if text.is_empty() || text.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
            return Err(DecodeError::BadText(field));
        }
        Ok(text)
    }

    pub(crate) fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'b [u8], DecodeError> {
        match self.datatype(field)? {
            Type::Bytes => {}
            _ => return Err(DecodeError::WrongType(field)),
        }
        let b = self.d.bytes().map_err(|e| self.err(e, field))?;
        if b.len() > max {
            return Err(DecodeError::TooLong { field, max });
        }
        Ok(b)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        match self.datatype(field)? {
            Type::U8 | Type::U16 | Type::U32 => self.d.u32().map_err(|e| self.err(e, field)),
            Type::U64 => Err(DecodeError::OutOfRange(field)),
            Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => Err(DecodeError::OutOfRange(field)),
            _ => Err(DecodeError::WrongType(field)),
        }
    }

    pub(crate) fn opt_u32(&mut self, field: &'static str) -> Result<Option<u32>, DecodeError> {
        if self.null(field)? {
            return Ok(None);
        }
        self.u32(field).map(Some)
    }

    /// Skips the value of an unknown field, refusing anything nested deeper than
    /// [`MAX_SKIP_DEPTH`] so that a hostile value cannot make us recurse or allocate.
    pub(crate) fn skip(&mut self) -> Result<(), DecodeError> {
        self.skip_at(0)
    }

    fn skip_at(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_SKIP_DEPTH {
            return Err(DecodeError::TooDeep(MAX_SKIP_DEPTH));
        }
        match self.datatype("value")? {
            Type::Array | Type::ArrayIndef => {
                let len = self.d.array().map_err(|e| self.err(e, "value"))?;
                self.items(len, 1, depth)
            }
            Type::Map | Type::MapIndef => {
                let len = self.d.map().map_err(|e| self.err(e, "value"))?;
                self.items(len, 2, depth)
            }
            Type::Tag => {
                self.d.tag().map_err(|e| self.err(e, "value"))?;
                self.skip_at(depth + 1)
            }
            Type::Break => Err(DecodeError::Malformed(self.d.position())),
            _ => self.d.skip().map_err(|e| self.err(e, "value")),
        }
    }

    fn items(&mut self, len: Option<u64>, per: u64, depth: usize) -> Result<(), DecodeError> {
        match len {
            Some(n) => {
                let n = n.saturating_mul(per);
                if n > (MAX_MAP_ENTRIES * 2) as u64 {
                    return Err(DecodeError::TooManyEntries(MAX_MAP_ENTRIES));
                }
                for _ in 0..n {
                    self.skip_at(depth + 1)?;
                }
            }
            None => {
                let mut seen = 0;
                while self.datatype("value")? != Type::Break {
                    seen += 1;
                    if seen > MAX_MAP_ENTRIES * 2 {
                        return Err(DecodeError::TooManyEntries(MAX_MAP_ENTRIES));
                    }
                    self.skip_at(depth + 1)?;
                }
                self.d.skip().map_err(|e| self.err(e, "value"))?;
            }
        }
        Ok(())
    }

    /// The whole input must be one value.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        let rest = self.d.input().len() - self.d.position();
        if rest > 0 {
            return Err(DecodeError::Trailing(rest));
        }
        Ok(())
    }
}

/// Records that a field was seen, refusing a second occurrence.
pub(crate) fn once(seen: &mut u32, bit: u32, field: &'static str) -> Result<(), DecodeError> {
    if *seen & bit != 0 {
        return Err(DecodeError::Duplicate(field));
    }
    *seen |= bit;
    Ok(())
}
