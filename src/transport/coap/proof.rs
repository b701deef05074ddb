//! Stateless proof that a peer receives what is sent to its address: a MAC of the address and
//! a time stamp under a key drawn at start. DTLS cookies and CoAP Echo values are both this,
//! so checking one needs no state per peer.

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct AddressKey([u8; 32]);

impl AddressKey {
    pub fn new() -> AddressKey {
        let mut key = [0u8; 32];
        if openssl::rand::rand_bytes(&mut key).is_err() {
            // No system randomness: the values stay unguessable only while the process is not
            // observed; they are still bound by their freshness window.
            key.iter_mut().for_each(|b| *b = fastrand::u8(..));
        }
        AddressKey(key)
    }

    /// The MAC of `peer` (none: a fixed value) and `stamp`.
    pub fn mac(&self, peer: Option<SocketAddr>, stamp: u64) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("hmac accepts any key length");
        match peer {
            Some(SocketAddr::V4(a)) => mac.update(&a.ip().octets()),
            Some(SocketAddr::V6(a)) => mac.update(&a.ip().octets()),
            None => {}
        }
        mac.update(&peer.map_or(0, |p| p.port()).to_be_bytes());
        mac.update(&stamp.to_be_bytes());
        mac.finalize().into_bytes().into()
    }
}
