//! A simulated device's side of the DFU exchange, without a transport: it builds the Status a
//! real device would send and applies the Commands it gets back, checking what a real device
//! checks — each WRITE continues where the device is, the SWAP checksum is the sha256 of the
//! bytes it assembled, a SYNC names the version it runs.

use sha2::{Digest, Sha256};

use crate::protocol::{Command, DecodeError, Form, Status, UpdateProgress};

/// How one DFU exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The device verified the image, swapped, and was told SYNC on the new version.
    Updated,
    /// The device stopped on purpose once it had this many bytes.
    Paused(u32),
    /// SYNC with nothing to do.
    Synced,
    Waited,
}

/// What a device refuses in a Command; each one is a gateway bug as the device sees it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("undecodable command: {0}")]
    Decode(#[from] DecodeError),
    #[error("reply in the {got} form to a {sent} Status")]
    Form { sent: &'static str, got: &'static str },
    #[error("WRITE at offset {offset} while the device holds {held} bytes of {version}")]
    Gap { version: String, offset: u32, held: usize },
    #[error("SWAP to {0} without a download of it")]
    SwapWithoutDownload(String),
    #[error("SWAP checksum {announced} is not the sha256 {assembled} of the assembled image")]
    Checksum { announced: String, assembled: String },
    #[error("SYNC on {synced} while the device runs {running}")]
    SyncVersion { synced: String, running: String },
}

/// A device's firmware state as it changes under DFU commands.
#[derive(Debug, Clone)]
pub struct DfuDevice {
    pub id: String,
    pub form: Form,
    pub mtu: u32,
    /// WRITE blocks accepted per Status (MQTT only).
    pub window: Option<u32>,
    pub running: String,
    /// (version, bytes written so far) of the transfer in progress.
    pub download: Option<(String, Vec<u8>)>,
    /// Offsets of every WRITE received, in order (one `u32` per block).
    pub offsets: Vec<u32>,
    pub swaps: Vec<[u8; 32]>,
    /// The image the device last swapped to.
    pub last_image: Vec<u8>,
}

impl DfuDevice {
    pub fn new(id: &str, form: Form, running: &str) -> DfuDevice {
        DfuDevice {
            id: id.into(),
            form,
            mtu: 512,
            window: None,
            running: running.into(),
            download: None,
            offsets: Vec::new(),
            swaps: Vec::new(),
            last_image: Vec::new(),
        }
    }

    /// Bytes of the transfer in progress.
    pub fn held(&self) -> u32 {
        self.download.as_ref().map_or(0, |(_, b)| b.len() as u32)
    }

    /// The Status this device sends now.
    pub fn status_bytes(&self) -> Vec<u8> {
        let update =
            self.download.as_ref().map(|(v, b)| UpdateProgress { version: v.as_str(), offset: b.len() as u32 });
        let s = Status { mtu: Some(self.mtu), window: self.window, update, ..Status::new(&self.running) };
        let mut out = Vec::new();
        s.encode(self.form, &mut out);
        out
    }

    /// Applies one encoded Command. `Ok(Some(_))` ends the exchange; `Ok(None)` asks for the
    /// next Status.
    pub fn apply(&mut self, payload: &[u8]) -> Result<Option<Ended>, DeviceError> {
        let (cmd, form) = Command::decode(payload)?;
        if form != self.form {
            return Err(DeviceError::Form { sent: self.form.as_str(), got: form.as_str() });
        }
        match cmd {
            Command::Write { version, offset, data, .. } => {
                if self.download.as_ref().is_none_or(|(v, _)| v != version) {
                    self.download = Some((version.to_owned(), Vec::new()));
                }
                let Some((_, buf)) = self.download.as_mut() else { unreachable!("set just above") };
                if offset as usize != buf.len() {
                    return Err(DeviceError::Gap { version: version.into(), offset, held: buf.len() });
                }
                self.offsets.push(offset);
                buf.extend_from_slice(data);
                Ok(None)
            }
            Command::Swap { version, checksum, .. } => {
                let Some((v, buf)) = self.download.take_if(|(v, _)| v == version) else {
                    return Err(DeviceError::SwapWithoutDownload(version.into()));
                };
                let digest: [u8; 32] = Sha256::digest(&buf).into();
                if digest != checksum {
                    // A real device discards an image that fails verification.
                    return Err(DeviceError::Checksum {
                        announced: hex::encode(checksum),
                        assembled: hex::encode(digest),
                    });
                }
                self.swaps.push(checksum);
                self.running = v;
                self.last_image = buf;
                Ok(None)
            }
            Command::Sync { version, .. } if version != self.running => {
                Err(DeviceError::SyncVersion { synced: version.into(), running: self.running.clone() })
            }
            Command::Sync { .. } => Ok(Some(if self.last_image.is_empty() { Ended::Synced } else { Ended::Updated })),
            Command::Wait { .. } => Ok(Some(Ended::Waited)),
        }
    }

    /// Whether a paused run has reached its pause point.
    pub fn paused_at(&self, pause_at: Option<u32>) -> Option<Ended> {
        let limit = pause_at?;
        let held = self.download.as_ref()?.1.len() as u32;
        (held >= limit).then_some(Ended::Paused(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(c: Command<'_>, form: Form) -> Vec<u8> {
        let mut v = Vec::new();
        c.encode(form, &mut v);
        v
    }

    #[test]
    fn a_device_assembles_verifies_and_refuses_what_a_real_one_would() {
        let img: Vec<u8> = (0..100u8).collect();
        let sha: [u8; 32] = Sha256::digest(&img).into();
        let mut d = DfuDevice::new("d", Form::Packed, "1.0.0");
        let w = |offset: u32, r: std::ops::Range<usize>| {
            encoded(Command::Write { version: "2.0.0", correlation_id: None, offset, data: &img[r] }, Form::Packed)
        };
        assert_eq!(d.apply(&w(0, 0..60)).unwrap(), None);
        assert!(matches!(d.apply(&w(70, 70..100)), Err(DeviceError::Gap { held: 60, .. })));
        d.apply(&w(60, 60..100)).unwrap();
        let named = encoded(Command::Swap { version: "2.0.0", correlation_id: None, checksum: sha }, Form::Named);
        assert!(matches!(d.apply(&named), Err(DeviceError::Form { .. })));
        let bad = encoded(Command::Swap { version: "2.0.0", correlation_id: None, checksum: [0; 32] }, Form::Packed);
        assert!(matches!(d.clone().apply(&bad), Err(DeviceError::Checksum { .. })));
        let swap = encoded(Command::Swap { version: "2.0.0", correlation_id: None, checksum: sha }, Form::Packed);
        assert_eq!(d.apply(&swap).unwrap(), None);
        assert_eq!((d.running.as_str(), d.last_image.as_slice()), ("2.0.0", img.as_slice()));
        let sync = encoded(Command::Sync { version: "2.0.0", correlation_id: None, poll: None }, Form::Packed);
        assert_eq!(d.apply(&sync).unwrap(), Some(Ended::Updated));
        let old = encoded(Command::Sync { version: "1.0.0", correlation_id: None, poll: None }, Form::Packed);
        assert!(matches!(d.apply(&old), Err(DeviceError::SyncVersion { .. })));
        assert!(matches!(d.apply(b"\xff"), Err(DeviceError::Decode(_))));
    }
}
