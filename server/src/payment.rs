//! The Payment service: charges an order once its stock is reserved, through a deterministic
//! simulated provider, and publishes `PaymentProcessed` or `PaymentFailed`.
//!
//! - [`start`]: the service's endpoint;
//! - [`handler`]: the charge, recorded with its outcome event;
//! - [`charges`]: the charges of a batch of events, read and written together;
//! - [`provider`]: the simulated payment provider.

pub mod charges;
pub mod handler;
pub mod provider;

use self::{handler::PaymentHandler, provider::Provider};
use crate::{endpoint::Endpoint, service::Service, shutdown::Stages};

/// Starts Payment on `endpoint`, charging through `provider`.
pub fn start(endpoint: &Endpoint, stages: &mut Stages, provider: Provider) {
    for queue in endpoint.topology().queues_of(Service::Payment) {
        endpoint.consume(queue, PaymentHandler::new(provider), stages);
    }
}
