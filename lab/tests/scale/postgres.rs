//! The saga on PostgreSQL: each service in its own schema, migrated on start, with every
//! outcome and exact stock, surviving restarts of every process.

use std::time::Duration;

use orderflow_lab::deployment::Deployment;
use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, order_service_client::OrderServiceClient,
};
use orderflow_server::service::Service;
use sqlx::{Connection as _, PgConnection};
use tonic::transport::Channel;

use crate::{
    harness::{self, Item},
    pg_database::PgDatabase,
};

/// How long one order may take to finish on an idle deployment.
const WATCH_LIMIT: Duration = Duration::from_secs(30);

const CATALOG: &[Item] = &[
    ("PG-APPLE", 150, 10),
    ("PG-PEAR", 200, 3),
    ("PG-GOLD", 6_000_000, 2),
];

async fn place(
    client: &mut OrderServiceClient<Channel>,
    customer: &str,
    items: &[(&str, u32)],
) -> String {
    client
        .place_order(pb::PlaceOrderRequest {
            customer_id: customer.into(),
            items: items
                .iter()
                .map(|(sku, quantity)| pb::OrderItem {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
            idempotency_key: None,
        })
        .await
        .expect("order accepted")
        .into_inner()
        .order_id
}

async fn stock(url: &str, namespace: &str) -> Vec<(String, i64)> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let schema = orderflow_server::db::schema_name(namespace, Service::Inventory);
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT sku, available FROM {schema}.stock ORDER BY sku"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_runs_on_postgresql_and_survives_restarts() {
    let database = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let namespace = harness::namespace("pg");
    let settings = harness::settings(
        dir.path(),
        &namespace,
        harness::amqp_url(),
        Some(database.url.clone()),
        1,
        CATALOG,
    );
    let mut deployment = Deployment::start(settings)
        .await
        .expect("services start on PostgreSQL");
    let channel = Channel::from_shared(format!("http://{}", deployment.order_addrs()[0]))
        .unwrap()
        .connect_lazy();
    let mut client = OrderServiceClient::new(channel);

    let completed = place(&mut client, "alice", &[("PG-APPLE", 2), ("PG-PEAR", 1)]).await;
    assert_eq!(
        harness::watch(&mut client, &completed, WATCH_LIMIT).await,
        [
            (1, OrderStatus::Pending),
            (2, OrderStatus::InventoryReserved),
            (3, OrderStatus::Completed)
        ]
    );
    let rejected = place(&mut client, "bob", &[("PG-PEAR", 5)]).await;
    assert_eq!(
        harness::watch(&mut client, &rejected, WATCH_LIMIT).await,
        [(1, OrderStatus::Pending), (2, OrderStatus::Rejected)]
    );
    let declined = place(&mut client, "carol", &[("PG-GOLD", 1)]).await;
    assert_eq!(
        harness::watch(&mut client, &declined, WATCH_LIMIT).await,
        [
            (1, OrderStatus::Pending),
            (2, OrderStatus::InventoryReserved),
            (3, OrderStatus::PaymentFailed)
        ]
    );

    // Restart every process: migrations run again (a no-op), the catalog does not reset stock,
    // and the orders are still there.
    for instance in deployment.instances() {
        let (_, clean) = deployment
            .terminate(instance, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(clean, "graceful exit");
        deployment
            .start_instance(instance)
            .await
            .expect("restarts on the same schema");
    }
    let after = place(&mut client, "dave", &[("PG-APPLE", 1)]).await;
    assert_eq!(
        harness::watch(&mut client, &after, WATCH_LIMIT)
            .await
            .last()
            .map(|(_, s)| *s),
        Some(OrderStatus::Completed)
    );
    let order = client
        .get_order(pb::GetOrderRequest {
            order_id: completed.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.total_cents, Some(2 * 150 + 200));

    // The declined payment's reservation is released once the order records it.
    let state = deployment.state();
    let accepted = [completed, rejected, declined, after];
    harness::audit_settled(&state, &accepted, CATALOG).await;
    assert_eq!(
        stock(&database.url, &namespace).await,
        [
            ("PG-APPLE".to_owned(), 7),
            ("PG-GOLD".to_owned(), 2),
            ("PG-PEAR".to_owned(), 2)
        ]
    );
    deployment.stop().await.unwrap();
    harness::teardown(&namespace).await;
}
