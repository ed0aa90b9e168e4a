//! The raw-broker ceiling: the same three hops as orderflow's saga, written by hand with
//! lapin alone, in this process. OrderCreated → "inventory" → InventoryReserved → "payment"
//! → PaymentProcessed → "completion". Same durable quorum queues, persistent messages,
//! awaited publisher confirms, manual acks after the next hop's confirm, same prefetch, and
//! the real protobuf events; but no database, no outbox, no gRPC. Each stage has its own
//! connection, as separate services would.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use orderflow_proto::orderflow::v1 as pb;
use prost::Message as _;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    amqp as broker,
    catalog::{PRICE_CENTS, sku},
};
use crate::driver::pattern::{self, Finished, Phase, PhaseResult};

const ORDER_CREATED: &str = "order.created";
const INVENTORY_RESERVED: &str = "inventory.reserved";
const PAYMENT_PROCESSED: &str = "payment.processed";
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Orders waiting for their PaymentProcessed, by order id.
type Waiting = Mutex<HashMap<String, oneshot::Sender<Instant>>>;

/// A running baseline: topology declared, stage consumers running.
#[derive(Debug)]
pub(crate) struct Baseline {
    url: String,
    namespace: String,
    producer: Connection,
    publish: Channel,
    stages: Vec<(Connection, JoinHandle<()>)>,
    stop: CancellationToken,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    waiting: Waiting,
    /// Failures inside the stages (decode, publish), by kind. The order they hit never
    /// completes, so it also shows up as unfinished.
    stage_errors: Mutex<BTreeMap<String, u64>>,
    /// PaymentProcessed for an order nobody waits for (one abandoned at a run's limit).
    strays: AtomicU64,
}

impl Shared {
    fn stage_error(&self, kind: String) {
        let mut errors = self.stage_errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(kind).or_default() += 1;
    }
}

impl Baseline {
    /// Declares the namespace's exchange and queues and starts the three consuming stages.
    pub(crate) async fn start(url: &str, namespace: &str, prefetch: u16) -> Result<Self> {
        let producer = broker::connect(url, "orderflow bench baseline producer").await?;
        let setup = producer.create_channel().await?;
        declare(&setup, namespace)
            .await
            .context("declaring the baseline's queues")?;
        let _ = setup.close(200, "declared".into()).await;
        let publish = producer.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;

        let stop = CancellationToken::new();
        let shared = Arc::new(Shared::default());
        let mut stages = Vec::new();
        for stage in [Stage::Inventory, Stage::Payment, Stage::Completion] {
            let connection =
                broker::connect(url, &format!("orderflow bench baseline {}", stage.name())).await?;
            let consumer = StageConsumer::open(&connection, namespace, stage, prefetch).await?;
            let task = tokio::spawn(consumer.run(stop.clone(), shared.clone()));
            stages.push((connection, task));
        }
        Ok(Self {
            url: url.to_owned(),
            namespace: namespace.to_owned(),
            producer,
            publish,
            stages,
            stop,
            shared,
        })
    }

    /// Runs one phase; order numbering as in the orderflow driver.
    pub(crate) async fn run(
        &self,
        phase: Phase,
        first_index: u64,
        done: Arc<AtomicU64>,
    ) -> PhaseResult {
        pattern::run(phase, done, &CancellationToken::new(), |i| {
            one_order(
                self.publish.clone(),
                self.namespace.clone(),
                self.shared.clone(),
                first_index + i,
            )
        })
        .await
    }

    /// Errors inside the stages so far, by kind, and stray completions.
    pub(crate) fn stage_errors(&self) -> (BTreeMap<String, u64>, u64) {
        let errors = self
            .shared
            .stage_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (errors, self.shared.strays.load(Ordering::Relaxed))
    }

    /// Stops the stages, closes the connections and deletes the namespace's queues and
    /// exchange. Returns the queues that still held messages.
    pub(crate) async fn stop(self) -> Result<BTreeMap<String, u64>> {
        self.stop.cancel();
        for (connection, task) in self.stages {
            let _ = task.await;
            let _ = connection.close(200, "bench done".into()).await;
        }
        let _ = self.producer.close(200, "bench done".into()).await;
        let (queues, exchanges) = names(&self.namespace);
        broker::delete(&self.url, &queues, &exchanges).await
    }
}

