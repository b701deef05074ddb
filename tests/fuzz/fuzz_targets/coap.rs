#![no_main]
//! One CoAP datagram through the exchange layer (Block2, DFU, options, duplicates) of a real
//! gateway.

use std::sync::OnceLock;

use fwgate::fuzzing::Fixture;
use libfuzzer_sys::fuzz_target;

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let _ = FIXTURE.get_or_init(Fixture::start).coap(data);
});
