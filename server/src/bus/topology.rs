//! Every exchange, queue and binding of one orderflow namespace, and their declaration.
//!
//! Names all start with the namespace (`ORDERFLOW_NAMESPACE`). Events go through one durable
//! topic exchange `<ns>.events`; each (consuming service, event) pair has its own durable
//! quorum queue `<ns>.<service>.<event>`. Failed deliveries take two side roads:
//! - delayed retries: a fanout exchange and quorum queue per service and attempt,
//!   `<ns>.<service>.retry.<n>`, whose messages expire after their backoff and are dead-lettered
//!   (at-least-once) through the default exchange straight back to their work queue;
//! - dead letters: the topic exchange `<ns>.dead-letters` routes, by work queue name, to
//!   `<work queue>.dlq` and to Order's `<ns>.order.dead-letters` queue, which marks the order
//!   FAILED. Both the consumer's explicit dead-lettering and the broker's delivery limit use it.
//!
//! Declaration is idempotent and every service declares the whole namespace, so start-up order
//! never matters and a publish never finds its queue missing.

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::service::Service;

/// Routing keys of the events on `<ns>.events`.
pub mod routing_key {
    /// `OrderCreated`, published by Order.
    pub const ORDER_CREATED: &str = "order.created";
    /// `InventoryReserved`, published by Inventory.
    pub const INVENTORY_RESERVED: &str = "inventory.reserved";
    /// `InventoryRejected`, published by Inventory.
    pub const INVENTORY_REJECTED: &str = "inventory.rejected";
    /// `InventoryReleased`, published by Inventory.
    pub const INVENTORY_RELEASED: &str = "inventory.released";
    /// `PaymentProcessed`, published by Payment.
    pub const PAYMENT_PROCESSED: &str = "payment.processed";
    /// `PaymentFailed`, published by Payment.
    pub const PAYMENT_FAILED: &str = "payment.failed";
}

/// Header names orderflow adds to AMQP messages.
pub mod header {
    /// Which delivery attempt this is, starting at 1 (absent means 1).
    pub const ATTEMPT: &str = "x-orderflow-attempt";
    /// Exchange the message was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-orderflow-original-exchange";
    /// Routing key the message was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-orderflow-original-routing-key";
    /// Work queue the message failed on.
    pub const QUEUE: &str = "x-orderflow-queue";
    /// Text of the last handler error.
    pub const LAST_ERROR: &str = "x-orderflow-last-error";
    /// `transient` or `permanent`: how the last error was classified.
    pub const ERROR_KIND: &str = "x-orderflow-error-kind";
    /// Service (`inventory-service`, …) whose handler failed.
    pub const FAILING_SERVICE: &str = "x-orderflow-failing-service";
    /// When the first attempt failed (RFC 3339).
    pub const FIRST_FAILURE_AT: &str = "x-orderflow-first-failure-at";
    /// When the last attempt failed (RFC 3339).
    pub const LAST_FAILURE_AT: &str = "x-orderflow-last-failure-at";
    /// Why the message was dead-lettered: `max-attempts`, `permanent-error`, ….
    pub const DEAD_LETTER_REASON: &str = "x-orderflow-dead-letter-reason";
    /// How many times the message was replayed from a dead-letter queue.
    pub const REPLAYS: &str = "x-orderflow-replays";
    /// When it was last replayed (RFC 3339).
    pub const REPLAYED_AT: &str = "x-orderflow-replayed-at";
}

/// Where a subscription's messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The events exchange.
    Events,
    /// The dead-letter exchange (every work queue's dead letters).
    DeadLetters,
}

/// One queue a service consumes: which exchange feeds it and with what binding key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The consuming service.
    pub service: Service,
    /// Last part of the queue name, after `<ns>.<service>.`.
    pub name: &'static str,
    /// The exchange the queue is bound to.
    pub source: Source,
    /// Binding key on that exchange.
    pub binding_key: &'static str,
}

/// Every queue of the saga. One queue per consuming service and event, so each can be
/// monitored, scaled and dead-lettered on its own.
pub const SUBSCRIPTIONS: &[Subscription] = &[
    Subscription {
        service: Service::Inventory,
        name: "order-created",
        source: Source::Events,
        binding_key: routing_key::ORDER_CREATED,
    },
    Subscription {
        service: Service::Inventory,
        name: "payment-failed",
        source: Source::Events,
        binding_key: routing_key::PAYMENT_FAILED,
    },
    Subscription {
        service: Service::Payment,
        name: "inventory-reserved",
        source: Source::Events,
        binding_key: routing_key::INVENTORY_RESERVED,
    },
    Subscription {
        service: Service::Order,
        name: "inventory-reserved",
        source: Source::Events,
        binding_key: routing_key::INVENTORY_RESERVED,
    },
    Subscription {
        service: Service::Order,
        name: "inventory-rejected",
        source: Source::Events,
        binding_key: routing_key::INVENTORY_REJECTED,
    },
    Subscription {
        service: Service::Order,
        name: "inventory-released",
        source: Source::Events,
        binding_key: routing_key::INVENTORY_RELEASED,
    },
    Subscription {
        service: Service::Order,
        name: "payment-processed",
        source: Source::Events,
        binding_key: routing_key::PAYMENT_PROCESSED,
    },
    Subscription {
        service: Service::Order,
        name: "payment-failed",
        source: Source::Events,
        binding_key: routing_key::PAYMENT_FAILED,
    },
    Subscription {
        service: Service::Order,
        name: "dead-letters",
        source: Source::DeadLetters,
        binding_key: "#",
    },
];

