//! One DFU exchange, shared by every transport: decode a Status, run the engine step on the
//! device's operation, persist any transition, encode the reply in the request's form.

use std::sync::Arc;

use tracing::{debug, warn};

use crate::engine::{self, EngineConfig, OpState, Target};
use crate::fleet::{Fleet, MAIN_COMPONENT};
use crate::planner::{Lookup, Planner};
use crate::protocol::{Command, Status};
use crate::telemetry::Telemetry;

/// What became of one message, for the transport's bookkeeping and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Commands were produced (WRITE, SWAP, SYNC).
    Replied,
    /// The device is not registered; it was told to WAIT.
    UnknownDevice,
    /// The message did not decode; nothing was changed or sent.
    BadInput,
    /// The operation changed under this message (a concurrent one, or the sweeper); nothing
    /// was sent, the device asks again.
    Stale,
    /// The store failed; nothing was acknowledged and nothing sent.
    Failed,
}

/// How many WRITEs one Status may get, and how large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// As the device asks (`window`, `mtu`), within the engine's limits: MQTT.
    Window,
    /// One WRITE of at most `max_block` bytes: a CoAP answer.
    One { max_block: u32 },
}

/// A failure of the state behind a DFU step (the store, a lost image).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Where a DFU step reads a device's operation and records what happened: the planner and
/// fleet of this node ([`Local`]), or a data-plane node's copy of what the planner told it
/// (`cluster::Replica`).
pub trait Source: Send + Sync {
    /// Notes a Status from a device running `version` on `component`; false when the
    /// device is not registered.
    fn observe(&self, device: &str, component: &str, version: &str, now: u64) -> Result<bool, SourceError>;
    /// What the component should get now (see [`Planner::lookup`]).
    fn lookup(&self, device: &str, component: &str, now: u64) -> Result<Lookup, SourceError>;
    /// Applies a step to operation `seq` if it is still in `from` (see
    /// [`Planner::record_reported`]); false when it moved on meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        device: &str,
        seq: u64,
        from: OpState,
        to: Option<OpState>,
        progress: Option<u32>,
        served: Option<&str>,
        reported: Option<&str>,
        now: u64,
    ) -> Result<bool, SourceError>;
}

/// This node's own planner and fleet: a single node, or the planner of a cluster.
pub struct Local {
    pub planner: Arc<Planner>,
    pub fleet: Arc<Fleet>,
}

impl Source for Local {
    fn observe(&self, device: &str, component: &str, version: &str, now: u64) -> Result<bool, SourceError> {
        Ok(self.fleet.observe(device, component, version, now)?)
    }

    fn lookup(&self, device: &str, component: &str, now: u64) -> Result<Lookup, SourceError> {
        Ok(self.planner.lookup(device, component, now)?)
    }

    fn record(
        &self,
        device: &str,
        seq: u64,
        from: OpState,
        to: Option<OpState>,
        progress: Option<u32>,
        served: Option<&str>,
        reported: Option<&str>,
        now: u64,
    ) -> Result<bool, SourceError> {
        Ok(self.planner.record_reported(device, seq, from, to, progress, served, reported, now)?)
    }
}

pub struct Dfu {
    source: Arc<dyn Source>,
    engine: EngineConfig,
    telemetry: Arc<Telemetry>,
}

impl Dfu {
    pub fn new(planner: Arc<Planner>, fleet: Arc<Fleet>, engine: EngineConfig, telemetry: Arc<Telemetry>) -> Dfu {
        Dfu::with_source(Arc::new(Local { planner, fleet }), engine, telemetry)
    }

    pub fn with_source(source: Arc<dyn Source>, engine: EngineConfig, telemetry: Arc<Telemetry>) -> Dfu {
        Dfu { source, engine, telemetry }
    }

