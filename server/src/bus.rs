//! The messaging layer: everything that knows about RabbitMQ lives here and nowhere else.
//!
//! - [`topology`]: names, declaration and verification of exchanges, queues and bindings;
//! - [`management`]: reading the broker's topology through its management HTTP API;
//! - [`Broker`]: the supervised, self-healing connection;
//! - [`Publisher`]: confirmed, mandatory publishing;
//! - [`Consumer`]: the consume loop and the one place deliveries are settled;
//! - [`pause`]: whether a consumer takes deliveries, for `orderflow_consumer_paused`;
//! - [`failure`]: the headers a failed message's copy carries;
//! - [`dead_letters`]: what a dead letter is, read from the intake, and how it is replayed;
//! - [`propagation`]: trace context in message headers;
//! - [`recovery`]: the spans of a retry, a dead-lettering and a replay.
//!
//! Services see only [`Event`]s, [`Incoming`] messages and [`HandleError`]s.

mod amqp_url;
mod broker;
mod consumer;
pub mod dead_letters;
mod event;
pub mod failure;
pub mod management;
pub mod message;
mod outcome;
pub mod pause;
pub mod propagation;
mod publisher;
pub mod recovery;
mod retry;
pub mod topology;

pub use amqp_url::AmqpUrl;
pub use broker::{Broker, Link};
pub use consumer::{Consumer, ParkFault, Processor, Settings as ConsumerSettings};
pub use event::{Event, SagaEvent, order_ids};
pub use message::{Incoming, Outgoing};
pub use outcome::{DeadLetterReason, HandleError, Settlement};
pub use publisher::{PublishError, Publisher};
pub use retry::{RetryPolicy, nth_delay};
pub use topology::Topology;

/// Whether `error` (anywhere in its chain) is a broker configuration problem that retrying
/// cannot fix, such as a pre-declared topology that differs from what the services need.
pub fn is_configuration_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<topology::VerifyError>()
            .is_some_and(topology::VerifyError::is_configuration)
    })
}
