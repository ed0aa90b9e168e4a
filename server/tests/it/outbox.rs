//! The outbox relay when the broker refuses some of its rows: a missing binding under load
//! holds back only the events it concerns, never the ones behind them, and an event refused on
//! every attempt is parked as a dead letter where a person sees it, never dropped.

use std::collections::HashMap;

use futures_util::{StreamExt as _, TryStreamExt as _};
use lapin::{
    Channel, Connection,
    options::QueueBindOptions,
    types::{AMQPValue, FieldTable},
};
use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use orderflow_server::{
    bus::{Topology, message::header_str, topology::header},
    config::{Config, DeclareTopology},
    db::schema_name,
    service::Service,
};
use prost::Message as _;

use crate::{
    helpers::{
        TestApp, WAIT, eventually, order_request, raw_connection, scrape, series, spawn_app_with,
        unique_namespace,
    },
    pg_database::PgDatabase,
    tap::tap,
};

/// A namespace whose topology is declared up front, minus the binding that takes
/// `inventory.rejected` to Order. The app only verifies the topology (as with a definitions
/// file), so no reconnect of the app re-creates the binding.
struct MissingBinding {
    namespace: String,
    _conn: Connection,
    channel: Channel,
}

impl MissingBinding {
    const KEY: &str = "inventory.rejected";

    async fn new() -> MissingBinding {
        let namespace = unique_namespace();
        let conn = raw_connection().await;
        let channel = conn.create_channel().await.unwrap();
        Topology::new(namespace.clone(), 4, 20)
            .declare(&channel)
            .await
            .unwrap();
        MissingBinding {
            namespace,
            _conn: conn,
            channel,
        }
    }

