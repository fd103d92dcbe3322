//! Latency histograms for `/metrics`: fixed buckets, lock-free recording (one relaxed atomic
//! add per bucket hit, sum and count), rendered in the Prometheus text format as
//! `<name>_bucket{le="…"}`, `<name>_sum` and `<name>_count`. Each writer (a shard, the ingest
//! thread) records into its own [`Histogram`]; rendering adds several up into one series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (100 µs to 10 s; +Inf is implicit).
pub const BOUNDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The same bounds in microseconds.
const BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// One histogram (non-cumulative bucket counts; the last one is +Inf).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 17],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        self.record_us(d.as_micros().min(u64::MAX as u128) as u64);
    }

    /// Records one observation of `us` microseconds.
    pub fn record_us(&self, us: u64) {
        let i = BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Appends histogram `name` (the sum of `parts`) with its HELP and TYPE lines.
pub fn render<'a>(out: &mut String, name: &str, help: &str, parts: impl Iterator<Item = &'a Histogram> + Clone) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let total = |f: &dyn Fn(&Histogram) -> u64| parts.clone().map(f).sum::<u64>();
    let mut cumulative = 0u64;
    for (i, le) in BOUNDS.iter().enumerate() {
        cumulative += total(&|h| h.buckets[i].load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    cumulative += total(&|h| h.buckets[BOUNDS.len()].load(Ordering::Relaxed));
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", total(&|h| h.sum_us.load(Ordering::Relaxed)) as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", total(&|h| h.count.load(Ordering::Relaxed)));
}

/// The `q` quantile (0..1) of the sum of `parts`, as the upper bound (seconds) of the bucket
/// it falls in (`None` without observations; +Inf reads as the largest bound).
pub fn quantile<'a>(parts: impl Iterator<Item = &'a Histogram> + Clone, q: f64) -> Option<f64> {
    let counts: Vec<u64> =
        (0..=BOUNDS.len()).map(|i| parts.clone().map(|h| h.buckets[i].load(Ordering::Relaxed)).sum()).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(BOUNDS[i.min(BOUNDS.len() - 1)]);
        }
    }
    Some(BOUNDS[BOUNDS.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_sum_up_across_parts() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.record_us(50); // ≤ 100 µs
        a.record_us(100); // ≤ 100 µs (upper bounds are inclusive)
        b.record(Duration::from_millis(3)); // ≤ 5 ms
        b.record(Duration::from_secs(20)); // +Inf
        let mut out = String::new();
        render(&mut out, "x_seconds", "test", [&a, &b].into_iter());
        assert!(out.contains("# TYPE x_seconds histogram"));
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count 4\n"), "{out}");
        assert!(out.contains("x_seconds_sum 20.00315\n"), "{out}");
        assert_eq!(a.count() + b.count(), 4);
        assert_eq!(quantile([&a, &b].into_iter(), 0.5), Some(0.0001));
        assert_eq!(quantile([&a, &b].into_iter(), 0.75), Some(0.005));
        assert_eq!(quantile([&a, &b].into_iter(), 1.0), Some(10.0));
        assert_eq!(quantile(std::iter::once(&Histogram::default()), 0.5), None);
    }
}
