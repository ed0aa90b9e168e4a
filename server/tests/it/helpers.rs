//! Test harness: a real app per test (its own namespace, data directory and port) talking to
//! the real broker, plus a raw AMQP connection for looking at the wire.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::LazyLock,
    time::Duration,
};

use clap::Parser as _;
use lapin::{Connection, ConnectionProperties};
use orderflow_proto::orderflow::v1::{
    self as pb, dead_letters_client::DeadLettersClient, order_service_client::OrderServiceClient,
};
use orderflow_server::{app::App, bus::Topology, config::Config, service::Service};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::otlp::Collector;

pub(crate) use crate::broker::amqp_url;

/// The management HTTP API of the tests' broker (read by `--declare-topology verify`):
/// `ORDERFLOW_TEST_MANAGEMENT_URL` if set, else `http://<AMQP host>:<AMQP port + 10000>`
/// (15672 for the usual 5672, 15673 for a second node on 5673), credentials from `AMQP_URL`.
pub(crate) fn management_url() -> String {
    if let Ok(url) = std::env::var("ORDERFLOW_TEST_MANAGEMENT_URL") {
        return url;
    }
    let amqp: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    format!(
        "http://{}:{}",
        amqp.authority.host,
        amqp.authority.port + 10000
    )
}

/// Deadline for anything a test waits for.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Telemetry as the server sets it up, once per test binary, exporting every span to a real
/// OTLP receiver; logs go to stderr only with `TEST_LOG` set. The receiver and the exporter's
/// connection live on a runtime of their own, since each test's runtime ends with the test.
static TELEMETRY: LazyLock<Collector> = LazyLock::new(|| {
    let (ready, collector) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("otlp-collector".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("collector runtime");
            runtime.block_on(async move {
                let collector = Collector::start().await;
                let settings = orderflow_server::telemetry::Settings {
                    log_format: orderflow_server::telemetry::LogFormat::Text,
                    log_filter: Some(if std::env::var_os("TEST_LOG").is_some() {
                        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned())
                    } else {
                        "off".to_owned()
                    }),
                    otlp_endpoint: Some(collector.endpoint()),
                    service_name: None,
                    services: Service::ALL.to_vec(),
                };
                // Kept for the whole run: the provider must outlive every test.
                std::mem::forget(
                    orderflow_server::telemetry::init(&settings).expect("telemetry initialises"),
                );
                ready.send(collector).expect("test thread waits");
                std::future::pending::<()>().await;
            });
        })
        .expect("collector thread starts");
    collector.recv().expect("collector started")
});

/// The OTLP receiver every app of this test binary exports its spans to.
pub(crate) fn collector() -> Collector {
    LazyLock::force(&TELEMETRY).clone()
}

/// Connects to the broker or fails the test with instructions; never skips.
pub(crate) async fn raw_connection() -> Connection {
    let url = amqp_url();
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => panic!(
            "RabbitMQ is not reachable ({error}). These tests need a real broker on 127.0.0.1:5672 \
             (guest/guest) or at AMQP_URL: start it with `rabbitmq-server -detached` \
             (then `rabbitmqctl await_startup`)."
        ),
        Err(_) => {
            panic!("RabbitMQ did not answer within 10s. Start it with `rabbitmq-server -detached`.")
        }
    }
}

/// A fresh namespace no other test uses.
pub(crate) fn unique_namespace() -> String {
    format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A config for a test app: its own namespace, data dir and an ephemeral port.
pub(crate) fn test_config(namespace: &str, data_dir: &Path) -> Config {
    Config::try_parse_from([
        "orderflow-server",
        "--amqp-url",
        &amqp_url(),
        "--namespace",
        namespace,
        "--grpc-addr",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().expect("utf-8 temp dir"),
        "--retry-initial-delay",
        "50ms",
        "--retry-max-delay",
        "1s",
        "--management-url",
        &management_url(),
    ])
    .expect("test config parses")
}

/// One running app and what a test needs to talk to it.
#[derive(Debug)]
pub(crate) struct TestApp {
    /// Where its gRPC server listens.
    grpc_addr: SocketAddr,
    /// Where it serves metrics, if configured.
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// Its namespace on the broker.
    pub(crate) namespace: String,
    /// Its config (to restart it identically).
    pub(crate) config: Config,
    /// A gRPC client connected to it.
    pub(crate) client: OrderServiceClient<Channel>,
    /// The gRPC channel behind `client`, for other services' clients.
    pub(crate) channel: Channel,
    data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    shutdown: CancellationToken,
    cleanup: bool,
}

/// Starts an app with the default test config.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts an app after `adjust` changed its test config.
pub(crate) async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_tls(adjust, None).await
}

