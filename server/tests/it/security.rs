//! Security against a real TLS handshake and the real broker: TLS on the gRPC port, bearer
//! tokens and roles on each API, request limits, `amqps://` with a configured CA, credentials
//! kept out of logs, and oversized deliveries refused to the dead-letter queue.

use std::{path::Path, sync::Arc, time::Duration};

use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, dead_letters_client::DeadLettersClient,
    order_service_client::OrderServiceClient,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig},
};

use crate::helpers::{
    TestApp, order_request, publish_raw, raw_connection, spawn_app_tls, spawn_app_with,
};

/// A throwaway CA and a server certificate it signed for `localhost` and 127.0.0.1, as PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

const ADMIN: &str = "admin-token-for-tests-0001";
const SHOP: &str = "client-token-for-tests-0002";
const ALICE: &str = "alice-token-for-tests-0003";

fn token_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens.json");
    let hashed_admin = orderflow_server::api::auth::hashed(ADMIN);
    std::fs::write(
        &path,
        format!(
            r#"[
              {{"name": "ops", "token": "{hashed_admin}", "role": "admin"}},
              {{"name": "shop", "token": "{SHOP}", "role": "client"}},
              {{"name": "alice", "token": "{ALICE}", "role": "customer", "customer_id": "alice"}}
            ]"#
        ),
    )
    .unwrap();
    path
}

