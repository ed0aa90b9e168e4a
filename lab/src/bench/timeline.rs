//! When in a run its slow orders finished: the e2e latencies grouped by the second of the run in
//! which each order completed. A tail made of a few bad seconds is a stall (a checkpoint, a
//! broker pause); a tail spread over every second is the width of the distribution itself. The
//! report's latency samples are sorted, so this is the only place the run's course survives.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use super::stats::{Latencies, Summary};

/// The orders that completed in one second of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Second {
    /// Whole seconds since the measured phase started.
    pub(crate) t_s: u64,
    /// Their e2e latencies.
    #[serde(flatten)]
    pub(crate) e2e: Summary,
}

/// Groups `completions`, each an order's (completion time since the phase started, e2e
/// latency), by the second it completed in; seconds without a completion are left out.
pub(crate) fn by_second(
    completions: impl IntoIterator<Item = (Duration, Duration)>,
) -> Vec<Second> {
    let mut seconds: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
    for (finished, e2e) in completions {
        seconds.entry(finished.as_secs()).or_default().push(e2e);
    }
    seconds
        .into_iter()
        .filter_map(|(t_s, e2e)| {
            let e2e = Latencies::from_durations(e2e).summary()?;
            Some(Second { t_s, e2e })
        })
        .collect()
}

/// The `n` seconds with the slowest orders, slowest first.
pub(crate) fn slowest(seconds: &[Second], n: usize) -> Vec<&Second> {
    let mut sorted: Vec<&Second> = seconds.iter().collect();
    sorted.sort_by(|a, b| b.e2e.max_ms.total_cmp(&a.e2e.max_ms));
    sorted.truncate(n);
    sorted
}

/// The median of the seconds' p99s: what a typical second's tail is, to hold the slowest
/// against.
pub(crate) fn typical_p99_ms(seconds: &[Second]) -> Option<f64> {
    let mut p99s: Vec<f64> = seconds.iter().map(|s| s.e2e.p99_ms).collect();
    p99s.sort_by(f64::total_cmp);
    p99s.get(p99s.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn orders_are_grouped_by_the_second_they_completed_in() {
        let seconds = by_second([
            (ms(100), ms(10)),
            (ms(900), ms(30)),
            (ms(2_500), ms(200)),
            (ms(2_999), ms(20)),
        ]);
        let seen: Vec<(u64, usize, f64, f64)> = seconds
            .iter()
            .map(|s| (s.t_s, s.e2e.count, s.e2e.p50_ms, s.e2e.max_ms))
            .collect();
        assert_eq!(seen, [(0, 2, 10.0, 30.0), (2, 2, 20.0, 200.0)]);
    }

    #[test]
    fn a_stall_stands_out_from_the_typical_second() {
        let mut completions: Vec<(Duration, Duration)> = (0..10)
            .flat_map(|second| (0..100).map(move |i| (ms(second * 1_000 + i), ms(20 + i % 5))))
            .collect();
        completions.push((ms(7_500), ms(140)));
        let seconds = by_second(completions);
        let worst = slowest(&seconds, 2);
        assert_eq!(worst[0].t_s, 7);
        assert_eq!(worst[0].e2e.max_ms, 140.0);
        assert_eq!(worst.len(), 2);
        assert_eq!(typical_p99_ms(&seconds), Some(24.0));
        assert!(slowest(&[], 3).is_empty());
        assert_eq!(typical_p99_ms(&[]), None);
    }
}
