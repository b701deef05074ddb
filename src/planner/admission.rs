//! Whether an image may reach a device, decided from signed facts (TUF targets of the
//! device's class, their `custom.tags` and `custom.version`), and what happens when it may
//! not: a refusal that can pass by itself holds the operation ("waiting for trust"), any
//! other fails it.

use crate::engine::OpState;
use crate::firmware::{version_order, ImageMeta};
use crate::tuf::Refusal;

use super::{Operation, Planner};

fn refusal_text(meta: &ImageMeta, r: &Refusal) -> String {
    match r {
        Refusal::NotATarget { .. } | Refusal::OtherTag { .. } => format!("image {} ({r}) may not be served", meta.id()),
        _ => format!("image {} may not be served: {r}", meta.id()),
    }
}

/// Why an image may not reach a device now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: String,
    /// The reason may pass by itself (TUF metadata expired, or not verified yet): the
    /// operation waits for trust instead of failing, and staging is retried after the next
    /// successful refresh. Otherwise the refusal is definitive.
    pub transient: bool,
}

impl Denial {
    fn of(meta: &ImageMeta, r: &Refusal) -> Denial {
        Denial { reason: refusal_text(meta, r), transient: r.is_transient() }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.transient {
            write!(f, "waiting for trust: {}", self.reason)
        } else {
            f.write_str(&self.reason)
        }
    }
}

impl Planner {
    /// Whether `meta` may reach a device of a class (and, with `tag`, is released for it);
    /// the refusal names the image.
    pub fn admit(&self, production: bool, meta: &ImageMeta, tag: Option<&str>, now: u64) -> Result<(), Denial> {
        self.trust.admit(production, &meta.sha256, meta.length, tag, now).map_err(|r| Denial::of(meta, &r))
    }

    /// The version `meta` installs as its signed metadata states it (`custom.version` of the
    /// verified target for a class), else its label.
    pub fn signed_version(&self, production: bool, meta: &ImageMeta) -> String {
        self.trust.signed_version(production, &meta.sha256, meta.length).unwrap_or_else(|| meta.version.clone())
    }

    /// Why the image of a device's head operation may not reach it, if so: not a verified
    /// target for its class, or not released for its tag (checked whatever the operation's
    /// state, so a finished operation's image is not handed out either), or, before the
    /// transfer starts, a downgrade by the version the device will report: the target's
    /// signed `custom.version` where there is one, else `reports` (the operation's version —
    /// the image's label, or the `firmwareVersion` of its FAS identity), which is what the
    /// device's running version is comparable with.
    pub fn refusal(
        &self,
        device: &str,
        component: &str,
        state: OpState,
        meta: &ImageMeta,
        reports: &str,
        now: u64,
    ) -> Option<Denial> {
        let admitted = self
            .fleet
            .with_class(device, |production, tag| self.admit(production, meta, tag, now).map(|()| production))?;
        let production = match admitted {
            Ok(p) => p,
            Err(d) => return Some(d),
        };
        if state == OpState::Pending && !self.allow_downgrade {
            let running = self.fleet.running(device, component)?;
            let to =
                self.trust.signed_version(production, &meta.sha256, meta.length).unwrap_or_else(|| reports.to_owned());
            if let (Some(from), Some(order)) = (version_order(&running), version_order(&to)) {
                if order < from {
                    let label = if to == meta.version { String::new() } else { format!(" (image {})", meta.id()) };
                    return Some(Denial {
                        reason: format!("downgrade from {running} to {to}{label} refused (tuf.allow_downgrade is off)"),
                        transient: false,
                    });
                }
            }
        }
        None
    }

    /// Why operation `seq` of a device would wait for trust if its device asked now (its
    /// image's TUF metadata expired, or not verified yet), for operators' views.
    pub fn waits_for_trust(&self, op: &Operation, now: u64) -> Option<String> {
        if op.state.is_terminal() {
            return None;
        }
        let (name, version) = op.image.split_once('@')?;
        let meta = self.firmware.get(name, version)?;
        self.refusal(&op.device, &op.component, op.state, &meta, &op.version, now)
            .filter(|d| d.transient)
            .map(|d| d.to_string())
    }

    /// Why a device's head operation waits for trust, if it does.
    pub fn waiting_for_trust(&self, device: &str) -> Option<String> {
        let (seq, why) = self.held.get(device).map(|e| e.clone())?;
        let live = self.ops.get(device).is_some_and(|ops| ops.iter().any(|o| o.seq == seq && !o.state.is_terminal()));
        live.then_some(why)
    }

    /// How many operations wait for trust now, and how many started to since the start.
    pub fn trust_holds(&self) -> (usize, u64) {
        let ids: Vec<String> = self.held.iter().map(|e| e.key().clone()).collect();
        let now = ids.iter().filter(|id| self.waiting_for_trust(id).is_some()).count();
        (now, self.holds.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Notes that operation `seq` of a device waits for trust; an operation in flight gets a
    /// fresh time limit (its device is there, asking): an outage of the TUF repository does
    /// not time transfers out.
    pub(super) fn hold(&self, device: &str, seq: u64, why: &str, now: u64, asked: bool) {
        if let Some(mut ops) = self.ops.get_mut(device).filter(|_| asked) {
            if let Some(o) = ops.iter_mut().find(|o| o.seq == seq && o.state.in_flight()) {
                o.last_activity = o.last_activity.max(now);
            }
        }
        let fresh = self.held.get(device).is_none_or(|e| e.0 != seq);
        if fresh {
            self.holds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.held.insert(device.to_owned(), (seq, why.to_owned()));
        }
    }
}
