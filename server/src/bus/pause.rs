//! Whether a consumer is taking deliveries, for `orderflow_consumer_paused`. A consumer is
//! paused while it has no subscription on the broker (no connection yet, or between a lost one
//! and the next), while its processor holds a batch through a database outage, and while the
//! broker blocks its connection's publishes: then nothing it handles gets its outcome out.
//!
//! The consumer and the processor each own their own reason, as an RAII guard, so an early
//! return or a `?` cannot leave a stale reason behind; the broker's state is read at scrape time.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use super::Broker;
use crate::metrics;

/// The pause state of one consumer. Cheap to clone; every clone is the same state.
#[derive(Debug, Clone, Default)]
pub struct Pause {
    inner: Arc<Reasons>,
}

#[derive(Debug, Default)]
struct Reasons {
    /// Set while the consumer has a live subscription; starts unset (not yet consuming).
    subscribed: AtomicBool,
    /// Set while the processor holds a batch it cannot commit (the database is gone).
    holding: AtomicBool,
}

/// Unsets its flag when dropped.
#[derive(Debug)]
#[must_use = "the state lasts as long as the guard"]
pub struct Guard {
    reasons: Arc<Reasons>,
    flag: fn(&Reasons) -> &AtomicBool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        (self.flag)(&self.reasons).store(false, Ordering::Relaxed);
    }
}

impl Pause {
    /// The consumer holds a live subscription until the guard drops.
    pub fn subscribed(&self) -> Guard {
        self.set(|r| &r.subscribed)
    }

    /// The processor holds a batch through a database outage until the guard drops.
    pub fn holding(&self) -> Guard {
        self.set(|r| &r.holding)
    }

    fn set(&self, flag: fn(&Reasons) -> &AtomicBool) -> Guard {
        flag(&self.inner).store(true, Ordering::Relaxed);
        Guard {
            reasons: self.inner.clone(),
            flag,
        }
    }

    /// Whether the consumer takes no deliveries right now, given whether its broker connection
    /// is up and whether the broker blocks it.
    pub fn paused(&self, connected: bool, blocked: bool) -> bool {
        !connected
            || blocked
            || !self.inner.subscribed.load(Ordering::Relaxed)
            || self.inner.holding.load(Ordering::Relaxed)
    }
}

/// `orderflow_consumer_paused{service,queue}` of one consumer, read at scrape time.
pub fn probe(service: &'static str, queue: String, pause: Pause, broker: Broker) -> metrics::Probe {
    Box::new(move || {
        let paused = pause.paused(broker.current().is_some(), broker.blocked());
        let labels = vec![("service", service.to_owned()), ("queue", queue.clone())];
        Box::pin(async move {
            vec![(
                "orderflow_consumer_paused",
                "1 while the consumer takes no deliveries: not subscribed (no broker connection), \
                 holding a batch through a database outage, or blocked by the broker.",
                labels,
                f64::from(u8::from(paused)),
            )]
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_until_subscribed_and_while_anything_holds_it_back() {
        let pause = Pause::default();
        assert!(pause.paused(true, false), "not subscribed yet");
        let subscription = pause.subscribed();
        assert!(!pause.paused(true, false), "consuming");
        assert!(pause.paused(false, false), "connection lost");
        assert!(pause.paused(true, true), "broker blocks publishes");
        {
            let _held = pause.clone().holding();
            assert!(pause.paused(true, false), "holding a batch");
        }
        assert!(!pause.paused(true, false), "the batch went through");
        drop(subscription);
        assert!(pause.paused(true, false), "the subscription ended");
    }
}