/// A TLS app with tokens; returns it and a TLS channel trusting the test CA.
async fn secured_app(
    adjust: impl FnOnce(&mut orderflow_server::config::Config),
) -> (TestApp, Channel, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    for (name, pem) in [("cert.pem", &pki.cert), ("key.pem", &pki.key)] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let tokens = token_file(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let app = spawn_app_tls(
        |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.auth_tokens = Some(tokens);
            adjust(c);
        },
        Some(tls),
    )
    .await;
    let channel = app.channel.clone();
    (app, channel, dir)
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens_guard_each_api() {
    let (app, channel, _dir) = secured_app(|_| {}).await;
    let mut orders = OrderServiceClient::new(channel.clone());
    let mut dead_letters = DeadLettersClient::new(channel.clone());

    // Health needs no token (but does need TLS).
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(status.into_inner().status, 1);

    // Missing, malformed and wrong tokens.
    for token in [None, Some("not-a-real-token-at-all"), Some(&ADMIN[1..])] {
        let status = orders
            .place_order(with_token(order_request("alice", &[("KB-001", 1)]), token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        let status = dead_letters
            .list_queues(with_token(pb::ListDeadLetterQueuesRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }

    // A client may order for anyone but may not touch dead letters; an admin may.
    let bobs = orders
        .place_order(with_token(
            order_request("bob", &[("KB-001", 1)]),
            Some(SHOP),
        ))
        .await
        .unwrap()
        .into_inner();
    for token in [SHOP, ALICE] {
        let status = dead_letters
            .list_queues(with_token(pb::ListDeadLetterQueuesRequest {}, Some(token)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{token}");
        let purge = pb::PurgeRequest {
            queue: "payment.inventory-reserved".into(),
            message_ids: vec![],
            all: true,
        };
        assert_eq!(
            dead_letters
                .purge(with_token(purge, Some(token)))
                .await
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
    }
    assert!(
        dead_letters
            .list_queues(with_token(pb::ListDeadLetterQueuesRequest {}, Some(ADMIN)))
            .await
            .is_ok()
    );

    // A customer token acts for its customer only.
    let denied = orders
        .place_order(with_token(
            order_request("bob", &[("KB-001", 1)]),
            Some(ALICE),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let alices = orders
        .place_order(with_token(
            order_request("alice", &[("MS-002", 1)]),
            Some(ALICE),
        ))
        .await
        .unwrap()
        .into_inner();
    let hidden = orders
        .get_order(with_token(
            pb::GetOrderRequest {
                order_id: bobs.order_id.clone(),
            },
            Some(ALICE),
        ))
        .await;
    assert_eq!(
        hidden.unwrap_err().code(),
        Code::NotFound,
        "another customer's order does not exist for alice"
    );
    let watch = pb::WatchOrderRequest {
        order_id: bobs.order_id.clone(),
        resume_after_version: None,
    };
    assert_eq!(
        orders
            .watch_order(with_token(watch, Some(ALICE)))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mine = orders
        .list_orders(with_token(pb::ListOrdersRequest::default(), Some(ALICE)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        mine.orders
            .iter()
            .map(|o| o.order_id.clone())
            .collect::<Vec<_>>(),
        vec![alices.order_id.clone()]
    );
    let others = pb::ListOrdersRequest {
        customer_id: Some("bob".into()),
        ..Default::default()
    };
    assert_eq!(
        orders
            .list_orders(with_token(others, Some(ALICE)))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let all = orders
        .list_orders(with_token(pb::ListOrdersRequest::default(), Some(SHOP)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.orders.len(), 2, "a client sees every customer");
    assert!(
        orders
            .get_order(with_token(
                pb::GetOrderRequest {
                    order_id: alices.order_id
                },
                Some(ALICE)
            ))
            .await
            .is_ok()
    );

    // Plaintext is refused on a TLS port.
    let plaintext = Channel::from_shared(format!("http://{}", app.channel_addr()))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let mut client = OrderServiceClient::new(channel);
        assert!(
            client
                .place_order(with_token(
                    order_request("alice", &[("KB-001", 1)]),
                    Some(SHOP)
                ))
                .await
                .is_err()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_refused_with_a_message() {
    let app = spawn_app_with(|c| {
        c.max_watch_streams = 2;
        c.max_request_bytes = 4096;
    })
    .await;
    // A request above the size limit: see `every_rpc_refuses_an_oversized_message_...`.
    let huge = order_request(&"x".repeat(10_000), &[("KB-001", 1)]);
    let status = app.client.clone().place_order(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Watch streams per server: an order that stays PENDING (no Inventory running) holds them.
    let pending = {
        let app = spawn_app_with(|c| {
            c.max_watch_streams = 2;
            c.services = vec![orderflow_server::service::Service::Order];
        })
        .await;
        let order = app.place("alice", &[("KB-001", 1)]).await;
        (app, order)
    };
    let (stuck_app, stuck) = pending;
    let mut held = Vec::new();
    for _ in 0..2 {
        let watch = pb::WatchOrderRequest {
            order_id: stuck.order_id.clone(),
            resume_after_version: None,
        };
        held.push(
            stuck_app
                .client
                .clone()
                .watch_order(watch)
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let watch = pb::WatchOrderRequest {
        order_id: stuck.order_id.clone(),
        resume_after_version: None,
    };
    let status = stuck_app
        .client
        .clone()
        .watch_order(watch)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("limit 2"), "{}", status.message());
    drop(held);
}

/// A message over the limit is `RESOURCE_EXHAUSTED` naming the limit, as the gRPC status code
/// spec asks, whichever RPC it is sent to (server-streaming and other services included), and
/// the server carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_an_oversized_message_with_resource_exhausted() {
    const LIMIT: usize = 64 * 1024;
    let app = spawn_app_with(|c| c.max_request_bytes = LIMIT).await;
    let mut orders = app.client.clone();
    let mut dead_letters = app.dead_letters();
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let big = "x".repeat(100 * 1024);
    let many_items: Vec<(String, u32)> = (0..10_000).map(|i| (format!("SKU-{i:05}"), 1)).collect();
    let many_items: Vec<(&str, u32)> = many_items.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    let id = |order_id: &str| pb::GetOrderRequest {
        order_id: order_id.to_owned(),
    };
    let refusals: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "PlaceOrder, 10,000 items",
            orders
                .place_order(order_request("alice", &many_items))
                .await
                .map(drop),
        ),
        (
            "PlaceOrder, 1 MiB customer id",
            orders
                .place_order(order_request(&"c".repeat(1 << 20), &[("KB-001", 1)]))
                .await
                .map(drop),
        ),
        (
            "PlaceOrder, 5 MiB",
            orders
                .place_order(order_request(&"c".repeat(5 << 20), &[("KB-001", 1)]))
                .await
                .map(drop),
        ),
        (
            "GetOrder, 100 KiB id",
            orders.get_order(id(&big)).await.map(drop),
        ),
        (
            "ListOrders",
            orders
                .list_orders(pb::ListOrdersRequest {
                    page_size: 10,
                    page_token: big.clone(),
                    customer_id: None,
                })
                .await
                .map(drop),
        ),
        (
            "WatchOrder (server-streaming)",
            orders
                .watch_order(pb::WatchOrderRequest {
                    order_id: big.clone(),
                    resume_after_version: None,
                })
                .await
                .map(drop),
        ),
        (
            "ListDeadLetters",
            dead_letters
                .list_dead_letters(pb::ListDeadLettersRequest {
                    queue: big.clone(),
                    limit: 1,
                })
                .await
                .map(drop),
        ),
        (
            "Replay",
            dead_letters
                .replay(pb::ReplayRequest {
                    queue: "payment.inventory-reserved".into(),
                    message_ids: vec![big.clone()],
                    all: false,
                })
                .await
                .map(drop),
        ),
        (
            "Health/Check",
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: big.clone(),
                })
                .await
                .map(drop),
        ),
    ];
    for (call, result) in refusals {
        let status = result.expect_err(call);
        assert_eq!(status.code(), Code::ResourceExhausted, "{call}: {status:?}");
        assert!(
            status
                .message()
                .contains(&format!("limit of {LIMIT} bytes")),
            "{call}: {}",
            status.message()
        );
    }
    // Just under the limit is decoded and answered on its merits.
    let near = "x".repeat(LIMIT - 64);
    let status = orders.get_order(id(&near)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // The connection and the server carry on.
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_deliveries_go_to_the_dead_letter_queue_unread() {
    let app = spawn_app_with(|c| c.max_message_bytes = 4096).await;
    let conn = raw_connection().await;
    let queue = format!("{}.inventory.order-created", app.namespace);
    let properties = lapin::BasicProperties::default()
        .with_message_id("huge-1".into())
        .with_type("orderflow.v1.OrderCreated".into());
    publish_raw(&conn, "", &queue, &vec![0u8; 64 * 1024], properties).await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed
    );
    crate::helpers::eventually("dead-lettered", || async {
        app.dlq_depth("inventory.order-created").await == 1
    })
    .await;
    let dead = app
        .dead_letters()
        .get_dead_letter(pb::GetDeadLetterRequest {
            queue: "inventory.order-created".into(),
            message_id: "huge-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        dead.last_error.contains("exceeds the limit of 4096 bytes"),
        "{}",
        dead.last_error
    );
    assert_eq!(dead.payload.len(), 64 * 1024, "body kept as it was");
    conn.close(200, "ok".into()).await.ok();
}

/// A TLS front for the local broker: accepts `amqps` with the test certificate and relays the
/// decrypted stream to the broker at `AMQP_URL`, so the client side of a real TLS handshake is tested
/// without reconfiguring the machine's RabbitMQ.
async fn tls_front(pki: &Pki) -> std::net::SocketAddr {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    };
    let certs = CertificateDer::pem_slice_iter(pki.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut broker) =
                    tokio::net::TcpStream::connect(crate::broker::broker_addr()).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_configured_ca_works_and_without_it_does_not() {
    let pki = pki();
    let front = tls_front(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca).unwrap();
    let url: orderflow_server::bus::AmqpUrl =
        format!("amqps://guest:guest@localhost:{}/%2f", front.port())
            .parse()
            .unwrap();

    let app = spawn_app_with(|c| {
        c.amqp_url = url.clone();
        c.amqp_ca_cert = Some(ca.clone());
    })
    .await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed,
        "the saga runs over amqps"
    );

    // Without the CA the certificate is unknown: the app never connects.
    let namespace = crate::helpers::unique_namespace();
    let data = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::test_config(&namespace, data.path());
    config.amqp_url = url;
    let untrusting = orderflow_server::app::App::build(config).await.unwrap();
    let channel = crate::helpers::connect(untrusting.grpc_addr()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(untrusting.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        2,
        "NOT_SERVING: the broker's certificate is not trusted"
    );
    shutdown.cancel();
}

/// A RabbitMQ user with a random password, deleted on drop.
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    fn create() -> BrokerUser {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let user = BrokerUser {
            name: format!("leak-{}", &id[..8]),
            password: format!("pw-{}", &id[8..]),
        };
        let ctl = |args: &[&str]| {
            let command = crate::broker::ctl(args);
            let status = crate::broker::ctl(args)
                .output()
                .unwrap_or_else(|e| panic!("{command:?} runs: {e}"));
            assert!(
                status.status.success(),
                "{command:?}: {}",
                String::from_utf8_lossy(&status.stderr)
            );
        };
        ctl(&["add_user", &user.name, &user.password]);
        ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = crate::broker::ctl(&["delete_user", &self.name]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amqp_password_never_appears_in_logs_or_errors() {
    let user = BrokerUser::create();
    let url = crate::broker::amqp_url_as(&user.name, &user.password);
    let server_bin = env!("CARGO_BIN_EXE_orderflow-server");

    // A full saga with every log level on.
    let deployment = crate::process::Deployment::new();
    let server = deployment
        .start(&["--amqp-url", &url], &[("RUST_LOG", "trace")])
        .await;
    let mut client = server.client().await;
    let placed = client
        .place_order(order_request("alice", &[("KB-001", 1)]))
        .await
        .unwrap()
        .into_inner();
    crate::helpers::wait_for_status(&client, &placed.order_id, OrderStatus::Completed).await;
    let logs = server.logs.clone();
    server.stop().await;
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.len() > 10_000, "trace logs were captured");
    assert!(
        logs.contains(&user.name),
        "the user name may appear (redacted URL)"
    );
    assert!(
        !logs.contains(&user.password),
        "password leaked into the logs"
    );

    // A wrong password: connection errors are logged, the password is not.
    let wrong = crate::broker::amqp_url_as(&user.name, &format!("{}x", user.password));
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("timeout")
            .args([
                "3",
                server_bin,
                "--grpc-addr",
                "127.0.0.1:0",
                "--namespace",
                "leak-check",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("AMQP_URL", &wrong)
            .env("RUST_LOG", "trace")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Cannot use RabbitMQ yet"), "{stderr}");
    assert!(
        !stderr.contains(&user.password),
        "password leaked into an error"
    );

    // Invalid configuration, `--help` and a malformed URL: no echo of the secret either.
    for args in [vec!["--namespace", "bad name"], vec!["--help"]] {
        let output = std::process::Command::new(server_bin)
            .args(&args)
            .env("AMQP_URL", &url)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!all.contains(&user.password), "{args:?}: {all}");
    }
    let malformed = format!(
        "amqp://{}:{}@127.0.0.1:notaport/%2f",
        user.name, user.password
    );
    let output = std::process::Command::new(server_bin)
        .env("AMQP_URL", &malformed)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(64),
        "configuration errors exit with EX_USAGE"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("malformed AMQP URL") && !stderr.contains(&user.password),
        "{stderr}"
    );
}
