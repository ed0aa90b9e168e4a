//! The Order service: accepts orders (through `api`), persists them with their status history,
//! and moves them through the saga as Inventory's and Payment's events arrive.
//!
//! - [`start`]: the service's endpoint: which handler consumes which queue;
//! - [`status`]: the state machine;
//! - [`store`]: orders in the database;
//! - [`handler`]: reactions to saga events and to dead letters;
//! - [`batch`]: the orders a batch of those reactions reads and changes;
//! - [`dead_letters`]: the namespace's dead letters, kept for people to browse and replay;
//! - [`placement`]: group commit of new orders;
//! - [`watch`]: wake-ups for `WatchOrder` streams, across processes.

pub mod batch;
pub mod dead_letters;
pub mod handler;
pub mod placement;
pub mod status;
pub mod store;
pub mod watch;

use serde::{Deserialize, Serialize};

pub use status::Status;

use self::{
    dead_letters::DeadLetterStore,
    handler::{DeadLetterHandler, SagaHandler},
    placement::Placements,
    watch::Hub,
};
use crate::{
    bus::topology::Source,
    db::Database,
    endpoint::Endpoint,
    service::Service,
    shutdown::{Stage, Stages},
};

/// The running Order service, as the API serves it.
#[derive(Debug, Clone)]
pub struct Running {
    /// Orders, for reads.
    pub database: Database,
    /// Where new orders go.
    pub placements: Placements,
    /// Wake-ups for watch streams.
    pub hub: Hub,
    /// The namespace's dead letters.
    pub dead_letters: DeadLetterStore,
}

/// Starts Order on `endpoint`: the saga handler on its event queues, the dead-letter intake,
/// the placement writer and the follower that wakes watch streams for other instances' changes.
pub fn start(endpoint: &Endpoint, stages: &mut Stages) -> Running {
    let (database, topology, metrics) =
        (endpoint.database(), endpoint.topology(), endpoint.metrics());
    let hub = Hub::default();
    for queue in topology.queues_of(Service::Order) {
        match queue.subscription.source {
            Source::Events => {
                let handler = SagaHandler::new(hub.clone(), metrics.clone());
                endpoint.consume(queue, handler, stages);
            }
            Source::DeadLetters => {
                let work_queues = topology.all_queues().into_iter().map(|q| q.work).collect();
                let handler = DeadLetterHandler::new(hub.clone(), metrics.clone(), work_queues);
                endpoint.consume_dead_letters(queue, handler, DeadLetterHandler::dedup_key, stages);
            }
        }
    }
    stages.spawn(Stage::Intake, |stop| {
        hub.clone().follow(database.clone(), stop)
    });
    let (placements, writer) =
        placement::writer(database.clone(), endpoint.outbox().clone(), hub.clone());
    stages.spawn(Stage::Intake, |stop| writer.run(stop));
    let store = DeadLetterStore::new(database.clone(), endpoint.outbox().clone());
    metrics.probe(dead_letters::depth_probe(store.clone(), topology.clone()));
    Running {
        database: database.clone(),
        placements,
        hub,
        dead_letters: store,
    }
}

/// A validated request for a new order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Who orders.
    pub customer_id: String,
    /// At least one line, each SKU once.
    pub lines: Vec<Line>,
    /// Client-chosen key making retries safe.
    pub idempotency_key: Option<String>,
}

impl NewOrder {
    /// A canonical text of what was asked, to tell an idempotent retry from a reused key.
    pub fn digest(&self) -> String {
        let mut lines: Vec<String> = self
            .lines
            .iter()
            .map(|l| format!("{}={}", l.sku, l.quantity))
            .collect();
        lines.sort();
        lines.join("\n")
    }
}

/// One requested line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Catalog SKU.
    pub sku: String,
    /// Units, at least one.
    pub quantity: u32,
}

/// One line of a stored order; priced once Inventory reserved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Catalog SKU.
    pub sku: String,
    /// Units.
    pub quantity: u32,
    /// Unit price at reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price_cents: Option<i64>,
    /// Catalog name at reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Order version after the change (1 for PENDING).
    pub version: u64,
    /// New status.
    pub status: Status,
    /// Why, for failures.
    pub reason: String,
    /// When, in microseconds since the epoch.
    pub at: i64,
}

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// UUIDv7.
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// Lines.
    pub items: Vec<Item>,
    /// Known once reserved.
    pub total_cents: Option<i64>,
    /// Current status.
    pub status: Status,
    /// Version of the current status.
    pub version: u64,
    /// Why the order failed, if it did.
    pub failure_reason: String,
    /// Payment transaction, once paid.
    pub transaction_id: Option<String>,
    /// The key it was placed with.
    pub idempotency_key: Option<String>,
    /// When Inventory released the stock after a failed payment, µs since the epoch.
    pub stock_released_at: Option<i64>,
    /// Creation time, µs since the epoch.
    pub created_at: i64,
    /// Last change, µs since the epoch.
    pub updated_at: i64,
    /// Every status change, oldest first (empty in listings).
    pub history: Vec<Change>,
}

#[cfg(test)]
impl Order {
    /// A PENDING order at version 1, as just placed, for unit tests.
    pub fn pending(order_id: &str, customer_id: &str, items: Vec<Item>) -> Order {
        Order {
            order_id: order_id.into(),
            customer_id: customer_id.into(),
            items,
            total_cents: None,
            status: Status::Pending,
            version: 1,
            failure_reason: String::new(),
            transaction_id: None,
            idempotency_key: None,
            stock_released_at: None,
            created_at: 0,
            updated_at: 0,
            history: vec![Change {
                version: 1,
                status: Status::Pending,
                reason: String::new(),
                at: 0,
            }],
        }
    }
}
