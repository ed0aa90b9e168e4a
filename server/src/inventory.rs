//! The Inventory service: owns stock. On `OrderCreated` it reserves every line of the order or
//! none (rejecting unknown SKUs and short stock); on `PaymentFailed` it releases the
//! reservation. Initial stock comes from a JSON catalog.
//!
//! - [`catalog`]: catalog format, demo catalog, seeding;
//! - [`stock`]: reservations in SQLite;
//! - [`handler`]: reactions to events.

pub mod catalog;
pub mod handler;
pub mod stock;
