//! Simulated devices that drive a gateway through the same protocols real devices use, for
//! integration tests, `fwgate load` and the peer benchmarks.
//!
//! Owns: the device side of DFU ([`device`]) and a CoAP client ([`coap`]). Must not know the
//! gateway's internals: it talks to it only over the wire.

pub mod coap;
pub mod device;
