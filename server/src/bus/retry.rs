//! The retry policy: how many attempts a message gets and how long it waits between them.
//! Delays grow exponentially from `initial_delay`, capped at `max_delay`, with ±20% jitter so
//! a burst of failures does not come back as a burst. [`nth_delay`] reads any backon schedule
//! by failure count, for the other backoffs of the server (reconnects, outages, the relay).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use rand::Rng as _;

/// Attempts and backoff for one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Deliveries a message gets, the first one included.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
}

/// Jitter applied to each delay: a delay `d` becomes a uniform draw from `d * [0.8, 1.2]`.
const JITTER: f64 = 0.2;

impl RetryPolicy {
    /// Delay, before jitter, after the failed `attempt` (1-based): `initial * 2^(attempt-1)`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let schedule = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay);
        nth_delay(schedule, attempt).min(self.max_delay)
    }

    /// Delay after the failed `attempt`, with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        // Applied here rather than by backon, whose jitter only lengthens a delay (to [d, 2d)):
        // a retry's delay stays near what the operator configured, on both sides.
        let factor = rand::rng().random_range((1.0 - JITTER)..=(1.0 + JITTER));
        self.base_delay(attempt)
            .mul_f64(factor)
            .max(Duration::from_millis(1))
    }

    /// Whether a message that failed its `attempt`-th delivery gets another one.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

/// The delay after the `failures`-th failure in a row (1-based) under `schedule`, as its
/// backoff iterator would yield it, so callers keep a count (a row's refusals live in the
/// database) rather than an iterator.
pub fn nth_delay(schedule: ExponentialBuilder, failures: u32) -> Duration {
    // Doubling reaches any cap within 64 steps; walking further would change nothing.
    let step = failures.saturating_sub(1).min(64) as usize;
    schedule
        .without_max_times()
        .with_total_delay(None)
        .build()
        .nth(step)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let p = policy();
        let base: Vec<_> = (1..=5).map(|a| p.base_delay(a).as_millis()).collect();
        assert_eq!(base, vec![100, 200, 400, 500, 500]);
        assert_eq!(p.base_delay(1000), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = policy();
        for _ in 0..1000 {
            let d = p.delay(2).as_secs_f64();
            assert!((0.16..=0.24).contains(&d), "{d}");
        }
    }

    #[test]
    fn schedules_are_read_by_failure_count() {
        let doubling = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2));
        let millis: Vec<_> = (1..=6)
            .map(|n| nth_delay(doubling, n).as_millis())
            .collect();
        assert_eq!(millis, vec![200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(nth_delay(doubling, 0), Duration::from_millis(200));
        assert_eq!(nth_delay(doubling, u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn retries_until_the_last_attempt() {
        let p = policy();
        assert!(p.should_retry(1));
        assert!(p.should_retry(4));
        assert!(!p.should_retry(5));
        assert!(
            !RetryPolicy {
                max_attempts: 1,
                ..p
            }
            .should_retry(1)
        );
    }
}