/// The baseline's queues and exchange.
pub(crate) fn names(namespace: &str) -> (Vec<String>, Vec<String>) {
    let queues = [Stage::Inventory, Stage::Payment, Stage::Completion]
        .iter()
        .map(|stage| stage.queue(namespace))
        .collect();
    (queues, vec![events_exchange(namespace)])
}

fn events_exchange(namespace: &str) -> String {
    format!("{namespace}.events")
}

async fn declare(channel: &Channel, namespace: &str) -> lapin::Result<()> {
    let exchange = events_exchange(namespace);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for stage in [Stage::Inventory, Stage::Payment, Stage::Completion] {
        let queue = stage.queue(namespace);
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                stage.consumes().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Publishes OrderCreated for order `index` (confirm awaited), then waits for the completion
/// stage to see its PaymentProcessed.
async fn one_order(
    channel: Channel,
    namespace: String,
    shared: Arc<Shared>,
    index: u64,
) -> Finished {
    let order_id = uuid::Uuid::now_v7().to_string();
    let (tx, rx) = oneshot::channel();
    shared
        .waiting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(order_id.clone(), tx);
    let event = pb::OrderCreated {
        order_id: order_id.clone(),
        customer_id: format!("bench-customer-{}", index % 100),
        items: vec![pb::OrderLine {
            sku: sku(index),
            quantity: 1,
        }],
        created_at: Some(SystemTime::now().into()),
    };
    let published = publish(
        &channel,
        &events_exchange(&namespace),
        ORDER_CREATED,
        "orderflow.v1.OrderCreated",
        &order_id,
        &event.encode_to_vec(),
    )
    .await;
    let accepted_at = Instant::now();
    if let Err(why) = published {
        shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&order_id);
        return Finished {
            order_id: None,
            accepted_at: None,
            completed_at: Err(format!("publish OrderCreated: {why}")),
        };
    }
    let completed_at = rx.await.map_err(|_| "completion waiter dropped".to_owned());
    Finished {
        order_id: Some(order_id),
        accepted_at: Some(accepted_at),
        completed_at,
    }
}

/// Publishes one persistent, mandatory event and waits for the broker's confirm.
async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    kind: &str,
    order_id: &str,
    body: &[u8],
) -> Result<(), String> {
    let properties = BasicProperties::default()
        .with_content_type("application/x-protobuf".into())
        .with_type(kind.into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_correlation_id(order_id.into())
        .with_delivery_mode(PERSISTENT);
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(|e| e.to_string())?;
    match confirm.await.map_err(|e| e.to_string())? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err("unroutable".to_owned()),
        Confirmation::Nack(None) => Err("nacked".to_owned()),
        Confirmation::NotRequested => Err("no confirm".to_owned()),
    }
}

/// The consuming stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// OrderCreated → InventoryReserved.
    Inventory,
    /// InventoryReserved → PaymentProcessed.
    Payment,
    /// PaymentProcessed → the waiting order.
    Completion,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Completion => "completion",
        }
    }

    fn consumes(self) -> &'static str {
        match self {
            Self::Inventory => ORDER_CREATED,
            Self::Payment => INVENTORY_RESERVED,
            Self::Completion => PAYMENT_PROCESSED,
        }
    }

    fn queue(self, namespace: &str) -> String {
        format!("{namespace}.{}.{}", self.name(), self.consumes())
    }
}

/// One stage's consuming channel and, for the relaying stages, its confirming publish channel.
struct StageConsumer {
    stage: Stage,
    exchange: String,
    consumer: lapin::Consumer,
    publish: Channel,
}

