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

/// A transfer in progress: how much of which version the device holds, and the running
/// sha256 of it. The bytes themselves are kept only when the device keeps images.
#[derive(Debug, Clone)]
pub struct Download {
    pub version: String,
    pub len: u32,
    hasher: Sha256,
    pub bytes: Vec<u8>,
}

impl Download {
    fn new(version: &str) -> Download {
        Download { version: version.into(), len: 0, hasher: Sha256::new(), bytes: Vec::new() }
    }

    /// A transfer the device claims to be `len` bytes into (for resume and restart tests);
    /// its checksum can never match, so the device must be started over or fail.
    pub fn claimed(version: &str, len: u32) -> Download {
        Download { len, ..Download::new(version) }
    }
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
    pub download: Option<Download>,
    /// Keep the bytes of images (tests compare them); without, the device keeps a running
    /// sha256 only, so a simulated fleet's memory does not grow with the image size.
    pub keep_images: bool,
    /// Offsets of every WRITE received, in order (one `u32` per block), when `keep_images`.
    pub offsets: Vec<u32>,
    pub swaps: Vec<[u8; 32]>,
    /// The image the device last swapped to (with `keep_images`), and its sha256.
    pub last_image: Vec<u8>,
    pub last_sha256: Option<[u8; 32]>,
    /// The firmware target (DFU `component`) this exchange updates; `None` is `main`.
    pub component: Option<String>,
    /// Sent with each Status and echoed in its answer: several clients of one device on one
    /// command topic (a target each) tell their answers apart by it.
    pub correlation_id: Option<u32>,
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
            keep_images: true,
            offsets: Vec::new(),
            swaps: Vec::new(),
            last_image: Vec::new(),
            last_sha256: None,
            component: None,
            correlation_id: None,
        }
    }

    /// Bytes of the transfer in progress.
    pub fn held(&self) -> u32 {
        self.download.as_ref().map_or(0, |d| d.len)
    }

    /// The Status this device sends now.
    pub fn status_bytes(&self) -> Vec<u8> {
        let update = self.download.as_ref().map(|d| UpdateProgress { version: d.version.as_str(), offset: d.len });
        let s = Status {
            mtu: Some(self.mtu),
            window: self.window,
            update,
            component: self.component.as_deref(),
            correlation_id: self.correlation_id,
            ..Status::new(&self.running)
        };
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
                // Another version, or the gateway starting the transfer over at 0: a new
                // download (as embedded-update starts one on a WRITE at offset 0).
                if self.download.as_ref().is_none_or(|d| d.version != version || (offset == 0 && d.len > 0)) {
                    self.download = Some(Download::new(version));
                }
                let Some(d) = self.download.as_mut() else { unreachable!("set just above") };
                if offset != d.len {
                    return Err(DeviceError::Gap { version: version.into(), offset, held: d.len as usize });
                }
                d.len += data.len() as u32;
                d.hasher.update(data);
                if self.keep_images {
                    d.bytes.extend_from_slice(data);
                    self.offsets.push(offset);
                }
                Ok(None)
            }
            Command::Swap { version, checksum, .. } => {
                let Some(d) = self.download.take_if(|d| d.version == version) else {
                    return Err(DeviceError::SwapWithoutDownload(version.into()));
                };
                let digest: [u8; 32] = d.hasher.finalize().into();
                if digest != checksum {
                    // A real device discards an image that fails verification.
                    return Err(DeviceError::Checksum {
                        announced: hex::encode(checksum),
                        assembled: hex::encode(digest),
                    });
                }
                self.swaps.push(checksum);
                self.running = d.version;
                self.last_image = d.bytes;
                self.last_sha256 = Some(digest);
                Ok(None)
            }
            Command::Sync { version, .. } if version != self.running => {
                Err(DeviceError::SyncVersion { synced: version.into(), running: self.running.clone() })
            }
            Command::Sync { .. } => Ok(Some(if self.last_sha256.is_none() { Ended::Synced } else { Ended::Updated })),
            Command::Wait { .. } => Ok(Some(Ended::Waited)),
        }
    }

    /// Whether a paused run has reached its pause point.
    pub fn paused_at(&self, pause_at: Option<u32>) -> Option<Ended> {
        let limit = pause_at?;
        let held = self.download.as_ref()?.len;
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
        assert_eq!(d.last_sha256, Some(sha));
        // Without kept images: the same verification from the running hash, no bytes kept.
        let mut lean = DfuDevice { keep_images: false, ..DfuDevice::new("l", Form::Packed, "1.0.0") };
        lean.apply(&w(0, 0..60)).unwrap();
        lean.apply(&w(60, 60..100)).unwrap();
        assert_eq!(lean.apply(&swap).unwrap(), None);
        assert_eq!((lean.last_sha256, lean.last_image.len()), (Some(sha), 0));
        let sync = encoded(Command::Sync { version: "2.0.0", correlation_id: None, poll: None }, Form::Packed);
        assert_eq!(d.apply(&sync).unwrap(), Some(Ended::Updated));
        let old = encoded(Command::Sync { version: "1.0.0", correlation_id: None, poll: None }, Form::Packed);
        assert!(matches!(d.apply(&old), Err(DeviceError::SyncVersion { .. })));
        assert!(matches!(d.apply(b"\xff"), Err(DeviceError::Decode(_))));
    }
}
