//! Simulated devices that drive a gateway through the same protocols real devices use, for
//! integration tests, `fwgate load` and the peer benchmarks.
//!
//! Owns: the device side of DFU ([`device`]), its MQTT and CoAP shells ([`mqtt`], [`coap`]),
//! load runs with their statistics ([`run`], [`stats`]), and multi-target devices
//! ([`targets`]). Must not know the gateway's internals: it talks to it only over the wire.

pub mod coap;
pub mod device;
pub mod mqtt;
pub mod run;
pub mod stats;
pub mod targets;
