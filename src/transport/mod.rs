//! Transport shells: bytes in, one DFU step, bytes out — MQTT (fwgate's own listener, or
//! `external`: a client of the broker a fleet already runs) and CoAP (UDP). Thin: decisions
//! live in `engine` and `planner`.

pub mod coap;
pub mod external;
pub mod mqtt;
mod session;

pub use session::{Dfu, Handled, Local, Shape, Source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind listener {addr}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("mqtt TLS configuration: {0}")]
    Tls(String),
    #[error("mqtt broker: {0}")]
    Broker(String),
}
