//! Payment's reaction to `InventoryReserved`: one charge decision per order, recorded with the
//! outcome event in the same transaction, so a redelivery never charges twice.

use orderflow_proto::orderflow::v1 as pb;
use tracing::debug;

use super::provider::{Charge, Provider};
use crate::{
    bus::{HandleError, Incoming, SagaEvent},
    inbox::{Context, Handler},
    time,
};

/// Handles `InventoryReserved`.
#[derive(Debug, Clone)]
pub struct PaymentHandler {
    provider: Provider,
}

impl PaymentHandler {
    /// A handler charging through `provider`.
    pub fn new(provider: Provider) -> Self {
        PaymentHandler { provider }
    }
}

impl Handler for PaymentHandler {
    type Batch = ();

    async fn handle(
        &self,
        cx: &mut Context<'_>,
        _: &mut (),
        message: &Incoming,
    ) -> Result<(), HandleError> {
        let event = match message.event()? {
            SagaEvent::InventoryReserved(event) => event,
            other => return Err(other.unexpected("Payment")),
        };
        if event.order_id.is_empty() || event.total_cents < 0 {
            return Err(HandleError::permanent(anyhow::anyhow!(
                "invalid InventoryReserved: order_id empty or negative total"
            )));
        }

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
                    order_id: event.order_id.clone(),
                    transaction_id,
                    amount_cents: event.total_cents,
                    processed_at: Some(time::now_timestamp()),
                    items: event.items.clone(),
                });
            }
            Charge::Declined(detail) => {
                cx.publish(&pb::PaymentFailed {
                    order_id: event.order_id.clone(),
                    amount_cents: event.total_cents,
                    reason: pb::PaymentFailureReason::LimitExceeded.into(),
                    detail,
                    failed_at: Some(time::now_timestamp()),
                    items: event.items.clone(),
                });
            }
        }
        Ok(())
    }
}
