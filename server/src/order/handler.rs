//! Order's reactions to the saga: Inventory's and Payment's outcomes move the order's status
//! (see [`super::status`]), and a dead-lettered message about an order marks it FAILED so
//! nobody waits forever.

use std::{collections::HashSet, sync::Arc};

use orderflow_proto::orderflow::v1 as pb;
use tracing::{debug, info};

use super::{
    Item, Order,
    batch::Orders,
    dead_letters,
    status::{Fact, Status, transitions},
    watch::Hub,
};
use crate::{
    bus::{self, HandleError, Incoming, SagaEvent, dead_letters::Parked, topology::header},
    inbox::{Context, Handler},
    metrics::Metrics,
};

/// Applies Inventory's and Payment's events to orders.
#[derive(Debug, Clone)]
pub struct SagaHandler {
    observers: Observers,
}

impl SagaHandler {
    /// A handler that rings `hub` after each committed change.
    pub fn new(hub: Hub, metrics: Metrics) -> Self {
        SagaHandler {
            observers: Observers { hub, metrics },
        }
    }
}

impl Handler for SagaHandler {
    type Batch = Orders;

    async fn prepare(
        &self,
        cx: &mut Context<'_>,
        messages: &[&Incoming],
    ) -> Result<Orders, HandleError> {
        load(cx, &bus::order_ids(messages)).await
    }

    async fn handle(
        &self,
        cx: &mut Context<'_>,
        orders: &mut Orders,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        let observers = &self.observers;
        match message.event()? {
            SagaEvent::InventoryReserved(event) => {
                apply(
                    cx,
                    orders,
                    observers,
                    &event.order_id,
                    Fact::Reserved,
                    "",
                    |order| {
                        price(order, &event.items, event.total_cents);
                    },
                )
                .await
            }
            SagaEvent::InventoryRejected(event) => {
                let (order_id, detail) = (&event.order_id, &event.detail);
                apply(
                    cx,
                    orders,
                    observers,
                    order_id,
                    Fact::Rejected,
                    detail,
                    |_| {},
                )
                .await
            }
            SagaEvent::PaymentProcessed(event) => {
                apply(
                    cx,
                    orders,
                    observers,
                    &event.order_id,
                    Fact::Paid,
                    "",
                    |order| {
                        price(order, &event.items, event.amount_cents);
                        order.transaction_id = Some(event.transaction_id.clone());
                    },
                )
                .await
            }
            SagaEvent::PaymentFailed(event) => {
                let (order_id, detail) = (&event.order_id, &event.detail);
                apply(
                    cx,
                    orders,
                    observers,
                    order_id,
                    Fact::Declined,
                    detail,
                    |order| {
                        price(order, &event.items, event.amount_cents);
                    },
                )
                .await
            }
            SagaEvent::InventoryReleased(event) => record_release(cx, orders, event).await,
            other => Err(other.unexpected("Order")),
        }
    }

    async fn finish(&self, cx: &mut Context<'_>, orders: Orders) -> Result<(), HandleError> {
        write(cx, orders).await
    }
}

/// Reads the batch's orders, locking them where other instances write too.
async fn load(cx: &mut Context<'_>, ids: &[&str]) -> Result<Orders, HandleError> {
    let lock = cx.for_update();
    Orders::load(cx.conn(), ids, lock)
        .await
        .map_err(HandleError::transient)
}

/// Writes what the batch changed.
async fn write(cx: &mut Context<'_>, orders: Orders) -> Result<(), HandleError> {
    orders.write(cx.writes()).map_err(HandleError::transient)
}

/// Compensation done: no status change, but the order records when its stock went back.
async fn record_release(
    cx: &mut Context<'_>,
    orders: &mut Orders,
    event: &pb::InventoryReleased,
) -> Result<(), HandleError> {
    let lock = cx.for_update();
    let Some(mut order) = orders
        .get(cx.conn(), &event.order_id, lock)
        .await
        .map_err(HandleError::transient)?
    else {
        return Err(HandleError::permanent(anyhow::anyhow!(
            "unknown order `{}`",
            event.order_id
        )));
    };
    if order.stock_released_at.is_none() {
        let at = event.released_at.map_or_else(crate::time::now_micros, |t| {
            t.seconds * 1_000_000 + i64::from(t.nanos) / 1000
        });
        order.stock_released_at = Some(at);
        orders.save(order);
    }
    Ok(())
}

