//! Payment's reaction to `InventoryReserved`: one charge decision per order, recorded with the
//! outcome event in the same transaction, so a redelivery never charges twice.

use orderflow_proto::orderflow::v1 as pb;
use tracing::debug;

use super::{
    charges::{Charges, Decision},
    provider::{Charge, Provider},
};
use crate::{
    bus::{self, HandleError, Incoming, SagaEvent},
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
    type Batch = Charges;

    async fn prepare(
        &self,
        cx: &mut Context<'_>,
        messages: &[&Incoming],
    ) -> Result<Charges, HandleError> {
        Charges::load(cx.conn(), &bus::order_ids(messages))
            .await
            .map_err(HandleError::transient)
    }

    async fn handle(
        &self,
        cx: &mut Context<'_>,
        charges: &mut Charges,
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

        if charges
            .charged(cx.conn(), &event.order_id)
            .await
            .map_err(HandleError::transient)?
        {
            debug!(order.id = %event.order_id, "Order already charged; its outcome is in the outbox.");
            return Ok(());
        }

        let charge = self.provider.charge(event.total_cents);
        let (status, transaction_id, reason) = match &charge {
            Charge::Approved(id) => ("processed", Some(id.clone()), String::new()),
            Charge::Declined(reason) => ("declined", None, reason.clone()),
        };
        charges.record(Decision {
            order_id: event.order_id.clone(),
            status,
            amount_cents: event.total_cents,
            transaction_id,
            reason,
        });

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

    async fn finish(&self, cx: &mut Context<'_>, charges: Charges) -> Result<(), HandleError> {
        charges.write(cx.writes());
        Ok(())
    }
}
