#![no_main]
//! A Status, named or packed CBOR: decoded, re-encoded, and handled by the DFU step.

use std::sync::OnceLock;

use fwgate::fuzzing::Fixture;
use libfuzzer_sys::fuzz_target;

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let _ = FIXTURE.get_or_init(Fixture::start).status(data);
});
