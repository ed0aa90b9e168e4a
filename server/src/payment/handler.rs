//! Payment's reaction to `InventoryReserved`: one charge decision per order, recorded with the
//! outcome event in the same transaction, so a redelivery never charges twice.

use orderflow_proto::orderflow::v1 as pb;
use prost::Name as _;
use tracing::debug;

use super::provider::{Charge, Provider};
use crate::{
    bus::{HandleError, Incoming},
    fault::Faults,
    inbox::{Context, Handler},
    time,
};

/// Handles `InventoryReserved`.
#[derive(Debug, Clone)]
pub struct PaymentHandler {
    provider: Provider,
    faults: Faults,
}

impl PaymentHandler {
    /// A handler charging through `provider`, injecting `faults`.
    pub fn new(provider: Provider, faults: Faults) -> Self {
        PaymentHandler { provider, faults }
    }
}

impl Handler for PaymentHandler {
    async fn handle(&self, cx: &mut Context<'_>, message: &Incoming) -> Result<(), HandleError> {
        let kind = message.kind().unwrap_or_default();
        if kind != pb::InventoryReserved::full_name() {
            return Err(HandleError::permanent(anyhow::anyhow!(
                "Payment does not handle message type `{kind}`"
            )));
        }
        let event: pb::InventoryReserved = message.decode()?;
        if event.order_id.is_empty() || event.total_cents < 0 {
            return Err(HandleError::permanent(anyhow::anyhow!(
                "invalid InventoryReserved: order_id empty or negative total"
            )));
        }
        self.faults.inject(message)?;

        let charged: Option<(String,)> =
            sqlx::query_as("SELECT status FROM payments WHERE order_id = $1")
                .bind(&event.order_id)
                .fetch_optional(cx.conn())
                .await
                .map_err(HandleError::transient)?;
        if charged.is_some() {
            debug!(order.id = %event.order_id, "Order already charged; its outcome is in the outbox.");
            return Ok(());
        }

        let charge = self.provider.charge(event.total_cents);
        let (status, transaction_id, reason) = match &charge {
            Charge::Approved(id) => ("processed", Some(id.as_str()), ""),
            Charge::Declined(reason) => ("declined", None, reason.as_str()),
        };
        sqlx::query(
            "INSERT INTO payments (order_id, status, amount_cents, transaction_id, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&event.order_id)
        .bind(status)
        .bind(event.total_cents)
        .bind(transaction_id)
        .bind(reason)
        .bind(time::now_micros())
        .execute(cx.conn())
        .await
        .map_err(HandleError::transient)?;

        match charge {
            Charge::Approved(transaction_id) => {
                cx.publish(&pb::PaymentProcessed {
                    order_id: event.order_id,
                    transaction_id,
                    amount_cents: event.total_cents,
                    processed_at: Some(time::now_timestamp()),
                    items: event.items,
                })
                .await?;
            }
            Charge::Declined(detail) => {
                cx.publish(&pb::PaymentFailed {
                    order_id: event.order_id,
                    amount_cents: event.total_cents,
                    reason: pb::PaymentFailureReason::LimitExceeded.into(),
                    detail,
                    failed_at: Some(time::now_timestamp()),
                    items: event.items,
                })
                .await?;
            }
        }
        Ok(())
    }
}
