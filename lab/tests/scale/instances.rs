//! Two instances of every service against one PostgreSQL and one broker: they share the work,
//! never oversell, publish each event once, and every order-service instance can watch every
//! order.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures_util::future::join_all;
use orderflow_lab::{
    deployment::Deployment,
    driver::{self, Plan},
};
use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, order_service_client::OrderServiceClient,
};
use orderflow_server::service::Service;
use tonic::transport::Channel;

use crate::{
    harness::{self, Item, Tap},
    pg_database::PgDatabase,
};

async fn two_of_each(
    items: &[Item],
    prefix: &str,
) -> (PgDatabase, tempfile::TempDir, String, Deployment) {
    let database = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let namespace = harness::namespace(prefix);
    let settings = harness::settings(
        dir.path(),
        &namespace,
        harness::amqp_url(),
        Some(database.url.clone()),
        2,
        items,
    );
    let deployment = Deployment::start(settings)
        .await
        .expect("two instances of each service start");
    (database, dir, namespace, deployment)
}

fn client(addr: std::net::SocketAddr) -> OrderServiceClient<Channel> {
    OrderServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    )
}

fn order(customer: &str, sku: &str, quantity: u32) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: customer.into(),
        items: vec![pb::OrderItem {
            sku: sku.into(),
            quantity,
        }],
        idempotency_key: None,
    }
}

/// Places an order on `placer` and follows it on `watcher`, another instance; returns the id
/// and the versions and statuses seen.
async fn place_here_watch_there(
    mut placer: OrderServiceClient<Channel>,
    mut watcher: OrderServiceClient<Channel>,
    customer: String,
) -> (String, Vec<(u64, OrderStatus)>) {
    let id = placer
        .place_order(order(&customer, "S-A", 1))
        .await
        .expect("accepted")
        .into_inner()
        .order_id;
    let seen = harness::watch(&mut watcher, &id, Duration::from_secs(120)).await;
    (id, seen)
}

const LOAD_CATALOG: &[Item] = &[
    ("S-A", 500, 100_000),
    ("S-B", 1_250, 1_500),
    ("S-SCARCE", 300, 300),
    ("S-PRICEY", 80_000, 100_000),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_each_service_finish_2000_orders_and_publish_each_event_once() {
    let (_database, dir, namespace, mut deployment) = two_of_each(LOAD_CATALOG, "scale").await;
    let tap = Tap::start(&harness::amqp_url(), &namespace).await;
    let addrs = deployment.order_addrs();
    assert_eq!(addrs.len(), 2);

    // 2,000 orders spread over both order-service instances, and meanwhile orders placed on
    // one instance and watched on the other.
    let plan = Plan {
        skus: LOAD_CATALOG
            .iter()
            .map(|(sku, _, _)| (*sku).to_owned())
            .collect(),
        rate: 400.0,
        in_flight: 64,
        max_orders: 2_000,
        give_up_after: Duration::from_secs(120),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (addrs, namespace) = (addrs.clone(), namespace.clone());
        tokio::spawn(async move { driver::run(&addrs, plan, &namespace, stop).await })
    };
    let watched = join_all((0..20).map(|n| {
        let (placer, watcher) = (client(addrs[n % 2]), client(addrs[(n + 1) % 2]));
        place_here_watch_there(placer, watcher, format!("watcher-{n}"))
    }))
    .await;
    let placed = load.await.unwrap().expect("load runs");
    println!(
        "placed {} orders in {:?}",
        placed.accepted.len(),
        placed.elapsed
    );
    assert_eq!(
        placed.accepted.len(),
        2_000,
        "abandoned: {:?}",
        placed.abandoned
    );
    for (id, seen) in &watched {
        let versions: Vec<u64> = seen.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            versions,
            (1..=seen.len() as u64).collect::<Vec<_>>(),
            "order {id}: every version once, in order"
        );
        assert_eq!(
            seen.first().map(|(_, s)| *s),
            Some(OrderStatus::Pending),
            "order {id}: {seen:?}"
        );
        assert_eq!(
            seen.last().map(|(_, s)| *s),
            Some(OrderStatus::Completed),
            "order {id}: {seen:?}"
        );
    }

    let mut accepted = placed.accepted.clone();
    accepted.extend(watched.iter().map(|(id, _)| id.clone()));
    let report = harness::audit_settled(&deployment.state(), &accepted, LOAD_CATALOG).await;
    assert_eq!(report.placed, 2_020);
    assert!(
        report.completed > 0 && report.rejected > 0 && report.payment_failed > 0,
        "{report:?}"
    );

    // The relays of both instances published each event once: the tap saw no message id twice,
    // and no order got the same kind of event twice.
    let tapped = tap.finish(Duration::from_secs(2)).await;
    let mut ids = HashSet::new();
    let repeated: Vec<_> = tapped
        .iter()
        .filter(|t| !ids.insert(t.message_id.clone()))
        .collect();
    assert!(repeated.is_empty(), "published twice: {repeated:?}");
    let mut per_order = HashSet::new();
    let doubled: Vec<_> = tapped
        .iter()
        .filter(|t| !per_order.insert((t.order_id.clone(), t.message_type.clone())))
        .collect();
    assert!(
        doubled.is_empty(),
        "an order got the same event twice: {doubled:?}"
    );
    let mut by_type: HashMap<&str, usize> = HashMap::new();
    for t in &tapped {
        *by_type.entry(t.message_type.as_str()).or_default() += 1;
    }
    println!("events published: {by_type:?}");
    assert_eq!(
        by_type.get("orderflow.v1.OrderCreated"),
        Some(&2_020),
        "{by_type:?}"
    );

    // Competing consumers: both instances of each service did a share of the work.
    for service in Service::ALL {
        let counts: Vec<usize> = (0..2)
            .map(|i| harness::handled(dir.path(), (service, i)))
            .collect();
        let total: usize = counts.iter().sum();
        println!("{service}: messages handled per instance {counts:?}");
        assert!(
            counts.iter().all(|&n| n * 10 >= total),
            "{service}: one instance did almost nothing: {counts:?}"
        );
    }
    deployment.stop().await.unwrap();
    harness::teardown(&namespace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_sku_with_stock_n_sells_exactly_n_across_instances() {
    const N: i64 = 25;
    let catalog: &[Item] = &[("HOT", 100, N)];
    let (database, _dir, namespace, mut deployment) = two_of_each(catalog, "hot").await;
    let addrs = deployment.order_addrs();

    // 5N single-unit orders at once, half through each order-service instance.
    let results = join_all((0..5 * N as usize).map(|n| {
        let mut client = client(addrs[n % 2]);
        async move {
            client
                .place_order(order(&format!("buyer-{n}"), "HOT", 1))
                .await
        }
    }))
    .await;
    let accepted: Vec<String> = results
        .into_iter()
        .map(|r| r.expect("every order is accepted").into_inner().order_id)
        .collect();
    let report = harness::audit_settled(&deployment.state(), &accepted, catalog).await;
    assert_eq!(
        (report.completed, report.rejected),
        (N as usize, 4 * N as usize),
        "{report:?}"
    );

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&database.url)
        .await
        .unwrap();
    let schema = orderflow_server::db::schema_name(&namespace, Service::Inventory);
    let (available,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT available FROM {schema}.stock WHERE sku = 'HOT'"
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(available, 0);
    deployment.stop().await.unwrap();
    harness::teardown(&namespace).await;
}
