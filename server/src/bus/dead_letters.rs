//! Broker-side operations on dead-letter queues: peek, replay, purge. Dead letters stay in
//! RabbitMQ (visible in the management UI); these operations take messages with `basic.get`
//! on a private channel, so two operators never get the same message, and settle each one only
//! after its replay was confirmed by the work queue. Messages not selected are held unacked and
//! go back to the queue when the channel closes.

use std::collections::HashSet;

use lapin::{
    Channel,
    options::{
        BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions,
        QueuePurgeOptions,
    },
    types::{FieldTable, ShortString},
};

use super::{
    Broker, Outgoing, PublishError,
    message::{republishable, text},
    topology::header,
};

/// Most messages one operation scans, so finding a message in a huge queue stays bounded.
pub const MAX_SCAN: u64 = 10_000;

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not connected to the broker right now.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    /// The broker refused an operation (e.g. the queue does not exist).
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// A replay's publish was not confirmed; the message stays in the dead-letter queue.
    #[error("replay was not confirmed: {0}")]
    Publish(#[from] PublishError),
}

/// One message as it sits in a dead-letter queue.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The producer's message id.
    pub message_id: Option<String>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    /// The AMQP `correlation_id` (order id).
    pub correlation_id: Option<String>,
    /// Untouched body.
    pub body: Vec<u8>,
    /// All headers.
    pub headers: FieldTable,
}

/// Which messages an operation applies to.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every message in the queue.
    All,
    /// Only these message ids.
    Ids(HashSet<String>),
}

impl Selection {
    fn selects(&self, id: Option<&str>) -> bool {
        match self {
            Selection::All => true,
            Selection::Ids(ids) => id.is_some_and(|id| ids.contains(id)),
        }
    }

    fn not_found(&self, seen: &HashSet<String>) -> Vec<String> {
        match self {
            Selection::All => Vec::new(),
            Selection::Ids(ids) => {
                let mut missing: Vec<String> = ids.difference(seen).cloned().collect();
                missing.sort();
                missing
            }
        }
    }
}

/// Dead-letter queue operations over a service's broker connection.
#[derive(Debug, Clone)]
pub struct DeadLetterQueues {
    broker: Broker,
}

impl DeadLetterQueues {
    /// Operations over `broker`'s connection.
    pub fn new(broker: Broker) -> Self {
        DeadLetterQueues { broker }
    }

    async fn channel(&self) -> Result<Channel, Error> {
        let link = self.broker.current().ok_or(Error::Disconnected)?;
        Ok(link.channel().await?)
    }

    /// Messages in `queue`.
    pub async fn depth(&self, queue: &str) -> Result<u64, Error> {
        let channel = self.channel().await?;
        let depth = depth(&channel, queue).await;
        let _ = channel.close(200, "done".into()).await;
        depth
    }

    /// Up to `limit` messages from the head of `queue`, left in place.
    pub async fn peek(&self, queue: &str, limit: u64) -> Result<Vec<Stored>, Error> {
        let channel = self.channel().await?;
        let mut found = Vec::new();
        while (found.len() as u64) < limit {
            match channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await?
            {
                Some(message) => found.push(stored(&message.delivery)),
                None => break,
            }
        }
        // Closing the channel returns every message taken above to the queue.
        let _ = channel.close(200, "peeked".into()).await;
        Ok(found)
    }

    /// Sends the selected messages of `queue` back to `work_queue` with a fresh attempt count.
    /// Returns the replayed messages and the requested ids that were not found.
    pub async fn replay(
        &self,
        queue: &str,
        work_queue: &str,
        selection: &Selection,
    ) -> Result<(Vec<Stored>, Vec<String>), Error> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut scan = Scan::start(&channel, queue, selection).await?;
        let mut replayed = Vec::new();
        while let Some(delivery) = scan.next().await? {
            let outgoing = Outgoing {
                exchange: String::new(),
                routing_key: work_queue.to_owned(),
                properties: republishable(&delivery.properties)
                    .with_headers(fresh_headers(&delivery.properties)),
                body: delivery.data.clone(),
            };
            publish_confirmed(&channel, &outgoing).await?;
            // Only now is the dead letter settled: a crash before this line leaves it in the
            // queue, and a second replay is then absorbed by the consumer's inbox.
            delivery.acker.ack(BasicAckOptions::default()).await?;
            replayed.push(stored(&delivery));
        }
        let not_found = scan.not_found();
        let _ = channel.close(200, "replayed".into()).await;
        Ok((replayed, not_found))
    }

    /// Deletes the selected messages of `queue`; returns how many, and the ids not found.
    pub async fn purge(
        &self,
        queue: &str,
        selection: &Selection,
    ) -> Result<(u64, Vec<String>), Error> {
        let channel = self.channel().await?;
        if let Selection::All = selection {
            let purged = channel
                .queue_purge(queue.into(), QueuePurgeOptions::default())
                .await?;
            let _ = channel.close(200, "purged".into()).await;
            return Ok((u64::from(purged), Vec::new()));
        }
        let mut scan = Scan::start(&channel, queue, selection).await?;
        let mut purged = 0;
        while let Some(delivery) = scan.next().await? {
            delivery.acker.ack(BasicAckOptions::default()).await?;
            purged += 1;
        }
        let not_found = scan.not_found();
        let _ = channel.close(200, "purged".into()).await;
        Ok((purged, not_found))
    }
}

