//! What a publish result means for its outbox row. Only the broker's explicit refusal of a row
//! (returned unroutable, or nacked) counts against the row: it is retried with backoff and,
//! after the policy's last attempt, parked. A lost connection or channel says nothing about the
//! row, so it costs no attempt; the relay as a whole backs off instead.

use std::time::Duration;

use crate::bus::{DeadLetterReason, PublishError, RetryPolicy};

/// The fate of a row whose publish was not confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The broker could not be asked (connection or channel down): leave the row as it is.
    Outage,
    /// Refused, with attempts left: publish again after `delay`.
    Retry {
        /// Refusals so far, this one included.
        attempt: u32,
        /// Backoff before the next publish.
        delay: Duration,
    },
    /// Refused for the last time: park it in the dead-letter queue.
    Park {
        /// Refusals so far, this one included.
        attempt: u32,
        /// `unroutable` or `nacked`.
        reason: DeadLetterReason,
    },
}

/// Whether `error` says nothing about the message: the broker could not be asked at all.
pub(super) fn is_outage(error: &PublishError) -> bool {
    matches!(error, PublishError::Disconnected | PublishError::Amqp(_))
}

/// Judges the failed publish of a row the broker had refused `refused_before` times.
pub(super) fn judge(error: &PublishError, refused_before: u32, policy: &RetryPolicy) -> Verdict {
    let reason = match error {
        PublishError::Disconnected | PublishError::Amqp(_) => return Verdict::Outage,
        PublishError::Unroutable(_) => DeadLetterReason::Unroutable,
        PublishError::Nacked => DeadLetterReason::Nacked,
    };
    let attempt = refused_before.saturating_add(1);
    if policy.should_retry(attempt) {
        Verdict::Retry {
            attempt,
            delay: policy.delay(attempt),
        }
    } else {
        Verdict::Park { attempt, reason }
    }
}

/// `now` (µs since the epoch) plus `delay`: when a rescheduled row is due.
pub(super) fn due_at(now: i64, delay: Duration) -> i64 {
    now.saturating_add(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(5),
    };

    fn unroutable() -> PublishError {
        PublishError::Unroutable("NO_ROUTE".into())
    }

    /// A broker outage never burns an attempt, however many the row already used.
    #[test]
    fn an_outage_costs_the_row_nothing() {
        for before in [0, 3, 100] {
            assert!(is_outage(&PublishError::Disconnected));
            assert!(!is_outage(&unroutable()) && !is_outage(&PublishError::Nacked));
            assert_eq!(
                judge(&PublishError::Disconnected, before, &POLICY),
                Verdict::Outage
            );
            let closed = lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "basic.publish",
            ));
            assert_eq!(
                judge(&PublishError::Amqp(closed), before, &POLICY),
                Verdict::Outage
            );
        }
    }

    #[test]
    fn refusals_back_off_exponentially_with_jitter_up_to_the_cap() {
        for (before, base) in [(0u32, 1.0f64), (1, 2.0), (2, 4.0)] {
            for _ in 0..200 {
                let Verdict::Retry { attempt, delay } = judge(&unroutable(), before, &POLICY)
                else {
                    panic!("attempt {} should be retried", before + 1);
                };
                assert_eq!(attempt, before + 1);
                let d = delay.as_secs_f64();
                assert!(
                    (base * 0.8..=base * 1.2).contains(&d),
                    "attempt {attempt}: {d}s not within 20% of {base}s"
                );
            }
        }
        let long = RetryPolicy {
            max_attempts: 50,
            ..POLICY
        };
        let Verdict::Retry { delay, .. } = judge(&PublishError::Nacked, 40, &long) else {
            panic!("retried");
        };
        assert!(delay <= Duration::from_secs(6), "capped: {delay:?}");
    }

    #[test]
    fn the_last_refusal_parks_the_row_with_its_reason() {
        assert_eq!(
            judge(&unroutable(), 3, &POLICY),
            Verdict::Park {
                attempt: 4,
                reason: DeadLetterReason::Unroutable
            }
        );
        assert_eq!(
            judge(&PublishError::Nacked, 3, &POLICY),
            Verdict::Park {
                attempt: 4,
                reason: DeadLetterReason::Nacked
            }
        );
        // A row past the limit (its park failed earlier) is parked again, not retried forever.
        assert!(matches!(
            judge(&unroutable(), 9, &POLICY),
            Verdict::Park { attempt: 10, .. }
        ));
        let once = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert!(matches!(
            judge(&unroutable(), 0, &once),
            Verdict::Park { attempt: 1, .. }
        ));
    }

    #[test]
    fn due_times_add_the_delay_in_microseconds() {
        assert_eq!(due_at(1_000, Duration::from_millis(2)), 3_000);
        assert_eq!(due_at(i64::MAX - 1, Duration::from_secs(1)), i64::MAX);
    }
}
