//! Parking: the copy of an outbox event the broker kept refusing, bound for the namespace's
//! dead-letter exchange with routing key `<ns>.<service>.outbox`. Its body and AMQP properties
//! (message id, type, correlation id, trace context) are the event's own; the failure headers
//! are the ones the consumer puts on its dead letters, so the Order service stores, shows and
//! replays it like any other dead letter (a replay goes back to the original route).

use std::time::{Duration, SystemTime};

use crate::{
    bus::{DeadLetterReason, Outgoing, failure::Failure},
    service::Service,
};

/// Where parked events of one service go.
#[derive(Debug, Clone)]
pub(super) struct Destination {
    /// The dead-letter exchange.
    pub(super) exchange: String,
    /// `<ns>.<service>.outbox`: the routing key, and the `queue` the headers name.
    pub(super) route: String,
    /// The service whose outbox this is.
    pub(super) service: Service,
}

/// One refused event about to be parked.
#[derive(Debug)]
pub(super) struct Refused<'a> {
    /// The event as it was published.
    pub(super) message: &'a Outgoing,
    /// Refusals, the last included.
    pub(super) attempt: u32,
    /// Why it is parked.
    pub(super) reason: DeadLetterReason,
    /// The last refusal.
    pub(super) error: String,
    /// When the first refusal happened (µs since the epoch), if recorded.
    pub(super) first_failed_at: Option<i64>,
}

impl Destination {
    /// The dead letter for `refused`, failed at `now`.
    pub(super) fn copy(&self, refused: &Refused<'_>, now: SystemTime) -> Outgoing {
        let message = refused.message;
        let copy = Outgoing {
            exchange: self.exchange.clone(),
            routing_key: self.route.clone(),
            ..message.clone()
        };
        let first_failed_at = refused
            .first_failed_at
            .and_then(|micros| u64::try_from(micros).ok())
            .map(|micros| SystemTime::UNIX_EPOCH + Duration::from_micros(micros));
        copy.with_failure(&Failure {
            exchange: &message.exchange,
            routing_key: &message.routing_key,
            queue: &self.route,
            service: self.service,
            // Retried before parking, like a handler's transient error; the reason header says
            // what the broker did.
            kind: "transient",
            error: refused.error.clone(),
            first_failed_at,
            failed_at: now,
        })
        .dead_lettered(refused.reason.as_str(), refused.attempt)
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;
    use crate::bus::{message::header_str, topology::header};

    #[test]
    fn a_parked_copy_is_the_event_plus_the_failure() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert("traceparent".into(), crate::bus::message::text("00-t-s-01"));
        let event = Outgoing {
            exchange: "ns.events".into(),
            routing_key: "inventory.rejected".into(),
            properties: crate::bus::message::properties(
                "m-1",
                "orderflow.v1.InventoryRejected",
                "o-1",
                "inventory-service",
                7,
            )
            .with_headers(headers),
            body: vec![9, 9],
        };
        let destination = Destination {
            exchange: "ns.dead-letters".into(),
            route: "ns.inventory.outbox".into(),
            service: Service::Inventory,
        };
        let refused = Refused {
            message: &event,
            attempt: 3,
            reason: DeadLetterReason::Unroutable,
            error: "unroutable: NO_ROUTE".into(),
            first_failed_at: Some(1_500_000),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(60);
        let copy = destination.copy(&refused, now);
        assert_eq!(
            (copy.exchange.as_str(), copy.routing_key.as_str()),
            ("ns.dead-letters", "ns.inventory.outbox")
        );
        assert_eq!(copy.body, event.body);
        let p = &copy.properties;
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(
            p.kind().as_ref().unwrap().as_str(),
            "orderflow.v1.InventoryRejected"
        );
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "o-1");
        let h = p.headers().as_ref().unwrap();
        for (key, value) in [
            ("traceparent", "00-t-s-01"),
            (header::ORIGINAL_EXCHANGE, "ns.events"),
            (header::ORIGINAL_ROUTING_KEY, "inventory.rejected"),
            (header::QUEUE, "ns.inventory.outbox"),
            (header::FAILING_SERVICE, "inventory-service"),
            (header::ERROR_KIND, "transient"),
            (header::LAST_ERROR, "unroutable: NO_ROUTE"),
            (header::DEAD_LETTER_REASON, "unroutable"),
            (header::FIRST_FAILURE_AT, "1970-01-01T00:00:01.500Z"),
            (header::LAST_FAILURE_AT, "1970-01-01T00:01:00.000Z"),
        ] {
            assert_eq!(header_str(h, key), Some(value), "{key}");
        }
        assert_eq!(
            h.inner().get(header::ATTEMPT),
            Some(&AMQPValue::LongLongInt(3))
        );
    }
}