/// Takes the messages of a queue one by one with `basic.get` on a private channel and yields
/// the selected ones. The others stay unacknowledged, held by this channel until it closes,
/// so nobody else takes them meanwhile and none is seen twice. Bounded by [`MAX_SCAN`] and by
/// the depth at the start (messages arriving later are left for the next operation).
struct Scan<'a> {
    channel: &'a Channel,
    queue: &'a str,
    selection: &'a Selection,
    left: u64,
    seen: HashSet<String>,
}

impl<'a> Scan<'a> {
    async fn start(
        channel: &'a Channel,
        queue: &'a str,
        selection: &'a Selection,
    ) -> Result<Scan<'a>, Error> {
        let left = depth(channel, queue).await?.min(MAX_SCAN);
        Ok(Scan {
            channel,
            queue,
            selection,
            left,
            seen: HashSet::new(),
        })
    }

    async fn next(&mut self) -> Result<Option<lapin::message::Delivery>, Error> {
        while self.left > 0 {
            self.left -= 1;
            let options = BasicGetOptions { no_ack: false };
            let Some(message) = self.channel.basic_get(self.queue.into(), options).await? else {
                return Ok(None);
            };
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned());
            if self.selection.selects(id.as_deref()) {
                self.seen.extend(id);
                return Ok(Some(message.delivery));
            }
        }
        Ok(None)
    }

    /// Requested ids the scan did not meet.
    fn not_found(&self) -> Vec<String> {
        self.selection.not_found(&self.seen)
    }
}

async fn depth(channel: &Channel, queue: &str) -> Result<u64, Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(ShortString::from(queue), passive, FieldTable::default())
        .await?;
    Ok(u64::from(declared.message_count()))
}

async fn publish_confirmed(channel: &Channel, message: &Outgoing) -> Result<(), Error> {
    let confirm = channel
        .basic_publish(
            message.exchange.as_str().into(),
            message.routing_key.as_str().into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &message.body,
            message.properties.clone(),
        )
        .await?
        .await?;
    match confirm {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(returned)) | lapin::Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Unroutable(returned.reply_text.to_string()).into())
        }
        _ => Err(PublishError::Nacked.into()),
    }
}

fn stored(delivery: &lapin::message::Delivery) -> Stored {
    let p = &delivery.properties;
    Stored {
        message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
        kind: p.kind().as_ref().map(|s| s.as_str().to_owned()),
        correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_owned()),
        body: delivery.data.clone(),
        headers: p.headers().clone().unwrap_or_default(),
    }
}

/// The headers a replayed message travels with: the failure bookkeeping is reset (a fresh
/// attempt count, no stale first-failure time), the trace context and original route are kept,
/// and the replay itself is recorded.
fn fresh_headers(properties: &lapin::BasicProperties) -> FieldTable {
    let reset = [
        header::ATTEMPT,
        header::LAST_ERROR,
        header::ERROR_KIND,
        header::FAILING_SERVICE,
        header::FIRST_FAILURE_AT,
        header::LAST_FAILURE_AT,
        header::DEAD_LETTER_REASON,
        header::QUEUE,
    ];
    let mut headers = FieldTable::default();
    let replays = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(header::REPLAYS))
        .and_then(super::message::as_u64)
        .unwrap_or(0);
    if let Some(original) = properties.headers() {
        for (key, value) in original.inner() {
            let broker_bookkeeping = key.as_str().starts_with("x-death")
                || key.as_str().starts_with("x-first-death")
                || key.as_str().starts_with("x-last-death")
                || key.as_str() == "x-delivery-count";
            if !broker_bookkeeping && !reset.contains(&key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert(
        header::REPLAYS.into(),
        lapin::types::AMQPValue::LongLongInt(replays as i64 + 1),
    );
    headers.insert(
        header::REPLAYED_AT.into(),
        text(crate::time::rfc3339(std::time::SystemTime::now())),
    );
    headers
}

#[cfg(test)]
mod tests {
    use lapin::{BasicProperties, types::AMQPValue};

    use super::*;

    #[test]
    fn replay_resets_failure_bookkeeping_and_keeps_context() {
        let mut original = FieldTable::default();
        original.insert(header::ATTEMPT.into(), AMQPValue::LongLongInt(5));
        original.insert(header::LAST_ERROR.into(), text("boom"));
        original.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        original.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        original.insert(
            "traceparent".into(),
            text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        original.insert(header::ORIGINAL_ROUTING_KEY.into(), text("order.created"));
        original.insert(header::REPLAYS.into(), AMQPValue::LongLongInt(1));
        let fresh = fresh_headers(&BasicProperties::default().with_headers(original));
        let keys: Vec<&str> = fresh.inner().keys().map(|k| k.as_str()).collect();
        assert!(keys.contains(&"traceparent") && keys.contains(&header::ORIGINAL_ROUTING_KEY));
        assert!(!keys.contains(&header::ATTEMPT) && !keys.contains(&header::LAST_ERROR));
        assert!(!keys.contains(&"x-death") && !keys.contains(&"x-delivery-count"));
        assert_eq!(
            fresh.inner().get(header::REPLAYS),
            Some(&AMQPValue::LongLongInt(2))
        );
    }

    #[test]
    fn selection() {
        let ids = Selection::Ids(["a".to_owned(), "b".to_owned()].into());
        assert!(ids.selects(Some("a")) && !ids.selects(Some("c")) && !ids.selects(None));
        assert!(Selection::All.selects(None));
        assert_eq!(
            ids.not_found(&["a".to_owned()].into()),
            vec!["b".to_owned()]
        );
    }
}
