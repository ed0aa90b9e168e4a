//! `--declare-topology verify` against the real broker and its management API: a correct
//! topology passes; a broken one is reported whole, in one error, and the binary exits with 78
//! (EX_CONFIG); an unreachable broker or management API is retried, not reported.

use lapin::{
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use orderflow_server::{
    bus::{
        Topology,
        management::Management,
        topology::{VerifyError, spec::Mismatch},
    },
    config::DeclareTopology,
    service::Service,
};

use crate::{
    helpers::{WAIT, amqp_url, management_url, raw_connection, unique_namespace},
    process::{Deployment, Process},
};

/// The topology the test config gives a server (5 attempts: 4 retry levels; delivery limit 20).
fn topology(namespace: &str) -> Topology {
    Topology::new(namespace, 4, 20)
}

/// The management API, or a failed test saying how to enable it.
async fn management() -> Management {
    let node = amqp_url().parse().expect("AMQP_URL parses");
    let url = management_url().parse().expect("management URL parses");
    let management = Management::new(&node, Some(&url), None).expect("management settings");
    let probe = management
        .read(&orderflow_server::bus::topology::spec::Spec::default())
        .await;
    if let Err(error) = probe {
        panic!(
            "RabbitMQ's management API is not reachable at {} ({error:#}). These tests need it: \
             `rabbitmq-plugins enable rabbitmq_management` (or set ORDERFLOW_TEST_MANAGEMENT_URL).",
            management.url()
        );
    }
    management
}

/// Declares the namespace's topology as `--declare-topology all` would.
async fn declare(namespace: &str) {
    let conn = raw_connection().await;
    let channel = conn.create_channel().await.unwrap();
    topology(namespace).declare(&channel).await.unwrap();
    conn.close(200, "ok".into()).await.ok();
}

fn problems(result: Result<(), VerifyError>) -> Vec<Mismatch> {
    match result {
        Err(VerifyError::Mismatch { mismatches, .. }) => mismatches,
        other => panic!("expected a topology mismatch, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_topology_passes_verify() {
    let deployment = Deployment::new();
    let management = management().await;
    declare(&deployment.namespace).await;
    for service in Service::ALL {
        management
            .verify(&topology(&deployment.namespace), service)
            .await
            .unwrap_or_else(|e| panic!("{service} verifies: {e}"));
    }
    // The whole process too: it becomes SERVING without declaring anything.
    let server = deployment
        .start(
            &[
                "--declare-topology",
                "verify",
                "--management-url",
                &management_url(),
            ],
            &[],
        )
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_topology_is_reported_whole_and_the_server_exits_with_78() {
    let deployment = Deployment::new();
    let management = management().await;
    let ns = deployment.namespace.clone();
    declare(&ns).await;

    // Break it in four ways at once.
    let conn = raw_connection().await;
    let channel = conn.create_channel().await.unwrap();
    // 1. A work queue loses its binding.
    channel
        .queue_unbind(
            format!("{ns}.order.payment-failed").as_str().into(),
            format!("{ns}.events").as_str().into(),
            "payment.failed".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // 2. A work queue comes back with another delivery limit.
    let reserved = format!("{ns}.order.inventory-reserved");
    channel
        .queue_delete(reserved.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    for (name, value) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
        ("x-dead-letter-exchange", &format!("{ns}.dead-letters")),
        ("x-dead-letter-routing-key", &reserved),
    ] {
        args.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(reserved.as_str().into(), durable, args)
        .await
        .unwrap();
    channel
        .queue_bind(
            reserved.as_str().into(),
            format!("{ns}.events").as_str().into(),
            "inventory.reserved".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // 3. The dead-letter intake's last-resort queue comes back as a classic queue.
    let dlq = format!("{ns}.order.dead-letters.dlq");
    channel
        .queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    channel
        .queue_declare(dlq.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    // 4. Order's first retry queue is gone.
    let gone = format!("{ns}.order.retry.1");
    channel
        .queue_delete(gone.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    conn.close(200, "ok".into()).await.ok();

    let found: Vec<String> = problems(management.verify(&topology(&ns), Service::Order).await)
        .iter()
        .map(ToString::to_string)
        .collect();
    let expected = [
        format!("queue `{reserved}` x-delivery-limit: expected 20, found 5"),
        format!("queue `{dlq}` x-queue-type: expected \"quorum\", found \"classic\""),
        format!("queue `{gone}`: expected a durable quorum queue, found none"),
        format!(
            "binding `{ns}.events` -> `{ns}.order.payment-failed` (key `payment.failed`): expected present, found none"
        ),
    ];
    let mut sorted = found.clone();
    sorted.sort();
    let mut wanted = expected.to_vec();
    wanted.sort();
    assert_eq!(sorted, wanted, "every break, and nothing else");
    // Payment checks only its own part, which none of the four breaks touched.
    let payment = management.verify(&topology(&ns), Service::Payment).await;
    assert!(payment.is_ok(), "{payment:?}");

    // The real binary: one error line listing all of them, exit code 78, no retry loop.
    let process = Process::spawn(
        &ns,
        deployment.dir.path(),
        &[
            "--services",
            "order",
            "--declare-topology",
            "verify",
            "--management-url",
            &management_url(),
        ],
        &[],
    );
    let (status, logs) = process.exit().await;
    let failed: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|json| json["message"] == "orderflow-server failed.")
        .collect();
    assert_eq!(status.code(), Some(78), "{logs:#?}");
    assert_eq!(failed.len(), 1, "{logs:#?}");
    let error = failed[0]["error"].as_str().unwrap();
    eprintln!("verify error: {error}");
    assert!(error.contains("(4 problems)"), "{error}");
    for problem in &expected {
        assert!(
            error.contains(problem.as_str()),
            "{problem} missing in {error}"
        );
    }
    let retries = logs
        .iter()
        .filter(|l| l.contains("Cannot use RabbitMQ yet; retrying."))
        .count();
    assert_eq!(retries, 0, "a wrong topology is not retried: {logs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_namespace_fails_the_app_without_retrying() {
    let namespace = unique_namespace();
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::test_config(&namespace, dir.path());
    config.declare_topology = DeclareTopology::Verify;
    config.services = vec![Service::Payment];
    management().await;
    let app = orderflow_server::app::App::build(config).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(WAIT, app.run(shutdown.clone()))
        .await
        .expect("the app stops by itself");
    let error = result.expect_err("a missing topology is an error");
    assert!(
        orderflow_server::bus::is_configuration_error(&error),
        "{error:#}"
    );
    let text = format!("{error:#}");
    assert!(
        text.contains(&format!(
            "queue `{namespace}.payment.inventory-reserved`: expected a durable quorum queue, found none"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_or_management_api_is_retried() {
    let deployment = Deployment::new();
    declare(&deployment.namespace).await;
    // Ports nobody listens on (bound, then released).
    let closed = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let no_management = format!("http://127.0.0.1:{}", closed());
    let no_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed());
    let cases = [
        (
            "management API",
            vec!["--management-url", no_management.as_str()],
        ),
        (
            "AMQP",
            vec![
                "--amqp-url",
                no_broker.as_str(),
                "--management-url",
                no_management.as_str(),
            ],
        ),
    ];
    for (what, extra) in cases {
        let mut args = vec!["--services", "payment", "--declare-topology", "verify"];
        args.extend(extra);
        let mut process = Process::spawn(&deployment.namespace, deployment.dir.path(), &args, &[]);
        crate::helpers::eventually(&format!("retries while the {what} is unreachable"), || {
            std::future::ready(process.logged("Cannot use RabbitMQ yet; retrying.").len() >= 3)
        })
        .await;
        assert!(
            process.child.try_wait().unwrap().is_none(),
            "still running while the {what} is unreachable"
        );
        let retry = &process.logged("Cannot use RabbitMQ yet; retrying.")[0];
        if what == "management API" {
            assert!(
                retry["error"].as_str().unwrap().contains("management API"),
                "{retry}"
            );
            assert!(
                retry["hint"]
                    .as_str()
                    .unwrap()
                    .contains("rabbitmq_management"),
                "{retry}"
            );
        }
        process.child.kill().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_management_login_is_a_configuration_error() {
    management().await;
    let node = amqp_url().parse().expect("AMQP_URL parses");
    let mut url = url::Url::parse(&management_url()).unwrap();
    url.set_username("orderflow-nobody").unwrap();
    url.set_password(Some("wrong")).unwrap();
    let url = url.as_str().parse().unwrap();
    let management = Management::new(&node, Some(&url), None).unwrap();
    let error = management
        .verify(&topology(&unique_namespace()), Service::Payment)
        .await
        .expect_err("a wrong password is refused");
    assert!(
        matches!(&error, VerifyError::Refused { status: 401, user, .. } if user == "orderflow-nobody"),
        "{error:?}"
    );
    assert!(error.is_configuration());
    assert!(!format!("{error} {error:?}").contains("wrong"), "{error:?}");
}
