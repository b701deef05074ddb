//! A data-plane node's copy of what the planner told it, answering DFU steps like a planner
//! would: the [`Source`] of its `Dfu`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::{Answer, Report, View};
use crate::engine::OpState;
use crate::firmware::ImageMeta;
use crate::planner::{ActiveOp, Lookup};
use crate::telemetry::Telemetry;
use crate::transport::{Source, SourceError};

/// A device that keeps sending Statuses on one version is reported seen this often.
const SEEN_EVERY_SECS: u64 = 10;
/// A transition the planner has not confirmed in a view is sent again after this long.
const RESEND_MS: u64 = 2_000;

/// One component's answer as this node holds it.
enum Held {
    Nothing,
    Wait(Option<u32>),
    Held(String),
    Refused(String),
    Active(Op),
}

struct Op {
    seq: u64,
    /// What the planner's view says, and where this node has seen the device get since.
    told: OpState,
    state: OpState,
    meta: Arc<ImageMeta>,
    resume: bool,
    foreign: bool,
    version: String,
    /// See `Answer::Active`.
    trusted_until: Option<u64>,
    no_downgrade: bool,
    /// Progress not reported yet.
    progress: Option<u32>,
    /// When the state (ahead of `told`) was last sent to the planner.
    sent_ms: u64,
}

#[derive(Default)]
struct Device {
    components: Vec<(String, Held)>,
    /// Per component, the version last reported seen, and when.
    seen: Vec<(String, String, u64)>,
}

/// Images by sha256, bounded in bytes; the least recently used go first.
struct Cache {
    max_bytes: u64,
    bytes: u64,
    tick: u64,
    images: HashMap<String, (Bytes, u64)>,
}

pub struct Replica {
    devices: DashMap<String, Device>,
    cache: Mutex<Cache>,
    /// Digests to fetch (the fetcher drops ones it has or is fetching).
    fetch: mpsc::Sender<String>,
    reports: mpsc::Sender<Report>,
    telemetry: Arc<Telemetry>,
}