/// Starts an app whose gRPC port speaks TLS, reached with `tls` (or plaintext with `None`).
pub(crate) async fn spawn_app_tls(
    adjust: impl FnOnce(&mut Config),
    tls: Option<ClientTlsConfig>,
) -> TestApp {
    LazyLock::force(&TELEMETRY);
    raw_connection().await.close(200, "ok".into()).await.ok();
    let dir = tempfile::tempdir().expect("temp dir");
    let namespace = unique_namespace();
    let mut config = test_config(&namespace, dir.path());
    adjust(&mut config);
    let mut app = start(config, dir.path().to_owned(), tls).await;
    app._dir = Some(dir);
    app
}

async fn start(config: Config, data_dir: PathBuf, tls: Option<ClientTlsConfig>) -> TestApp {
    let app = App::build(config.clone()).await.expect("app builds");
    let addr = app.grpc_addr();
    let metrics_addr = app.metrics_addr();
    let shutdown = CancellationToken::new();
    // The app runs until the test drops its TestApp (which cancels `shutdown`).
    tokio::spawn(app.run(shutdown.clone()));
    let channel = match tls {
        None => connect(addr).await,
        Some(tls) => Channel::from_shared(format!("https://{addr}"))
            .expect("valid uri")
            .tls_config(tls)
            .expect("TLS settings")
            .connect()
            .await
            .expect("TLS handshake"),
    };
    let test_app = TestApp {
        grpc_addr: addr,
        metrics_addr,
        namespace: config.namespace.clone(),
        config,
        client: OrderServiceClient::new(channel.clone()),
        channel,
        data_dir,
        _dir: None,
        shutdown,
        cleanup: true,
    };
    test_app.wait_serving().await;
    test_app
}

/// A gRPC channel to `addr`.
pub(crate) async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connects")
}

