//! Registrations whose plan effects are not applied yet. Registering or retagging a device
//! changes what the plans owe it (a complete wave of its new tag stages it, waves of its old
//! tag withdraw it, dynamic rollouts take it in), but the plans decide from the registry as
//! it is after the write. So the registration writes an intent with the devices, in the same
//! batch as their records; the plans act; the intent is deleted. An intent still there at
//! `open` is a registration a crash cut short, and is finished then (acting on a device twice
//! is harmless: members stay members, staged devices are not staged again).

use std::sync::atomic::Ordering;

use super::{DeviceSpec, Fleet, FleetError, Upserted};
use crate::store::{Cf, Store, StoreError};

const PREFIX: &[u8] = b"registration\0";

/// Devices registered (or changed) whose plan effects are owed.
#[derive(Debug)]
pub struct Registration {
    key: Vec<u8>,
    pub ids: Vec<String>,
}

fn key(n: u64) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// One past the last intent stored.
pub(super) fn next_key(store: &Store) -> Result<u64, StoreError> {
    let mut next = 0;
    store.scan(Cf::Meta, PREFIX, None, |k, _| {
        if let Ok(n) = <[u8; 8]>::try_from(&k[PREFIX.len()..]) {
            next = u64::from_be_bytes(n) + 1;
        }
        Ok(true)
    })?;
    Ok(next)
}

impl Fleet {
    /// Registers or updates devices as [`Fleet::upsert`] does, with an intent naming them in
    /// the same write; [`Fleet::registered`] deletes it once the plans have acted.
    pub fn register(&self, specs: Vec<DeviceSpec>, now: u64) -> Result<(Upserted, Registration), FleetError> {
        let ids: Vec<String> = specs.iter().map(|s| s.id.clone()).collect();
        let key = key(self.next_registration.fetch_add(1, Ordering::Relaxed));
        let value = serde_json::to_vec(&ids).map_err(|e| StoreError::Encode(e.to_string()))?;
        let out = self.upsert_noting(specs, now, Some((&key, &value)))?;
        Ok((out, Registration { key, ids }))
    }

    /// The plans have acted on a registration: its intent goes.
    pub fn registered(&self, r: Registration) -> Result<(), FleetError> {
        let mut b = self.store.batch();
        b.delete(Cf::Meta, &r.key);
        Ok(b.commit()?)
    }

    /// Registrations a crash left without their plan effects, oldest first.
    pub fn unfinished_registrations(&self) -> Result<Vec<Registration>, FleetError> {
        let mut out = Vec::new();
        self.store.scan(Cf::Meta, PREFIX, None, |k, v| {
            // An intent that does not decode is dropped with the next `registered`: its
            // devices are still in the registry, and a TUF refresh reconciles waves.
            let ids = serde_json::from_slice(v).unwrap_or_default();
            out.push(Registration { key: k.to_vec(), ids });
            Ok(true)
        })?;
        Ok(out)
    }
}
