//! What a handler's result means for the delivery. Handlers classify their errors as
//! transient or permanent; [`settle`] turns that, the attempt number and the retry policy into
//! one broker action, and `bus::consumer` is the only place that carries it out.

use std::time::Duration;

use super::RetryPolicy;

/// A handler failure, classified.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Might succeed later (database busy, dependency down): retry with backoff.
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Will never succeed (undecodable body, unknown type, invalid content): dead-letter now.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

impl HandleError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        HandleError::Transient(error.into())
    }

    /// A failure retrying cannot fix.
    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        HandleError::Permanent(error.into())
    }

    /// `transient` or `permanent`, as recorded in dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            HandleError::Transient(_) => "transient",
            HandleError::Permanent(_) => "permanent",
        }
    }
}

/// Why a message went to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The handler failed permanently.
    PermanentError,
    /// Transient failures used up every attempt.
    MaxAttempts,
    /// The outbox relay's publish was returned unroutable on every attempt.
    Unroutable,
    /// The broker nacked the outbox relay's publish on every attempt.
    Nacked,
}

impl DeadLetterReason {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::PermanentError => "permanent-error",
            DeadLetterReason::MaxAttempts => "max-attempts",
            DeadLetterReason::Unroutable => "unroutable",
            DeadLetterReason::Nacked => "nacked",
        }
    }
}

/// The broker action for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done (or a duplicate): acknowledge.
    Ack,
    /// Park the message in the retry queue of `failed_attempt`, to come back after `delay`.
    Retry {
        /// The attempt that just failed.
        failed_attempt: u32,
        /// Backoff before the next attempt.
        delay: Duration,
    },
    /// Move the message to its dead-letter queue.
    DeadLetter(DeadLetterReason),
}

/// Decides what happens to a delivery after its `attempt`-th handling returned `result`.
pub(super) fn settle(
    result: &Result<(), HandleError>,
    attempt: u32,
    policy: &RetryPolicy,
) -> Settlement {
    match result {
        Ok(()) => Settlement::Ack,
        Err(HandleError::Permanent(_)) => Settlement::DeadLetter(DeadLetterReason::PermanentError),
        Err(HandleError::Transient(_)) if policy.should_retry(attempt) => Settlement::Retry {
            failed_attempt: attempt,
            delay: policy.delay(attempt),
        },
        Err(HandleError::Transient(_)) => Settlement::DeadLetter(DeadLetterReason::MaxAttempts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    };

    #[test]
    fn success_acks() {
        assert_eq!(settle(&Ok(()), 1, &POLICY), Settlement::Ack);
    }

    #[test]
    fn permanent_goes_straight_to_the_dead_letter_queue() {
        let err = Err(HandleError::permanent(anyhow::anyhow!("garbage")));
        assert_eq!(
            settle(&err, 1, &POLICY),
            Settlement::DeadLetter(DeadLetterReason::PermanentError)
        );
    }

    #[test]
    fn transient_retries_until_attempts_run_out() {
        let err = Err(HandleError::transient(anyhow::anyhow!("busy")));
        match settle(&err, 2, &POLICY) {
            Settlement::Retry {
                failed_attempt: 2,
                delay,
            } => {
                assert!(delay >= Duration::from_millis(160) && delay <= Duration::from_millis(240));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            settle(&err, 3, &POLICY),
            Settlement::DeadLetter(DeadLetterReason::MaxAttempts)
        );
    }
}
