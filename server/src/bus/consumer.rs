//! The consume loop of one work queue: prefetch, take deliveries in batches, hand them to a
//! [`Processor`], and settle each one. [`Consumer::settle`] is the only code in orderflow that
//! acknowledges, retries or dead-letters a delivery.
//!
//! Invariants: a delivery is acknowledged only after its effects are committed (the processor
//! returned `Ok`) or after its copy was confirmed by the retry or dead-letter queue. A lost
//! connection leaves unacknowledged deliveries to the broker, which redelivers them.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt as _, StreamExt as _};
use lapin::{
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{
    Broker, HandleError, Incoming, Link, Outgoing, Publisher, RetryPolicy,
    failure::Failure,
    message::republishable,
    outcome::{Settlement, settle},
    pause::Pause,
    propagation,
    recovery::{self, Resend},
    topology::{QueueNames, Source, header},
};
use crate::{metrics::Metrics, service::Service};

/// How long a consumer under load waits for more deliveries to join a batch.
const BATCH_WINDOW: Duration = Duration::from_millis(1);

/// What [`Consumer::settle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Succeeded; to be acknowledged with the rest of its batch.
    AckLater,
    /// Already acknowledged or given back to the queue.
    Done,
}

/// Turns a batch of deliveries into effects. One result per delivery, in order.
pub trait Processor: Send + Sync + 'static {
    /// Handles `batch`; deliveries are independent, one failing must not fail the others.
    fn process(
        &self,
        batch: &[Incoming],
    ) -> impl Future<Output = Vec<Result<(), HandleError>>> + Send;
}

/// What a consumer consumes and how it treats failures.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The work queue and its retry and dead-letter routes.
    pub queue: QueueNames,
    /// The consuming service.
    pub service: Service,
    /// Retries before dead-lettering.
    pub policy: RetryPolicy,
    /// Unacknowledged deliveries held at once (and the largest batch).
    pub prefetch: u16,
    /// Larger deliveries are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Fault injection: when it says so, parking a failed message fails as if the broker had
    /// refused it.
    pub refuse_park: Option<ParkFault>,
    /// Set while the consumer holds a subscription, for `orderflow_consumer_paused`.
    pub pause: Pause,
}

/// Decides, for fault injection, whether a park fails.
#[derive(Clone)]
pub struct ParkFault(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for ParkFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParkFault")
    }
}

/// Consumes one work queue until shutdown, surviving reconnects.
#[derive(Debug)]
pub struct Consumer<P> {
    broker: Broker,
    publisher: Arc<Publisher>,
    queue: QueueNames,
    service: Service,
    policy: RetryPolicy,
    prefetch: u16,
    max_message_bytes: usize,
    refuse_park: Option<ParkFault>,
    pause: Pause,
    processor: Arc<P>,
    metrics: Metrics,
}

impl<P: Processor> Consumer<P> {
    /// A consumer of `queue` for `service`.
    pub fn new(
        broker: Broker,
        publisher: Arc<Publisher>,
        settings: Settings,
        processor: Arc<P>,
        metrics: Metrics,
    ) -> Self {
        let Settings {
            queue,
            service,
            policy,
            prefetch,
            max_message_bytes,
            refuse_park,
            pause,
        } = settings;
        Consumer {
            broker,
            publisher,
            queue,
            service,
            policy,
            prefetch,
            max_message_bytes,
            refuse_park,
            pause,
            processor,
            metrics,
        }
    }

    /// Consumes until `shutdown`. Finishes and settles the batch in hand before returning.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        while let Some(link) = self.broker.link(&shutdown).await {
            match self.consume(&link, &shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    warn!(
                        queue = %self.queue.work,
                        error = %error,
                        "Consumer interrupted; resuming on the next connection."
                    );
                    // A channel error on a healthy connection (e.g. a deleted queue) must not
                    // spin; a dead connection is noticed by the broker supervisor meanwhile.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        debug!(queue = %self.queue.work, "Consumer stopped.");
        Ok(())
    }

