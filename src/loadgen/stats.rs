//! What a load run counts and times, shared by every simulated device: counters, and HDR
//! histograms of per-block round trips and per-device completion times.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest time a histogram records (longer samples are clamped to it), in microseconds.
const MAX_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    // Three significant digits from 1 µs to an hour: a fixed ~200 KiB, whatever the run.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static bounds are valid")
}

pub struct Stats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub blocks: AtomicU64,
    pub bytes: AtomicU64,
    pub retries: AtomicU64,
    pub reconnects: AtomicU64,
    pub drops: AtomicU64,
    pub checksum_failures: AtomicU64,
    pub corrupt_sent: AtomicU64,
    rtt: Mutex<Histogram<u64>>,
    completion: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            drops: AtomicU64::new(0),
            checksum_failures: AtomicU64::new(0),
            corrupt_sent: AtomicU64::new(0),
            rtt: Mutex::new(histogram()),
            completion: Mutex::new(histogram()),
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// p50/p90/p99/max of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

impl Stats {
    /// The round trip of one request (a Status, a Block2 GET) to its first answer.
    pub fn rtt(&self, d: Duration) {
        let mut h = self.rtt.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(micros(d));
    }

    pub fn block(&self, len: usize) {
        self.blocks.fetch_add(1, Relaxed);
        self.bytes.fetch_add(len as u64, Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// A device finished: verified and updated (`ok`) or not, after `d` from its start.
    pub fn finished(&self, ok: bool, d: Duration) {
        if ok {
            self.ok.fetch_add(1, Relaxed);
            let mut h = self.completion.lock().unwrap_or_else(|e| e.into_inner());
            let _ = h.record(micros(d));
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    pub fn rtt_percentiles(&self) -> Percentiles {
        Percentiles::of(&self.rtt.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn completion_percentiles(&self) -> Percentiles {
        Percentiles::of(&self.completion.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}