/// Where a queue's dead letters are published: an exchange and a routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Exchange name (`""` is the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
}

/// The concrete names around one work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The subscription these names belong to.
    pub subscription: Subscription,
    /// The work queue, `<ns>.<service>.<name>`.
    pub work: String,
    /// The dead-letter queue, `<work>.dlq`.
    pub dlq: String,
    /// How a message reaches `dlq`.
    pub dead_letter: Route,
}

/// How a service makes sure the topology exists when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declare {
    /// Declare the whole namespace (needs `configure` permission on all of it): the default,
    /// so a fresh broker just works.
    All,
    /// Only check, passively, that what this service uses exists: for brokers whose topology
    /// is pre-declared (a definitions file) and whose users have least privilege.
    Verify(Service),
}

/// All names of one namespace, and how to declare them.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    retry_levels: u32,
    delivery_limit: u32,
}

impl Topology {
    /// Topology of `namespace` with `retry_levels` delayed-retry queues per service (the retry
    /// policy's attempts minus one) and the broker-side `delivery_limit` of work queues.
    pub fn new(namespace: impl Into<String>, retry_levels: u32, delivery_limit: u32) -> Self {
        Topology {
            namespace: namespace.into(),
            retry_levels,
            delivery_limit,
        }
    }

    /// The namespace prefix.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `<ns>.events`: the topic exchange every event is published to.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// `<ns>.dead-letters`: the topic exchange dead letters go through.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letters", self.namespace)
    }

    /// `<ns>.<service>.outbox`: the routing key on the dead-letter exchange of outbox events
    /// the broker kept refusing (parked by the relay), and the `queue` their headers name. Only
    /// Order's `#` binding takes it: no work queue's `.dlq` is bound for it.
    pub fn outbox_route(&self, service: Service) -> String {
        format!("{}.{}.outbox", self.namespace, service.as_str())
    }

    /// `<ns>.<service>.retry.<attempt>`: exchange and queue holding messages that failed their
    /// `attempt`-th delivery until their backoff expires.
    pub fn retry_queue(&self, service: Service, attempt: u32) -> String {
        format!("{}.{}.retry.{attempt}", self.namespace, service.as_str())
    }

    /// Number of delayed-retry levels per service.
    pub fn retry_levels(&self) -> u32 {
        self.retry_levels
    }

    /// Names around the work queue of `subscription`.
    pub fn queue(&self, subscription: &Subscription) -> QueueNames {
        let work = format!(
            "{}.{}.{}",
            self.namespace,
            subscription.service.as_str(),
            subscription.name
        );
        let dlq = format!("{work}.dlq");
        let dead_letter = match subscription.source {
            Source::Events => Route {
                exchange: self.dead_letter_exchange(),
                routing_key: work.clone(),
            },
            // Dead letters of the dead-letter watcher must not come back to it: straight to its DLQ.
            Source::DeadLetters => Route {
                exchange: String::new(),
                routing_key: dlq.clone(),
            },
        };
        QueueNames {
            subscription: *subscription,
            work,
            dlq,
            dead_letter,
        }
    }

    /// Work queues of one service.
    pub fn queues_of(&self, service: Service) -> Vec<QueueNames> {
        SUBSCRIPTIONS
            .iter()
            .filter(|s| s.service == service)
            .map(|s| self.queue(s))
            .collect()
    }

    /// Every work queue of the namespace.
    pub fn all_queues(&self) -> Vec<QueueNames> {
        SUBSCRIPTIONS.iter().map(|s| self.queue(s)).collect()
    }

    /// Declares every exchange, queue and binding of the namespace. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;

        for service in Service::ALL {
            for attempt in 1..=self.retry_levels {
                let name = self.retry_queue(service, attempt);
                channel
                    .exchange_declare(
                        name.clone().into(),
                        ExchangeKind::Fanout,
                        durable,
                        FieldTable::default(),
                    )
                    .await?;
                // No dead-letter routing key: an expired message keeps the routing key it was
                // published with, which is its work queue's name, and the default exchange
                // routes it there.
                let mut args = quorum_args();
                args.insert("x-dead-letter-exchange".into(), long_string(""));
                declare_queue(channel, &name, args).await?;
                bind(channel, &name, &name, "").await?;
            }
        }

        for queue in self.all_queues() {
            let mut args = quorum_args();
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(self.delivery_limit as i32),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(&queue.dead_letter.exchange),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                long_string(&queue.dead_letter.routing_key),
            );
            declare_queue(channel, &queue.work, args).await?;
            let source = match queue.subscription.source {
                Source::Events => self.events_exchange(),
                Source::DeadLetters => self.dead_letter_exchange(),
            };
            bind(
                channel,
                &queue.work,
                &source,
                queue.subscription.binding_key,
            )
            .await?;

            let mut dlq_args = FieldTable::default();
            dlq_args.insert("x-queue-type".into(), long_string("quorum"));
            declare_queue(channel, &queue.dlq, dlq_args).await?;
            if queue.subscription.source == Source::Events {
                bind(
                    channel,
                    &queue.dlq,
                    &self.dead_letter_exchange(),
                    &queue.work,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Declares everything, or checks what `service` uses, as `declare` says.
    pub async fn prepare(&self, channel: &Channel, declare: Declare) -> lapin::Result<()> {
        match declare {
            Declare::All => self.declare(channel).await,
            Declare::Verify(service) => self.verify(channel, service).await,
        }
    }

    /// Checks, without creating anything, that the exchanges and queues `service` uses exist.
    /// Passive declarations need no permission, and the first missing name fails the check.
    pub async fn verify(&self, channel: &Channel, service: Service) -> lapin::Result<()> {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let mut exchanges = vec![self.events_exchange(), self.dead_letter_exchange()];
        exchanges.extend((1..=self.retry_levels).map(|n| self.retry_queue(service, n)));
        for exchange in exchanges {
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    passive,
                    FieldTable::default(),
                )
                .await?;
        }
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let mut queues: Vec<String> = Vec::new();
        for names in self.queues_of(service) {
            queues.push(names.work);
        }
        // The order service's dead-letter API reads every DLQ.
        if service == Service::Order {
            queues.extend(self.all_queues().into_iter().map(|q| q.dlq));
        }
        for queue in queues {
            channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange of the namespace (test clean-up, `reset` tooling).
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in self.all_queues() {
            for name in [&queue.work, &queue.dlq] {
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
        }
        for service in Service::ALL {
            for attempt in 1..=self.retry_levels {
                let name = self.retry_queue(service, attempt);
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
                channel
                    .exchange_delete(name.as_str().into(), Default::default())
                    .await?;
            }
        }
        for exchange in [self.events_exchange(), self.dead_letter_exchange()] {
            channel
                .exchange_delete(exchange.into(), Default::default())
                .await?;
        }
        Ok(())
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Durable quorum queue whose dead-lettering is at-least-once: the broker keeps a message until
/// its dead-letter target confirmed it, so nothing is lost between queues.
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    // at-least-once dead-lettering requires reject-publish overflow.
    args.insert("x-overflow".into(), long_string("reject-publish"));
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(ShortString::from(name), options, args)
        .await
        .map(drop)
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_namespace() {
        let topology = Topology::new("ns1", 4, 20);
        let names = topology.queue(&SUBSCRIPTIONS[0]);
        assert_eq!(names.work, "ns1.inventory.order-created");
        assert_eq!(names.dlq, "ns1.inventory.order-created.dlq");
        assert_eq!(names.dead_letter.exchange, "ns1.dead-letters");
        assert_eq!(names.dead_letter.routing_key, names.work);
        assert_eq!(
            topology.retry_queue(Service::Payment, 2),
            "ns1.payment.retry.2"
        );
        assert_eq!(
            topology.outbox_route(Service::Inventory),
            "ns1.inventory.outbox"
        );
        assert!(
            topology
                .all_queues()
                .iter()
                .all(|q| q.work != topology.outbox_route(q.subscription.service)),
            "parked events never reach a work queue's dead-letter queue"
        );
        assert!(
            topology
                .all_queues()
                .iter()
                .all(|q| q.work.starts_with("ns1."))
        );
    }

    #[test]
    fn one_queue_per_service_and_event() {
        let topology = Topology::new("ns", 1, 1);
        let mut works: Vec<_> = topology.all_queues().into_iter().map(|q| q.work).collect();
        let count = works.len();
        works.sort();
        works.dedup();
        assert_eq!(works.len(), count);
        assert_eq!(topology.queues_of(Service::Payment).len(), 1);
        assert_eq!(topology.queues_of(Service::Inventory).len(), 2);
    }

    #[test]
    fn dead_letter_watcher_does_not_feed_itself() {
        let topology = Topology::new("ns", 1, 1);
        let watcher = SUBSCRIPTIONS
            .iter()
            .find(|s| s.source == Source::DeadLetters)
            .unwrap();
        let names = topology.queue(watcher);
        assert_eq!(
            names.dead_letter,
            Route {
                exchange: String::new(),
                routing_key: names.dlq.clone()
            }
        );
    }
}