impl Replica {
    pub fn new(
        cache_bytes: u64,
        fetch: mpsc::Sender<String>,
        reports: mpsc::Sender<Report>,
        telemetry: Arc<Telemetry>,
    ) -> Replica {
        Replica {
            devices: DashMap::new(),
            cache: Mutex::new(Cache { max_bytes: cache_bytes, bytes: 0, tick: 0, images: HashMap::new() }),
            fetch,
            reports,
            telemetry,
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Takes the planner's view of a device; `None` removes it (no longer registered).
    /// An operation this node saw get further than the view says keeps where it got: the
    /// report is on its way.
    pub fn apply(&self, device: &str, view: Option<View>) {
        let Some(view) = view else {
            self.devices.remove(device);
            return;
        };
        let mut entry = self.devices.entry(device.to_owned()).or_default();
        let old = std::mem::take(&mut entry.components);
        let mut components = Vec::with_capacity(view.components.len());
        for e in view.components {
            let held = match e.answer {
                Answer::Nothing => Held::Nothing,
                Answer::Wait { poll } => Held::Wait(poll),
                Answer::Held { why } => Held::Held(why),
                Answer::Refused { why } => Held::Refused(why),
                Answer::Active { seq, state, image, resume, foreign, version, trusted_until, no_downgrade } => {
                    let mut op = Op {
                        seq,
                        told: state,
                        state,
                        meta: Arc::new(image),
                        resume,
                        foreign,
                        version,
                        trusted_until,
                        no_downgrade,
                        progress: None,
                        sent_ms: 0,
                    };
                    let before = old.iter().find_map(|(c, h)| match h {
                        Held::Active(o) if *c == e.component && o.seq == seq => Some(o),
                        _ => None,
                    });
                    if let Some(b) = before {
                        if b.state.stage() > state.stage() && !state.is_terminal() {
                            op.state = b.state;
                            op.sent_ms = b.sent_ms;
                        }
                        op.resume |= b.resume && b.meta.sha256 == op.meta.sha256;
                        op.progress = b.progress;
                    }
                    if !self.cached(&op.meta.sha256) {
                        let _ = self.fetch.try_send(op.meta.sha256.clone());
                    }
                    Held::Active(op)
                }
            };
            components.push((e.component, held));
        }
        entry.components = components;
    }

    /// The operation this node holds for a device's component, and where it has it.
    pub fn state(&self, device: &str, component: &str) -> Option<(u64, OpState)> {
        let d = self.devices.get(device)?;
        d.components.iter().find_map(|(c, h)| match h {
            Held::Active(o) if c == component => Some((o.seq, o.state)),
            _ => None,
        })
    }

    /// This node's own rule, for tests and the simulator: no device has two operations in
    /// flight here.
    pub fn audit(&self) -> Result<(), String> {
        for d in self.devices.iter() {
            let flying: Vec<u64> = d
                .components
                .iter()
                .filter_map(|(_, h)| match h {
                    Held::Active(o) if o.state.in_flight() => Some(o.seq),
                    _ => None,
                })
                .collect();
            if flying.len() > 1 {
                return Err(format!("{} has operations {flying:?} in flight", d.key()));
            }
        }
        Ok(())
    }

    fn cached(&self, sha256: &str) -> bool {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).images.contains_key(sha256)
    }

    /// Keeps an image (already checked against its digest).
    pub fn insert_image(&self, sha256: String, bytes: Bytes) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.tick += 1;
        let (tick, len) = (c.tick, bytes.len() as u64);
        if let Some((old, _)) = c.images.insert(sha256, (bytes, tick)) {
            c.bytes -= old.len() as u64;
        }
        c.bytes += len;
        while c.bytes > c.max_bytes && c.images.len() > 1 {
            let Some(oldest) = c.images.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) else { break };
            if let Some((b, _)) = c.images.remove(&oldest) {
                c.bytes -= b.len() as u64;
            }
        }
    }

    /// Whether an image is worth fetching: not held yet.
    pub fn wants(&self, sha256: &str) -> bool {
        !self.cached(sha256)
    }

    /// (images, bytes) held.
    pub fn cache_size(&self) -> (usize, u64) {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        (c.images.len(), c.bytes)
    }

    fn image(&self, sha256: &str) -> Option<Bytes> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.tick += 1;
        let tick = c.tick;
        let (bytes, used) = c.images.get_mut(sha256)?;
        *used = tick;
        Some(bytes.clone())
    }

    fn send(&self, r: Report) {
        if self.reports.try_send(r).is_err() {
            // Sent again by the next sweep while no view confirms it.
            self.telemetry.cluster("report_dropped");
        }
    }

    /// What to report now: progress not reported yet, and states the planner has not
    /// confirmed for a while (sent again).
    pub fn sweep(&self, now_ms: u64) -> Vec<Report> {
        let mut out = Vec::new();
        for mut d in self.devices.iter_mut() {
            let device = d.key().clone();
            for (_, held) in d.components.iter_mut() {
                let Held::Active(op) = held else { continue };
                let ahead = op.state.stage() > op.told.stage() && now_ms.saturating_sub(op.sent_ms) >= RESEND_MS;
                if op.progress.is_none() && !ahead {
                    continue;
                }
                if ahead {
                    op.sent_ms = now_ms;
                }
                out.push(Report::Step {
                    device: device.clone(),
                    seq: op.seq,
                    to: ahead.then_some(op.state),
                    progress: op.progress.take(),
                    served: (ahead && op.resume).then(|| op.meta.sha256.clone()),
                    reported: None,
                    at: now_ms / 1000,
                });
            }
        }
        out
    }
}

impl Source for Replica {
    fn observe(&self, device: &str, component: &str, version: &str, now: u64) -> Result<bool, SourceError> {
        let Some(mut d) = self.devices.get_mut(device) else { return Ok(false) };
        let full = d.seen.len() >= 16;
        let due = match d.seen.iter_mut().find(|(c, _, _)| c == component) {
            Some((_, v, at)) if v == version && now.saturating_sub(*at) < SEEN_EVERY_SECS => false,
            Some((_, v, at)) => {
                (*v, *at) = (version.to_owned(), now);
                true
            }
            // Components come from devices: keep their number bounded.
            None if full => false,
            None => {
                d.seen.push((component.to_owned(), version.to_owned(), now));
                true
            }
        };
        drop(d);
        if due {
            let (device, component, version) = (device.to_owned(), component.to_owned(), version.to_owned());
            self.send(Report::Seen { device, component, version, at: now });
        }
        Ok(true)
    }

