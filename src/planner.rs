//! Who gets what and when. For now the simplest planner: an operator assigns an image to a
//! device, which creates one operation per (device, component); the DFU step moves it
//! through its states, and a sweeper times out silent ones. Waves, rollouts and actions build
//! on this (later issues).
//!
//! Every transition is written to the store before it is acknowledged anywhere.

pub mod select;

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::engine::{timed_out, OpState};
use crate::firmware::{Firmware, FirmwareError, ImageMeta};
use crate::fleet::{Fleet, FleetError};
use crate::store::{Cf, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("no device {0}")]
    UnknownDevice(String),
    #[error("no image {0}")]
    UnknownImage(String),
    #[error("image reference {0:?} is not NAME@VERSION")]
    BadImageRef(String),
    #[error("image {image} is for hardware {wanted:?}, device {device} is {actual:?}")]
    Hardware { image: String, device: String, wanted: Vec<String>, actual: Option<String> },
    #[error("device {device} has an operation in flight ({state}); wait for it to finish or time out")]
    InFlight { device: String, state: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
}

/// One (device, component, image) update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub device: String,
    pub component: String,
    /// NAME@VERSION.
    pub image: String,
    pub version: String,
    pub length: u64,
    pub state: OpState,
    /// The offset the device last reported (in memory between transitions).
    pub offset: u32,
    pub created_at: u64,
    /// When the state last changed.
    pub updated_at: u64,
    /// When the device last sent a Status for this operation.
    pub last_activity: u64,
    /// Why it ended, for failed and timed-out operations.
    #[serde(default)]
    pub detail: Option<String>,
}

impl Operation {
    /// Bytes written so far as a percentage of the image.
    pub fn progress_percent(&self) -> f64 {
        match self.state {
            OpState::Swapping | OpState::Succeeded => 100.0,
            _ if self.length == 0 => 0.0,
            _ => (self.offset as f64 * 100.0 / self.length as f64).min(100.0),
        }
    }
}

fn op_key(device: &str, component: &str) -> String {
    format!("{device}\0{component}")
}

/// What a transport needs to run one DFU step: the operation's state and the image, hot.
pub struct ActiveOp {
    pub state: OpState,
    pub meta: Arc<ImageMeta>,
    pub image: Bytes,
}

pub struct Planner {
    store: Store,
    fleet: Arc<Fleet>,
    firmware: Arc<Firmware>,
    /// Per device, its operations by component; the map entry is the device's lock.
    ops: DashMap<String, Vec<Operation>>,
    op_timeout_secs: u64,
}

impl Planner {
    /// Loads operations. In-flight ones get a fresh time limit from `now`: while the gateway
    /// was down their devices could not report.
    pub fn open(
        store: Store,
        fleet: Arc<Fleet>,
        firmware: Arc<Firmware>,
        op_timeout_secs: u64,
        now: u64,
    ) -> Result<Planner, PlannerError> {
        let ops: DashMap<String, Vec<Operation>> = DashMap::new();
        for mut op in store.load_all::<Operation>(Cf::Ops)? {
            if op.state.in_flight() {
                op.last_activity = op.last_activity.max(now);
            }
            ops.entry(op.device.clone()).or_default().push(op);
        }
        Ok(Planner { store, fleet, firmware, ops, op_timeout_secs })
    }

    /// Assigns `image` (NAME@VERSION) to a device's component, replacing a pending or finished
    /// operation. Refused while one is in flight: at most one operation per device at a time.
    pub fn assign(&self, device: &str, component: &str, image: &str, now: u64) -> Result<Operation, PlannerError> {
        let (name, version) = image.split_once('@').ok_or_else(|| PlannerError::BadImageRef(image.into()))?;
        let hardware = self.fleet.hardware(device).ok_or_else(|| PlannerError::UnknownDevice(device.into()))?;
        let meta = self.firmware.get(name, version).ok_or_else(|| PlannerError::UnknownImage(image.into()))?;
        if !meta.fits_hardware(hardware.as_deref()) {
            return Err(PlannerError::Hardware {
                image: image.into(),
                device: device.into(),
                wanted: meta.hardware.clone(),
                actual: hardware,
            });
        }
        let mut ops = self.ops.entry(device.to_owned()).or_default();
        if let Some(busy) = ops.iter().find(|o| o.state.in_flight()) {
            return Err(PlannerError::InFlight { device: device.into(), state: busy.state.as_str() });
        }
        let op = Operation {
            device: device.into(),
            component: component.into(),
            image: meta.id(),
            version: meta.version.clone(),
            length: meta.length,
            state: OpState::Pending,
            offset: 0,
            created_at: now,
            updated_at: now,
            last_activity: now,
            detail: None,
        };
        let mut b = self.store.batch();
        b.put_json(Cf::Ops, op_key(device, component).as_bytes(), &op)?;
        b.commit()?;
        ops.retain(|o| o.component != component);
        ops.push(op.clone());
        ops.sort_by(|a, b| a.component.cmp(&b.component));
        Ok(op)
    }

