//! orderflow-server: the Order, Inventory and Payment services of the orderflow saga, the
//! RabbitMQ messaging layer they share, and the gRPC API.
//!
//! `main` parses a [`config::Config`], then [`app::App::build`] and [`app::App::run`] assemble
//! the services this process runs. Tests do the same with their own config.

pub mod api;
pub mod app;
pub mod bus;
pub mod config;
pub mod db;
pub mod fault;
pub mod health;
pub mod inbox;
pub mod inventory;
pub mod metrics;
pub mod order;
pub mod outbox;
pub mod payment;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;
