#![no_main]
//! One MQTT connection's bytes (after a first byte choosing auth off or on) through the
//! listener's state machine and the DFU step of a real gateway.

use std::sync::OnceLock;

use fwgate::fuzzing::Fixture;
use libfuzzer_sys::fuzz_target;

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let _ = FIXTURE.get_or_init(Fixture::start).mqtt(data);
});
