//! The retry policy: how many attempts a message gets and how long it waits between them.
//! Delays grow exponentially from `initial_delay`, capped at `max_delay`, with ±20% jitter so
//! a burst of failures does not come back as a burst.

use std::time::Duration;

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
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }

    /// Delay after the failed `attempt`, with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let jittered = base * rand::rng().random_range((1.0 - JITTER)..=(1.0 + JITTER));
        Duration::from_secs_f64(jittered).max(Duration::from_millis(1))
    }

    /// Whether a message that failed its `attempt`-th delivery gets another one.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
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
