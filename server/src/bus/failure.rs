//! The failure headers a copy of a failed message carries into a retry or dead-letter queue:
//! where it was first published, where and why it failed, and when. Shared by the consumer
//! (handler failures) and the outbox relay (rows the broker refused), so every dead letter in a
//! namespace reads the same way, whoever parked it.
//!
//! Origin and first-failure time already on the copy win: a message retried or replayed keeps
//! the story of its first failure.

use std::time::SystemTime;

use lapin::types::AMQPValue;

use super::{
    Outgoing,
    message::{header_str, text},
    topology::header,
};
use crate::{service::Service, time::rfc3339};

/// Longest `last error` header kept; error chains can be long, headers should not be.
const MAX_ERROR_BYTES: usize = 2048;

/// One failure of a message, as recorded on its copy.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    /// Exchange the message was published to (unless the copy already names one).
    pub exchange: &'a str,
    /// Routing key it was published with (unless the copy already names one).
    pub routing_key: &'a str,
    /// The queue it failed on: a work queue, or `<ns>.<service>.outbox` for a refused publish.
    pub queue: &'a str,
    /// The service that could not get the message through.
    pub service: Service,
    /// How the error was classified (`transient`, `permanent`).
    pub kind: &'a str,
    /// What went wrong (the whole chain).
    pub error: String,
    /// When the first attempt failed, if known; else `failed_at` (unless the copy has one).
    pub first_failed_at: Option<SystemTime>,
    /// When this attempt failed.
    pub failed_at: SystemTime,
}

impl Outgoing {
    /// This copy with `failure`'s headers set.
    pub fn with_failure(self, failure: &Failure<'_>) -> Outgoing {
        let now = rfc3339(failure.failed_at);
        let first = rfc3339(failure.first_failed_at.unwrap_or(failure.failed_at));
        let existing = self.properties.headers().clone().unwrap_or_default();
        let keep = |key: &str, fallback: &str| {
            text(header_str(&existing, key).unwrap_or(fallback).to_owned())
        };
        let original_exchange = keep(header::ORIGINAL_EXCHANGE, failure.exchange);
        let original_routing_key = keep(header::ORIGINAL_ROUTING_KEY, failure.routing_key);
        let first_failure_at = keep(header::FIRST_FAILURE_AT, &first);
        self.with_header(header::ORIGINAL_EXCHANGE, original_exchange)
            .with_header(header::ORIGINAL_ROUTING_KEY, original_routing_key)
            .with_header(header::FIRST_FAILURE_AT, first_failure_at)
            .with_header(header::LAST_FAILURE_AT, text(now))
            .with_header(header::QUEUE, text(failure.queue))
            .with_header(
                header::FAILING_SERVICE,
                text(failure.service.service_name()),
            )
            .with_header(header::ERROR_KIND, text(failure.kind))
            .with_header(
                header::LAST_ERROR,
                text(truncate(&failure.error, MAX_ERROR_BYTES)),
            )
    }

    /// This copy marked as a dead letter: why, and after how many attempts.
    pub fn dead_lettered(self, reason: &str, attempt: u32) -> Outgoing {
        self.with_header(header::DEAD_LETTER_REASON, text(reason))
            .with_header(header::ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt)))
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::BasicProperties;

    use super::*;

    fn copy(headers: &[(&str, &str)]) -> Outgoing {
        let mut table = lapin::types::FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), text(*v));
        }
        Outgoing {
            exchange: String::new(),
            routing_key: String::new(),
            properties: BasicProperties::default().with_headers(table),
            body: vec![1, 2, 3],
        }
    }

    fn failure(error: String) -> Failure<'static> {
        Failure {
            exchange: "ns.events",
            routing_key: "order.created",
            queue: "ns.order.outbox",
            service: Service::Order,
            kind: "transient",
            error,
            first_failed_at: Some(SystemTime::UNIX_EPOCH),
            failed_at: SystemTime::UNIX_EPOCH + Duration::from_secs(60),
        }
    }

    fn get(copy: &Outgoing, key: &str) -> Option<String> {
        header_str(copy.properties.headers().as_ref()?, key).map(str::to_owned)
    }

    #[test]
    fn records_origin_place_and_time_of_a_first_failure() {
        let copy = copy(&[("traceparent", "00-abc")]).with_failure(&failure("no route".into()));
        assert_eq!(
            get(&copy, header::ORIGINAL_EXCHANGE).as_deref(),
            Some("ns.events")
        );
        assert_eq!(
            get(&copy, header::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("order.created")
        );
        assert_eq!(
            get(&copy, header::QUEUE).as_deref(),
            Some("ns.order.outbox")
        );
        assert_eq!(
            get(&copy, header::FAILING_SERVICE).as_deref(),
            Some("order-service")
        );
        assert_eq!(
            get(&copy, header::FIRST_FAILURE_AT).as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        assert_eq!(
            get(&copy, header::LAST_FAILURE_AT).as_deref(),
            Some("1970-01-01T00:01:00.000Z")
        );
        assert_eq!(get(&copy, header::LAST_ERROR).as_deref(), Some("no route"));
        assert_eq!(get(&copy, "traceparent").as_deref(), Some("00-abc"));
        assert_eq!(copy.body, vec![1, 2, 3]);
    }

    #[test]
    fn a_retried_copy_keeps_its_first_failure() {
        let copy = copy(&[
            (header::ORIGINAL_EXCHANGE, "first.exchange"),
            (header::FIRST_FAILURE_AT, "2020-01-01T00:00:00.000Z"),
        ])
        .with_failure(&failure("é".repeat(2000)));
        assert_eq!(
            get(&copy, header::ORIGINAL_EXCHANGE).as_deref(),
            Some("first.exchange")
        );
        assert_eq!(
            get(&copy, header::FIRST_FAILURE_AT).as_deref(),
            Some("2020-01-01T00:00:00.000Z")
        );
        let error = get(&copy, header::LAST_ERROR).unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES && error.chars().all(|c| c == 'é'));
        let dead = copy.dead_lettered("unroutable", 7);
        assert_eq!(
            get(&dead, header::DEAD_LETTER_REASON).as_deref(),
            Some("unroutable")
        );
        assert_eq!(
            dead.properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(header::ATTEMPT).cloned()),
            Some(AMQPValue::LongLongInt(7))
        );
    }
}
