//! orderflow-server: the Order, Inventory and Payment services of the orderflow saga, the
//! RabbitMQ messaging layer they share, and the gRPC API.
//!
//! # The route of one order
//!
//! 1. [`api`] takes `PlaceOrder` (`api/service.rs`), parses it into an [`order::NewOrder`]
//!    (`api/request.rs`) and hands it to [`order::placement`], which commits the order and its
//!    `OrderCreated` event to the [`outbox`] in one transaction.
//! 2. The [`outbox`] relay publishes the event through [`bus::Publisher`] with confirms; the
//!    [`bus::topology`] routes it to Inventory's queue.
//! 3. A [`bus::Consumer`] takes a batch of deliveries, decodes each into a [`bus::SagaEvent`]
//!    and hands the batch to the [`inbox`], which applies it exactly once in one transaction
//!    through the service's handler: [`inventory::handler`] reserves stock, then
//!    [`payment::handler`] charges, each staging its outcome event in its own outbox.
//! 4. [`order::handler`] moves the order through [`order::status`]; [`order::watch`] wakes the
//!    `WatchOrder` streams of `api/status_stream.rs`.
//! 5. A failure is settled in one place, `bus/consumer.rs` with `bus/outcome.rs`: a delayed
//!    retry, or a dead letter kept by [`order::dead_letters`] and served by `api/dead_letters.rs`.
//!
//! # Assembly
//!
//! `main` parses a [`config::Config`]; [`app::App`] opens the databases and starts each service
//! it names (`order::start`, `inventory::start`, `payment::start`) on its own [`endpoint`]:
//! connection, publisher, outbox relay and consumers. [`shutdown::Stages`] stops them in order.
//! Around them: [`db`], [`telemetry`], [`metrics`], [`health`], [`fault`] (test faults, injected
//! at the consumer/inbox seam), [`time`], [`service`] and [`secret_url`].
//!
//! Tests build a `Config` and run an [`app::App`] the same way.

pub mod api;
pub mod app;
pub mod bus;
pub mod config;
pub mod db;
pub mod endpoint;
pub mod fault;
pub mod health;
pub mod inbox;
pub mod inventory;
pub mod metrics;
pub mod order;
pub mod outbox;
pub mod payment;
pub mod secret_url;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;
