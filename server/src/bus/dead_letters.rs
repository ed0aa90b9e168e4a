//! What a dead letter is, apart from where it is kept. [`Parked::read`] turns a delivery from
//! the dead-letter intake into plain fields (no lapin type leaves `bus`), whoever dead-lettered
//! it: a consumer after its retries, the broker's delivery limit, or a relay that could not
//! route an outbox row. [`replay_properties`] gives a stored dead letter back the properties it
//! travels with when it is replayed.
//!
//! Dead letters are browsed from a store, never from a queue: on RabbitMQ 4 every message a
//! browse hands back to a quorum queue counts towards its delivery limit, so a queue that is
//! read without being consumed loses its messages.

use std::collections::BTreeMap;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};

use super::{
    Incoming,
    message::{as_u64, header_str, republishable, text},
    topology::header,
};

/// One dead letter, as read from the intake.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// The queue (or outbox, `<ns>.<service>.outbox`) the message failed in.
    pub source: String,
    /// The producer's message id (empty when it had none).
    pub message_id: String,
    /// The AMQP `type` property.
    pub kind: String,
    /// The AMQP `correlation_id`: the order id.
    pub correlation_id: String,
    /// Untouched body.
    pub body: Vec<u8>,
    /// Every AMQP property worth keeping, headers included, as JSON: what a replay restores.
    pub properties: String,
    /// Every header as text, for people.
    pub headers: BTreeMap<String, String>,
    /// `permanent-error`, `max-attempts`, `unroutable`, or the broker's (`delivery_limit`).
    pub reason: String,
    /// The last error, when orderflow dead-lettered it.
    pub last_error: String,
    /// Deliveries or publishes tried.
    pub attempts: u32,
    /// The service that gave up on it.
    pub failing_service: String,
    /// Where it was first published.
    pub original_exchange: String,
    /// With which routing key.
    pub original_routing_key: String,
    /// When it first failed (µs since the epoch).
    pub first_failure_at: Option<i64>,
    /// When it last failed (µs since the epoch).
    pub last_failure_at: Option<i64>,
    /// Where a replay sends it: the exchange…
    pub replay_exchange: String,
    /// …and routing key.
    pub replay_routing_key: String,
}

impl Parked {
    /// Reads a delivery of the dead-letter intake. `is_work_queue` tells the namespace's work
    /// queues apart: a message that failed in one is replayed straight into it; anything else
    /// (an outbox row nobody could route) goes back to where it was first published.
    pub fn read(message: &Incoming, is_work_queue: impl Fn(&str) -> bool) -> Parked {
        let properties = &message.delivery.properties;
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let own = |key: &str| header_str(headers, key).unwrap_or_default().to_owned();
        let broker = |key: &str| {
            header_str(headers, &format!("x-first-death-{key}"))
                .unwrap_or_default()
                .to_owned()
        };
        let or = |a: String, b: String| if a.is_empty() { b } else { a };
        // The broker names the queue it dead-lettered from; the routing key it used is the
        // work queue's name (its `x-dead-letter-routing-key`).
        let source = or(
            or(own(header::QUEUE), broker("queue")),
            message.routing_key().to_owned(),
        );
        let original_exchange = or(own(header::ORIGINAL_EXCHANGE), broker("exchange"));
        let original_routing_key = own(header::ORIGINAL_ROUTING_KEY);
        let death_time = death_time(headers);
        let (replay_exchange, replay_routing_key) =
            if is_work_queue(&source) || original_routing_key.is_empty() {
                (String::new(), source.clone())
            } else {
                (original_exchange.clone(), original_routing_key.clone())
            };
        Parked {
            message_id: message.message_id().unwrap_or_default().to_owned(),
            kind: message.kind().unwrap_or_default().to_owned(),
            correlation_id: message.correlation_id().unwrap_or_default().to_owned(),
            body: message.body().to_vec(),
            properties: serde_json::to_string(&republishable(properties))
                .unwrap_or_else(|_| "{}".to_owned()),
            headers: headers
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), display(v)))
                .collect(),
            reason: or(own(header::DEAD_LETTER_REASON), broker("reason")),
            last_error: own(header::LAST_ERROR),
            attempts: headers
                .inner()
                .get(header::ATTEMPT)
                .or_else(|| headers.inner().get("x-delivery-count"))
                .and_then(as_u64)
                .unwrap_or(1)
                .min(u64::from(u32::MAX)) as u32,
            failing_service: own(header::FAILING_SERVICE),
            first_failure_at: micros(&own(header::FIRST_FAILURE_AT)).or(death_time),
            last_failure_at: micros(&own(header::LAST_FAILURE_AT)).or(death_time),
            source,
            original_exchange,
            original_routing_key,
            replay_exchange,
            replay_routing_key,
        }
    }
}

