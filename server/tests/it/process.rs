//! The real `orderflow-server` binary as separate processes: killed with SIGKILL mid-flow,
//! aborted between commit and publish, stopped with SIGTERM (in time, and past its grace
//! period behind a broker that stopped answering), and two instances sharing one database and
//! broker.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, order_service_client::OrderServiceClient,
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};
use tonic::transport::Channel;

use crate::helpers::{
    WAIT, amqp_url, connect, eventually, order_request, statuses, unique_namespace,
};

/// One `orderflow-server` process and its log lines.
pub(crate) struct Server {
    child: Child,
    /// Reads stderr until the process closes it.
    reader: tokio::task::JoinHandle<()>,
    pub(crate) addr: SocketAddr,
    pub(crate) logs: Arc<Mutex<Vec<String>>>,
}

/// An `orderflow-server` process just spawned (JSON logs, own namespace and data directory),
/// not yet known to serve, and its stderr lines as they come.
pub(crate) struct Process {
    pub(crate) child: Child,
    /// Reads stderr until the process closes it.
    reader: tokio::task::JoinHandle<()>,
    pub(crate) logs: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Spawns the binary; `args` and `env` come last and may override the defaults.
    pub(crate) fn spawn(
        namespace: &str,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_orderflow-server"));
        command
            .args(["--namespace", namespace, "--log-format", "json"])
            .args(if args.contains(&"--grpc-addr") {
                &[][..]
            } else {
                &["--grpc-addr", "127.0.0.1:0"][..]
            })
            .arg("--data-dir")
            .arg(data_dir)
            .args(if args.contains(&"--shutdown-grace") {
                &[][..]
            } else {
                &["--shutdown-grace", "10s"][..]
            })
            .args(if args.contains(&"--amqp-url") {
                vec![]
            } else {
                vec!["--amqp-url".to_owned(), amqp_url()]
            })
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("ORDERFLOW_FAULTS")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("orderflow-server starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = logs.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            reader,
            logs,
        }
    }

    /// The JSON log lines logged so far whose `message` is `message`.
    pub(crate) fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|json| json["message"] == message)
            .collect()
    }

    /// Waits for the process to exit on its own; its exit status and every log line.
    pub(crate) async fn exit(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .expect("reaped");
        let _ = tokio::time::timeout(WAIT, self.reader).await;
        let logs = std::mem::take(&mut *self.logs.lock().unwrap());
        (status, logs)
    }
}

impl Server {
    /// Starts the binary with JSON logs, returning once it listens and is SERVING.
    pub(crate) async fn start(
        namespace: &str,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let process = Process::spawn(namespace, data_dir, args, env);
        let mut addr = None;
        crate::helpers::eventually("the server to log its address", || {
            addr = process
                .logged("orderflow-server started.")
                .first()
                .and_then(|json| json["grpc.addr"].as_str().map(str::to_owned));
            std::future::ready(addr.is_some())
        })
        .await;
        let Process {
            child,
            reader,
            logs,
        } = process;
        let server = Server {
            child,
            reader,
            addr: addr
                .expect("address logged")
                .parse()
                .expect("a socket address"),
            logs,
        };
        server.wait_serving().await;
        server
    }

    async fn wait_serving(&self) {
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(connect(self.addr).await);
        crate::helpers::eventually("SERVING", || {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1)
            }
        })
        .await;
        let _ = &mut health;
    }

    pub(crate) async fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(connect(self.addr).await)
    }

    /// SIGKILL: no shutdown, no flush, nothing.
    pub(crate) async fn kill9(mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("reaped");
    }

    /// Sends SIGTERM and waits for the exit status.
    pub(crate) async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(status.success());
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .expect("reaped");
        // Every log line is read before anyone looks at them.
        let _ = tokio::time::timeout(WAIT, self.reader).await;
        status
    }

    /// SIGTERM, and a clean exit; otherwise fails with the end of what the server logged.
    pub(crate) async fn stop(self) {
        let logs = self.logs.clone();
        let status = self.terminate().await;
        if !status.success() {
            let lines = logs.lock().unwrap();
            // lapin's own lines (a closed channel, say) would crowd out the server's.
            let own: Vec<&String> = lines
                .iter()
                .filter(|line| !line.contains("\"target\":\"lapin"))
                .collect();
            let tail = &own[own.len().saturating_sub(40)..];
            panic!("the server exited with {status} after SIGTERM; its last lines:\n{tail:#?}");
        }
    }

    /// Waits for the process to exit on its own.
    pub(crate) async fn exited(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .expect("reaped")
    }
}

