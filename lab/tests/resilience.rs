//! Resilience against the real broker and the real binary, run as separate processes: broker
//! restarts, connections closed by the broker, services killed or stopped mid-load, and a
//! 5,000-order load. Every run ends with a full audit: every accepted order terminal, none
//! twice, stock arithmetic exact.
//!
//! These tests restart the shared RabbitMQ, so they live in their own test binary (cargo runs
//! test binaries one after another) and take turns within it.

use std::{collections::HashMap, time::Duration};

use orderflow_lab::{
    audit,
    broker::{self, Ctl},
    chaos::{self, Report, faults::Fault},
    deployment::{self, Deployment, Layout},
    driver::{self, Plan},
};
use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, order_service_client::OrderServiceClient,
};
use orderflow_server::bus::Topology;
use tokio::sync::Mutex;
use tonic_health::pb::health_check_response::ServingStatus;

/// One test at a time: they disturb the broker everyone shares.
static SERIAL: Mutex<()> = Mutex::const_new(());

const CATALOG: &[(&str, i64, i64)] = &[
    ("R-AAA", 500, 1_000_000),
    ("R-BBB", 1_250, 1_000_000),
    ("R-SCARCE", 300, 60),
    ("R-PRICEY", 80_000, 1_000_000),
];

#[path = "common/server_bin.rs"]
mod server_bin;
#[path = "../../server/tests/common/broker.rs"]
mod test_broker;

use test_broker::amqp_url;

fn settings(dir: &std::path::Path, namespace: &str) -> deployment::Settings {
    let catalog: Vec<serde_json::Value> = CATALOG
        .iter()
        .map(|(sku, price, stock)| serde_json::json!({"sku": sku, "name": sku, "price_cents": price, "stock": stock}))
        .collect();
    let path = dir.join("catalog.json");
    std::fs::write(&path, serde_json::to_string(&catalog).unwrap()).unwrap();
    deployment::Settings {
        server_bin: server_bin::server_bin(),
        namespace: namespace.to_owned(),
        data_dir: dir.to_owned(),
        amqp_url: amqp_url(),
        database_url: None,
        sqlite_services: vec![],
        layout: Layout::Separate,
        instances: 1,
        args: vec![
            "--catalog".into(),
            path.display().to_string(),
            "--retry-initial-delay".into(),
            "100ms".into(),
        ],
        env: vec![],
    }
}

fn plan(rate: f64, in_flight: usize, max_orders: usize) -> Plan {
    Plan {
        skus: CATALOG.iter().map(|(s, _, _)| (*s).to_owned()).collect(),
        rate,
        in_flight,
        max_orders,
        give_up_after: Duration::from_secs(120),
    }
}

fn initial_stock() -> HashMap<String, i64> {
    CATALOG
        .iter()
        .map(|(s, _, n)| ((*s).to_owned(), *n))
        .collect()
}

