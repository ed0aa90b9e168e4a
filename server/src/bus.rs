//! The messaging layer: everything that knows about RabbitMQ lives here and nowhere else.
//!
//! - [`topology`]: names and declaration of exchanges and queues;
//! - [`Broker`]: the supervised, self-healing connection;
//! - [`Publisher`]: confirmed, mandatory publishing;
//! - [`Consumer`]: the consume loop and the one place deliveries are settled;
//! - [`failure`]: the headers a failed message's copy carries;
//! - [`dead_letters`]: inspecting, replaying and purging dead-letter queues;
//! - [`propagation`]: trace context in message headers.
//!
//! Services see only [`Event`]s, [`Incoming`] messages and [`HandleError`]s.

mod broker;
mod consumer;
pub mod dead_letters;
mod event;
pub mod failure;
pub mod message;
mod outcome;
pub mod propagation;
mod publisher;
mod retry;
pub mod topology;

pub use broker::{Broker, Link};
pub use consumer::{Consumer, Processor, Settings as ConsumerSettings};
pub use event::Event;
pub use message::{Incoming, Outgoing};
pub use outcome::{DeadLetterReason, HandleError, Settlement};
pub use publisher::{PublishError, Publisher};
pub use retry::RetryPolicy;
pub use topology::Topology;
