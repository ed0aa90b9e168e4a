//! The Payment service: charges an order once its stock is reserved, through a deterministic
//! simulated provider, and publishes `PaymentProcessed` or `PaymentFailed`.

pub mod handler;
pub mod provider;
