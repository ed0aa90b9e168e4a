//! Domain orders as API messages.

use orderflow_proto::orderflow::v1 as pb;

use crate::{
    order::{Change, Item, Order},
    time::timestamp,
};

impl From<Order> for pb::Order {
    fn from(order: Order) -> Self {
        pb::Order {
            order_id: order.order_id,
            customer_id: order.customer_id,
            items: order.items.into_iter().map(Into::into).collect(),
            total_cents: order.total_cents,
            status: pb::OrderStatus::from(order.status).into(),
            failure_reason: order.failure_reason,
            version: order.version,
            created_at: Some(timestamp(order.created_at)),
            updated_at: Some(timestamp(order.updated_at)),
            history: order.history.iter().map(Into::into).collect(),
            transaction_id: order.transaction_id,
            idempotency_key: order.idempotency_key,
            stock_released_at: order.stock_released_at.map(timestamp),
        }
    }
}

impl From<Item> for pb::OrderLineItem {
    fn from(item: Item) -> Self {
        pb::OrderLineItem {
            sku: item.sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
            name: item.name,
        }
    }
}

impl From<&Change> for pb::StatusChange {
    fn from(change: &Change) -> Self {
        pb::StatusChange {
            version: change.version,
            status: pb::OrderStatus::from(change.status).into(),
            reason: change.reason.clone(),
            at: Some(timestamp(change.at)),
        }
    }
}

/// One change as a `WatchOrder` update.
pub(super) fn update(order_id: &str, change: &Change) -> pb::OrderUpdate {
    pb::OrderUpdate {
        order_id: order_id.to_owned(),
        version: change.version,
        status: pb::OrderStatus::from(change.status).into(),
        reason: change.reason.clone(),
        at: Some(timestamp(change.at)),
        terminal: change.status.is_terminal(),
    }
}
