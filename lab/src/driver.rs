//! Placing orders through the public gRPC API, as clients would, over a pool of connections
//! to the order-service instances, in one of the arrival [`pattern`]s. Two kinds of client:
//! - [`Follow::ToTerminal`] (the bench): PlaceOrder, then WatchOrder from version 0 until a
//!   terminal status, so an order's latency includes everything a caller waits for;
//! - [`Follow::UntilAccepted`] (chaos runs, resilience tests): each order has its own
//!   idempotency key and is retried until the server accepts it, so a response lost with a
//!   dying connection never becomes a second order.

pub mod pattern;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::Context as _;
use orderflow_proto::orderflow::v1::{self as pb, order_service_client::OrderServiceClient};
use rand::Rng as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use self::pattern::{Finished, Pattern, Phase, PhaseResult};

/// Fewest HTTP/2 connections the load is spread over: one would funnel every stream
/// through one connection task on each side; a handful is what a few clients would open.
const MIN_CONNECTIONS: usize = 4;
/// Streams one connection carries at most. The server allows 100 concurrent streams per
/// connection by default (`--max-streams-per-connection`), and every order in flight holds
/// a watch stream plus, briefly, its PlaceOrder call; beyond the limit calls would queue in
/// the client and the bench would measure itself.
const STREAMS_PER_CONNECTION: usize = 40;

/// What the driver does with each order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Place it once and watch it to its terminal status; done when COMPLETED arrives.
    ToTerminal,
    /// Place it, retrying with its idempotency key until accepted or `give_up_after`.
    UntilAccepted {
        /// How long one order may keep being retried.
        give_up_after: Duration,
    },
}

/// A pool of OrderService clients on separate connections, round-robin over the instances.
#[derive(Debug, Clone)]
pub struct Driver {
    clients: Arc<Vec<OrderServiceClient<Channel>>>,
    /// Deadline of each PlaceOrder call.
    call_timeout: Duration,
}

impl Driver {
    /// Opens enough connections for `concurrency` orders in flight at once, now: a server
    /// that is not there fails here, before anything is measured.
    pub async fn connect(
        addrs: &[SocketAddr],
        concurrency: usize,
        call_timeout: Duration,
    ) -> anyhow::Result<Driver> {
        anyhow::ensure!(!addrs.is_empty(), "no order-service instance to connect to");
        let connections = concurrency
            .div_ceil(STREAMS_PER_CONNECTION)
            .max(MIN_CONNECTIONS)
            .max(addrs.len());
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            let addr = addrs[i % addrs.len()];
            let channel = endpoint(addr)?
                .connect()
                .await
                .with_context(|| format!("connecting to the order service at {addr}"))?;
            clients.push(OrderServiceClient::new(channel));
        }
        Ok(Driver {
            clients: Arc::new(clients),
            call_timeout,
        })
    }

    /// One lazy connection per instance: each reconnects by itself when its instance
    /// restarts, so orders keep going through faults.
    pub fn lazy(addrs: &[SocketAddr], call_timeout: Duration) -> anyhow::Result<Driver> {
        anyhow::ensure!(
            !addrs.is_empty(),
            "no order-service instance to send orders to"
        );
        let clients = addrs
            .iter()
            .map(|addr| Ok(OrderServiceClient::new(endpoint(*addr)?.connect_lazy())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Driver {
            clients: Arc::new(clients),
            call_timeout,
        })
    }

    /// Runs one phase of orders numbered from `first_index`, `request(index)` building each.
    /// `done` counts finished orders; `stop` ends the sending early.
    pub async fn run(
        &self,
        phase: Phase,
        first_index: u64,
        done: Arc<AtomicU64>,
        stop: &CancellationToken,
        follow: Follow,
        request: impl Fn(u64) -> pb::PlaceOrderRequest,
    ) -> PhaseResult {
        pattern::run(phase, done, stop, |i| {
            let index = first_index + i;
            let client = self.clients[index as usize % self.clients.len()].clone();
            let (request, timeout) = (request(index), self.call_timeout);
            async move {
                match follow {
                    Follow::ToTerminal => place_and_watch(client, request, timeout).await,
                    Follow::UntilAccepted { give_up_after } => {
                        place_until_accepted(client, request, timeout, give_up_after).await
                    }
                }
            }
        })
        .await
    }
}

fn endpoint(addr: SocketAddr) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

