//! Inventory's reactions: reserve stock for a new order (or reject it), release it when the
//! payment failed. Each outcome is staged in the outbox in the same transaction.

use orderflow_proto::orderflow::v1 as pb;
use tracing::debug;

use super::{ledger::Ledger, stock::Decision};
use crate::{
    bus::{HandleError, Incoming, SagaEvent},
    inbox::{Context, Handler},
    time,
};

/// Largest number of lines Inventory accepts in one order (the API's limit).
const MAX_LINES: usize = 100;

/// Handles `OrderCreated` and `PaymentFailed`.
#[derive(Debug, Clone, Default)]
pub struct InventoryHandler;

impl Handler for InventoryHandler {
    type Batch = Ledger;

    async fn prepare(
        &self,
        cx: &mut Context<'_>,
        messages: &[&Incoming],
    ) -> Result<Ledger, HandleError> {
        // An order that is invalid fails in `handle`, where it is its own failure.
        let orders: Vec<&pb::OrderCreated> = messages
            .iter()
            .filter_map(|message| match message.event() {
                Ok(SagaEvent::OrderCreated(event)) if check(event).is_ok() => Some(event),
                _ => None,
            })
            .collect();
        // A batch reserves many orders' SKUs in no global order: row locks alone would let two
        // instances' batches deadlock.
        cx.serialize("stock").await?;
        let lock = cx.for_update();
        Ledger::load(cx.conn(), &orders, lock)
            .await
            .map_err(HandleError::transient)
    }

    async fn handle(
        &self,
        cx: &mut Context<'_>,
        ledger: &mut Ledger,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        match message.event()? {
            SagaEvent::OrderCreated(event) => reserve(cx, ledger, event).await,
            SagaEvent::PaymentFailed(event) => release(cx, ledger, event).await,
            other => Err(other.unexpected("Inventory")),
        }
    }

    async fn finish(&self, cx: &mut Context<'_>, mut ledger: Ledger) -> Result<(), HandleError> {
        let (conn, writes) = cx.conn_and_writes();
        ledger
            .write(conn, writes)
            .await
            .map_err(HandleError::transient)
    }
}

/// Reserves every line of a new order, or none, and stages the outcome.
async fn reserve(
    cx: &mut Context<'_>,
    ledger: &mut Ledger,
    event: &pb::OrderCreated,
) -> Result<(), HandleError> {
    check(event)?;
    let lock = cx.for_update();
    match ledger
        .reserve(cx.conn(), &event.order_id, &event.items, lock)
        .await
        .map_err(HandleError::transient)?
    {
        Decision::Reserved { lines, total_cents } => {
            cx.publish(&pb::InventoryReserved {
                order_id: event.order_id.clone(),
                items: lines.into_iter().map(Into::into).collect(),
                total_cents,
                customer_id: event.customer_id.clone(),
                reserved_at: Some(time::now_timestamp()),
            });
        }
        Decision::Rejected {
            reason,
            shortfalls,
            detail,
        } => {
            cx.publish(&pb::InventoryRejected {
                order_id: event.order_id.clone(),
                reason: reason.into(),
                shortfalls,
                detail,
                rejected_at: Some(time::now_timestamp()),
            });
        }
        Decision::AlreadyDecided => {
            debug!(order.id = %event.order_id, "Order already decided; its outcome is in the outbox.");
        }
    }
    Ok(())
}

/// Gives back the reservation of an order whose payment failed, and stages `InventoryReleased`.
async fn release(
    cx: &mut Context<'_>,
    ledger: &mut Ledger,
    event: &pb::PaymentFailed,
) -> Result<(), HandleError> {
    let lock = cx.for_update();
    if let Some(lines) = ledger
        .release(cx.conn(), &event.order_id, lock)
        .await
        .map_err(HandleError::transient)?
    {
        cx.publish(&pb::InventoryReleased {
            order_id: event.order_id.clone(),
            items: lines.into_iter().map(Into::into).collect(),
            reason: format!("payment failed: {}", event.detail),
            released_at: Some(time::now_timestamp()),
        });
    }
    Ok(())
}

/// An `OrderCreated` that no retry can make valid is dead-lettered.
fn check(event: &pb::OrderCreated) -> Result<(), HandleError> {
    let invalid = |why: String| {
        Err(HandleError::permanent(anyhow::anyhow!(
            "invalid OrderCreated: {why}"
        )))
    };
    if event.order_id.is_empty() {
        return invalid("empty order_id".into());
    }
    if event.items.is_empty() || event.items.len() > MAX_LINES {
        return invalid(format!(
            "{} lines (expected 1-{MAX_LINES})",
            event.items.len()
        ));
    }
    let mut skus = std::collections::HashSet::new();
    for (i, item) in event.items.iter().enumerate() {
        if item.quantity == 0 {
            return invalid(format!("items[{i}].quantity is 0"));
        }
        if !skus.insert(item.sku.as_str()) {
            return invalid(format!("items[{i}].sku `{}` appears twice", item.sku));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(items: Vec<(&str, u32)>) -> pb::OrderCreated {
        pb::OrderCreated {
            order_id: "o-1".into(),
            customer_id: "c".into(),
            items: items
                .into_iter()
                .map(|(sku, quantity)| pb::OrderLine {
                    sku: sku.into(),
                    quantity,
                })
                .collect(),
            created_at: None,
        }
    }

    #[test]
    fn invalid_orders_are_permanent_failures() {
        for bad in [
            created(vec![]),
            created(vec![("A", 0)]),
            created(vec![("A", 1), ("A", 2)]),
        ] {
            assert!(
                matches!(check(&bad), Err(HandleError::Permanent(_))),
                "{bad:?}"
            );
        }
        assert!(check(&created(vec![("A", 1), ("B", 2)])).is_ok());
    }
}