impl TestApp {
    /// Waits until the health service reports SERVING (every broker connection up).
    pub(crate) async fn wait_serving(&self) {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            if status.as_ref().ok()
                == Some(&(tonic_health::pb::health_check_response::ServingStatus::Serving as i32))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "app never became SERVING: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The topology of this app's namespace.
    pub(crate) fn topology(&self) -> Topology {
        Topology::new(
            self.namespace.clone(),
            self.config.retry_max_attempts.saturating_sub(1),
            self.config.delivery_limit,
        )
    }

    /// The database file of `service`.
    pub(crate) fn db_path(&self, service: Service) -> PathBuf {
        self.data_dir.join(format!("{}.db", service.as_str()))
    }

    /// Units available per SKU, read from Inventory's database file.
    pub(crate) async fn stock(&self) -> HashMap<String, i64> {
        let pool = sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            self.db_path(Service::Inventory).display()
        ))
        .await
        .expect("inventory db opens");
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT sku, available FROM stock")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        rows.into_iter().collect()
    }

    /// The gRPC address of this app.
    pub(crate) fn channel_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// A DeadLetters client for this app.
    pub(crate) fn dead_letters(&self) -> DeadLettersClient<Channel> {
        DeadLettersClient::new(self.channel.clone())
    }

    /// The dead letters of `queue` (short form `<service>.<name>`), oldest first, once there
    /// are exactly `count` of them.
    pub(crate) async fn dead_letters_in(&self, queue: &str, count: u64) -> Vec<pb::DeadLetter> {
        eventually(&format!("{count} dead letter(s) in {queue}"), || async {
            self.dlq_depth(queue).await == count
        })
        .await;
        let list = self
            .dead_letters()
            .list_dead_letters(pb::ListDeadLettersRequest {
                queue: queue.to_owned(),
                limit: u32::try_from(count).expect("a small count"),
            })
            .await
            .expect("ListDeadLetters")
            .into_inner();
        assert_eq!(list.depth, count);
        list.dead_letters
    }

    /// Depth of the dead-letter queue of `queue` (short form `<service>.<name>`).
    pub(crate) async fn dlq_depth(&self, queue: &str) -> u64 {
        self.dead_letters()
            .list_dead_letters(pb::ListDeadLettersRequest {
                queue: queue.to_owned(),
                limit: 1,
            })
            .await
            .expect("ListDeadLetters")
            .into_inner()
            .depth
    }

    /// Places an order and returns it.
    pub(crate) async fn place(&self, customer: &str, items: &[(&str, u32)]) -> pb::Order {
        self.client
            .clone()
            .place_order(order_request(customer, items))
            .await
            .expect("PlaceOrder succeeds")
            .into_inner()
    }

    /// Watches `order_id` from the start of its history until the stream ends.
    pub(crate) async fn watch_all(&self, order_id: &str) -> Vec<pb::OrderUpdate> {
        self.watch_from(order_id, Some(0)).await
    }

    /// Watches `order_id` (after `resume_after`, if given) until the stream ends.
    pub(crate) async fn watch_from(
        &self,
        order_id: &str,
        resume_after: Option<u64>,
    ) -> Vec<pb::OrderUpdate> {
        let request = pb::WatchOrderRequest {
            order_id: order_id.to_owned(),
            resume_after_version: resume_after,
        };
        let mut stream = self
            .client
            .clone()
            .watch_order(request)
            .await
            .expect("WatchOrder starts")
            .into_inner();
        let mut updates = Vec::new();
        loop {
            let next = tokio::time::timeout(WAIT, stream.next()).await;
            let Ok(next) = next else {
                panic!("watch of {order_id} did not end within {WAIT:?}; got {updates:?}");
            };
            match next {
                Some(Ok(update)) => updates.push(update),
                Some(Err(status)) => panic!("watch stream failed: {status}"),
                None => return updates,
            }
        }
    }

    /// Waits for the order to reach a terminal status; returns it.
    pub(crate) async fn terminal(&self, order_id: &str) -> pb::Order {
        let updates = self.watch_from(order_id, None).await;
        assert!(
            updates.last().is_some_and(|u| u.terminal),
            "no terminal update: {updates:?}"
        );
        self.get(order_id).await
    }

    /// GetOrder.
    pub(crate) async fn get(&self, order_id: &str) -> pb::Order {
        self.client
            .clone()
            .get_order(pb::GetOrderRequest {
                order_id: order_id.to_owned(),
            })
            .await
            .expect("GetOrder succeeds")
            .into_inner()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if !self.cleanup {
            return;
        }
        // Delete this test's queues and exchanges so repeated runs leave the broker clean.
        orderflow_server::bus::Topology::for_teardown(self.namespace.as_str())
            .delete_all_blocking(&amqp_url());
    }
}

/// Publishes raw bytes with `properties` to `exchange`/`key`, waiting for the confirm.
pub(crate) async fn publish_raw(
    conn: &Connection,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // A queue declared moments ago on a busy broker can briefly be unroutable; the services
    // retry such publishes from their outbox, and so does this helper.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties.clone(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        match confirm {
            lapin::Confirmation::Ack(None) => break,
            lapin::Confirmation::Ack(Some(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("the broker did not take the message: {other:?}"),
        }
    }
    channel.close(200, "ok".into()).await.ok();
}

/// Waits until `check` returns true, polling every 50 ms, or fails after [`WAIT`].
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until GetOrder through `client` reports `status` for `order_id`.
pub(crate) async fn wait_for_status(
    client: &OrderServiceClient<Channel>,
    order_id: &str,
    status: pb::OrderStatus,
) {
    eventually(&format!("order {order_id} {status:?}"), || {
        let (mut client, order_id) = (client.clone(), order_id.to_owned());
        async move {
            client
                .get_order(pb::GetOrderRequest { order_id })
                .await
                .is_ok_and(|order| order.into_inner().status() == status)
        }
    })
    .await;
}

/// A PlaceOrder request.
pub(crate) fn order_request(customer: &str, items: &[(&str, u32)]) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: customer.to_owned(),
        items: items
            .iter()
            .map(|(sku, quantity)| pb::OrderItem {
                sku: (*sku).to_owned(),
                quantity: *quantity,
            })
            .collect(),
        idempotency_key: None,
    }
}

/// The statuses of `updates`, in order.
pub(crate) fn statuses(updates: &[pb::OrderUpdate]) -> Vec<pb::OrderStatus> {
    updates.iter().map(|u| u.status()).collect()
}

/// GET /metrics over a plain TCP connection, as Prometheus does.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("Content-Type: text/plain; version=0.0.4"));
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// `name{labels} value` rows as a map from the full series name to its value.
pub(crate) fn series(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(f64::NAN)))
        })
        .collect()
}
