//! The link between the generated event types and the bus: each event's routing key and the
//! order it belongs to, and [`SagaEvent`], the one place a delivery becomes a typed event. The
//! AMQP `type` property is the proto's fully qualified name (`prost::Name::full_name`), so the
//! consumer decodes each delivery once, at the edge, and handlers match on the result.

use orderflow_proto::orderflow::v1 as pb;
use prost::Name as _;

use super::{HandleError, Incoming, topology::routing_key};

/// An event carried on `<ns>.events`.
pub trait Event: prost::Message + prost::Name + Default + Send + Sync + 'static {
    /// Routing key it is published with.
    const ROUTING_KEY: &'static str;

    /// The order it is about; becomes the AMQP `correlation_id`.
    fn order_id(&self) -> &str;
}

macro_rules! event {
    ($type:ty, $key:expr) => {
        impl Event for $type {
            const ROUTING_KEY: &'static str = $key;

            fn order_id(&self) -> &str {
                &self.order_id
            }
        }
    };
}

event!(pb::OrderCreated, routing_key::ORDER_CREATED);
event!(pb::InventoryReserved, routing_key::INVENTORY_RESERVED);
event!(pb::InventoryRejected, routing_key::INVENTORY_REJECTED);
event!(pb::InventoryReleased, routing_key::INVENTORY_RELEASED);
event!(pb::PaymentProcessed, routing_key::PAYMENT_PROCESSED);
event!(pb::PaymentFailed, routing_key::PAYMENT_FAILED);

/// Every event of the saga, decoded from a delivery's `type` property and body.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaEvent {
    /// Order accepted an order.
    OrderCreated(pb::OrderCreated),
    /// Inventory reserved every line.
    InventoryReserved(pb::InventoryReserved),
    /// Inventory could not reserve the order.
    InventoryRejected(pb::InventoryRejected),
    /// Inventory gave back a reservation after a failed payment.
    InventoryReleased(pb::InventoryReleased),
    /// Payment charged the order.
    PaymentProcessed(pb::PaymentProcessed),
    /// Payment declined the order.
    PaymentFailed(pb::PaymentFailed),
}

impl SagaEvent {
    /// Decodes a delivery. An unknown or missing `type`, or a body that is not that type, is a
    /// permanent failure: no retry can change what was sent.
    pub fn decode(kind: Option<&str>, body: &[u8]) -> Result<SagaEvent, HandleError> {
        fn body_of<E: Event>(body: &[u8]) -> Result<E, HandleError> {
            E::decode(body).map_err(|e| {
                HandleError::permanent(
                    anyhow::Error::new(e)
                        .context(format!("body does not decode as `{}`", E::full_name())),
                )
            })
        }
        let Some(kind) = kind else {
            return Err(HandleError::permanent(anyhow::anyhow!(
                "message has no `type` property"
            )));
        };
        Ok(match kind {
            k if k == pb::OrderCreated::full_name() => SagaEvent::OrderCreated(body_of(body)?),
            k if k == pb::InventoryReserved::full_name() => {
                SagaEvent::InventoryReserved(body_of(body)?)
            }
            k if k == pb::InventoryRejected::full_name() => {
                SagaEvent::InventoryRejected(body_of(body)?)
            }
            k if k == pb::InventoryReleased::full_name() => {
                SagaEvent::InventoryReleased(body_of(body)?)
            }
            k if k == pb::PaymentProcessed::full_name() => {
                SagaEvent::PaymentProcessed(body_of(body)?)
            }
            k if k == pb::PaymentFailed::full_name() => SagaEvent::PaymentFailed(body_of(body)?),
            other => {
                return Err(HandleError::permanent(anyhow::anyhow!(
                    "unknown message type `{other}`"
                )));
            }
        })
    }

    /// The fully qualified proto name, as in the AMQP `type` property.
    pub fn name(&self) -> String {
        match self {
            SagaEvent::OrderCreated(_) => pb::OrderCreated::full_name(),
            SagaEvent::InventoryReserved(_) => pb::InventoryReserved::full_name(),
            SagaEvent::InventoryRejected(_) => pb::InventoryRejected::full_name(),
            SagaEvent::InventoryReleased(_) => pb::InventoryReleased::full_name(),
            SagaEvent::PaymentProcessed(_) => pb::PaymentProcessed::full_name(),
            SagaEvent::PaymentFailed(_) => pb::PaymentFailed::full_name(),
        }
    }

    /// The order the event is about.
    pub fn order_id(&self) -> &str {
        match self {
            SagaEvent::OrderCreated(e) => &e.order_id,
            SagaEvent::InventoryReserved(e) => &e.order_id,
            SagaEvent::InventoryRejected(e) => &e.order_id,
            SagaEvent::InventoryReleased(e) => &e.order_id,
            SagaEvent::PaymentProcessed(e) => &e.order_id,
            SagaEvent::PaymentFailed(e) => &e.order_id,
        }
    }

    /// The failure of a handler that was given an event it does not handle: the topology bound
    /// its queue to a routing key it should not have, or a producer mislabelled a message.
    pub fn unexpected(&self, service: &str) -> HandleError {
        HandleError::permanent(anyhow::anyhow!(
            "{service} does not handle message type `{}`",
            self.name()
        ))
    }
}

/// The orders the events among `messages` are about: what a handler reads for a batch. A message
/// that does not decode is left out; it fails in its handler, where it is its own failure.
pub fn order_ids<'m>(messages: &[&'m Incoming]) -> Vec<&'m str> {
    messages
        .iter()
        .filter_map(|message| message.event().ok())
        .map(SagaEvent::order_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use prost::Name as _;

    use super::*;

    #[test]
    fn type_names_are_fully_qualified() {
        assert_eq!(pb::OrderCreated::full_name(), "orderflow.v1.OrderCreated");
        assert_eq!(pb::PaymentFailed::full_name(), "orderflow.v1.PaymentFailed");
        assert_eq!(
            <pb::InventoryReserved as Event>::ROUTING_KEY,
            "inventory.reserved"
        );
    }

    #[test]
    fn decodes_by_type_and_refuses_the_rest() {
        let event = pb::PaymentFailed {
            order_id: "o-1".into(),
            ..Default::default()
        };
        let body = prost::Message::encode_to_vec(&event);
        let name = pb::PaymentFailed::full_name();
        assert_eq!(
            SagaEvent::decode(Some(&name), &body).unwrap(),
            SagaEvent::PaymentFailed(event)
        );
        for (kind, body) in [
            (None, body.as_slice()),
            (Some("orderflow.v1.Shipped"), body.as_slice()),
            (Some(name.as_str()), &[0xff, 0xff][..]),
        ] {
            assert!(
                matches!(
                    SagaEvent::decode(kind, body),
                    Err(HandleError::Permanent(_))
                ),
                "{kind:?}"
            );
        }
    }
}
