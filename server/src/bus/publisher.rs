//! Publishing with publisher confirms on one long-lived channel per service.
//!
//! Every message is published `mandatory`, so a message no queue would take comes back as an
//! error instead of vanishing, and every call waits for the broker's confirm. Batches are
//! pipelined: every message is queued for writing before anything is awaited, then all
//! confirms are awaited together.

use std::collections::{HashMap, HashSet};

use futures_util::{
    future::{join_all, maybe_done},
    poll,
};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use tokio::sync::Mutex;

use super::{Broker, Link, Outgoing};

/// Why a publish did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker right now.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    /// The broker refused to take responsibility for the message.
    #[error("the broker nacked the message")]
    Nacked,
    /// No queue is bound for the message's routing key.
    #[error("unroutable: {0}")]
    Unroutable(String),
    /// The channel or connection failed.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// Confirmed, mandatory publishing on a service's connection.
#[derive(Debug)]
pub struct Publisher {
    broker: Broker,
    channel: Mutex<Option<(Link, Channel)>>,
}

impl Publisher {
    /// A publisher on `broker`'s current connection (whatever it is at publish time).
    pub fn new(broker: Broker) -> Self {
        Publisher {
            broker,
            channel: Mutex::new(None),
        }
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Publishes `messages` in order and waits for every confirm; one result per message.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let (link, channel) = match self.channel().await {
            Ok(pair) => pair,
            Err(error) => return messages.iter().map(|_| Err(clone_error(&error))).collect(),
        };
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let mut write = Box::pin(maybe_done(channel.basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &message.body,
                message.properties.clone(),
            )));
            // lapin queues a publish's frames on its first poll, then waits for its I/O thread
            // to write them. Polled once here, in order, the batch goes out in one write, in
            // the order given, instead of one round trip to that thread per message.
            let _ = poll!(write.as_mut());
            pending.push(write);
        }
        let confirmations = join_all(pending.into_iter().map(|mut write| async move {
            write.as_mut().await;
            let published = write
                .as_mut()
                .take_output()
                .expect("a completed MaybeDone holds its output");
            Ok(published?.await?)
        }))
        .await;
        let results = outcomes(messages, confirmations);
        if results
            .iter()
            .any(|r| matches!(r, Err(PublishError::Amqp(_))))
        {
            self.discard(&link).await;
        }
        results
    }

    async fn channel(&self) -> Result<(Link, Channel), PublishError> {
        let mut cached = self.channel.lock().await;
        if let Some((link, channel)) = cached.as_ref() {
            let same_connection = self
                .broker
                .current()
                .is_some_and(|c| c.generation() == link.generation());
            if same_connection && channel.status().connected() {
                return Ok((link.clone(), channel.clone()));
            }
        }
        let link = self.broker.current().ok_or(PublishError::Disconnected)?;
        let channel = link.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *cached = Some((link.clone(), channel.clone()));
        Ok((link, channel))
    }

    async fn discard(&self, link: &Link) {
        let mut cached = self.channel.lock().await;
        if cached
            .as_ref()
            .is_some_and(|(l, _)| l.generation() == link.generation())
        {
            *cached = None;
        }
    }
}

/// Each message's result from its confirm. A message the broker returned (no queue took it)
/// is unroutable, but lapin hands a returned message to whichever confirm completes next, and
/// the confirms of a `multiple` ack complete in no particular order: the return may ride on
/// another message's confirm. Its message id says whose it is; only a returned message without
/// one of this batch's ids stays with the confirm that carried it.
fn outcomes(
    messages: &[Outgoing],
    confirmations: Vec<Result<Confirmation, PublishError>>,
) -> Vec<Result<(), PublishError>> {
    let ours: HashSet<&str> = messages
        .iter()
        .filter_map(|message| message_id(&message.properties))
        .collect();
    let mut returned: HashMap<String, String> = HashMap::new();
    let mut own: Vec<(Result<(), PublishError>, Option<String>)> =
        Vec::with_capacity(messages.len());
    for confirmation in confirmations {
        let (result, carried) = match confirmation {
            Ok(Confirmation::Ack(carried)) => (Ok(()), carried),
            Ok(Confirmation::Nack(carried)) => (Err(PublishError::Nacked), carried),
            // confirm_select is always on; treat a missing confirm as a refusal.
            Ok(Confirmation::NotRequested) => (Err(PublishError::Nacked), None),
            Err(error) => (Err(error), None),
        };
        let mut unclaimed = None;
        if let Some(message) = carried {
            let reply = message.reply_text.to_string();
            match message_id(&message.delivery.properties).filter(|id| ours.contains(id)) {
                Some(owner) => {
                    returned.insert(owner.to_owned(), reply);
                }
                None => unclaimed = Some(reply),
            }
        }
        own.push((result, unclaimed));
    }
    own.into_iter()
        .zip(messages)
        .map(|((result, unclaimed), message)| {
            let reply = message_id(&message.properties)
                .and_then(|id| returned.remove(id))
                .or(unclaimed);
            match (result, reply) {
                (Ok(()), Some(reply)) => Err(PublishError::Unroutable(reply)),
                (result, _) => result,
            }
        })
        .collect()
}

fn message_id(properties: &BasicProperties) -> Option<&str> {
    properties.message_id().as_ref().map(ShortString::as_str)
}

fn clone_error(error: &PublishError) -> PublishError {
    match error {
        PublishError::Disconnected => PublishError::Disconnected,
        PublishError::Nacked => PublishError::Nacked,
        PublishError::Unroutable(text) => PublishError::Unroutable(text.clone()),
        PublishError::Amqp(e) => PublishError::Amqp(e.clone()),
    }
}