/// Keeps every dead letter of the namespace in the dead-letter store and marks the order it is
/// about FAILED, in one transaction.
#[derive(Debug, Clone)]
pub struct DeadLetterHandler {
    observers: Observers,
    work_queues: Arc<HashSet<String>>,
}

impl DeadLetterHandler {
    /// A handler that rings `hub` after each committed change. `work_queues` are the
    /// namespace's work queues: a dead letter from one of them is replayed straight into it.
    pub fn new(hub: Hub, metrics: Metrics, work_queues: HashSet<String>) -> Self {
        DeadLetterHandler {
            observers: Observers { hub, metrics },
            work_queues: Arc::new(work_queues),
        }
    }

    /// Inbox key of a dead letter: the message id plus when it failed (and a digest of the
    /// body, for messages without an id), so the same message dead-lettered again after a
    /// replay is kept again, while a redelivered copy is not.
    pub fn dedup_key(message: &Incoming) -> Option<String> {
        use sha2::Digest as _;
        let id = message.message_id().unwrap_or("-");
        let failed_at = message
            .header_str(header::LAST_FAILURE_AT)
            .unwrap_or("broker");
        let count = message.death_count().unwrap_or(0);
        let body = sha2::Sha256::digest(message.body());
        let body: String = body[..8].iter().map(|b| format!("{b:02x}")).collect();
        Some(format!("dead-letter:{id}:{failed_at}:{count}:{body}"))
    }
}

impl Handler for DeadLetterHandler {
    type Batch = Orders;

    async fn prepare(
        &self,
        cx: &mut Context<'_>,
        messages: &[&Incoming],
    ) -> Result<Orders, HandleError> {
        let ids: Vec<&str> = messages
            .iter()
            .filter_map(|message| message.correlation_id())
            .filter(|id| !id.is_empty())
            .collect();
        load(cx, &ids).await
    }

    async fn handle(
        &self,
        cx: &mut Context<'_>,
        orders: &mut Orders,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        let parked = Parked::read(message, |queue| self.work_queues.contains(queue));
        dead_letters::record(cx.conn(), &parked)
            .await
            .map_err(HandleError::transient)?;
        let Some(order_id) = message.correlation_id().filter(|id| !id.is_empty()) else {
            debug!("Dead letter without an order id; nothing to mark.");
            return Ok(());
        };
        let reason = dead_letter_reason(message);
        apply(
            cx,
            orders,
            &self.observers,
            order_id,
            Fact::DeadLettered,
            &reason,
            |_| {},
        )
        .await
        .or_else(|error| match error {
            // A dead letter about an order this database does not know (foreign or garbage
            // correlation id) has nothing to mark.
            HandleError::Permanent(_) => Ok(()),
            transient => Err(transient),
        })
    }

    async fn finish(&self, cx: &mut Context<'_>, orders: Orders) -> Result<(), HandleError> {
        write(cx, orders).await
    }
}

/// Human-readable reason from the dead letter's headers.
fn dead_letter_reason(message: &Incoming) -> String {
    let kind = message.kind().unwrap_or("message");
    match message.header_str(header::LAST_ERROR) {
        Some(error) => {
            let service = message
                .header_str(header::FAILING_SERVICE)
                .unwrap_or("a service");
            let attempts = message.attempt();
            format!("{service} could not process {kind} after {attempts} attempt(s): {error}")
        }
        // Dead-lettered by the broker itself: the delivery limit (a handler that crashed the
        // process on every attempt) or a rejection.
        None => {
            let why = message
                .header_str("x-first-death-reason")
                .unwrap_or("unknown");
            let queue = message
                .header_str("x-first-death-queue")
                .unwrap_or("its queue");
            format!("{kind} was dead-lettered by RabbitMQ from {queue} ({why})")
        }
    }
}