    async fn consume(&self, link: &Link, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let channel = link.channel().await?;
        // Prefetch bounds both memory and the batch size: the broker holds the backlog.
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!(
            "{}-{}",
            self.service.service_name(),
            uuid::Uuid::new_v4().simple()
        );
        let mut deliveries = channel
            .basic_consume(
                self.queue.work.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        debug!(queue = %self.queue.work, consumer.tag = %tag, "Consuming.");
        let _subscribed = self.pause.subscribed();

        let mut loaded = false;
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                next = deliveries.next() => next,
            };
            let Some(first) = first else {
                anyhow::bail!(
                    "the broker cancelled the consumer (queue deleted?) or the channel closed"
                );
            };
            let mut batch = Vec::with_capacity(usize::from(self.prefetch));
            batch.extend(self.admit(Incoming::new(first?)).await?);
            // Take what has already arrived to share one transaction. Under load (the last
            // batch had company) also wait a moment for what is on its way: a commit costs
            // the same for one message or fifty. Alone, a message never waits.
            let window = if loaded { BATCH_WINDOW } else { Duration::ZERO };
            let deadline = tokio::time::Instant::now() + window;
            while batch.len() < usize::from(self.prefetch) {
                let next = match deliveries.next().now_or_never() {
                    Some(next) => next,
                    None if window.is_zero() => break,
                    None => match tokio::time::timeout_at(deadline, deliveries.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                };
                match next {
                    Some(Ok(delivery)) => batch.extend(self.admit(Incoming::new(delivery)).await?),
                    _ => break,
                }
            }
            loaded = batch.len() > 1;
            if batch.is_empty() {
                continue;
            }
            self.metrics
                .batch_taken(self.service.service_name(), &self.queue.work, batch.len());
            let results = self.process(&batch).await;
            let mut ack_up_to = None;
            for (incoming, result) in batch.iter().zip(results) {
                if self.settle(incoming, result).await? == Settled::AckLater {
                    ack_up_to = Some(incoming.delivery.delivery_tag);
                }
            }
            // One frame for the batch: every delivery up to this tag is settled by now (the
            // others individually), and later deliveries have higher tags.
            if let Some(tag) = ack_up_to {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await?;
            }
        }

        // Stop deliveries, then close: prefetched but unhandled messages go back to the queue.
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = channel.close(200, "consumer stopped".into()).await;
        Ok(())
    }

    /// Passes a delivery on to be processed, decoded into its [`super::SagaEvent`] on event
    /// queues. A message larger than the limit is dead-lettered unread (decoding it could cost
    /// more than it is worth), and one that does not decode is dead-lettered before any handler
    /// sees it.
    async fn admit(&self, mut incoming: Incoming) -> anyhow::Result<Option<Incoming>> {
        let size = incoming.body().len();
        let admitted = if size > self.max_message_bytes {
            Err(HandleError::permanent(anyhow::anyhow!(
                "message of {size} bytes exceeds the limit of {} bytes",
                self.max_message_bytes
            )))
        } else if self.queue.subscription.source == Source::Events {
            incoming.decode()
        } else {
            Ok(())
        };
        match admitted {
            Ok(()) => Ok(Some(incoming)),
            Err(error) => {
                self.settle(&incoming, Err(error)).await?;
                Ok(None)
            }
        }
    }

    /// Runs the processor; if it panics, runs each delivery alone so only the culprit fails.
    async fn process(&self, batch: &[Incoming]) -> Vec<Result<(), HandleError>> {
        match AssertUnwindSafe(self.processor.process(batch))
            .catch_unwind()
            .await
        {
            Ok(results) => results,
            Err(_) if batch.len() > 1 => {
                let mut results = Vec::with_capacity(batch.len());
                for incoming in batch {
                    let single = std::slice::from_ref(incoming);
                    match AssertUnwindSafe(self.processor.process(single))
                        .catch_unwind()
                        .await
                    {
                        Ok(mut result) => results.push(result.pop().unwrap_or(Ok(()))),
                        Err(panic) => results.push(Err(panicked(panic))),
                    }
                }
                results
            }
            Err(panic) => vec![Err(panicked(panic))],
        }
    }

