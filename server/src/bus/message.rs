//! The two shapes a message takes in orderflow: [`Outgoing`] (what a publisher sends, with all
//! AMQP properties the contract requires) and [`Incoming`] (a delivery as a handler sees it).
//! Handlers never touch the delivery's acker: only `bus::consumer` settles deliveries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use super::{Event, HandleError, SagaEvent, topology::header};

/// Content type of every event body: one prost-encoded message.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Target exchange (`""` for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// AMQP properties; always persistent.
    pub properties: BasicProperties,
    /// The prost-encoded event.
    pub body: Vec<u8>,
}

impl Outgoing {
    /// An event with every property of the wire contract: `content_type`, `type`,
    /// `message_id`, `correlation_id` (the order id), `timestamp`, `app_id`, persistent mode.
    pub fn event<E: Event>(exchange: String, message_id: &str, app_id: &str, event: &E) -> Self {
        Outgoing {
            exchange,
            routing_key: E::ROUTING_KEY.to_owned(),
            properties: properties(
                message_id,
                &E::full_name(),
                event.order_id(),
                app_id,
                now_secs(),
            ),
            body: event.encode_to_vec(),
        }
    }

    /// Sets (or replaces) a header.
    pub fn with_header(mut self, key: &str, value: AMQPValue) -> Self {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(key.into(), value);
        self.properties = self.properties.with_headers(headers);
        self
    }
}

/// The contract's AMQP properties for a message.
pub fn properties(
    message_id: &str,
    kind: &str,
    correlation_id: &str,
    app_id: &str,
    timestamp: u64,
) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_type(short(kind))
        .with_message_id(short(message_id))
        .with_correlation_id(short(correlation_id))
        .with_timestamp(timestamp)
        .with_app_id(short(app_id))
        .with_delivery_mode(PERSISTENT)
}

/// The properties of a received message, minus those that must not travel with a copy of it:
/// `expiration` (a retry's backoff must not expire the message again) and `user_id` (RabbitMQ
/// rejects a `user_id` that is not the publishing connection's user).
pub fn republishable(received: &BasicProperties) -> BasicProperties {
    let mut props = BasicProperties::default();
    if let Some(v) = received.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = received.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = received.headers() {
        props = props.with_headers(v.clone());
    }
    if let Some(v) = received.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = received.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = received.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = received.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = received.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = received.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = received.app_id() {
        props = props.with_app_id(v.clone());
    }
    props.with_delivery_mode(PERSISTENT)
}

/// A ShortString that cannot panic: AMQP short strings hold at most 255 bytes, and ids here
/// come from the network.
pub fn short(value: &str) -> ShortString {
    let mut end = value.len().min(255);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&value[..end])
}

/// A string header value (RabbitMQ convention: long string).
pub fn text(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

/// Seconds since the Unix epoch, the unit of the AMQP `timestamp` property.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A delivery taken from a work queue.
#[derive(Debug)]
pub struct Incoming {
    pub(super) delivery: Delivery,
    received_at: std::time::Instant,
    event: Option<SagaEvent>,
    /// Set by a processor that found it handled before, for the consumer's metrics.
    duplicate: std::sync::atomic::AtomicBool,
}

impl Incoming {
    pub(super) fn new(delivery: Delivery) -> Self {
        Incoming {
            delivery,
            received_at: std::time::Instant::now(),
            event: None,
            duplicate: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The producer's `message_id`, the key for de-duplication.
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The AMQP `type` property: the event's fully qualified proto name.
    pub fn kind(&self) -> Option<&str> {
        self.delivery
            .properties
            .kind()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The AMQP `correlation_id` property: the order id.
    pub fn correlation_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The routing key of this delivery.
    pub fn routing_key(&self) -> &str {
        self.delivery.routing_key.as_str()
    }

    /// The raw body.
    pub fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    /// The AMQP headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.delivery.properties.headers().as_ref()
    }

    /// A header's value as text, for string-valued headers.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        header_str(self.headers()?, key)
    }

    /// Which delivery attempt this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.headers()
            .and_then(|h| h.inner().get(header::ATTEMPT))
            .and_then(as_u64)
            .map_or(1, |n| n.clamp(1, u64::from(u32::MAX)) as u32)
    }

    /// Marks it as handled before (a redelivery, or a second copy in one batch): acknowledged
    /// with nothing applied. Only counted, under `outcome="duplicate"`.
    pub fn mark_duplicate(&self) {
        self.duplicate
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a processor marked it as handled before.
    pub fn duplicate(&self) -> bool {
        self.duplicate.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long ago the consumer received it.
    pub fn age(&self) -> Duration {
        self.received_at.elapsed()
    }

    /// The saga event it carries, decoded once by the consumer. A queue whose messages are not
    /// decoded (the dead-letter intake) has none, and asking is a permanent failure.
    pub fn event(&self) -> Result<&SagaEvent, HandleError> {
        self.event.as_ref().ok_or_else(|| {
            HandleError::permanent(anyhow::anyhow!(
                "message of type `{}` was not decoded as a saga event",
                self.kind().unwrap_or("?")
            ))
        })
    }

    /// Decodes the body into [`Incoming::event`]; fails permanently if it is no saga event.
    pub(super) fn decode(&mut self) -> Result<(), HandleError> {
        self.event = Some(SagaEvent::decode(self.kind(), self.body())?);
        Ok(())
    }

    /// How often the broker has dead-lettered it: the sum of the `count`s of its `x-death`
    /// entries.
    pub fn death_count(&self) -> Option<u64> {
        let AMQPValue::FieldArray(deaths) = self.headers()?.inner().get("x-death")? else {
            return None;
        };
        Some(
            deaths
                .as_slice()
                .iter()
                .filter_map(|d| match d {
                    AMQPValue::FieldTable(t) => t.inner().get("count").and_then(as_u64),
                    _ => None,
                })
                .sum(),
        )
    }
}

/// A string-valued header, whatever AMQP string type the producer chose.
pub fn header_str<'a>(headers: &'a FieldTable, key: &str) -> Option<&'a str> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok(),
        _ => None,
    }
}

