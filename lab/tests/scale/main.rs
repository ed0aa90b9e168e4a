//! Scaling out, against the real engines: PostgreSQL on 127.0.0.1:5432 (or
//! `ORDERFLOW_TEST_POSTGRES`), the RabbitMQ the other tests use, and a three-node RabbitMQ
//! cluster started by `scripts/rabbitmq-cluster.sh` on ports of its own. Every service runs as
//! its own `orderflow-server` process, two instances of each where the test says so.
//!
//! Each test has its own PostgreSQL database, broker namespace and data directory, so they run
//! in parallel with each other; the cluster test's nodes do not touch the shared broker.

#[path = "../../../server/tests/common/broker.rs"]
mod broker;
mod cluster;
mod harness;
mod instances;
mod outage;
#[path = "../../../server/tests/common/pg_database.rs"]
mod pg_database;
mod postgres;
#[path = "../common/server_bin.rs"]
mod server_bin;
#[path = "../../../server/tests/common/tap.rs"]
mod tap;