    fn lookup(&self, device: &str, component: &str, now: u64) -> Result<Lookup, SourceError> {
        let Some(d) = self.devices.get(device) else { return Ok(Lookup::Nothing) };
        let Some((_, held)) = d.components.iter().find(|(c, _)| c == component) else { return Ok(Lookup::Nothing) };
        Ok(match held {
            Held::Nothing => Lookup::Nothing,
            Held::Wait(poll) => Lookup::Wait(*poll),
            Held::Held(why) => Lookup::Held(why.clone()),
            Held::Refused(why) => Lookup::Refused(why.clone()),
            // Past the view's trust deadline nothing is served, planner or not.
            Held::Active(op)
                if !op.state.is_terminal()
                    && op.trusted_until.is_some_and(|t| now >= t)
                    && !crate::planner::rules::broken(crate::planner::rules::Rule::TrustDeadline) =>
            {
                self.telemetry.cluster("trust_expired");
                Lookup::Held(format!("TUF metadata expired at {}", op.trusted_until.unwrap_or(0)))
            }
            // A downgrade is never started here: the planner refuses it once it hears what
            // the device runs.
            Held::Active(op)
                if op.state == OpState::Pending && op.no_downgrade && downgrade(&d.seen, component, &op.version) =>
            {
                self.telemetry.cluster("downgrade_held");
                Lookup::Held(format!("{} would be a downgrade", op.version))
            }
            Held::Active(op) => match self.image(&op.meta.sha256) {
                Some(image) => Lookup::Active(ActiveOp {
                    seq: op.seq,
                    state: op.state,
                    meta: op.meta.clone(),
                    image,
                    // Another node may have served this image's first bytes, which the planner
                    // learns only from its report: unless the planner knows another image's
                    // bytes were served, the device's offset for this version is taken.
                    resume: op.resume || !op.foreign,
                    foreign: op.foreign,
                    version: op.version.clone(),
                }),
                None => {
                    // Fetched from the planner; the device asks again in a second.
                    let _ = self.fetch.try_send(op.meta.sha256.clone());
                    self.telemetry.cluster("image_not_ready");
                    Lookup::Wait(Some(1))
                }
            },
        })
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
        let Some(mut d) = self.devices.get_mut(device) else { return Ok(false) };
        // One transfer per device: a second component does not start while one is in flight
        // here (the planner's view grants one start, and refuses any other).
        let starts = from == OpState::Pending && to.is_some_and(|t| t.in_flight());
        let busy =
            d.components.iter().any(|(_, h)| matches!(h, Held::Active(o) if o.seq != seq && o.state.in_flight()));
        if starts && busy {
            return Ok(false);
        }
        let Some(op) = d.components.iter_mut().find_map(|(_, h)| match h {
            Held::Active(o) if o.seq == seq => Some(o),
            _ => None,
        }) else {
            return Ok(false);
        };
        if op.state != from {
            return Ok(false);
        }
        if served == Some(op.meta.sha256.as_str()) {
            op.resume = true;
        }
        if progress.is_some() {
            op.progress = progress;
        }
        let Some(to) = to else { return Ok(true) };
        op.state = to;
        // The Status's time (this node's clock, as the sweep's).
        op.sent_ms = now.saturating_mul(1000);
        let report = Report::Step {
            device: device.to_owned(),
            seq,
            to: Some(to),
            progress: op.progress.take(),
            served: served.map(str::to_owned),
            reported: reported.map(str::to_owned),
            at: now,
        };
        drop(d);
        self.send(report);
        Ok(true)
    }
}