fn namespace() -> String {
    format!(
        "resilience-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn chaos_run(
    faults: Vec<Fault>,
    duration: Duration,
    interval: (Duration, Duration),
    plan: Plan,
) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(chaos::Settings {
        deployment: settings(dir.path(), &namespace()),
        duration,
        faults,
        fault_interval: interval,
        plan,
        initial_stock: initial_stock(),
        settle_timeout: Duration::from_secs(120),
        rabbitmqctl: Ctl::from_env(),
    })
    .await
    .expect("chaos run completes");
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.audit.failed, 0, "no order FAILED: {report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_lose_nothing() {
    let _turn = SERIAL.lock().await;
    let report = chaos_run(
        vec![Fault::CloseConnections],
        // Room for at least two faults even when the broker's CLI is slow to start on a busy
        // machine (each injection runs `rabbitmqctl eval`).
        Duration::from_secs(20),
        (Duration::from_secs(2), Duration::from_secs(4)),
        plan(40.0, 32, 100_000),
    )
    .await;
    assert!(report.faults.len() >= 2, "{report}");
    assert!(report.audit.placed > 200, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_services_lose_nothing() {
    let _turn = SERIAL.lock().await;
    let report = chaos_run(
        vec![Fault::KillService, Fault::StopService],
        Duration::from_secs(20),
        (Duration::from_secs(2), Duration::from_secs(4)),
        plan(40.0, 32, 100_000),
    )
    .await;
    assert!(report.faults.len() >= 2, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_in_time_and_the_restart_finishes_the_rest() {
    let _turn = SERIAL.lock().await;
    let report = chaos_run(
        vec![Fault::StopService],
        Duration::from_secs(15),
        (Duration::from_secs(3), Duration::from_secs(5)),
        plan(150.0, 128, 100_000),
    )
    .await;
    // Each stop must have been graceful (exit 0 within the grace period) for the run to pass.
    assert!(
        report
            .faults
            .iter()
            .all(|(_, what)| what.contains("SIGTERM")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_concurrent_orders_all_finish() {
    let _turn = SERIAL.lock().await;
    let report = chaos_run(
        vec![],
        Duration::from_secs(300),
        (Duration::from_secs(1), Duration::from_secs(1)),
        plan(5_000.0, 500, 5_000),
    )
    .await;
    assert_eq!(report.audit.placed, 5_000, "{report}");
}

/// A deployment under a steady load of orders, for a fault in the middle of it.
struct UnderLoad {
    deployment: Deployment,
    namespace: String,
    _dir: tempfile::TempDir,
    stop: tokio_util::sync::CancellationToken,
    driver: tokio::task::JoinHandle<anyhow::Result<driver::Placed>>,
}

impl UnderLoad {
    /// Starts the services and places orders at `rate` for 3 s before returning.
    async fn start(rate: f64) -> UnderLoad {
        let dir = tempfile::tempdir().unwrap();
        let namespace = namespace();
        let deployment = Deployment::start(settings(dir.path(), &namespace))
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let driver = {
            let (addr, stop, namespace) =
                (deployment.order_addrs(), stop.clone(), namespace.clone());
            tokio::spawn(async move {
                driver::run(&addr, plan(rate, 32, 100_000), &namespace, stop).await
            })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        UnderLoad {
            deployment,
            namespace,
            _dir: dir,
            stop,
            driver,
        }
    }

    fn client(&self) -> OrderServiceClient<tonic::transport::Channel> {
        let addr = self.deployment.order_addrs()[0];
        OrderServiceClient::new(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy(),
        )
    }

    /// One order placed by hand while the fault lasts; `expect` says why it must be accepted.
    async fn place(&self, customer: &str, expect: &str) -> pb::Order {
        self.client()
            .place_order(pb::PlaceOrderRequest {
                customer_id: customer.into(),
                items: vec![pb::OrderItem {
                    sku: "R-AAA".into(),
                    quantity: 1,
                }],
                idempotency_key: None,
            })
            .await
            .expect(expect)
            .into_inner()
    }

    /// Lets the load run 3 s more and stops it, waits for every order to settle, and audits
    /// them all with `during`: nothing lost, applied twice or FAILED, and `during` completed.
    async fn finish(mut self, during: pb::Order, what: &str) -> driver::Placed {
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.stop.cancel();
        let placed = (&mut self.driver).await.unwrap().unwrap();
        assert!(
            audit::wait_settled(&self.deployment.state(), Duration::from_secs(120))
                .await
                .unwrap(),
            "settles"
        );
        let mut accepted = placed.accepted.clone();
        accepted.push(during.order_id.clone());
        let report = audit::audit(&self.deployment.state(), &accepted, &initial_stock())
            .await
            .unwrap();
        println!(
            "{what}: placed {}, completed {}, rejected {}, payment failed {}, FAILED {}",
            report.placed, report.completed, report.rejected, report.payment_failed, report.failed
        );
        assert!(report.passed(), "{report:?}");
        assert_eq!(report.failed, 0, "no order FAILED: {report:?}");
        assert_eq!(report.placed, accepted.len());
        let order = self
            .client()
            .get_order(pb::GetOrderRequest {
                order_id: during.order_id,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            order.status(),
            OrderStatus::Completed,
            "the order taken during the {what} completed"
        );
        self.deployment.stop().await.unwrap();
        Topology::for_teardown(self.namespace.as_str())
            .delete_all_at(&amqp_url())
            .await
            .expect("namespace deleted");
        placed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_delays_orders_but_loses_none() {
    let _turn = SERIAL.lock().await;
    let load = UnderLoad::start(40.0).await;
    // Stop the broker; every service notices and reports NOT_SERVING.
    let restart =
        tokio::spawn(async { broker::restart(&Ctl::from_env(), Duration::from_secs(4)).await });
    load.deployment
        .wait_health_all(ServingStatus::NotServing, Duration::from_secs(60))
        .await
        .expect("NOT_SERVING while the broker is down");
    // PlaceOrder keeps accepting orders: they are stored, with their event in the outbox.
    let during = load
        .place("during-outage", "accepted while the broker is down")
        .await;
    assert_eq!(during.status(), OrderStatus::Pending);
    restart.await.unwrap().expect("broker restarted");
    // Back: every service reconnects, re-declares its topology and reports SERVING again.
    load.deployment
        .wait_health_all(ServingStatus::Serving, Duration::from_secs(60))
        .await
        .expect("SERVING again once the broker is back");
    load.finish(during, "broker restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20s_memory_alarm_delays_orders_but_loses_and_fails_none() {
    use orderflow_server::service::Service;

    let _turn = SERIAL.lock().await;
    let load = UnderLoad::start(20.0).await;
    // The broker blocks every publishing connection. The guard restores the watermark even if
    // an assertion below fails; the alarm never outlasts 20 s on purpose.
    let ctl = Ctl::from_env();
    let alarm = broker::MemoryAlarm::raise(&ctl)
        .await
        .expect("memory alarm raised");
    let raised = tokio::time::Instant::now();
    println!("memory alarm raised (watermark was {})", alarm.original());
    // Order publishes every new order's event, so its connection is blocked within moments:
    // health and metrics say so. (Inventory and Payment are blocked only once they publish.)
    let order = (Service::Order, 0);
    let deployment = &load.deployment;
    deployment
        .wait_health(order, ServingStatus::NotServing, Duration::from_secs(15))
        .await
        .expect("order-service NOT_SERVING while the broker blocks its publishes");
    let gauge = |name: &'static str| async move {
        deployment
            .gauge(order, name)
            .await
            .expect("/metrics answers")
    };
    assert_eq!(gauge("orderflow_broker_blocked").await, Some(1.0));
    assert_eq!(gauge("orderflow_broker_connected").await, Some(1.0));
    let during = load
        .place(
            "during-alarm",
            "accepted while the broker blocks publishers",
        )
        .await;
    // Cleared at 19 s: the control command itself takes most of a second.
    tokio::time::sleep(Duration::from_secs(19).saturating_sub(raised.elapsed())).await;
    alarm.clear().await.expect("watermark restored");
    println!("memory alarm cleared after {:?}", raised.elapsed());

    deployment
        .wait_health_all(ServingStatus::Serving, Duration::from_secs(30))
        .await
        .expect("SERVING again once the alarm clears");
    assert_eq!(gauge("orderflow_broker_blocked").await, Some(0.0));
    let placed = load.finish(during, "memory alarm").await;
    assert!(
        placed.abandoned.is_empty(),
        "abandoned: {:?}",
        placed.abandoned
    );
}