impl StageConsumer {
    async fn open(
        connection: &Connection,
        namespace: &str,
        stage: Stage,
        prefetch: u16,
    ) -> Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                stage.queue(namespace).as_str().into(),
                format!("bench-{}", stage.name()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            stage,
            exchange: events_exchange(namespace),
            consumer,
            publish,
        })
    }

    /// Handles deliveries until `stop`. Each delivery gets its own task, so up to `prefetch`
    /// are in progress at once, as the broker allows; otherwise one confirm round trip per
    /// message would be the whole story.
    async fn run(mut self, stop: CancellationToken, shared: Arc<Shared>) {
        let this = Arc::new((self.stage, self.exchange, self.publish));
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = self.consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    shared.stage_error(format!("{} consumer: {error}", this.0.name()));
                    break;
                }
                None => break,
            };
            let (this, shared) = (this.clone(), shared.clone());
            tokio::spawn(async move {
                let (stage, exchange, channel) = &*this;
                handle(*stage, exchange, channel, &shared, delivery).await;
            });
        }
    }
}

async fn handle(
    stage: Stage,
    exchange: &str,
    channel: &Channel,
    shared: &Shared,
    delivery: Delivery,
) {
    let forwarded = match stage {
        Stage::Inventory => match pb::OrderCreated::decode(delivery.data.as_slice()) {
            Ok(created) => {
                let items: Vec<pb::ReservedLine> = created
                    .items
                    .iter()
                    .map(|line| pb::ReservedLine {
                        sku: line.sku.clone(),
                        quantity: line.quantity,
                        unit_price_cents: PRICE_CENTS,
                        name: "Bench item".to_owned(),
                    })
                    .collect();
                let total_cents = items
                    .iter()
                    .map(|l| i64::from(l.quantity) * l.unit_price_cents)
                    .sum();
                let event = pb::InventoryReserved {
                    order_id: created.order_id.clone(),
                    items,
                    total_cents,
                    customer_id: created.customer_id,
                    reserved_at: Some(SystemTime::now().into()),
                };
                Some(
                    publish(
                        channel,
                        exchange,
                        INVENTORY_RESERVED,
                        "orderflow.v1.InventoryReserved",
                        &created.order_id,
                        &event.encode_to_vec(),
                    )
                    .await,
                )
            }
            Err(error) => {
                shared.stage_error(format!("inventory: undecodable OrderCreated: {error}"));
                None
            }
        },
        Stage::Payment => match pb::InventoryReserved::decode(delivery.data.as_slice()) {
            Ok(reserved) => {
                let event = pb::PaymentProcessed {
                    order_id: reserved.order_id.clone(),
                    transaction_id: uuid::Uuid::new_v4().to_string(),
                    amount_cents: reserved.total_cents,
                    processed_at: Some(SystemTime::now().into()),
                    items: reserved.items,
                };
                Some(
                    publish(
                        channel,
                        exchange,
                        PAYMENT_PROCESSED,
                        "orderflow.v1.PaymentProcessed",
                        &reserved.order_id,
                        &event.encode_to_vec(),
                    )
                    .await,
                )
            }
            Err(error) => {
                shared.stage_error(format!("payment: undecodable InventoryReserved: {error}"));
                None
            }
        },
        Stage::Completion => {
            match pb::PaymentProcessed::decode(delivery.data.as_slice()) {
                Ok(paid) => {
                    let now = Instant::now();
                    let waiter = shared
                        .waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&paid.order_id);
                    match waiter {
                        Some(waiter) => {
                            let _ = waiter.send(now);
                        }
                        None => {
                            shared.strays.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(error) => {
                    shared
                        .stage_error(format!("completion: undecodable PaymentProcessed: {error}"));
                }
            }
            Some(Ok(()))
        }
    };
    let settled = match forwarded {
        Some(Ok(())) => delivery.acker.ack(BasicAckOptions::default()).await,
        Some(Err(why)) => {
            shared.stage_error(format!("{}: publish failed: {why}", stage.name()));
            // Back to the queue for another try, as a real consumer would.
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
        // Undecodable: retrying cannot help; drop it.
        None => delivery.acker.nack(BasicNackOptions::default()).await,
    };
    if let Err(error) = settled {
        shared.stage_error(format!("{}: settling failed: {error}", stage.name()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_in_the_namespace() {
        let (queues, exchanges) = names("bench-1-base");
        assert_eq!(
            queues,
            [
                "bench-1-base.inventory.order.created",
                "bench-1-base.payment.inventory.reserved",
                "bench-1-base.completion.payment.processed",
            ]
        );
        assert_eq!(exchanges, ["bench-1-base.events"]);
    }
}