/// Whether the version a device last reported for `component` is above `to`.
fn downgrade(seen: &[(String, String, u64)], component: &str, to: &str) -> bool {
    let Some((_, running, _)) = seen.iter().find(|(c, ..)| c == component) else { return false };
    matches!((crate::firmware::version_order(running), crate::firmware::version_order(to)), (Some(a), Some(b)) if b < a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Entry;

    fn meta(sha: &str) -> ImageMeta {
        ImageMeta {
            name: "fw".into(),
            version: "1.0.0".into(),
            length: 4,
            sha256: sha.into(),
            hardware: vec![],
            chunk_bytes: 1024,
            created_at: 0,
            identity: None,
        }
    }

    fn active(seq: u64, state: OpState) -> View {
        let answer = Answer::Active {
            seq,
            state,
            image: meta("aa"),
            resume: false,
            foreign: true,
            version: "1.0.0".into(),
            trusted_until: None,
            no_downgrade: false,
        };
        View { at_ms: 1, components: vec![Entry { component: "main".into(), answer }] }
    }

    /// A pending operation of image "aa" to 1.0.0, as a view carries it.
    fn pending(seq: u64, trusted_until: Option<u64>, no_downgrade: bool) -> Answer {
        Answer::Active {
            seq,
            state: OpState::Pending,
            image: meta("aa"),
            resume: false,
            foreign: false,
            version: "1.0.0".into(),
            trusted_until,
            no_downgrade,
        }
    }

    fn replica() -> (Replica, mpsc::Receiver<String>, mpsc::Receiver<Report>) {
        let (ftx, frx) = mpsc::channel(8);
        let (rtx, rrx) = mpsc::channel(8);
        (Replica::new(10, ftx, rtx, Arc::new(Telemetry::new())), frx, rrx)
    }

    #[test]
    fn an_image_not_held_is_fetched_and_the_device_waits_for_it() {
        let (r, mut fetch, _) = replica();
        assert!(!r.observe("d1", "main", "0.9", 1).unwrap(), "unknown before a view");
        r.apply("d1", Some(active(7, OpState::Pending)));
        assert_eq!(fetch.try_recv().unwrap(), "aa");
        assert!(matches!(r.lookup("d1", "main", 1).unwrap(), Lookup::Wait(Some(1))));
        r.insert_image("aa".into(), Bytes::from_static(b"abcd"));
        let Lookup::Active(a) = r.lookup("d1", "main", 1).unwrap() else { panic!("active") };
        assert_eq!((a.seq, a.state, &a.image[..]), (7, OpState::Pending, &b"abcd"[..]));
        assert!(!a.resume, "the planner knows another image's bytes were served last");
        assert!(matches!(r.lookup("d1", "other", 1).unwrap(), Lookup::Nothing));
        r.apply("d1", None);
        assert!(matches!(r.lookup("d1", "main", 1).unwrap(), Lookup::Nothing));
    }

    #[test]
    fn a_lost_or_overtaken_seen_report_is_sent_again_at_the_devices_next_status_ten_seconds_on() {
        let (r, _, mut reports) = replica();
        r.apply("d1", Some(View { at_ms: 1, components: vec![] }));
        let seen = |reports: &mut mpsc::Receiver<Report>| match reports.try_recv() {
            Ok(Report::Seen { version, .. }) => Some(version),
            _ => None,
        };
        assert!(r.observe("d1", "main", "2.0", 100).unwrap());
        assert_eq!(seen(&mut reports).as_deref(), Some("2.0"));
        r.observe("d1", "main", "2.0", 105).unwrap();
        assert_eq!(seen(&mut reports), None, "not again within 10 s");
        // That report may have been lost, or overtaken by an older one another node sent: the
        // device's next Status 10 s on reports what it runs again, and the planner converges.
        r.observe("d1", "main", "2.0", 110).unwrap();
        assert_eq!(seen(&mut reports).as_deref(), Some("2.0"));
        // Another version is reported at once.
        r.observe("d1", "main", "2.1", 111).unwrap();
        assert_eq!(seen(&mut reports).as_deref(), Some("2.1"));
    }

    #[test]
    fn a_state_the_planner_has_not_confirmed_survives_a_view_and_is_sent_again() {
        let (r, _, mut reports) = replica();
        r.apply("d1", Some(active(7, OpState::Pending)));
        assert!(r
            .record("d1", 7, OpState::Pending, Some(OpState::Downloading), Some(64), Some("aa"), None, 5)
            .unwrap());
        assert!(matches!(reports.try_recv().unwrap(), Report::Step { to: Some(OpState::Downloading), .. }));
        // A step from a state the node no longer holds is stale.
        assert!(!r.record("d1", 7, OpState::Pending, Some(OpState::Downloading), None, None, None, 5).unwrap());
        // A view published before the report arrived keeps the node's state.
        r.apply("d1", Some(active(7, OpState::Pending)));
        let Lookup::Wait(_) = r.lookup("d1", "main", 1).unwrap() else { panic!("no image yet") };
        r.insert_image("aa".into(), Bytes::from_static(b"abcd"));
        let Lookup::Active(a) = r.lookup("d1", "main", 1).unwrap() else { panic!("active") };
        assert_eq!(a.state, OpState::Downloading);
        assert!(a.resume, "the bytes served were this image's");
        let later = crate::now_millis() + RESEND_MS;
        let again = r.sweep(later);
        assert!(matches!(&again[..], [Report::Step { seq: 7, to: Some(OpState::Downloading), .. }]), "{again:?}");
        assert!(r.sweep(later).is_empty(), "not again at once");
        // The planner confirms: nothing more to send; a cancel wins over the node's state.
        r.apply("d1", Some(active(7, OpState::Downloading)));
        assert!(r.sweep(later + RESEND_MS).is_empty());
        r.apply("d1", Some(active(7, OpState::Canceled)));
        let Lookup::Active(a) = r.lookup("d1", "main", 1).unwrap() else { panic!("active") };
        assert_eq!(a.state, OpState::Canceled);
    }

    #[test]
    fn without_another_images_bytes_a_device_resumes_where_another_node_left_it() {
        let (r, _, _) = replica();
        let answer = pending(1, None, false);
        r.apply("d1", Some(View { at_ms: 1, components: vec![Entry { component: "main".into(), answer }] }));
        r.insert_image("aa".into(), Bytes::from_static(b"abcd"));
        let Lookup::Active(a) = r.lookup("d1", "main", 1).unwrap() else { panic!("active") };
        assert!(a.resume);
    }

    /// Finding 3 of issue 28: nodes served past TUF expiry while the planner was busy or down.
    /// A view carries the deadline, and from it on the node answers WAIT by itself; nor does it
    /// start a downgrade of what the device reports.
    #[test]
    fn past_the_views_trust_deadline_the_node_waits_and_it_never_starts_a_downgrade() {
        let (r, _, mut reports) = replica();
        let answer = pending(1, Some(100), true);
        r.apply("d1", Some(View { at_ms: 1, components: vec![Entry { component: "main".into(), answer }] }));
        r.insert_image("aa".into(), Bytes::from_static(b"abcd"));
        assert!(r.observe("d1", "main", "0.9.0", 10).unwrap());
        assert!(matches!(r.lookup("d1", "main", 99).unwrap(), Lookup::Active(_)));
        assert!(matches!(r.lookup("d1", "main", 100).unwrap(), Lookup::Held(why) if why.contains("expired")));
        // The device comes back on 2.0.0: 1.0.0 would be a downgrade, so it waits.
        let _ = reports.try_recv();
        r.observe("d1", "main", "2.0.0", 50).unwrap();
        assert!(matches!(r.lookup("d1", "main", 50).unwrap(), Lookup::Held(why) if why.contains("downgrade")));
    }

    /// Finding 1 of issue 28 (the node's side): a device asking for two components before the
    /// next view got both started. A second start is refused while one is in flight.
    #[test]
    fn a_node_starts_one_transfer_per_device() {
        let (r, _, _) = replica();
        let components = vec![
            Entry { component: "BIOS".into(), answer: pending(1, None, false) },
            Entry { component: "BMC".into(), answer: pending(2, None, false) },
        ];
        r.apply("x1", Some(View { at_ms: 1, components }));
        let start =
            |seq| r.record("x1", seq, OpState::Pending, Some(OpState::Downloading), Some(0), Some("aa"), None, 5);
        assert!(start(1).unwrap());
        assert!(!start(2).unwrap(), "BMC may not start while BIOS is in flight");
    }

    #[test]
    fn the_cache_keeps_to_its_bytes() {
        let (r, _, _) = replica();
        r.insert_image("a".into(), Bytes::from_static(b"123456"));
        r.insert_image("b".into(), Bytes::from_static(b"123456"));
        assert_eq!(r.cache_size(), (1, 6));
        assert!(r.wants("a") && !r.wants("b"));
    }
}
