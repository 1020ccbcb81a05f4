//! Fixed-bucket histograms that every loop observes into with relaxed
//! atomics: an observation is one bucket search over a static list and three
//! adds, with no lock and no allocation (the byte path can afford that; a
//! metrics scrape sums nothing, the buckets are already the process's).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the backend connect-time buckets, in microseconds: 0.5 ms to 10 s.
pub const CONNECT_BOUNDS: &[u64] =
    &[500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000];

/// Upper bounds of the connection-duration buckets, in microseconds: 10 ms to 1 h.
pub const DURATION_BOUNDS: &[u64] = &[
    10_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    1_800_000_000,
    3_600_000_000,
];

/// One histogram: a count per bucket (not cumulative: each observation adds
/// to one bucket only), the count of observations above the last bound, and
/// the sum of every observation.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// `bounds.len() + 1` counts; the last is the `+Inf` bucket's own.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

/// A histogram as read at one moment, for the exposition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Each bucket's upper bound in microseconds, with its cumulative count.
    pub buckets: Vec<(u64, u64)>,
    /// Every observation, the `+Inf` bucket's cumulative count.
    pub count: u64,
    /// The sum of the observations in microseconds.
    pub sum_micros: u64,
}

impl Histogram {
    /// An empty histogram over these bucket bounds (ascending, in microseconds).
    pub fn new(bounds: &'static [u64]) -> Histogram {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram { bounds, counts, sum_micros: AtomicU64::new(0) }
    }

    /// Counts one observation.
    pub fn observe(&self, value: Duration) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        // Few buckets: a linear scan beats a binary search's branches.
        let at = self.bounds.iter().position(|&b| micros <= b).unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get(at) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The cumulative counts now. Read bucket by bucket while loops may add, so
    /// `count` is the buckets' own sum: the exposition never shows a `+Inf`
    /// below a smaller bucket.
    pub fn snapshot(&self) -> Snapshot {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            running += count.load(Ordering::Relaxed);
            buckets.push((*bound, running));
        }
        let over = self.counts.last().map_or(0, |c| c.load(Ordering::Relaxed));
        Snapshot { buckets, count: running + over, sum_micros: self.sum_micros.load(Ordering::Relaxed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them_and_counts_are_cumulative() {
        let h = Histogram::new(&[1_000, 10_000]);
        h.observe(Duration::from_micros(1_000));
        h.observe(Duration::from_micros(1_001));
        h.observe(Duration::from_secs(5));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(1_000, 1), (10_000, 2)]);
        assert_eq!(s.count, 3);
        assert_eq!(s.sum_micros, 1_000 + 1_001 + 5_000_000);
    }

    #[test]
    fn bounds_ascend() {
        for bounds in [CONNECT_BOUNDS, DURATION_BOUNDS] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn a_huge_duration_saturates_instead_of_wrapping() {
        let h = Histogram::new(CONNECT_BOUNDS);
        h.observe(Duration::MAX);
        assert_eq!(h.snapshot().count, 1);
        assert_eq!(h.snapshot().sum_micros, u64::MAX);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = std::sync::Arc::new(Histogram::new(DURATION_BOUNDS));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let h = h.clone();
                std::thread::spawn(move || (0..5_000).for_each(|n| h.observe(Duration::from_millis(n * i))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(h.snapshot().count, 20_000);
    }
}
