//! Integration tests against the real RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`).
//!
//! One test binary; each module is one concern. Every test runs its own app with its own
//! namespace, data directory and gRPC port, so tests run in parallel without cross-talk.

#[path = "../common/broker.rs"]
mod broker;
mod helpers;
mod layout;
#[path = "../common/tap.rs"]
mod tap;

mod clients;
mod dashboard;
mod failures;
mod observability;
mod otlp;
mod outbox;
#[path = "../common/pg_database.rs"]
mod pg_database;
mod place_order;
mod process;
mod publish;
mod readme;
mod recovery_traces;
mod saga;
mod security;
mod teardown;
mod verify;
mod watch_order;
mod wire;
