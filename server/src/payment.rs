//! The Payment service: charges an order once its stock is reserved, through a deterministic
//! simulated provider, and publishes `PaymentProcessed` or `PaymentFailed`.

pub mod handler;
pub mod provider;

use sqlx::migrate::Migrator;

/// The payment service's schema.
pub fn migrations() -> Migrator {
    crate::db::shared(sqlx::migrate!("./migrations/payment"))
}
