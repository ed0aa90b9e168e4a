//! The `orderflow` CLI against a real server (in-process) and the real broker, as a user runs
//! it: placing, watching, reading and listing orders, dead-letter commands, health, and the
//! TLS and token flags.

use std::{process::Command, time::Duration};

use clap::Parser as _;
use orderflow_server::{app::App, config::Config};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

struct Server {
    addr: std::net::SocketAddr,
    namespace: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        orderflow_server::bus::Topology::for_teardown(self.namespace.as_str())
            .delete_all_blocking(&amqp_url());
    }
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A server with its own namespace and data directory, `extra` flags added; not yet ready.
async fn start_server(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let namespace = format!("cli-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let data = dir.path().to_str().unwrap().to_owned();
    let mut args = vec![
        "orderflow-server",
        "--namespace",
        &namespace,
        "--grpc-addr",
        "127.0.0.1:0",
        "--data-dir",
        &data,
    ];
    let url = amqp_url();
    args.extend(["--amqp-url", &url]);
    args.extend(extra);
    let config = Config::try_parse_from(args).unwrap();
    let app = App::build(config)
        .await
        .expect("app builds (is RabbitMQ running? rabbitmq-server -detached)");
    let addr = app.grpc_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    Server {
        addr,
        namespace,
        shutdown,
        _dir: dir,
    }
}

/// A plaintext server, ready.
async fn server(extra: &[&str]) -> Server {
    let server = start_server(extra).await;
    // `orderflow health` is how a user waits for readiness.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cli(&server, &[], &["health"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "server never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
}

fn cli(server: &Server, global: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(global)
        .args(args)
        .env("ORDERFLOW_ADDR", server.addr.to_string())
        .env_remove("ORDERFLOW_TOKEN")
        .output()
        .expect("the CLI runs")
}

fn ok(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_places_watches_reads_and_lists_orders() {
    let server = server(&[]).await;
    let placed: Value = serde_json::from_str(&ok(cli(
        &server,
        &["--json"],
        &["place", "--customer", "alice", "--item", "KB-001=2"],
    )))
    .unwrap();
    let id = placed["orderId"].as_str().unwrap().to_owned();
    assert_eq!(placed["status"], "ORDER_STATUS_PENDING");

    let watched = ok(cli(&server, &[], &["watch", &id, "--resume-after", "0"]));
    let lines: Vec<&str> = watched.lines().collect();
    assert_eq!(lines.len(), 3, "{watched}");
    assert!(lines[0].starts_with("v1 ORDER_STATUS_PENDING"), "{watched}");
    assert!(
        lines[2].starts_with("v3 ORDER_STATUS_COMPLETED"),
        "{watched}"
    );

    let order: Value = serde_json::from_str(&ok(cli(&server, &["--json"], &["get", &id]))).unwrap();
    assert_eq!(order["totalCents"], 2 * 8999);
    assert_eq!(order["history"].as_array().unwrap().len(), 3);
    let text = ok(cli(&server, &[], &["get", &id]));
    assert!(
        text.contains("Mechanical keyboard") && text.contains("179.98"),
        "{text}"
    );

    let listed = ok(cli(&server, &[], &["list", "--customer", "alice"]));
    assert!(listed.contains(&id), "{listed}");

    // Refused requests exit 2 with the server's field-level message.
    let refused = cli(
        &server,
        &[],
        &["place", "--customer", "alice", "--item", "NOT VALID=1"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("INVALID_ARGUMENT: items[0].sku"));
    let missing = cli(&server, &[], &["get", &uuid::Uuid::now_v7().to_string()]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_inspects_and_replays_dead_letters() {
    let server = server(&["--faults", "payment:permanent:1"]).await;
    let placed = ok(cli(
        &server,
        &["--json"],
        &[
            "place",
            "--customer",
            "bob",
            "--item",
            "MS-002=1",
            "--watch",
        ],
    ));
    let last: Value = serde_json::from_str(placed.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "ORDER_STATUS_FAILED", "{placed}");
    let id = last["orderId"].as_str().unwrap().to_owned();

    let queues: Value =
        serde_json::from_str(&ok(cli(&server, &["--json"], &["dlq", "list"]))).unwrap();
    let depth = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| {
            q["name"]
                .as_str()
                .unwrap()
                .ends_with(".payment.inventory-reserved.dlq")
        })
        .unwrap()["depth"]
        .clone();
    assert_eq!(depth, 1);
    let shown = ok(cli(
        &server,
        &[],
        &["dlq", "show", "payment.inventory-reserved"],
    ));
    assert!(
        shown.contains("reason    permanent-error after 1 attempt(s) in payment-service"),
        "{shown}"
    );
    assert!(shown.contains(&id), "{shown}");

    assert_eq!(
        ok(cli(
            &server,
            &[],
            &["dlq", "replay", "payment.inventory-reserved", "--all"]
        ))
        .trim(),
        "replayed 1"
    );
    let resumed = ok(cli(&server, &[], &["watch", &id, "--resume-after", "3"]));
    assert!(
        resumed.starts_with("v4 ORDER_STATUS_COMPLETED"),
        "{resumed}"
    );
    assert_eq!(
        ok(cli(
            &server,
            &[],
            &["dlq", "purge", "payment.inventory-reserved", "--all"]
        ))
        .trim(),
        "purged 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(
        path("tokens.json"),
        r#"[{"name": "ops", "token": "cli-admin-token-123456", "role": "admin"},
            {"name": "shop", "token": "cli-client-token-123456", "role": "client"}]"#,
    )
    .unwrap();
    let (cert_path, key_path, tokens) = (path("cert.pem"), path("key.pem"), path("tokens.json"));
    let server = start_server(&[
        "--tls-cert",
        &cert_path,
        "--tls-key",
        &key_path,
        "--auth-tokens",
        &tokens,
    ])
    .await;
    let https = format!("https://localhost:{}", server.addr.port());
    let ca_path = path("ca.pem");
    let secure = |token: &str, args: &[&str]| {
        let mut global = vec!["--addr", https.as_str(), "--tls-ca", ca_path.as_str()];
        if !token.is_empty() {
            global.extend(["--token", token]);
        }
        cli(&server, &global, args)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !secure("", &["health"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "never SERVING over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let anonymous = secure("", &["list"]);
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("UNAUTHENTICATED"));
    ok(secure(
        "cli-client-token-123456",
        &["place", "--customer", "carol", "--item", "KB-001=1"],
    ));
    let denied = secure("cli-client-token-123456", &["dlq", "list"]);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));
    ok(secure("cli-admin-token-123456", &["dlq", "list"]));
    // Without the CA the certificate is unknown.
    let untrusted = cli(&server, &["--addr", &https], &["health"]);
    assert!(!untrusted.status.success());
}
