//! One connection's bytes through the listener's state machine without a socket: what the fuzz
//! targets (`tests/fuzz`) and the replay of their findings (`tests/fuzz_replay.rs`) drive. The
//! input arrives in pieces of varying size, as TCP may deliver it; what the gateway writes is
//! collected, bounded.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{conn, Shared};
use crate::config::{DfuConfig, MqttConfig};
use crate::fleet::Fleet;
use crate::telemetry::Telemetry;
use crate::transport::Dfu;

/// What the gateway may write back to one harness connection before it is cut off.
const MAX_OUTPUT: usize = 1 << 20;

struct Memory<'a> {
    input: &'a [u8],
    pos: usize,
    step: usize,
    output: Vec<u8>,
}

impl AsyncRead for Memory<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Piece sizes cycle through 1..=61 bytes, so packets split at every boundary.
        this.step = this.step % 61 + 1;
        let n = this.step.min(buf.remaining()).min(this.input.len() - this.pos);
        buf.put_slice(&this.input[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Memory<'_> {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.output.len() + buf.len() > MAX_OUTPUT {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The listener's shared state over a running gateway's DFU step.
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    pub fn new(
        cfg: &MqttConfig,
        dfu_cfg: &DfuConfig,
        dfu: Arc<Dfu>,
        fleet: Arc<Fleet>,
        telemetry: Arc<Telemetry>,
    ) -> Session {
        Session { shared: Arc::new(Shared::new(cfg, dfu_cfg, dfu, fleet, telemetry, CancellationToken::new())) }
    }

    /// Serves `input` as one connection's bytes, then end of stream; returns what the gateway
    /// wrote. Must run inside a tokio runtime.
    pub async fn run(&self, input: &[u8]) -> Vec<u8> {
        let mut io = Memory { input, pos: 0, step: 0, output: Vec::new() };
        conn::serve(&mut io, self.shared.clone(), ([127, 0, 0, 1], 1).into(), None).await;
        io.output
    }

    /// Connections that still hold a session or a route: 0 once every run ended.
    pub fn residue(&self) -> usize {
        self.shared.sessions.load(std::sync::atomic::Ordering::Relaxed)
            + self.shared.routes.len()
            + self.shared.clients.len()
    }
}
