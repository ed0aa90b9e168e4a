//! The example clients in `examples/` (Python stubs generated with grpcio-tools; Node with
//! @grpc/grpc-js and @grpc/proto-loader), run as their users would against a real server. A
//! proxy between client and server cuts the client's connection once the first update of its
//! watch has arrived, so every run has to resume the watch, and must still print each version
//! exactly once and end on the terminal status.
//!
//! The order cannot move on behind the test's back: the first app runs only the Order service
//! (and the API), so the order stays PENDING until Inventory and Payment start, in a second
//! app on the same namespace, after the client has said it resumes.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use orderflow_server::{app::App, service::Service};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::helpers::{spawn_app_with, test_config};

/// How long a client may take for one step (start-up included): generous, since the machine
/// may be busy building, and only reached when something is broken.
const STEP: Duration = Duration::from_secs(60);
const TOKEN: &str = "a-long-random-token-for-the-example-clients";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_resumes_its_watch_and_sees_every_version_once() {
    let example = repo().join("examples/python");
    let dependencies = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    assert!(
        dependencies.as_ref().is_ok_and(|o| o.status.success()),
        "the Python example needs python3 with grpcio and grpcio-tools: \
         `python3 -m pip install -r examples/python/requirements.txt` (scripts/test.sh does): \
         {dependencies:?}"
    );
    // The stubs are generated as the README says, so a change to the protos reaches them.
    let generated = std::process::Command::new(example.join("generate.sh"))
        .output()
        .expect("generate.sh runs");
    assert!(
        generated.status.success(),
        "examples/python/generate.sh failed: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let mut client = Command::new("python3");
    client.arg(example.join("place_and_watch.py"));
    run_through_a_cut(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_client_resumes_its_watch_and_sees_every_version_once() {
    let example = repo().join("examples/node");
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the Node example needs Node.js 18 or newer on PATH (apt-get install nodejs npm): {node:?}"
    );
    assert!(
        example.join("node_modules/@grpc/grpc-js").is_dir()
            && example.join("node_modules/@grpc/proto-loader").is_dir(),
        "the Node example's dependencies are not installed: \
         `npm ci --prefix examples/node` (scripts/test.sh does)"
    );
    let mut client = Command::new("node");
    client.arg(example.join("place_and_watch.js"));
    run_through_a_cut(client).await;
}

/// Runs `client` against a fresh server through a [`Proxy`] that cuts it off after the first
/// update, and checks what it printed.
async fn run_through_a_cut(mut client: Command) {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        format!(r#"[{{"name": "examples", "token": "{TOKEN}", "role": "client"}}]"#),
    )
    .expect("token file");
    let app = spawn_app_with(|c| {
        c.services = vec![Service::Order];
        c.auth_tokens = Some(tokens);
    })
    .await;
    let proxy = Proxy::start(app.channel_addr()).await;
    let mut child = client
        .args(["--addr", &proxy.addr.to_string(), "--token", TOKEN])
        .args(["--customer", "alice", "--sku", "KB-001", "--quantity", "2"])
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the client starts");
    let stderr = collect(&mut child);
    let mut output = Output {
        lines: BufReader::new(child.stdout.take().expect("piped stdout")).lines(),
        seen: Vec::new(),
    };

    output.until(|line| line.starts_with("version 1:")).await;
    proxy.cut();
    output
        .until(|line| line.contains("resuming after version 1"))
        .await;
    let rest = Rest::start(&app.namespace).await;
    output.read_rest().await;
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("the client exits after its last line")
        .expect("the client's status");
    let stderr = stderr.await.expect("stderr reader");
    let transcript = output.seen.join("\n");
    // Shown with --nocapture: what a user of the example sees.
    println!("{transcript}");
    assert!(
        status.success(),
        "client failed ({status}):\n{transcript}\nstderr:\n{stderr}"
    );

    let versions: Vec<(u64, String)> = output
        .seen
        .iter()
        .filter_map(|line| {
            let (version, status) = line.strip_prefix("version ")?.split_once(": ")?;
            Some((version.parse().ok()?, status.to_owned()))
        })
        .collect();
    let expected = [
        OrderStatus::Pending,
        OrderStatus::InventoryReserved,
        OrderStatus::Completed,
    ]
    .iter()
    .zip(1..)
    .map(|(status, version)| (version, status.as_str_name().to_owned()))
    .collect::<Vec<_>>();
    assert_eq!(
        versions, expected,
        "every version once, in order:\n{transcript}"
    );
    let resumed = output
        .seen
        .iter()
        .filter(|line| line.starts_with("stream dropped ("))
        .collect::<Vec<_>>();
    assert_eq!(resumed.len(), 1, "one resume, after the cut:\n{transcript}");
    assert!(
        resumed[0].ends_with("; resuming after version 1"),
        "{transcript}"
    );
    assert!(proxy.connections() >= 2, "it reconnected:\n{transcript}");
    let placed = output.seen[0]
        .strip_prefix("placed order ")
        .and_then(|rest| rest.split_once(':'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("the first line names the order:\n{transcript}"));
    assert_eq!(
        output.seen.last().map(String::as_str),
        Some(format!("order {placed} ended ORDER_STATUS_COMPLETED").as_str()),
        "{transcript}"
    );

    // The server agrees, and saw exactly one order.
    let orders = app
        .client
        .clone()
        .list_orders(authorized(pb::ListOrdersRequest {
            page_size: 10,
            page_token: String::new(),
            customer_id: Some("alice".to_owned()),
        }))
        .await
        .expect("ListOrders")
        .into_inner()
        .orders;
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0].order_id, placed);
    assert_eq!(orders[0].status(), OrderStatus::Completed);
    assert_eq!(orders[0].items[0].quantity, 2);
    rest.stop().await;
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ASCII"),
    );
    request
}