    /// Carries out the settlement of one delivery. Errors only when the channel is unusable.
    /// Returns [`Settled::AckLater`] for a plain success: the caller acknowledges a whole batch
    /// of those with one `multiple` ack.
    async fn settle(
        &self,
        incoming: &Incoming,
        result: Result<(), HandleError>,
    ) -> lapin::Result<Settled> {
        let attempt = incoming.attempt();
        let order_id = incoming.correlation_id().unwrap_or_default();
        let message_id = incoming.message_id().unwrap_or_default();
        let kind = incoming.kind().unwrap_or_default();
        let settlement = settle(&result, attempt, &self.policy);
        let (copy, span) = match (&settlement, &result) {
            (Settlement::Ack, _) => {
                info!(
                    target: "orderflow::message",
                    service = self.service.service_name(),
                    queue = %self.queue.work,
                    event.type = kind,
                    order.id = order_id,
                    message.id = message_id,
                    attempt,
                    elapsed_ms = incoming.age().as_millis() as u64,
                    "Handled event."
                );
                self.metrics.consumed(
                    self.service.service_name(),
                    kind,
                    &self.queue.work,
                    incoming.age(),
                    incoming.duplicate(),
                );
                return Ok(Settled::AckLater);
            }
            (
                Settlement::Retry {
                    failed_attempt,
                    delay,
                },
                Err(error),
            ) => {
                let exchange = self
                    .broker
                    .topology()
                    .retry_queue(self.service, *failed_attempt);
                let span = recovery::retry_span(
                    &self.resend(incoming, &exchange, &self.queue.work),
                    attempt,
                    *delay,
                    error.kind(),
                    error,
                    propagation::extract(incoming.headers()),
                );
                span.in_scope(|| {
                    warn!(
                        service = self.service.service_name(),
                        queue = %self.queue.work,
                        event.type = kind,
                        order.id = order_id,
                        message.id = message_id,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %error,
                        "Handling failed; retrying after a delay."
                    )
                });
                self.metrics
                    .retried(self.service.service_name(), kind, incoming.age());
                let mut copy = self.failure_copy(incoming, error);
                copy.routing_key = self.queue.work.clone();
                copy.exchange = exchange;
                copy.properties = copy
                    .properties
                    .with_expiration(delay.as_millis().max(1).to_string().as_str().into());
                let copy = copy.with_header(
                    header::ATTEMPT,
                    lapin::types::AMQPValue::LongLongInt(i64::from(attempt) + 1),
                );
                (copy.with_trace_context(&span.context()), span)
            }
            (Settlement::DeadLetter(reason), Err(error)) => {
                let route = &self.queue.dead_letter;
                let span = recovery::dead_letter_span(
                    &self.resend(incoming, &route.exchange, &route.routing_key),
                    reason.as_str(),
                    attempt,
                    error,
                    propagation::extract(incoming.headers()),
                );
                span.in_scope(|| {
                    error!(
                        service = self.service.service_name(),
                        queue = %self.queue.work,
                        dlq = %self.queue.dlq,
                        event.type = kind,
                        order.id = order_id,
                        message.id = message_id,
                        attempt,
                        reason = reason.as_str(),
                        error = %error,
                        "Dead-lettered a message."
                    )
                });
                self.metrics
                    .dead_lettered(self.service.service_name(), kind, incoming.age());
                let mut copy = self.failure_copy(incoming, error);
                copy.exchange = route.exchange.clone();
                copy.routing_key = route.routing_key.clone();
                let copy = copy.dead_lettered(reason.as_str(), attempt);
                (copy.with_trace_context(&span.context()), span)
            }
            (_, Ok(())) => unreachable!("settle() only retries or dead-letters failures"),
        };

        let parked = match &self.refuse_park {
            Some(ParkFault(refuse)) if refuse() => Err(super::PublishError::Nacked),
            _ => self.publisher.publish(&copy).instrument(span.clone()).await,
        };
        if let Err(error) = parked {
            // Not parked anywhere: give it back to the queue rather than lose it. The queue's
            // explicit delivery limit (the same on RabbitMQ 3 and 4) stops this from looping
            // forever: past it, the broker dead-letters the message itself, and at-least-once
            // dead-lettering keeps it until the dead-letter route takes it.
            crate::telemetry::record_error(&span, "park", &error);
            span.in_scope(|| {
                warn!(
                    queue = %self.queue.work,
                    message.id = message_id,
                    error = %error,
                    "Could not park a failed message; requeueing it."
                )
            });
            incoming
                .delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            return Ok(Settled::Done);
        }
        incoming
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await?;
        Ok(Settled::Done)
    }

    /// What a retry or dead-letter span says about `incoming`, sent on to `exchange`.
    fn resend<'a>(
        &'a self,
        incoming: &'a Incoming,
        exchange: &'a str,
        routing_key: &'a str,
    ) -> Resend<'a> {
        Resend {
            service: self.service,
            queue: &self.queue.work,
            exchange,
            routing_key,
            message_id: incoming.message_id().unwrap_or_default(),
            order_id: incoming.correlation_id().unwrap_or_default(),
            event_type: incoming.kind().unwrap_or_default(),
        }
    }

    /// A copy of `incoming` (body untouched) carrying the failure's context in its headers.
    fn failure_copy(&self, incoming: &Incoming, error: &HandleError) -> Outgoing {
        let delivery = &incoming.delivery;
        let copy = Outgoing {
            exchange: String::new(),
            routing_key: String::new(),
            properties: republishable(&delivery.properties),
            body: delivery.data.clone(),
        };
        copy.with_failure(&Failure {
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            queue: &self.queue.work,
            service: self.service,
            kind: error.kind(),
            error: error.to_string(),
            first_failed_at: None,
            failed_at: SystemTime::now(),
        })
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> HandleError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    HandleError::transient(anyhow::anyhow!("handler panicked: {message}"))
}
