//! What the scale tests share: a catalog file, a deployment of separate processes, and a raw
//! tap on the events exchange (a fresh PostgreSQL database per test is in `tests/common`).

use std::{collections::HashMap, path::Path, time::Duration};

use futures_util::StreamExt as _;
use lapin::{Connection, ConnectionProperties};
use orderflow_lab::{
    audit::{self, Audit, State},
    deployment::{self, Layout},
};
use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, order_service_client::OrderServiceClient,
};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub(crate) use crate::broker::amqp_url;

/// A catalog entry: SKU, price in cents, stock.
pub(crate) type Item = (&'static str, i64, i64);

/// Deletes every queue and exchange of `namespace` once a test is done with it.
pub(crate) async fn teardown(namespace: &str) {
    orderflow_server::bus::Topology::for_teardown(namespace)
        .delete_all_at(&amqp_url())
        .await
        .expect("namespace deleted");
}

/// Writes `items` as the catalog file the processes load.
pub(crate) fn write_catalog(dir: &Path, items: &[Item]) -> String {
    let catalog: Vec<serde_json::Value> = items
        .iter()
        .map(|(sku, price, stock)| serde_json::json!({"sku": sku, "name": sku, "price_cents": price, "stock": stock}))
        .collect();
    let path = dir.join("catalog.json");
    std::fs::write(&path, serde_json::to_string(&catalog).unwrap()).unwrap();
    path.display().to_string()
}

/// The stock each SKU of `items` starts with.
pub(crate) fn initial_stock(items: &[Item]) -> HashMap<String, i64> {
    items
        .iter()
        .map(|(sku, _, stock)| ((*sku).to_owned(), *stock))
        .collect()
}

/// A fresh broker namespace.
pub(crate) fn namespace(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Settings for `instances` processes per service: catalog, payment limit, short retries,
/// and each handled message logged (to tell which instance did the work).
pub(crate) fn settings(
    dir: &Path,
    namespace: &str,
    amqp_url: String,
    database_url: Option<String>,
    instances: usize,
    items: &[Item],
) -> deployment::Settings {
    deployment::Settings {
        server_bin: crate::server_bin::server_bin(),
        namespace: namespace.to_owned(),
        data_dir: dir.to_owned(),
        amqp_url,
        database_url,
        sqlite_services: vec![],
        layout: Layout::Separate,
        instances,
        args: vec![
            "--catalog".into(),
            write_catalog(dir, items),
            "--payment-limit-cents".into(),
            "100000".into(),
            "--retry-initial-delay".into(),
            "100ms".into(),
        ],
        env: vec![(
            "RUST_LOG".into(),
            "warn,orderflow_server=info,orderflow=info".into(),
        )],
    }
}

/// Waits for the deployment to settle, audits it and fails the test on any broken invariant.
pub(crate) async fn audit_settled(state: &State, accepted: &[String], items: &[Item]) -> Audit {
    assert!(
        audit::wait_settled(state, Duration::from_secs(180))
            .await
            .expect("audit reads the databases"),
        "orders still in flight 180 s after the load"
    );
    let report = audit::audit(state, accepted, &initial_stock(items))
        .await
        .expect("audit reads the databases");
    println!("{report:?}");
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.failed, 0, "no order FAILED: {report:?}");
    report
}

/// One event as the broker delivered it to the tap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Tapped {
    pub(crate) message_id: String,
    pub(crate) message_type: String,
    pub(crate) order_id: String,
}

/// A queue bound to every routing key of the namespace's events exchange: sees each
/// publish the relays made, duplicates included.
pub(crate) struct Tap {
    connection: Connection,
    task: JoinHandle<Vec<Tapped>>,
}

impl Tap {
    /// Binds the tap; the exchange must exist (start the deployment first).
    pub(crate) async fn start(amqp_url: &str, namespace: &str) -> Tap {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable (start it with `rabbitmq-server -detached`)");
        let mut consumer = crate::tap::tap(&connection, &format!("{namespace}.events"), "#").await;
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(Ok(delivery)) = consumer.next().await {
                let p = &delivery.properties;
                let text = |v: Option<&lapin::types::ShortString>| {
                    v.map(|s| s.as_str().to_owned()).unwrap_or_default()
                };
                seen.push(Tapped {
                    message_id: text(p.message_id().as_ref()),
                    message_type: text(p.kind().as_ref()),
                    order_id: text(p.correlation_id().as_ref()),
                });
            }
            seen
        });
        Tap { connection, task }
    }

    /// Everything tapped so far; waits `quiet` for stragglers first.
    pub(crate) async fn finish(self, quiet: Duration) -> Vec<Tapped> {
        tokio::time::sleep(quiet).await;
        // Bounded: a close the broker never confirms must not hang the test.
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            self.connection.close(200, "tap done".into()),
        )
        .await;
        self.task.await.expect("tap task")
    }
}

/// Lines of an instance's log that record a handled message.
pub(crate) fn handled(dir: &Path, instance: deployment::Instance) -> usize {
    let (service, index) = instance;
    let log = dir
        .join("logs")
        .join(format!("{}-{index}.log", service.as_str()));
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("Handled event."))
        .count()
}

/// Follows `order_id` from its first version until a terminal status (at most `within`);
/// returns the versions and statuses seen.
pub(crate) async fn watch(
    client: &mut OrderServiceClient<Channel>,
    order_id: &str,
    within: Duration,
) -> Vec<(u64, OrderStatus)> {
    let mut stream = client
        .watch_order(pb::WatchOrderRequest {
            order_id: order_id.into(),
            resume_after_version: Some(0),
        })
        .await
        .expect("the order is known to this instance")
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(update)) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{order_id} terminal within {within:?}"))
    {
        seen.push((update.version, update.status()));
    }
    seen
}
