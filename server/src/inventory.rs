//! The Inventory service: owns stock. On `OrderCreated` it reserves every line of the order or
//! none (rejecting unknown SKUs and short stock); on `PaymentFailed` it releases the
//! reservation. Initial stock comes from a JSON catalog.
//!
//! - [`start`]: the service's endpoint;
//! - [`catalog`]: catalog format, demo catalog, seeding;
//! - [`stock`]: stock and reservations in the database;
//! - [`ledger`]: the stock a batch of events reads and changes;
//! - [`handler`]: reactions to events.

pub mod catalog;
pub mod handler;
pub mod ledger;
pub mod stock;

use anyhow::Context as _;
use tracing::info;

use self::handler::InventoryHandler;
use crate::{endpoint::Endpoint, service::Service, shutdown::Stages};

/// Starts Inventory on `endpoint`: adds the `catalog` SKUs its stock lacks, then reserves and
/// releases stock on every queue it consumes.
pub async fn start(
    endpoint: &Endpoint,
    stages: &mut Stages,
    catalog: &[catalog::Entry],
) -> anyhow::Result<()> {
    let added = catalog::seed(endpoint.database(), catalog)
        .await
        .context("seeding the catalog")?;
    info!(skus = catalog.len(), added, "Catalog loaded.");
    for queue in endpoint.topology().queues_of(Service::Inventory) {
        endpoint.consume(queue, InventoryHandler, stages);
    }
    Ok(())
}
