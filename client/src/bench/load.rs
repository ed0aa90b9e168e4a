//! Drives a running orderflow over its public gRPC API the way clients would: PlaceOrder,
//! then WatchOrder from version 0 until the order's terminal status. An order counts as
//! done when the COMPLETED update arrives, so the end-to-end latency includes the saga,
//! the database commits and the watch notification, everything a caller waits for.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::{Context as _, Result};
use orderflow_proto::orderflow::v1 as pb;
use pb::order_service_client::OrderServiceClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::workload::{self, Finished, Phase, PhaseResult};

/// Fewest HTTP/2 connections the load is spread over: one would funnel every stream
/// through one connection task on each side; a handful is what a few clients would open.
const MIN_CONNECTIONS: usize = 4;
/// Streams one connection carries at most. The server allows 100 concurrent streams per
/// connection by default (`--max-streams-per-connection`), and every order in flight holds
/// a watch stream plus, briefly, its PlaceOrder call; beyond the limit calls would queue in
/// the client and the bench would measure itself.
const STREAMS_PER_CONNECTION: usize = 40;

/// SKUs of the bench catalog; orders rotate over them so stock updates are not all on one row.
pub(crate) const SKUS: usize = 8;
/// Price of every bench SKU, in cents.
pub(crate) const PRICE_CENTS: i64 = 100;

/// The bench catalog: [`SKUS`] items with far more stock than any run can use.
pub(crate) fn catalog_json() -> String {
    let entries: Vec<serde_json::Value> = (0..SKUS)
        .map(|i| {
            serde_json::json!({
                "sku": sku(i as u64),
                "name": format!("Bench item {i}"),
                "price_cents": PRICE_CENTS,
                "stock": 1_000_000_000_i64,
            })
        })
        .collect();
    serde_json::Value::Array(entries).to_string()
}

pub(crate) fn sku(index: u64) -> String {
    format!("BENCH-{}", index % SKUS as u64)
}

/// A pool of OrderService clients on separate connections.
#[derive(Debug, Clone)]
pub(crate) struct Driver {
    clients: Arc<Vec<OrderServiceClient<Channel>>>,
    /// Deadline of each PlaceOrder call (the CLI's `--timeout`).
    place_timeout: Duration,
}

impl Driver {
    /// Opens enough connections for `concurrency` orders in flight at once.
    pub(crate) async fn connect(
        addr: SocketAddr,
        concurrency: usize,
        place_timeout: Duration,
    ) -> Result<Self> {
        let connections = concurrency
            .div_ceil(STREAMS_PER_CONNECTION)
            .max(MIN_CONNECTIONS);
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to the order service at {addr}"))?;
            clients.push(OrderServiceClient::new(channel));
        }
        Ok(Self {
            clients: Arc::new(clients),
            place_timeout,
        })
    }

    /// Runs one phase of orders numbered from `first_index` (so warm-up and measured orders
    /// have distinct customers and SKU rotation continues).
    pub(crate) async fn run(
        &self,
        phase: Phase,
        first_index: u64,
        done: Arc<AtomicU64>,
    ) -> PhaseResult {
        workload::run(phase, done, |i| {
            let index = first_index + i;
            let client = self.clients[index as usize % self.clients.len()].clone();
            one_order(client, index, self.place_timeout)
        })
        .await
    }
}

/// Places order `index` and follows it to its terminal status.
async fn one_order(
    mut client: OrderServiceClient<Channel>,
    index: u64,
    place_timeout: Duration,
) -> Finished {
    let request = pb::PlaceOrderRequest {
        customer_id: format!("bench-customer-{}", index % 100),
        items: vec![pb::OrderItem {
            sku: sku(index),
            quantity: 1,
        }],
        idempotency_key: None,
    };
    let placed = tokio::time::timeout(place_timeout, client.place_order(request)).await;
    let accepted_at = Instant::now();
    let order = match placed {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return failed(None, format!("PlaceOrder: {:?}", status.code())),
        Err(_) => return failed(None, "PlaceOrder: client timeout".to_owned()),
    };
    // From version 0, so a change that happened before the watch started is not missed.
    let watch = client
        .watch_order(pb::WatchOrderRequest {
            order_id: order.order_id,
            resume_after_version: Some(0),
        })
        .await;
    let mut updates = match watch {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return failed(
                Some(accepted_at),
                format!("WatchOrder: {:?}", status.code()),
            );
        }
    };
    loop {
        match updates.message().await {
            Ok(Some(update)) if update.terminal => {
                let now = Instant::now();
                return if update.status == pb::OrderStatus::Completed as i32 {
                    Finished {
                        accepted_at: Some(accepted_at),
                        completed_at: Ok(now),
                    }
                } else {
                    let status = pb::OrderStatus::try_from(update.status).map_or_else(
                        |_| update.status.to_string(),
                        |s| s.as_str_name().to_owned(),
                    );
                    failed(Some(accepted_at), format!("ended {status}"))
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return failed(
                    Some(accepted_at),
                    "WatchOrder ended before a terminal status".to_owned(),
                );
            }
            Err(status) => {
                return failed(
                    Some(accepted_at),
                    format!("WatchOrder stream: {:?}", status.code()),
                );
            }
        }
    }
}

fn failed(accepted_at: Option<Instant>, why: String) -> Finished {
    Finished {
        accepted_at,
        completed_at: Err(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_every_sku_the_orders_use() {
        let catalog: Vec<serde_json::Value> = serde_json::from_str(&catalog_json()).unwrap();
        assert_eq!(catalog.len(), SKUS);
        for index in [0, 1, 7, 8, 12_345] {
            let sku = sku(index);
            assert!(catalog.iter().any(|e| e["sku"] == sku.as_str()), "{sku}");
        }
        assert!(
            catalog
                .iter()
                .all(|e| e["stock"].as_i64() > Some(1_000_000))
        );
    }
}
