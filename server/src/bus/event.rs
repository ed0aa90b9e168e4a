//! The link between the generated event types and the bus: each event's routing key and the
//! order it belongs to. The AMQP `type` property is the proto's fully qualified name
//! (`prost::Name::full_name`), so a consumer can tell events apart before decoding.

use orderflow_proto::orderflow::v1 as pb;

use super::topology::routing_key;

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
}