    pub fn operation(&self, device: &str, component: &str) -> Option<Operation> {
        self.ops.get(device)?.iter().find(|o| o.component == component).cloned()
    }

    /// All operations of a device, by component.
    pub fn operations_of(&self, device: &str) -> Vec<Operation> {
        self.ops.get(device).map(|v| v.clone()).unwrap_or_default()
    }

    pub fn counts(&self) -> Vec<(OpState, usize)> {
        let mut n = [0usize; OpState::ALL.len()];
        for e in self.ops.iter() {
            for o in e.iter() {
                n[OpState::ALL.iter().position(|s| *s == o.state).unwrap_or(0)] += 1;
            }
        }
        OpState::ALL.iter().copied().zip(n).collect()
    }

    /// The operation and its image, ready for a DFU step; `None` when nothing is assigned.
    pub fn lookup(&self, device: &str, component: &str) -> Result<Option<ActiveOp>, PlannerError> {
        let Some((state, image)) = self.operation_image(device, component) else {
            return Ok(None);
        };
        let (name, version) = image.split_once('@').unwrap_or((image.as_str(), ""));
        let meta = self.firmware.get(name, version).ok_or(PlannerError::UnknownImage(image.clone()))?;
        let image = self.firmware.bytes(&meta)?;
        Ok(Some(ActiveOp { state, meta, image }))
    }

    /// The state of a device's operation on `component`, without copying it.
    pub fn operation_state(&self, device: &str, component: &str) -> Option<OpState> {
        let ops = self.ops.get(device)?;
        ops.iter().find(|o| o.component == component).map(|o| o.state)
    }

    fn operation_image(&self, device: &str, component: &str) -> Option<(OpState, String)> {
        let ops = self.ops.get(device)?;
        ops.iter().find(|o| o.component == component).map(|o| (o.state, o.image.clone()))
    }

    /// Applies what a DFU step observed. A transition is written to the store before this
    /// returns (and so before the reply goes out); progress alone stays in memory. A step
    /// computed from a state that has changed meanwhile is dropped (`Ok(false)`).
    pub fn record(
        &self,
        device: &str,
        component: &str,
        from: OpState,
        to: Option<OpState>,
        progress: Option<u32>,
        now: u64,
    ) -> Result<bool, PlannerError> {
        let Some(mut ops) = self.ops.get_mut(device) else { return Ok(false) };
        let Some(op) = ops.iter_mut().find(|o| o.component == component) else { return Ok(false) };
        if op.state != from {
            return Ok(false);
        }
        if let Some(to) = to {
            let mut next = op.clone();
            next.state = to;
            next.updated_at = now;
            next.last_activity = now;
            if let Some(p) = progress {
                next.offset = p;
            }
            if to == OpState::Failed {
                next.detail = Some(format!("device came back on another version than {} after SWAP", next.version));
            }
            let mut b = self.store.batch();
            b.put_json(Cf::Ops, op_key(device, component).as_bytes(), &next)?;
            b.commit()?;
            *op = next;
        } else {
            op.last_activity = now;
            if let Some(p) = progress {
                op.offset = p;
            }
        }
        Ok(true)
    }

