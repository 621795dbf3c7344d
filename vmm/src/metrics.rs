//! Counters and latency histograms. Hot paths bump these instead of logging; log lines the guest
//! can trigger are rate-limited through [`Counter::inc_logged`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Adds one and runs `log` for the first 8 events, then for every power of two: a guest that
    /// triggers the event in a loop cannot flood the log.
    pub fn inc_logged(&self, log: impl FnOnce()) {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 8 || n.is_power_of_two() {
            log();
        }
    }
}

/// Number of histogram buckets: bucket `i` holds values in `[2^(i-1), 2^i)` nanoseconds.
const BUCKETS: usize = 48;

/// A lock-free log2 histogram of durations in nanoseconds, with exact count, sum and max.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

/// A histogram's summary for the stats JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ns: u64,
    /// Upper bound of the bucket holding the median.
    pub p50_ns: u64,
    /// Upper bound of the bucket holding the 99th percentile.
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, ns: u64) {
        let b = (64 - ns.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(ns, Ordering::Relaxed);
        self.max.fetch_max(ns, Ordering::Relaxed);
    }

    /// Count, mean, p50, p99 and max.
    pub fn summary(&self) -> LatencySummary {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return LatencySummary::default();
        }
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let max = self.max.load(Ordering::Relaxed);
        let quantile = |q: f64| {
            // The rank of the q-quantile, 1-based.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let upper = if i == 0 { 0 } else { (1u64 << i) - 1 };
                    return upper.min(max);
                }
            }
            max
        };
        LatencySummary {
            count,
            mean_ns: self.sum.load(Ordering::Relaxed) / count,
            p50_ns: quantile(0.5),
            p99_ns: quantile(0.99),
            max_ns: max,
        }
    }
}

/// Wall-clock marks for the boot-time report.
#[derive(Debug)]
pub struct Timing {
    pub start: Instant,
    first_run: OnceLock<Instant>,
    first_exit: OnceLock<Instant>,
}

impl Timing {
    pub fn new(start: Instant) -> Self {
        Timing { start, first_run: OnceLock::new(), first_exit: OnceLock::new() }
    }

    /// Records the first `KVM_RUN` (later calls do nothing).
    pub fn mark_first_run(&self) {
        let _ = self.first_run.set(Instant::now());
    }

    /// Records vCPU 0's first exit (later calls do nothing).
    pub fn mark_first_exit(&self) {
        let _ = self.first_exit.set(Instant::now());
    }

    /// Microseconds from start to the first `KVM_RUN`.
    pub fn first_run_us(&self) -> Option<u64> {
        self.first_run.get().map(|t| micros(*t - self.start))
    }

    /// Microseconds from start to the first exit (the guest's first instruction ran by then).
    pub fn first_exit_us(&self) -> Option<u64> {
        self.first_exit.get().map(|t| micros(*t - self.start))
    }
}

/// Whole microseconds of `d`, saturating.
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.max_ns, 100_000);
        assert!(s.p50_ns >= 50_000 && s.p50_ns < 2 * 65_536, "{s:?}");
        assert!(s.p99_ns >= 99_000 && s.p99_ns <= 100_000, "{s:?}");
        assert_eq!(Histogram::default().summary(), LatencySummary::default());
    }
}
