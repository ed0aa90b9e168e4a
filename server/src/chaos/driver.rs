//! A steady stream of orders through the gRPC API, as a client that survives outages would send
//! them: each order has its own idempotency key and is retried until the server accepts it, so a
//! response lost with a dying connection never becomes a second order.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use orderflow_proto::orderflow::v1::{self as pb, order_service_client::OrderServiceClient};
use rand::Rng as _;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Channel;

/// What to order.
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

/// The orders a driver got accepted, and the ones it gave up on.
#[derive(Debug, Clone, Default)]
pub struct Placed {
    /// Order ids the server returned.
    pub accepted: Vec<String>,
    /// Orders never accepted within `give_up_after` (idempotency keys).
    pub abandoned: Vec<String>,
    /// From the first send to the last acceptance.
    pub elapsed: std::time::Duration,
}

/// Places orders per `plan`, round-robin over the order-service instances at `addrs`, until
/// `stop` fires or the plan is done.
pub async fn run(
    addrs: &[SocketAddr],
    plan: Plan,
    run_id: &str,
    stop: CancellationToken,
) -> anyhow::Result<Placed> {
    anyhow::ensure!(
        !addrs.is_empty(),
        "no order-service instance to send orders to"
    );
    // Lazy: each channel reconnects by itself when its instance restarts.
    let clients = addrs
        .iter()
        .map(|addr| {
            let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
            Ok(OrderServiceClient::new(channel))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let placed = Arc::new(Mutex::new(Placed::default()));
    let slots = Arc::new(Semaphore::new(plan.in_flight.max(1)));
    let tasks = TaskTracker::new();
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..plan.max_orders {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let request = order(&plan.skus, &format!("{run_id}-{n}"));
        let client = clients[n % clients.len()].clone();
        let (placed, give_up) = (placed.clone(), plan.give_up_after);
        tasks.spawn(async move {
            let _permit = permit;
            let key = request.idempotency_key.clone().unwrap_or_default();
            match place_until_accepted(client, request, give_up).await {
                Some(id) => placed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .accepted
                    .push(id),
                None => placed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .abandoned
                    .push(key),
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    let mut placed = placed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    placed.elapsed = started.elapsed();
    Ok(placed)
}

/// One to three lines of one to three units.
fn order(skus: &[String], key: &str) -> pb::PlaceOrderRequest {
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

async fn place_until_accepted(
    mut client: OrderServiceClient<Channel>,
    request: pb::PlaceOrderRequest,
    give_up_after: Duration,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + give_up_after;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(Duration::from_secs(10));
        match client.place_order(call).await {
            Ok(order) => return Some(order.into_inner().order_id),
            // A refused request will not be accepted by retrying.
            Err(status) if status.code() == tonic::Code::InvalidArgument => return None,
            Err(_) if tokio::time::Instant::now() + delay > deadline => return None,
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