    /// Times out in-flight operations silent for longer than the limit; returns how many.
    pub fn sweep_timeouts(&self, now: u64) -> Result<usize, PlannerError> {
        let mut n = 0;
        for mut e in self.ops.iter_mut() {
            // Each device is written under its own entry lock, so a Status racing the sweep
            // either lands first (and the op is no longer silent) or sees TimedOut.
            let mut b = self.store.batch();
            let mut next = e.clone();
            for op in next.iter_mut().filter(|o| timed_out(o.state, o.last_activity, now, self.op_timeout_secs)) {
                op.detail = Some(format!("no Status for {} s", now - op.last_activity));
                op.state = OpState::TimedOut;
                op.updated_at = now;
                b.put_json(Cf::Ops, op_key(&op.device, &op.component).as_bytes(), &*op)?;
                n += 1;
            }
            if !b.is_empty() {
                b.commit()?;
                *e = next;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FirmwareConfig;
    use crate::fleet::{DeviceSpec, MAIN_COMPONENT};

    struct World {
        _dir: tempfile::TempDir,
        planner: Planner,
    }

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let fleet = Arc::new(Fleet::open(store.clone(), 100).unwrap());
        let firmware = Arc::new(Firmware::open(store.clone(), FirmwareConfig::default()).unwrap());
        fleet
            .upsert(
                vec![
                    DeviceSpec { id: "d1".into(), hardware: Some("nrf52".into()), ..Default::default() },
                    DeviceSpec { id: "d2".into(), hardware: Some("esp32".into()), ..Default::default() },
                ],
                0,
            )
            .unwrap();
        firmware.add("app", "2.0", vec!["nrf52".into()], Bytes::from_static(b"0123456789"), 0).unwrap();
        World { planner: Planner::open(store, fleet, firmware, 100, 0).unwrap(), _dir: dir }
    }

    #[test]
    fn assign_checks_device_image_and_hardware() {
        let w = world();
        let p = &w.planner;
        assert!(matches!(p.assign("nope", MAIN_COMPONENT, "app@2.0", 1), Err(PlannerError::UnknownDevice(_))));
        assert!(matches!(p.assign("d1", MAIN_COMPONENT, "app@9", 1), Err(PlannerError::UnknownImage(_))));
        assert!(matches!(p.assign("d1", MAIN_COMPONENT, "app", 1), Err(PlannerError::BadImageRef(_))));
        assert!(matches!(p.assign("d2", MAIN_COMPONENT, "app@2.0", 1), Err(PlannerError::Hardware { .. })));
        let op = p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap();
        assert_eq!(op.state, OpState::Pending);
        assert_eq!(p.lookup("d1", MAIN_COMPONENT).unwrap().unwrap().image.len(), 10);
    }

    #[test]
    fn one_operation_in_flight_per_device_and_stale_steps_are_dropped() {
        let w = world();
        let p = &w.planner;
        p.assign("d1", MAIN_COMPONENT, "app@2.0", 1).unwrap();
        assert!(p.record("d1", MAIN_COMPONENT, OpState::Pending, Some(OpState::Downloading), Some(0), 2).unwrap());
        assert!(matches!(p.assign("d1", "bios", "app@2.0", 3), Err(PlannerError::InFlight { .. })));
        // A step computed from Pending, arriving after the move to Downloading, changes nothing.
        assert!(!p.record("d1", MAIN_COMPONENT, OpState::Pending, Some(OpState::Downloading), Some(5), 3).unwrap());
        assert!(p.record("d1", MAIN_COMPONENT, OpState::Downloading, None, Some(4), 4).unwrap());
        assert_eq!(p.operation("d1", MAIN_COMPONENT).unwrap().offset, 4);
    }

    #[test]
    fn silent_operations_time_out_and_fresh_ones_do_not() {
        let w = world();
        let p = &w.planner;
        p.assign("d1", MAIN_COMPONENT, "app@2.0", 0).unwrap();
        p.record("d1", MAIN_COMPONENT, OpState::Pending, Some(OpState::Downloading), Some(0), 10).unwrap();
        assert_eq!(p.sweep_timeouts(109).unwrap(), 0);
        assert_eq!(p.sweep_timeouts(110).unwrap(), 1);
        let op = p.operation("d1", MAIN_COMPONENT).unwrap();
        assert_eq!(op.state, OpState::TimedOut);
        assert!(op.detail.unwrap().contains("no Status"));
    }
}