/// A namespace and data directory shared by several server processes; deletes the namespace's
/// topology at the end.
pub(crate) struct Deployment {
    pub(crate) namespace: String,
    pub(crate) dir: tempfile::TempDir,
}

impl Deployment {
    pub(crate) fn new() -> Deployment {
        Deployment {
            namespace: unique_namespace(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) async fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start(&self.namespace, self.dir.path(), args, env).await
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        orderflow_server::bus::Topology::for_teardown(self.namespace.as_str())
            .delete_all_blocking(&amqp_url());
    }
}

async fn watch_all(
    client: &mut OrderServiceClient<Channel>,
    order_id: &str,
) -> Vec<pb::OrderUpdate> {
    let request = pb::WatchOrderRequest {
        order_id: order_id.to_owned(),
        resume_after_version: Some(0),
    };
    let mut stream = client
        .watch_order(request)
        .await
        .expect("watch starts")
        .into_inner();
    let mut updates = Vec::new();
    while let Some(update) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("update in time")
        .expect("stream ok")
    {
        updates.push(update);
    }
    updates
}

const COMPLETE: [OrderStatus; 3] = [
    OrderStatus::Pending,
    OrderStatus::InventoryReserved,
    OrderStatus::Completed,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_flow_the_order_still_completes_after_restart() {
    let deployment = Deployment::new();
    // Payment fails once and retries after 2 s: the order is mid-flow when the process dies.
    let server = deployment
        .start(
            &["--retry-initial-delay", "2s"],
            &[("ORDERFLOW_FAULTS", "payment:transient:1")],
        )
        .await;
    let mut client = server.client().await;
    let placed = client
        .place_order(order_request("alice", &[("KB-001", 2)]))
        .await
        .unwrap()
        .into_inner();
    crate::helpers::wait_for_status(&client, &placed.order_id, OrderStatus::InventoryReserved)
        .await;
    server.kill9().await;

    let server = deployment.start(&[], &[]).await;
    let mut client = server.client().await;
    let updates = watch_all(&mut client, &placed.order_id).await;
    assert_eq!(statuses(&updates), COMPLETE);
    let order = client
        .get_order(pb::GetOrderRequest {
            order_id: placed.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.history.len(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_publish_is_recovered_by_the_outbox() {
    let deployment = Deployment::new();
    // Inventory commits its reservation (and the InventoryReserved outbox row), then the process
    // aborts before the relay publishes and before the delivery is acknowledged.
    let server = deployment
        .start(
            &[],
            &[("ORDERFLOW_FAULTS", "inventory:crash-after-commit:1")],
        )
        .await;
    let mut client = server.client().await;
    let placed = client
        .place_order(order_request("alice", &[("KB-001", 3)]))
        .await
        .unwrap()
        .into_inner();
    let status = server.exited().await;
    assert!(
        !status.success(),
        "the injected crash aborted the process: {status:?}"
    );

    let inventory = format!(
        "sqlite://{}",
        deployment.dir.path().join("inventory.db").display()
    );
    let pool = sqlx::SqlitePool::connect(&inventory).await.unwrap();
    let (pending,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 1, "the committed event waits in the outbox");
    pool.close().await;

    let server = deployment.start(&[], &[]).await;
    let mut client = server.client().await;
    assert_eq!(
        statuses(&watch_all(&mut client, &placed.order_id).await),
        COMPLETE
    );
    let pool = sqlx::SqlitePool::connect(&inventory).await.unwrap();
    let (available,): (i64,) = sqlx::query_as("SELECT available FROM stock WHERE sku = 'KB-001'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        available, 97,
        "reserved exactly once despite the redelivery"
    );
    // A confirmed row's delete rides with the service's next write, or comes once it idles.
    eventually("the outbox row published and cleared", || async {
        let (pending,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        pending == 0
    })
    .await;
    pool.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_ends_watch_streams() {
    let deployment = Deployment::new();
    // Payment fails once; its retry waits 3 s in the broker's retry queue.
    let server = deployment
        .start(
            &["--retry-initial-delay", "3s"],
            &[("ORDERFLOW_FAULTS", "payment:transient:1")],
        )
        .await;
    let mut client = server.client().await;
    let placed = client
        .place_order(order_request("alice", &[("KB-001", 1)]))
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .watch_order(pb::WatchOrderRequest {
            order_id: placed.order_id.clone(),
            resume_after_version: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().status(),
        OrderStatus::Pending
    );
    let logs = server.logs.clone();
    let started = std::time::Instant::now();
    let status = server.terminate().await;
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    // The process enforces its 10 s grace itself; a machine busy with other tests may add a
    // little on top of the real shutdown time.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    // The open stream was ended with a clear status, not cut off.
    let mut ended = None;
    while let Ok(Some(update)) = stream.message().await.map_err(|s| ended = Some(s)) {
        assert_ne!(update.status(), OrderStatus::Completed);
    }
    let status = ended.expect("stream ended with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("resume_after_version="),
        "{}",
        status.message()
    );
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.contains("Shutdown complete."), "{logs}");
    assert!(!logs.contains("Graceful shutdown timed out"), "{logs}");

    // The parked retry is still in the broker: a restart finishes the order.
    let server = deployment.start(&[], &[]).await;
    let mut client = server.client().await;
    assert_eq!(
        statuses(&watch_all(&mut client, &placed.order_id).await),
        COMPLETE
    );
    server.stop().await;
}

/// A TCP relay to the broker that can be frozen: from then on it forwards nothing either way
/// but keeps both sockets open, as a broker that hangs (or a network that drops every packet)
/// would look to the client.
struct FreezableProxy {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    async fn start() -> FreezableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = tokio::sync::watch::Sender::new(false);
        let watch = frozen.clone();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(crate::broker::broker_addr()).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (broker_read, broker_write) = broker.into_split();
                relays.spawn(relay(client_read, broker_write, watch.subscribe()));
                relays.spawn(relay(broker_read, client_write, watch.subscribe()));
            }
        });
        FreezableProxy { addr, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either closes; once frozen, holds what it read and stops.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Checked between read and write, so nothing read after the freeze gets through.
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_outlasts_its_grace_period_exits_124() {
    // The broker stops answering (a frozen relay, so the connection stays open) while an order's
    // event waits in the outbox: draining the outbox and closing the connection can never
    // finish, so the 1 s grace runs out every time, however fast or slow the machine.
    let proxy = FreezableProxy::start().await;
    let deployment = Deployment::new();
    let url = crate::broker::amqp_url_via(proxy.addr);
    let server = deployment
        .start(&["--amqp-url", &url, "--shutdown-grace", "1s"], &[])
        .await;
    let mut client = server.client().await;
    proxy.freeze();
    let placed = client
        .place_order(order_request("alice", &[("KB-001", 1)]))
        .await
        .expect("PlaceOrder commits locally; the broker is not needed to accept")
        .into_inner();
    assert_eq!(placed.status(), OrderStatus::Pending);
    let logs = server.logs.clone();
    let status = server.terminate().await;
    assert_eq!(
        status.code(),
        Some(124),
        "a shutdown cut short by its grace period exits 124: {status:?}"
    );
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.contains("Graceful shutdown timed out"), "{logs}");
    assert!(!logs.contains("Shutdown complete."), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_instance_sees_transitions_processed_by_another() {
    let deployment = Deployment::new();
    // Instance A runs everything; instance B only the order service (API + order consumers),
    // on the same database directory and broker namespace.
    let a = deployment.start(&[], &[]).await;
    let b = deployment.start(&["--services", "order"], &[]).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    for i in 0..6 {
        let placed = client_a
            .place_order(order_request(&format!("c{i}"), &[("CB-005", 1)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            statuses(&watch_all(&mut client_b, &placed.order_id).await),
            COMPLETE,
            "watch on B"
        );
        assert_eq!(
            statuses(&watch_all(&mut client_a, &placed.order_id).await),
            COMPLETE,
            "watch on A"
        );
    }
    // Every transition was applied exactly once, by one instance or the other (competing
    // consumers); counted once both have flushed their logs.
    let (logs_a, logs_b) = (a.logs.clone(), b.logs.clone());
    b.stop().await;
    a.stop().await;
    let handled = |logs: &Arc<Mutex<Vec<String>>>| {
        logs.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("Order status changed."))
            .count()
    };
    assert_eq!(
        handled(&logs_a) + handled(&logs_b),
        12,
        "each transition applied once"
    );
}
