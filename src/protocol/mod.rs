//! DFU wire types and codecs, in both CBOR forms, the MQTT topic / CoAP path grammar, and the
//! CoAP option encoding both ends share.
//!
//! Owns: what a Status and a Command look like on the wire. Must not know: sockets, the
//! clock, RocksDB, or what the gateway decides. Decoding is total — any byte string yields a
//! value or a [`DecodeError`] — and borrows from the input instead of allocating, so a hostile
//! length field can never make us reserve memory.

pub mod coap;
mod command;
mod reader;
mod status;
pub mod topic;

pub use command::Command;
pub use status::{Status, UpdateProgress};

/// Which of the two encodings a message used; a reply is encoded in the form of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    /// Text-keyed maps with an `op` tag, as in the fleet-manager seed.
    Named,
    /// Integer-keyed maps, as serde_cbor's packed encoding of drogue `embedded-update` types.
    Packed,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Named => "named",
            Form::Packed => "packed",
        }
    }
}

/// Longest accepted version or component string, in bytes.
pub const MAX_TEXT_LEN: usize = 128;
/// Most entries accepted in any map (the largest real message has six).
pub const MAX_MAP_ENTRIES: usize = 16;
/// How deep an unknown field's value may nest before the message is refused.
pub const MAX_SKIP_DEPTH: usize = 4;
/// Largest WRITE data block a codec accepts (DESIGN.md caps blocks well below this).
pub const MAX_DATA_LEN: usize = 64 * 1024;

/// Why a message was refused. Every variant is a clean rejection: nothing was allocated in
/// proportion to a declared length and nothing panicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message ends before the value it declares")]
    Truncated,
    #[error("malformed cbor at byte {0}")]
    Malformed(usize),
    #[error("top-level value is not a map")]
    NotAMap,
    #[error("field `{0}` has the wrong type")]
    WrongType(&'static str),
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{0}` is out of range")]
    OutOfRange(&'static str),
    #[error("field `{field}` is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("field `{0}` is not valid utf-8")]
    NotUtf8(&'static str),
    #[error("field `{0}` is empty or holds NUL, CR or LF")]
    BadText(&'static str),
    #[error("field `{0}` appears twice")]
    Duplicate(&'static str),
    #[error("a map has more than {0} entries")]
    TooManyEntries(usize),
    #[error("a value nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("unknown op")]
    UnknownOp,
    #[error("unknown command variant {0}")]
    UnknownVariant(u64),
}

impl DecodeError {
    /// A short stable name, used as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::BadText(_) => "bad_text",
            DecodeError::Truncated => "truncated",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::NotAMap => "not_a_map",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::OutOfRange(_) => "out_of_range",
            DecodeError::TooLong { .. } => "too_long",
            DecodeError::NotUtf8(_) => "not_utf8",
            DecodeError::Duplicate(_) => "duplicate_field",
            DecodeError::TooManyEntries(_) => "too_many_entries",
            DecodeError::TooDeep(_) => "too_deep",
            DecodeError::Trailing(_) => "trailing_bytes",
            DecodeError::UnknownOp | DecodeError::UnknownVariant(_) => "unknown_command",
        }
    }
}

/// Encoding into a `Vec` cannot fail: its writer's error type is uninhabited and we never ask
/// minicbor for message or custom errors.
fn infallible<T>(r: Result<T, minicbor::encode::Error<std::convert::Infallible>>) -> T {
    match r {
        Ok(v) => v,
        Err(_) => unreachable!("encoding into a Vec<u8> has no failure mode"),
    }
}

#[cfg(test)]
mod vectors;