/// Reads the child's stderr to the end in the background, for failure messages.
fn collect(child: &mut Child) -> JoinHandle<String> {
    let mut stderr = child.stderr.take().expect("piped stderr");
    tokio::spawn(async move {
        let mut text = String::new();
        stderr.read_to_string(&mut text).await.ok();
        text
    })
}

/// The client's stdout, line by line, and every line read so far.
struct Output {
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: Vec<String>,
}

impl Output {
    /// Reads lines until one matches `wanted`.
    async fn until(&mut self, wanted: impl Fn(&str) -> bool) {
        loop {
            match self.next().await {
                Some(line) if wanted(&line) => return,
                Some(_) => {}
                None => panic!("the client's output ended early:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Reads every remaining line.
    async fn read_rest(&mut self) {
        while self.next().await.is_some() {}
    }

    async fn next(&mut self) -> Option<String> {
        let line = tokio::time::timeout(STEP, self.lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the client printed nothing for {STEP:?}:\n{}",
                    self.seen.join("\n")
                )
            })
            .expect("the client's stdout reads")?;
        self.seen.push(line.clone());
        Some(line)
    }
}

/// A TCP proxy to the server that can cut every connection open at the moment, as a network
/// failure would, and forwards the connections made after that untouched.
struct Proxy {
    addr: std::net::SocketAddr,
    /// Cancelled to cut the connections accepted since the last cut.
    current: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicUsize>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let current = Arc::new(Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepting = tokio::spawn({
            let (current, accepted) = (current.clone(), accepted.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let cut = current.lock().expect("not poisoned").clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        // Either side closing ends both; a cut drops both sockets at once.
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            () = cut.cancelled() => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            current,
            accepted,
            accepting,
        }
    }

    /// Closes every connection open now.
    fn cut(&self) {
        let fresh = CancellationToken::new();
        std::mem::replace(&mut *self.current.lock().expect("not poisoned"), fresh).cancel();
    }

    /// Connections accepted so far.
    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.current.lock().expect("not poisoned").cancel();
    }
}

/// Inventory and Payment, in an app of their own on the Order app's namespace (and their own
/// data directory).
struct Rest {
    stop: CancellationToken,
    running: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Rest {
    async fn start(namespace: &str) -> Rest {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(namespace, dir.path());
        config.services = vec![Service::Inventory, Service::Payment];
        let app = App::build(config).await.expect("app builds");
        let stop = CancellationToken::new();
        let running = tokio::spawn(app.run(stop.clone()));
        Rest {
            stop,
            running,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(crate::helpers::WAIT, self.running)
            .await
            .expect("Inventory and Payment stop")
            .expect("their task")
            .expect("they stop cleanly");
    }
}
