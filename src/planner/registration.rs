//! Registering or changing devices and what the plans owe them for it, as one change that
//! survives a crash: the registry write carries an intent naming the devices (see
//! [`crate::fleet::Registration`]); the waves and dynamic rollouts act; the intent goes. A
//! crash between the write and the plans' reaction is finished by [`finish_registrations`]
//! when the gateway opens again.

use super::rollouts::{RolloutError, Rollouts};
use super::waves::{WaveError, Waves};
use crate::fleet::{DeviceSpec, Fleet, FleetError, Registration, Upserted};

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Waves(#[from] WaveError),
    #[error(transparent)]
    Rollouts(#[from] RolloutError),
}

/// Registers (or updates) devices; devices joining a tag with a complete wave get its
/// version, devices leaving one lose what it staged, and devices matching a dynamic rollout's
/// filter join it. `rollouts` is `None` where there are none (tests of waves alone).
pub fn register_devices(
    fleet: &Fleet,
    waves: &Waves,
    rollouts: Option<&Rollouts>,
    specs: Vec<DeviceSpec>,
    now: u64,
) -> Result<Upserted, RegisterError> {
    let (out, registration) = fleet.register(specs, now)?;
    apply(fleet, waves, rollouts, registration, now)?;
    Ok(out)
}

/// Finishes the registrations a crash cut short (at open, once the plans are loaded); returns
/// how many there were.
pub fn finish_registrations(
    fleet: &Fleet,
    waves: &Waves,
    rollouts: Option<&Rollouts>,
    now: u64,
) -> Result<usize, RegisterError> {
    let unfinished = fleet.unfinished_registrations()?;
    let n = unfinished.len();
    for r in unfinished {
        apply(fleet, waves, rollouts, r, now)?;
    }
    Ok(n)
}

fn apply(
    fleet: &Fleet,
    waves: &Waves,
    rollouts: Option<&Rollouts>,
    r: Registration,
    now: u64,
) -> Result<(), RegisterError> {
    waves.devices_changed(&r.ids, now)?;
    if let Some(rollouts) = rollouts {
        rollouts.devices_changed(&r.ids, now)?;
    }
    fleet.registered(r)?;
    Ok(())
}
