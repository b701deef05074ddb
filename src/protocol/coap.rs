//! CoAP wire details the gateway and the devices it serves share (RFC 7252): how option
//! values encode unsigned integers, and the content formats of the DFU resources. The
//! resource paths are in [`super::topic`].

/// `application/octet-stream`: the firmware behind `GET /fw/{id}`.
pub const CF_OCTET_STREAM: u16 = 42;
/// `application/cbor`: Status and Command on `POST /dfu/{id}`.
pub const CF_CBOR: u16 = 60;

/// An option's uint value (§3.2): big-endian, no leading zero bytes.
pub fn uint(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|&&x| x == 0).count();
    b[skip..].to_vec()
}

/// Reads an option's uint value; `None` when it is longer than 4 bytes.
pub fn read_uint(v: &[u8]) -> Option<u32> {
    if v.len() > 4 {
        return None;
    }
    Some(v.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uints_are_minimal_and_read_back() {
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(60), [60]);
        assert_eq!(uint(0x0102_0304), [1, 2, 3, 4]);
        for v in [0, 1, 255, 256, 65_535, 1 << 20, u32::MAX] {
            assert_eq!(read_uint(&uint(v)), Some(v));
        }
        assert_eq!(read_uint(&[1, 2, 3, 4, 5]), None);
    }
}