    /// Handles one Status from `device`, pushing encoded replies onto `out` in the given
    /// [`Shape`].
    pub fn handle(
        &self,
        transport: &'static str,
        device: &str,
        payload: &[u8],
        now: u64,
        shape: Shape,
        out: &mut Vec<Vec<u8>>,
    ) -> Handled {
        let (mut status, form) = match Status::decode(payload) {
            Ok(v) => v,
            Err(e) => {
                self.telemetry.bad_input(e.kind());
                if let Some(suppressed) = self.telemetry.log_fault("bad_status") {
                    warn!(device, transport, error = %e, len = payload.len(), suppressed, "refused a Status");
                }
                return Handled::BadInput;
            }
        };
        if let Shape::One { max_block } = shape {
            status.window = None;
            status.mtu = Some(status.mtu.unwrap_or(self.engine.default_mtu).min(max_block));
        }
        let component = status.component.unwrap_or(MAIN_COMPONENT);
        match self.source.observe(device, component, status.version, now) {
            Ok(true) => {}
            Ok(false) => {
                self.telemetry.status("unknown_device");
                debug!(device, transport, "Status from an unknown device");
                push(out, &engine::wait(&self.engine, &status, None), form);
                return Handled::UnknownDevice;
            }
            Err(e) => return self.failed(device, &e),
        }
        let active = match self.source.lookup(device, component, now) {
            Ok(Lookup::Active(a)) => Some(a),
            Ok(Lookup::Nothing) => None,
            Ok(Lookup::Refused(why)) => {
                // Not a block of it: the operation failed with the reason, the device stays.
                if let Some(suppressed) = self.telemetry.log_fault("refused_image") {
                    warn!(device, transport, reason = %why, suppressed, "refused to serve an image");
                }
                self.telemetry.status("refused");
                push(out, &engine::handle_status(&self.engine, &status, None).commands[0], form);
                return Handled::Replied;
            }
            Ok(Lookup::Wait(poll)) => {
                // Another component of the device is being transferred: this one waits, as
                // long as its image asks if it does.
                self.telemetry.status("wait");
                push(out, &engine::wait(&self.engine, &status, poll), form);
                return Handled::Replied;
            }
            Ok(Lookup::Held(why)) => {
                // Trust is missing for a passing reason: the operation stays, the device asks
                // again after its poll interval.
                debug!(device, transport, reason = %why, "operation waits for trust");
                self.telemetry.status("waiting_for_trust");
                push(out, &engine::wait(&self.engine, &status, None), form);
                return Handled::Replied;
            }
            Err(e) => return self.failed(device, &e),
        };
        if let Some(a) =
            active.as_ref().filter(|a| !a.resume && matches!(a.state, OpState::Pending | OpState::Downloading))
        {
            // The bytes the device holds are not this image's (the operation's image changed
            // since they were served): its offset means nothing here, start again at 0.
            if status.update.as_ref().is_some_and(|u| u.version == a.version && u.offset > 0) {
                status.update = None;
                self.telemetry.transfer_restart("image_changed");
                debug!(device, transport, image = %a.meta.id(), "transfer restarted at 0: other bytes served before");
            }
        }
        let op = active
            .as_ref()
            .map(|a| (a.state, Target { version: &a.version, image: &a.image, sha256: a.meta.digest() }));
        let step = engine::handle_status(&self.engine, &status, op);
        if let Some(a) = &active {
            if step.transition.is_some() || step.progress.is_some() {
                let served = Some(a.meta.sha256.as_str());
                let reported = Some(status.version);
                match self.source.record(device, a.seq, a.state, step.transition, step.progress, served, reported, now)
                {
                    Ok(true) => {}
                    // The operation moved on under us (a concurrent message or the sweeper):
                    // answering from the stale state could contradict it, so stay silent and
                    // let the device ask again.
                    Ok(false) => {
                        self.telemetry.status("stale");
                        return Handled::Stale;
                    }
                    Err(e) => return self.failed(device, &e),
                }
                if let Some(to) = step.transition {
                    debug!(device, component, from = a.state.as_str(), to = to.as_str(), "operation transition");
                }
            }
        }
        let (mut blocks, mut bytes) = (0u64, 0u64);
        for c in &step.commands {
            if let Command::Write { data, .. } = c {
                blocks += 1;
                bytes += data.len() as u64;
            }
            push(out, c, form);
        }
        if blocks > 0 {
            self.telemetry.served(transport, blocks, bytes);
        }
        self.telemetry.status(match step.commands.first().map(Command::op) {
            Some("WRITE") => "write",
            Some("SWAP") => "swap",
            Some("WAIT") => "wait",
            _ => "sync",
        });
        Handled::Replied
    }

    fn failed(&self, device: &str, e: &SourceError) -> Handled {
        self.telemetry.store_error();
        warn!(device, error = %e, "could not handle a Status");
        Handled::Failed
    }
}

fn push(out: &mut Vec<Vec<u8>>, c: &Command<'_>, form: crate::protocol::Form) {
    let mut buf = Vec::with_capacity(c.encoded_len_hint());
    c.encode(form, &mut buf);
    out.push(buf);
}
