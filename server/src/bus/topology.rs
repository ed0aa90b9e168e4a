//! Every exchange, queue and binding of one orderflow namespace, and their declaration.
//!
//! Names all start with the namespace (`ORDERFLOW_NAMESPACE`). Events go through one durable
//! topic exchange `<ns>.events`; each (consuming service, event) pair has its own durable
//! quorum queue `<ns>.<service>.<event>`. Failed deliveries take two side roads:
//! - delayed retries: a fanout exchange and quorum queue per service and attempt,
//!   `<ns>.<service>.retry.<n>`, whose messages expire after their backoff and are dead-lettered
//!   (at-least-once) through the default exchange straight back to their work queue;
//! - dead letters: the topic exchange `<ns>.dead-letters` routes every dead letter (routing key:
//!   its work queue's name) to Order's intake `<ns>.order.dead-letters`, which keeps it in
//!   Order's dead-letter store and marks the order FAILED. The consumer's explicit
//!   dead-lettering, the broker's delivery limit and the outbox relay's parking all use it.
//!   Only the intake has a dead-letter queue of its own, `<ns>.order.dead-letters.dlq`, the
//!   last resort for what the store itself refuses. No dead-letter queue is ever browsed: on
//!   RabbitMQ 4 a browse spends the delivery limit of the message it looks at.
//!
//! [`Topology::spec`] describes all of it as data; declaring, verifying and deleting work from
//! that one description. Declaration is idempotent and every service declares the whole
//! namespace, so start-up order never matters and a publish never finds its queue missing.

mod retire;
pub mod spec;
mod teardown;

use std::collections::BTreeMap;

use lapin::{
    Channel,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};

use self::spec::{Argument, BindingSpec, ExchangeKind, ExchangeSpec, Mismatch, QueueSpec, Spec};
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
    /// `<work>.dlq`: the name its dead letters are listed under. A real queue only for the
    /// dead-letter intake itself; the others' dead letters live in Order's store.
    pub dlq: String,
    /// How a message reaches `dlq`.
    pub dead_letter: Route,
}