/// Moves `order_id` by `fact`, updating its data with `update` when it moves.
async fn apply(
    cx: &mut Context<'_>,
    orders: &mut Orders,
    observers: &Observers,
    order_id: &str,
    fact: Fact,
    reason: &str,
    update: impl FnOnce(&mut Order),
) -> Result<(), HandleError> {
    let lock = cx.for_update();
    let Some(mut order) = orders
        .get(cx.conn(), order_id, lock)
        .await
        .map_err(HandleError::transient)?
    else {
        return Err(HandleError::permanent(anyhow::anyhow!(
            "unknown order `{order_id}`"
        )));
    };
    let reserved = match order.status {
        Status::InventoryReserved | Status::Completed | Status::PaymentFailed => true,
        Status::Pending | Status::Rejected => false,
        // Only a FAILED order's status does not say whether it got that far.
        Status::Failed => orders
            .has_reached(cx.conn(), order_id, Status::InventoryReserved)
            .await
            .map_err(HandleError::transient)?,
    };
    let statuses = transitions(order.status, reserved, fact);
    let before = order.clone();
    update(&mut order);
    let Some(&last) = statuses.last() else {
        // No status change, but the fact may still carry data the order lacks (a FAILED
        // order learning its prices from a late reservation).
        if order != before {
            orders.save(order);
        }
        debug!(order.id = order_id, status = before.status.as_str(), fact = ?fact, "No status change for this fact.");
        return Ok(());
    };
    let from = order.status;
    order.failure_reason = if matches!(
        last,
        Status::Rejected | Status::PaymentFailed | Status::Failed
    ) {
        reason.to_owned()
    } else {
        String::new()
    };
    let created_at = order.created_at;
    let changes = orders.record(order, &statuses, reason);
    let version = changes.last().map_or(0, |c| c.version);
    info!(
        target: "orderflow::message",
        service = "order-service",
        order.id = order_id,
        from = from.as_str(),
        to = last.as_str(),
        version,
        "Order status changed."
    );
    let Observers { hub, metrics } = observers.clone();
    let order_id = order_id.to_owned();
    let saga = std::time::Duration::from_micros(
        crate::time::now_micros().saturating_sub(created_at).max(0) as u64,
    );
    cx.after_commit(move || {
        hub.notify_changes(&order_id, &changes);
        if let Some(outcome) = outcome_label(last) {
            metrics.order_finished(outcome, saga);
        }
    });
    Ok(())
}

/// Who hears about a committed change: watch streams (through the hub) and metrics.
#[derive(Debug, Clone)]
struct Observers {
    hub: Hub,
    metrics: Metrics,
}

/// The metrics label of a terminal status.
fn outcome_label(status: Status) -> Option<&'static str> {
    match status {
        Status::Completed => Some("completed"),
        Status::Rejected => Some("rejected"),
        Status::PaymentFailed => Some("payment_failed"),
        Status::Failed => Some("failed"),
        Status::Pending | Status::InventoryReserved => None,
    }
}

/// Records the reservation's prices on the order's lines, and the total.
fn price(order: &mut Order, lines: &[pb::ReservedLine], total_cents: i64) {
    if lines.is_empty() {
        return;
    }
    for item in &mut order.items {
        if let Some(line) = lines.iter().find(|l| l.sku == item.sku) {
            *item = Item {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price_cents: Some(line.unit_price_cents),
                name: Some(line.name.clone()),
            };
        }
    }
    order.total_cents = Some(total_cents);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        let line = |sku: &str, quantity| Item {
            sku: sku.into(),
            quantity,
            unit_price_cents: None,
            name: None,
        };
        Order::pending("o", "c", vec![line("a", 2), line("b", 1)])
    }

    #[test]
    fn pricing_fills_lines_and_total() {
        let mut o = order();
        let line = |sku: &str, p| pb::ReservedLine {
            sku: sku.into(),
            quantity: 1,
            unit_price_cents: p,
            name: sku.to_uppercase(),
        };
        price(&mut o, &[line("a", 150), line("b", 99)], 399);
        assert_eq!(o.total_cents, Some(399));
        assert_eq!(o.items[0].unit_price_cents, Some(150));
        assert_eq!(o.items[1].name.as_deref(), Some("B"));
    }

    #[test]
    fn pricing_without_lines_changes_nothing() {
        let mut o = order();
        price(&mut o, &[], 5);
        assert_eq!(o, order());
    }
}