impl Parked {
    /// The trace context the dead letter carries (W3C `traceparent`, `tracestate`).
    pub fn trace_context(&self) -> opentelemetry::Context {
        let carried: std::collections::HashMap<String, String> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        super::propagation::from_map(&carried)
    }
}

/// The properties a replayed message travels with, from a dead letter's stored ones: the
/// failure bookkeeping is reset (a fresh attempt count, no stale first-failure time), the
/// original route is kept, and the replay itself is recorded. The relay sets the trace context
/// when it publishes: the replay's, linked to the one kept here.
pub fn replay_properties(stored: &str) -> serde_json::Result<String> {
    let properties: BasicProperties = serde_json::from_str(stored)?;
    let properties = republishable(&properties).with_headers(fresh_headers(&properties));
    serde_json::to_string(&properties)
}

/// Properties stored by [`replay_properties`] or [`Parked::read`], ready to publish.
pub fn stored_properties(stored: &str) -> serde_json::Result<BasicProperties> {
    serde_json::from_str(stored)
}

fn fresh_headers(properties: &BasicProperties) -> FieldTable {
    let reset = [
        header::ATTEMPT,
        header::LAST_ERROR,
        header::ERROR_KIND,
        header::FAILING_SERVICE,
        header::FIRST_FAILURE_AT,
        header::LAST_FAILURE_AT,
        header::DEAD_LETTER_REASON,
        header::QUEUE,
    ];
    let mut headers = FieldTable::default();
    let replays = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(header::REPLAYS))
        .and_then(as_u64)
        .unwrap_or(0);
    if let Some(original) = properties.headers() {
        for (key, value) in original.inner() {
            let broker_bookkeeping = key.as_str().starts_with("x-death")
                || key.as_str().starts_with("x-first-death")
                || key.as_str().starts_with("x-last-death")
                || key.as_str() == "x-delivery-count";
            if !broker_bookkeeping && !reset.contains(&key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert(
        header::REPLAYS.into(),
        AMQPValue::LongLongInt(replays as i64 + 1),
    );
    headers.insert(
        header::REPLAYED_AT.into(),
        text(crate::time::rfc3339(std::time::SystemTime::now())),
    );
    headers
}

/// RFC 3339 text as µs since the epoch.
fn micros(text: &str) -> Option<i64> {
    let t = crate::time::parse_rfc3339(text)?;
    Some(t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
}

/// When the broker dead-lettered it (`x-death[0].time`), for messages it dead-lettered itself.
fn death_time(headers: &FieldTable) -> Option<i64> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let secs = first.inner().get("time").and_then(as_u64)?;
    Some(secs as i64 * 1_000_000)
}

/// A header value as text.
fn display(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::FieldArray(items) => format!(
            "[{}]",
            items
                .as_slice()
                .iter()
                .map(display)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::FieldTable(table) => format!(
            "{{{}}}",
            table
                .inner()
                .iter()
                .map(|(k, v)| format!("{k}: {}", display(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => as_u64(other).map_or_else(|| format!("{other:?}"), |n| n.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_resets_failure_bookkeeping_and_keeps_context() {
        let mut original = FieldTable::default();
        original.insert(header::ATTEMPT.into(), AMQPValue::LongLongInt(5));
        original.insert(header::LAST_ERROR.into(), text("boom"));
        original.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        original.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        original.insert(
            "traceparent".into(),
            text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        original.insert(header::ORIGINAL_ROUTING_KEY.into(), text("order.created"));
        original.insert(header::REPLAYS.into(), AMQPValue::LongLongInt(1));
        let stored = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("orderflow.v1.OrderCreated".into())
            .with_headers(original);
        let stored = serde_json::to_string(&stored).unwrap();
        let fresh = stored_properties(&replay_properties(&stored).unwrap()).unwrap();
        assert_eq!(fresh.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(fresh.delivery_mode(), &Some(2));
        let headers = fresh.headers().clone().unwrap();
        let keys: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert!(keys.contains(&"traceparent") && keys.contains(&header::ORIGINAL_ROUTING_KEY));
        assert!(!keys.contains(&header::ATTEMPT) && !keys.contains(&header::LAST_ERROR));
        assert!(!keys.contains(&"x-death") && !keys.contains(&"x-delivery-count"));
        assert_eq!(
            headers.inner().get(header::REPLAYS),
            Some(&AMQPValue::LongLongInt(2))
        );
    }

    #[test]
    fn headers_display_as_text() {
        assert_eq!(display(&text("boom")), "boom");
        assert_eq!(display(&AMQPValue::LongLongInt(3)), "3");
        assert_eq!(display(&AMQPValue::Boolean(true)), "true");
    }

    #[test]
    fn rfc3339_headers_become_micros() {
        assert_eq!(micros("1970-01-01T00:00:01.500Z"), Some(1_500_000));
        assert_eq!(micros("yesterday"), None);
    }
}
