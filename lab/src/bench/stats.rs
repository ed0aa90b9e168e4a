//! Latency statistics over a run's samples: nearest-rank percentiles on a sorted vector, and
//! the down-sampled CDF the latency plot draws.
//!
//! Runs hold at most a few tens of thousands of samples, so keeping every one (sorted, in
//! microseconds) is cheap and exact; no bucketing error to explain next to a p99.

use std::time::Duration;

use serde::Serialize;

/// The latency samples of one run, in microseconds, sorted ascending.
#[derive(Debug, Clone, Default)]
pub(crate) struct Latencies {
    sorted_us: Vec<u64>,
}

/// The figures the report prints for one latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Summary {
    pub(crate) count: usize,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latencies {
    pub(crate) fn from_durations(samples: impl IntoIterator<Item = Duration>) -> Self {
        // u64 microseconds hold 584,000 years; saturate rather than wrap on anything absurd.
        let mut sorted_us: Vec<u64> = samples
            .into_iter()
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .collect();
        sorted_us.sort_unstable();
        Self { sorted_us }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sorted_us.is_empty()
    }

    /// The samples in microseconds, ascending (for the JSON output).
    pub(crate) fn micros(&self) -> &[u64] {
        &self.sorted_us
    }

    /// Nearest-rank percentile in microseconds: the smallest sample with at least `p`% of the
    /// samples at or below it. `p` is clamped to 0-100; `None` without samples.
    pub(crate) fn percentile_us(&self, p: f64) -> Option<u64> {
        let n = self.sorted_us.len();
        if n == 0 {
            return None;
        }
        let p = p.clamp(0.0, 100.0);
        // Rank 1..=n; p = 0 asks for the minimum.
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(self.sorted_us[rank.clamp(1, n) - 1])
    }

    pub(crate) fn summary(&self) -> Option<Summary> {
        let ms = |p: f64| self.percentile_us(p).map_or(0.0, us_to_ms);
        let max = *self.sorted_us.last()?;
        let sum: u128 = self.sorted_us.iter().map(|&us| u128::from(us)).sum();
        Some(Summary {
            count: self.sorted_us.len(),
            mean_ms: sum as f64 / self.sorted_us.len() as f64 / 1000.0,
            p50_ms: ms(50.0),
            p90_ms: ms(90.0),
            p99_ms: ms(99.0),
            p999_ms: ms(99.9),
            max_ms: us_to_ms(max),
        })
    }

    /// The empirical CDF as (latency ms, fraction of samples at or below it), at most about
    /// `max_points` points. Points are spaced evenly in rank, and the slowest 1% is kept in
    /// full resolution (up to `max_points / 2` points), because that is where the curves
    /// of a plot differ and where a plain even spacing would leave a straight line.
    pub(crate) fn cdf(&self, max_points: usize) -> Vec<(f64, f64)> {
        let n = self.sorted_us.len();
        if n == 0 || max_points < 2 {
            return Vec::new();
        }
        let tail_start = n - n.div_ceil(100);
        let body_step = (tail_start / (max_points / 2).max(1)).max(1);
        let tail_step = ((n - tail_start) / (max_points / 2).max(1)).max(1);
        let mut ranks: Vec<usize> = (0..tail_start).step_by(body_step).collect();
        ranks.extend((tail_start..n).step_by(tail_step));
        if ranks.last() != Some(&(n - 1)) {
            ranks.push(n - 1);
        }
        ranks
            .into_iter()
            .map(|i| (us_to_ms(self.sorted_us[i]), (i + 1) as f64 / n as f64))
            .collect()
    }
}

pub(crate) fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(values: &[u64]) -> Latencies {
        Latencies::from_durations(values.iter().map(|&us| Duration::from_micros(us)))
    }

    #[test]
    fn nearest_rank_percentiles() {
        // 1..=100: the p-th percentile is p itself.
        let lat = micros(&(1..=100).rev().collect::<Vec<_>>());
        assert_eq!(lat.percentile_us(50.0), Some(50));
        assert_eq!(lat.percentile_us(90.0), Some(90));
        assert_eq!(lat.percentile_us(99.0), Some(99));
        assert_eq!(lat.percentile_us(99.9), Some(100));
        assert_eq!(lat.percentile_us(100.0), Some(100));
        assert_eq!(lat.percentile_us(0.0), Some(1));
        assert_eq!(lat.percentile_us(250.0), Some(100));
    }

    #[test]
    fn small_samples_round_up_in_rank() {
        let lat = micros(&[10, 20, 30]);
        // 50% of 3 is rank 1.5, rounded up to the 2nd sample.
        assert_eq!(lat.percentile_us(50.0), Some(20));
        assert_eq!(lat.percentile_us(34.0), Some(20));
        assert_eq!(lat.percentile_us(33.0), Some(10));
        assert_eq!(micros(&[7]).percentile_us(99.0), Some(7));
    }

    #[test]
    fn empty_has_no_figures() {
        let lat = Latencies::default();
        assert_eq!(lat.percentile_us(50.0), None);
        assert_eq!(lat.summary(), None);
        assert!(lat.cdf(100).is_empty());
    }

    #[test]
    fn summary_in_milliseconds() {
        let lat = micros(&[1_000, 2_000, 3_000, 4_000]);
        let s = lat.summary().unwrap();
        assert_eq!(s.count, 4);
        assert_eq!(s.p50_ms, 2.0);
        assert_eq!(s.max_ms, 4.0);
        assert_eq!(s.mean_ms, 2.5);
    }

    #[test]
    fn cdf_is_monotonic_bounded_and_ends_at_the_maximum() {
        let lat = micros(&(1..=10_000).collect::<Vec<_>>());
        let cdf = lat.cdf(200);
        assert!(cdf.len() <= 210, "{}", cdf.len());
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(cdf.last(), Some(&(10.0, 1.0)));
        // The slowest 1% gets about half the points.
        let tail = cdf.iter().filter(|(_, f)| *f > 0.99).count();
        assert!(tail >= 90, "{tail}");
    }

    #[test]
    fn cdf_of_fewer_samples_than_points_keeps_them_all() {
        let cdf = micros(&[5_000, 1_000, 3_000]).cdf(100);
        assert_eq!(cdf, vec![(1.0, 1.0 / 3.0), (3.0, 2.0 / 3.0), (5.0, 1.0)]);
    }
}