/// Places `request` and follows the order to its terminal status.
async fn place_and_watch(
    mut client: OrderServiceClient<Channel>,
    request: pb::PlaceOrderRequest,
    timeout: Duration,
) -> Finished {
    let placed = tokio::time::timeout(timeout, client.place_order(request)).await;
    let accepted_at = Instant::now();
    let order = match placed {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return failed(None, format!("PlaceOrder: {:?}", status.code())),
        Err(_) => return failed(None, "PlaceOrder: client timeout".to_owned()),
    };
    let accepted = Some((order.order_id.clone(), accepted_at));
    // From version 0, so a change that happened before the watch started is not missed.
    let watch = client
        .watch_order(pb::WatchOrderRequest {
            order_id: order.order_id.clone(),
            resume_after_version: Some(0),
        })
        .await;
    let mut updates = match watch {
        Ok(response) => response.into_inner(),
        Err(status) => return failed(accepted, format!("WatchOrder: {:?}", status.code())),
    };
    loop {
        match updates.message().await {
            Ok(Some(update)) if update.terminal => {
                let now = Instant::now();
                return if update.status == pb::OrderStatus::Completed as i32 {
                    Finished {
                        order_id: Some(order.order_id),
                        accepted_at: Some(accepted_at),
                        completed_at: Ok(now),
                    }
                } else {
                    let status = pb::OrderStatus::try_from(update.status).map_or_else(
                        |_| update.status.to_string(),
                        |s| s.as_str_name().to_owned(),
                    );
                    failed(accepted, format!("ended {status}"))
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return failed(
                    accepted,
                    "WatchOrder ended before a terminal status".to_owned(),
                );
            }
            Err(status) => {
                return failed(accepted, format!("WatchOrder stream: {:?}", status.code()));
            }
        }
    }
}

/// Places `request` until the server accepts it; done at acceptance.
async fn place_until_accepted(
    mut client: OrderServiceClient<Channel>,
    request: pb::PlaceOrderRequest,
    timeout: Duration,
    give_up_after: Duration,
) -> Finished {
    let deadline = Instant::now() + give_up_after;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(timeout);
        match client.place_order(call).await {
            Ok(order) => {
                let now = Instant::now();
                return Finished {
                    order_id: Some(order.into_inner().order_id),
                    accepted_at: Some(now),
                    completed_at: Ok(now),
                };
            }
            // A refused request will not be accepted by retrying.
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                return failed(None, format!("PlaceOrder: {:?}", status.code()));
            }
            Err(status) if Instant::now() + delay > deadline => {
                return failed(None, format!("gave up: PlaceOrder {:?}", status.code()));
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn failed(accepted: Option<(String, Instant)>, why: String) -> Finished {
    let (order_id, accepted_at) = accepted.unzip();
    Finished {
        order_id,
        accepted_at,
        completed_at: Err(why),
    }
}

/// A steady stream of orders for a chaos run or a resilience test.
#[derive(Debug, Clone)]
pub struct Plan {
    /// SKUs to pick lines from.
    pub skus: Vec<String>,
    /// Orders per second.
    pub rate: f64,
    /// Orders in flight at most.
    pub in_flight: usize,
    /// Stop after this many orders.
    pub max_orders: usize,
    /// How long one order may keep being retried.
    pub give_up_after: Duration,
}

/// The orders a plan got accepted, and the ones it gave up on.
#[derive(Debug, Clone, Default)]
pub struct Placed {
    /// Order ids the server returned.
    pub accepted: Vec<String>,
    /// Why each order that was never accepted was given up on (refused, or not accepted
    /// within `give_up_after`).
    pub abandoned: Vec<String>,
    /// From the first send to the last acceptance.
    pub elapsed: Duration,
}

/// Places orders per `plan` ([`Follow::UntilAccepted`], open loop at `plan.rate`), round-robin
/// over the order-service instances at `addrs`, until `stop` fires or the plan is done. The
/// orders' idempotency keys are `<run_id>-<n>`.
pub async fn run(
    addrs: &[SocketAddr],
    plan: Plan,
    run_id: &str,
    stop: CancellationToken,
) -> anyhow::Result<Placed> {
    let driver = Driver::lazy(addrs, Duration::from_secs(10))?;
    let phase = Phase {
        orders: plan.max_orders as u64,
        pattern: Pattern::Open {
            per_sec: plan.rate.max(0.001),
            max_outstanding: plan.in_flight.max(1),
        },
        // Only `stop` or the count end a plan; whatever is in flight then may take its
        // retries. A generous bound still guarantees the run ends.
        limit: Duration::from_secs(24 * 3600),
    };
    let follow = Follow::UntilAccepted {
        give_up_after: plan.give_up_after,
    };
    let started = Instant::now();
    let result = driver
        .run(phase, 0, Arc::default(), &stop, follow, |n| {
            random_order(&plan.skus, &format!("{run_id}-{n}"))
        })
        .await;
    let mut placed = Placed {
        elapsed: started.elapsed(),
        ..Placed::default()
    };
    for outcome in result.outcomes {
        match outcome.order_id {
            Some(id) => placed.accepted.push(id),
            None => placed
                .abandoned
                .push(outcome.result.err().unwrap_or_default()),
        }
    }
    Ok(placed)
}

/// One to three lines of one to three units, under idempotency key `key`.
fn random_order(skus: &[String], key: &str) -> pb::PlaceOrderRequest {
    let mut rng = rand::rng();
    let lines = rng.random_range(1..=3.min(skus.len()));
    let mut picked: Vec<&String> = Vec::new();
    while picked.len() < lines {
        let sku = &skus[rng.random_range(0..skus.len())];
        if !picked.contains(&sku) {
            picked.push(sku);
        }
    }
    pb::PlaceOrderRequest {
        customer_id: format!("chaos-{}", rng.random_range(0..50)),
        items: picked
            .into_iter()
            .map(|s| pb::OrderItem {
                sku: s.clone(),
                quantity: rng.random_range(1..=3),
            })
            .collect(),
        idempotency_key: Some(key.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_orders_have_distinct_lines_from_the_catalog() {
        let skus: Vec<String> = ["A", "B", "C", "D"].map(str::to_owned).to_vec();
        for n in 0..200 {
            let order = random_order(&skus, &format!("run-{n}"));
            assert_eq!(
                order.idempotency_key.as_deref(),
                Some(format!("run-{n}").as_str())
            );
            assert!((1..=3).contains(&order.items.len()));
            let mut lines: Vec<&str> = order.items.iter().map(|i| i.sku.as_str()).collect();
            lines.sort_unstable();
            lines.dedup();
            assert_eq!(lines.len(), order.items.len(), "{order:?}");
            assert!(order.items.iter().all(|i| (1..=3).contains(&i.quantity)));
        }
    }
}