/// An integer-valued header, whatever AMQP integer type the producer chose.
pub fn as_u64(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_truncates_on_a_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let s = short(&long);
        assert!(s.as_str().len() <= 255);
        assert!(s.as_str().chars().all(|c| c == 'é'));
        assert_eq!(short("abc").as_str(), "abc");
    }

    /// Hostile bodies (random bytes, truncated messages, length prefixes claiming gigabytes)
    /// are refused as permanent errors; nothing panics or allocates what the prefix claims.
    #[test]
    fn decoding_hostile_bodies_never_panics() {
        use orderflow_proto::orderflow::v1 as pb;
        use prost::Message as _;
        use rand::{Rng as _, SeedableRng as _};

        fn all(body: &[u8]) {
            for kind in [
                "orderflow.v1.OrderCreated",
                "orderflow.v1.InventoryReserved",
                "orderflow.v1.InventoryRejected",
                "orderflow.v1.InventoryReleased",
                "orderflow.v1.PaymentProcessed",
                "orderflow.v1.PaymentFailed",
            ] {
                let _ = SagaEvent::decode(Some(kind), body);
            }
        }

        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0f10_0f10);
        let valid = pb::InventoryReserved {
            order_id: "o-1".into(),
            items: vec![pb::ReservedLine {
                sku: "A".into(),
                quantity: 3,
                unit_price_cents: 100,
                name: "a".into(),
            }],
            total_cents: 300,
            customer_id: "c".into(),
            reserved_at: None,
        }
        .encode_to_vec();
        for _ in 0..20_000 {
            let len = rng.random_range(0..256);
            let garbage: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            all(&garbage);
        }
        for cut in 0..valid.len() {
            all(&valid[..cut]);
        }
        // Field 1 (bytes) claiming 2^32, 2^63 and u64::MAX bytes.
        for prefix in [
            [0x0a, 0x80, 0x80, 0x80, 0x80, 0x10].as_slice(),
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ] {
            let mut body = prefix.to_vec();
            body.extend_from_slice(b"short");
            all(&body);
            assert!(SagaEvent::decode(Some("orderflow.v1.OrderCreated"), &body).is_err());
        }
        assert!(SagaEvent::decode(Some("orderflow.v1.InventoryReserved"), &valid).is_ok());
        assert!(matches!(
            SagaEvent::decode(None, &valid),
            Err(HandleError::Permanent(_))
        ));
    }

    #[test]
    fn integer_headers_of_any_width() {
        assert_eq!(as_u64(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(as_u64(&AMQPValue::ShortShortUInt(7)), Some(7));
        assert_eq!(as_u64(&AMQPValue::LongInt(-1)), None);
        assert_eq!(as_u64(&text("4")), None);
    }
}
