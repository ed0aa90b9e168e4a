//! Retiring the per-queue dead-letter queues (`<work queue>.dlq`) of orderflow before the
//! dead-letter store. A namespace declared by an earlier version still has them, still bound to
//! the dead-letter exchange: left alone they would fill with copies nobody reads, and the dead
//! letters already in them would be out of the API's sight. So, on a connection that declares
//! the topology, each one found among the service's own queues is unbound, its messages are
//! moved to the dead-letter intake (which keeps them in the store), and it is deleted.
//!
//! One mover per old queue keeps its dead letters in their order. Two instances of a service
//! starting at the same moment can still both move from one queue: then the order between
//! them may mix, but the inbox keeps each dead letter once and none is lost.
//!
//! A move takes a message, publishes it to the intake with confirms, and only then acknowledges
//! it; the intake's inbox makes a message moved twice (a crash in between) stored once.

use lapin::{
    Connection,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use tracing::{info, warn};

use super::{QueueNames, Source, Topology};
use crate::{bus::message::republishable, service::Service};

impl Topology {
    /// Moves what the earlier per-queue DLQs of `service`'s work queues hold into the
    /// dead-letter intake and deletes them. Returns how many dead letters were moved. Nothing
    /// to do (and nothing declared) on a namespace that never had them.
    pub async fn retire_legacy_dead_letter_queues(
        &self,
        connection: &Connection,
        service: Service,
    ) -> u64 {
        let Some(intake) = self
            .all_queues()
            .into_iter()
            .find(|q| q.subscription.source == Source::DeadLetters)
            .map(|q| q.work)
        else {
            return 0;
        };
        let mut moved = 0;
        for queue in self.queues_of(service) {
            if queue.subscription.source != Source::Events {
                continue;
            }
            // Housekeeping must not keep the service from running: a failure (another
            // instance retiring the same queue, say) is reported and tried on the next connect.
            match self.retire(connection, &queue, &intake).await {
                Ok(Some(here)) => {
                    info!(
                        queue = %queue.dlq,
                        moved = here,
                        intake = %intake,
                        "Retired a dead-letter queue of an earlier version; its dead letters are in the store now."
                    );
                    moved += here;
                }
                Ok(None) => {}
                Err(error) => warn!(
                    queue = %queue.dlq,
                    error = %format!("{error:#}"),
                    "Could not retire a dead-letter queue of an earlier version yet."
                ),
            }
        }
        moved
    }

    /// Retires `queue`'s old DLQ; `None` when there is none.
    async fn retire(
        &self,
        connection: &Connection,
        queue: &QueueNames,
        intake: &str,
    ) -> anyhow::Result<Option<u64>> {
        // A passive declare of a missing queue closes its channel: one channel per look.
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if channel
            .queue_declare(queue.dlq.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            return Ok(None);
        }
        // First no new copies, then move what is there.
        channel
            .queue_unbind(
                queue.dlq.as_str().into(),
                self.dead_letter_exchange().as_str().into(),
                queue.work.as_str().into(),
                FieldTable::default(),
            )
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut moved = 0;
        while let Some(message) = channel
            .basic_get(queue.dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            let delivery = message.delivery;
            let confirm = channel
                .basic_publish(
                    "".into(),
                    intake.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &delivery.data,
                    republishable(&delivery.properties),
                )
                .await?
                .await?;
            anyhow::ensure!(
                matches!(confirm, lapin::Confirmation::Ack(None)),
                "the dead-letter intake {intake} refused a message: {confirm:?}"
            );
            delivery.acker.ack(BasicAckOptions::default()).await?;
            moved += 1;
        }
        // Quorum queues refuse `if_empty` (and close the connection for it). Nothing arrives
        // after the last get: the queue was unbound first.
        channel
            .queue_delete(queue.dlq.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let _ = channel.close(200, "retired".into()).await;
        Ok(Some(moved))
    }
}