    /// Removes the binding. Only once the apps are serving: verify refuses to start on a
    /// topology that lacks one, and verify-only apps never declare it back.
    async fn remove(&self) {
        self.channel
            .queue_unbind(
                self.queue().as_str().into(),
                self.exchange().as_str().into(),
                Self::KEY.into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    fn queue(&self) -> String {
        format!("{}.order.inventory-rejected", self.namespace)
    }

    fn exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// Runs the app on this namespace, verify-only.
    async fn spawn(&self, adjust: impl FnOnce(&mut Config)) -> TestApp {
        spawn_app_with(|c| {
            c.namespace = self.namespace.clone();
            c.declare_topology = DeclareTopology::Verify;
            adjust(c);
        })
        .await
    }

    async fn restore(&self) {
        self.channel
            .queue_bind(
                self.queue().as_str().into(),
                self.exchange().as_str().into(),
                Self::KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
}

/// Rows in `service`'s outbox, read from its SQLite file or its PostgreSQL schema.
async fn outbox_len(app: &TestApp, service: Service) -> i64 {
    let count = |table: String| format!("SELECT COUNT(*) FROM {table}");
    match &app.config.database_url {
        None => {
            let url = format!("sqlite://{}", app.db_path(service).display());
            let pool = sqlx::SqlitePool::connect(&url).await.expect("SQLite opens");
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(count("outbox".into())))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
        Some(url) => {
            let pool = sqlx::PgPool::connect(url.expose())
                .await
                .expect("PostgreSQL");
            let table = format!("{}.outbox", schema_name(&app.namespace, service));
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(count(table)))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
    }
}

/// How many of `customer`'s orders are in each status.
async fn statuses_of(app: &TestApp, customer: &str) -> HashMap<OrderStatus, usize> {
    let mut counts = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .client
            .clone()
            .list_orders(pb::ListOrdersRequest {
                page_size: 500,
                page_token,
                customer_id: Some(customer.to_owned()),
            })
            .await
            .expect("ListOrders")
            .into_inner();
        for order in &page.orders {
            *counts.entry(order.status()).or_default() += 1;
        }
        if page.next_page_token.is_empty() {
            return counts;
        }
        page_token = page.next_page_token;
    }
}

/// Places `count` orders of one `sku` for `customer`, 16 at a time.
async fn place_concurrently(app: &TestApp, count: usize, customer: &str, sku: &str) {
    futures_util::stream::iter(0..count)
        .map(|_| {
            let mut client = app.client.clone();
            async move {
                client
                    .place_order(order_request(customer, &[(sku, 1)]))
                    .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("PlaceOrder succeeds");
}

/// Retried quickly, and never parked within a test: only the binding decides.
fn quick_retries(c: &mut Config) {
    c.outbox_max_attempts = 100;
    c.outbox_initial_delay = std::time::Duration::from_millis(20);
    c.outbox_max_delay = std::time::Duration::from_millis(250);
}

/// The bug this guards against: the relay took the oldest rows every round, so a few hundred
/// unroutable rows at the head stopped every event of the service behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binding_under_load_holds_back_only_its_own_events() {
    let missing = MissingBinding::new().await;
    let app = missing.spawn(quick_retries).await;
    missing.remove().await;
    holds_back_only_its_own_events(&missing, &app).await;
}

/// The same on PostgreSQL with two instances of every service, whose relays claim rows with
/// `FOR UPDATE SKIP LOCKED` and share the rows' retry state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_postgresql_hold_back_only_the_refused_events() {
    let database = PgDatabase::create().await;
    let url = database.url.parse().expect("database URL");
    let missing = MissingBinding::new().await;
    let on_postgres = |c: &mut Config| {
        quick_retries(c);
        c.database_url = Some(url);
    };
    let app = missing.spawn(on_postgres.clone()).await;
    let _second = missing.spawn(on_postgres).await;
    missing.remove().await;
    holds_back_only_its_own_events(&missing, &app).await;
}

async fn holds_back_only_its_own_events(missing: &MissingBinding, app: &TestApp) {
    const REJECTED: usize = 300;
    // Orders for an unknown SKU: Inventory rejects each, and its InventoryRejected is unroutable.
    place_concurrently(app, REJECTED, "unknown", "NOPE").await;
    eventually("every rejection waiting in Inventory's outbox", || async {
        outbox_len(app, Service::Inventory).await == REJECTED as i64
    })
    .await;

    // Behind all of them in the same outbox: a valid order's InventoryReserved.
    let valid = app.place("valid", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&valid.order_id).await.status(),
        OrderStatus::Completed,
        "a valid order completes while the binding is still missing"
    );
    assert_eq!(
        statuses_of(app, "unknown").await,
        HashMap::from([(OrderStatus::Pending, REJECTED)]),
        "the rejections are still held back"
    );
    // The valid row's delete commits just after its confirm, possibly after the saga ended.
    eventually(
        "the rejections still stored: none dropped, none parked",
        || async { outbox_len(app, Service::Inventory).await == REJECTED as i64 },
    )
    .await;

    missing.restore().await;
    eventually("every rejection delivered once routable", || async {
        statuses_of(app, "unknown").await == HashMap::from([(OrderStatus::Rejected, REJECTED)])
    })
    .await;
    eventually("Inventory's outbox empty", || async {
        outbox_len(app, Service::Inventory).await == 0
    })
    .await;
}

/// On SQLite, writers hand committed rows to the relay in memory and the relay deletes them
/// after their confirms through the service's next write; the table stays the truth, read at
/// start, after failures and every few seconds. Under concurrent orders every event is still
/// published exactly once (no row both handed over and read back), and every row goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_orders_every_event_is_published_once_and_its_row_deleted() {
    const ORDERS: usize = 80;
    let app = spawn_app_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    place_concurrently(&app, ORDERS, "many", "KB-001").await;
    eventually("every order completed", || async {
        statuses_of(&app, "many").await == HashMap::from([(OrderStatus::Completed, ORDERS)])
    })
    .await;
    let addr = app.metrics_addr.expect("metrics served");
    let published = [
        ("order-service", "OrderCreated"),
        ("inventory-service", "InventoryReserved"),
        ("payment-service", "PaymentProcessed"),
    ];
    let counts = || async {
        let metrics = series(&scrape(addr).await);
        published.map(|(service, event)| {
            let name = format!(
                "orderflow_events_published_total{{service=\"{service}\",type=\"orderflow.v1.{event}\"}}"
            );
            metrics.get(&name).copied().unwrap_or_default()
        })
    };
    eventually("every event published", || async {
        counts().await == [ORDERS as f64; 3]
    })
    .await;
    for service in [Service::Order, Service::Inventory, Service::Payment] {
        eventually(&format!("{service}'s outbox empty"), || async {
            outbox_len(&app, service).await == 0
        })
        .await;
    }
    // Past the relay's periodic read of the table: nothing is published again.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_eq!(counts().await, [ORDERS as f64; 3], "published exactly once");
}

/// An event refused on every attempt reaches the dead-letter exchange as the event it was
/// (body and properties untouched) with the failure headers every dead letter carries; only
/// then does its outbox row go. The order it concerns becomes FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_refused_on_every_attempt_is_parked_as_a_dead_letter() {
    let missing = MissingBinding::new().await;
    let app = missing
        .spawn(|c| {
            c.outbox_max_attempts = 3;
            c.outbox_initial_delay = std::time::Duration::from_millis(20);
            c.outbox_max_delay = std::time::Duration::from_millis(100);
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
    missing.remove().await;
    let topology = app.topology();
    let route = topology.outbox_route(Service::Inventory);
    assert_eq!(route, format!("{}.inventory.outbox", app.namespace));
    let conn = raw_connection().await;
    let mut parked = tap(&conn, &topology.dead_letter_exchange(), &route).await;

    let placed = app.place("alice", &[("NOPE", 1)]).await;
    let dead = tokio::time::timeout(WAIT, parked.next())
        .await
        .expect("parked in time")
        .expect("tap open")
        .expect("delivery");

    let event = pb::InventoryRejected::decode(dead.data.as_slice()).expect("body untouched");
    assert_eq!(event.order_id, placed.order_id);
    let p = &dead.properties;
    assert_eq!(
        p.kind().as_ref().map(|k| k.as_str()),
        Some("orderflow.v1.InventoryRejected")
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|c| c.as_str()),
        Some(placed.order_id.as_str())
    );
    assert!(p.message_id().is_some());
    let headers = p.headers().as_ref().expect("headers");
    let h = |key: &str| header_str(headers, key).map(str::to_owned);
    assert!(h("traceparent").is_some(), "trace context kept");
    assert_eq!(h(header::ORIGINAL_EXCHANGE), Some(missing.exchange()));
    assert_eq!(
        h(header::ORIGINAL_ROUTING_KEY).as_deref(),
        Some(MissingBinding::KEY)
    );
    assert_eq!(h(header::QUEUE), Some(route.clone()));
    assert_eq!(
        h(header::FAILING_SERVICE).as_deref(),
        Some("inventory-service")
    );
    assert_eq!(h(header::DEAD_LETTER_REASON).as_deref(), Some("unroutable"));
    assert_eq!(h(header::ERROR_KIND).as_deref(), Some("transient"));
    let error = h(header::LAST_ERROR).expect("last error");
    assert!(error.contains("unroutable"), "{error}");
    // The parking is a span of the event's trace, and the dead letter continues from it.
    let traceparent = h("traceparent").expect("trace context");
    let (trace_id, parent) = {
        let parts: Vec<&str> = traceparent.split('-').collect();
        (parts[1].to_owned(), parts[2].to_owned())
    };
    let name = format!("dead-letter {route}");
    let spans = crate::helpers::collector()
        .wait_for_trace(&trace_id, WAIT, |spans| {
            spans.iter().any(|s| s.name == name)
        })
        .await;
    let span = spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("a {name} span in {spans:?}"));
    assert_eq!(span.span_id, parent);
    assert!(span.status_error);
    assert_eq!(span.attributes["dead_letter.reason"], "unroutable");
    assert_eq!(span.attributes["dead_letter.attempts"], "3");
    let (first, last) = (
        h(header::FIRST_FAILURE_AT).expect("first failure"),
        h(header::LAST_FAILURE_AT).expect("last failure"),
    );
    assert!(first < last, "three attempts apart: {first} < {last}");
    assert_eq!(
        headers.inner().get(header::ATTEMPT),
        Some(&AMQPValue::LongLongInt(3))
    );

    eventually("the parked row gone from the outbox", || async {
        outbox_len(&app, Service::Inventory).await == 0
    })
    .await;
    let metrics = app.metrics_addr.expect("metrics served");
    let counter = "orderflow_outbox_parked_total{service=\"inventory-service\",type=\"orderflow.v1.InventoryRejected\"}";
    eventually("the parked counter", || async {
        series(&scrape(metrics).await).get(counter) == Some(&1.0)
    })
    .await;
    // Order's dead-letter watcher takes every dead letter of the namespace, this one too.
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Failed
    );
}