/// How a service makes sure the topology exists when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declare {
    /// Declare the whole namespace (needs `configure` permission on all of it): the default,
    /// so a fresh broker just works. The service's own queues are also cleared of what an
    /// earlier version left (see `retire`): each service only its own, so the services of one
    /// process never move the same old queue at once and mix up its order.
    All(Service),
    /// Only check that what this service uses exists exactly as declared (types, arguments,
    /// bindings), through the management API: for brokers whose topology is pre-declared (a
    /// definitions file) and whose users have least privilege.
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
    /// the broker kept refusing (parked by the relay), and the `queue` their headers name:
    /// Order's intake takes it, and the dead-letter store lists it as a source of its own.
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

    /// Every exchange, queue (with its arguments) and binding of the namespace, and which
    /// services use each: the one description `declare`, `verify` and `delete` work from.
    pub fn spec(&self) -> Spec {
        let mut spec = Spec::default();
        for name in [self.events_exchange(), self.dead_letter_exchange()] {
            spec.exchanges.push(ExchangeSpec {
                name,
                kind: ExchangeKind::Topic,
                users: Service::ALL.to_vec(),
            });
        }
        for service in Service::ALL {
            for attempt in 1..=self.retry_levels {
                let name = self.retry_queue(service, attempt);
                let users = vec![service];
                spec.exchanges.push(ExchangeSpec {
                    name: name.clone(),
                    kind: ExchangeKind::Fanout,
                    users: users.clone(),
                });
                // No dead-letter routing key: an expired message keeps the routing key it was
                // published with, which is its work queue's name, and the default exchange
                // routes it there.
                let mut arguments = quorum_args();
                arguments.insert(
                    "x-dead-letter-exchange".into(),
                    Argument::Str(String::new()),
                );
                spec.queues.push(QueueSpec {
                    name: name.clone(),
                    arguments,
                    users: users.clone(),
                });
                spec.bindings.push(BindingSpec {
                    exchange: name.clone(),
                    queue: name,
                    key: String::new(),
                    users,
                });
            }
        }
        for queue in self.all_queues() {
            let service = queue.subscription.service;
            let mut arguments = quorum_args();
            arguments.insert(
                "x-delivery-limit".into(),
                Argument::Int(self.delivery_limit.into()),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                Argument::Str(queue.dead_letter.exchange.clone()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                Argument::Str(queue.dead_letter.routing_key.clone()),
            );
            spec.queues.push(QueueSpec {
                name: queue.work.clone(),
                arguments,
                users: vec![service],
            });
            let source = match queue.subscription.source {
                Source::Events => self.events_exchange(),
                Source::DeadLetters => self.dead_letter_exchange(),
            };
            spec.bindings.push(BindingSpec {
                exchange: source,
                queue: queue.work.clone(),
                key: queue.subscription.binding_key.to_owned(),
                users: vec![service],
            });

            if queue.subscription.source == Source::DeadLetters {
                // The last resort for what the dead-letter store refuses. Nobody consumes it,
                // so nothing is ever handed back to it and no delivery limit applies, on any
                // RabbitMQ version. Other work queues have no DLQ: their dead letters are kept
                // in Order's store.
                spec.queues.push(QueueSpec {
                    name: queue.dlq,
                    arguments: BTreeMap::from([(
                        "x-queue-type".to_owned(),
                        Argument::Str("quorum".to_owned()),
                    )]),
                    users: vec![service],
                });
            }
        }
        spec
    }

    /// Declares every exchange, queue and binding of the namespace. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let spec = self.spec();
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in &spec.exchanges {
            let kind = match exchange.kind {
                ExchangeKind::Topic => lapin::ExchangeKind::Topic,
                ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            };
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    kind,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for queue in &spec.queues {
            let mut arguments = FieldTable::default();
            for (name, value) in &queue.arguments {
                arguments.insert(name.as_str().into(), amqp_value(value));
            }
            channel
                .queue_declare(queue.name.as_str().into(), durable, arguments)
                .await?;
        }
        for binding in &spec.bindings {
            channel
                .queue_bind(
                    binding.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// Why `--declare-topology verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The management API could not be read: the broker may still be starting; try again.
    #[error("cannot read the topology through the management API at {url}")]
    Unreachable {
        /// The endpoint, without credentials.
        url: String,
        /// What went wrong.
        #[source]
        source: anyhow::Error,
    },
    /// The management API refused the user: a configuration error.
    #[error(
        "the management API at {url} refused user `{user}` (HTTP {status}): it needs the \
         `management` tag and access to the vhost"
    )]
    Refused {
        /// The endpoint, without credentials.
        url: String,
        /// The user it refused.
        user: String,
        /// 401 or 403.
        status: u16,
    },
    /// The broker's topology differs from the spec: a configuration error.
    #[error(
        "the topology of namespace `{namespace}` does not match what the {service} service uses ({} problems): {}",
        .mismatches.len(),
        .mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Mismatch {
        /// The namespace checked.
        namespace: String,
        /// The service whose part was checked.
        service: Service,
        /// Every difference.
        mismatches: Vec<Mismatch>,
    },
}

impl VerifyError {
    /// Whether retrying cannot help: the configuration (topology, user) must change.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, VerifyError::Unreachable { .. })
    }
}

fn amqp_value(value: &Argument) -> AMQPValue {
    match value {
        Argument::Str(s) | Argument::Other(s) => {
            AMQPValue::LongString(LongString::from(s.as_str()))
        }
        Argument::Int(n) => match i32::try_from(*n) {
            Ok(n) => AMQPValue::LongInt(n),
            Err(_) => AMQPValue::LongLongInt(*n),
        },
    }
}

/// Durable quorum queue whose dead-lettering is at-least-once: the broker keeps a message until
/// its dead-letter target confirmed it, so nothing is lost between queues.
fn quorum_args() -> BTreeMap<String, Argument> {
    BTreeMap::from([
        (
            "x-queue-type".to_owned(),
            Argument::Str("quorum".to_owned()),
        ),
        (
            "x-dead-letter-strategy".to_owned(),
            Argument::Str("at-least-once".to_owned()),
        ),
        // at-least-once dead-lettering requires reject-publish overflow.
        (
            "x-overflow".to_owned(),
            Argument::Str("reject-publish".to_owned()),
        ),
    ])
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
