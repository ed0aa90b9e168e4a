//! Recoverability in the trace, from the real binary to a real OTLP receiver, at the default
//! log level: a retry and a dead-lettering are spans of the message's trace, with the attempt,
//! the delay, the reason and the error; a replay is a span of the replaying request's trace,
//! linked to the trace the message failed in; and their log lines carry the trace id.

use orderflow_proto::orderflow::v1::{
    self as pb, OrderStatus, dead_letters_client::DeadLettersClient,
};

use crate::{
    helpers::{WAIT, collector, connect, order_request, wait_for_status},
    otlp::{ReceivedSpan, SpanKind},
    process::{Deployment, Server},
};

fn random_hex(bytes: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..bytes * 2].to_owned()
}

/// `request` as a traced client sends it: with a W3C `traceparent` of a new trace; returns the
/// trace id.
fn traced<T>(request: T) -> (tonic::Request<T>, String) {
    let trace_id = random_hex(16);
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{}-01", random_hex(8))
            .parse()
            .unwrap(),
    );
    (request, trace_id)
}

/// The one span of `spans` named `name`, or a failure listing what did arrive.
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "one span {name}; the trace has {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

/// `spans` as an indented tree, printed with `--nocapture`: what a reader of the trace sees.
fn outline(spans: &[ReceivedSpan]) -> String {
    fn walk(spans: &[ReceivedSpan], parent: &str, depth: usize, out: &mut String) {
        for span in spans.iter().filter(|s| s.parent_span_id == parent) {
            let mut keys: Vec<_> = span
                .attributes
                .iter()
                .filter(|(k, _)| k.starts_with("retry.") || k.starts_with("dead_letter."))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            keys.sort();
            let links: Vec<_> = span
                .links
                .iter()
                .map(|(t, s)| format!("link {t}/{s}"))
                .collect();
            out.push_str(&format!(
                "{:indent$}{} [{}]{} {} {}\n",
                "",
                span.name,
                span.service_name,
                if span.status_error { " ERROR" } else { "" },
                keys.join(" "),
                links.join(" "),
                indent = depth * 2
            ));
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    // Roots hang off a parent outside the trace's received spans (the calling client's).
    let outside: std::collections::BTreeSet<&str> = spans
        .iter()
        .map(|s| s.parent_span_id.as_str())
        .filter(|parent| !ids.contains(parent))
        .collect();
    let mut out = String::new();
    for parent in outside {
        walk(spans, parent, 0, &mut out);
    }
    out
}

/// The trace id on the log lines `message` about `order_id`.
fn logged_trace_ids(server: &Server, message: &str, order_id: &str) -> Vec<String> {
    let lines: Vec<serde_json::Value> = server
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    lines
        .iter()
        .filter(|line| line["message"] == message && line["order.id"] == order_id)
        .map(|line| line["trace_id"].as_str().unwrap_or("none").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_dead_letters_and_replays_are_spans_and_their_logs_carry_the_trace() {
    let endpoint = collector().endpoint();
    let deployment = Deployment::new();
    let ns = deployment.namespace.clone();
    // Inventory fails its first message for good; Payment fails each message's first attempt.
    let server = deployment
        .start(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                (
                    "ORDERFLOW_FAULTS",
                    "inventory:permanent:1,payment:transient:1",
                ),
            ],
        )
        .await;
    let orders = server.client().await;
    let (request, failed_trace) = traced(order_request("alice", &[("KB-001", 1)]));
    let failed = orders
        .clone()
        .place_order(request)
        .await
        .unwrap()
        .into_inner();
    wait_for_status(&orders, &failed.order_id, OrderStatus::Failed).await;
    let (request, retried_trace) = traced(order_request("bob", &[("KB-001", 1)]));
    let retried = orders
        .clone()
        .place_order(request)
        .await
        .unwrap()
        .into_inner();
    wait_for_status(&orders, &retried.order_id, OrderStatus::Completed).await;

    // The retry: a span between the failed attempt and the next one.
    let payment = format!("{ns}.payment.inventory-reserved");
    let retry_name = format!("retry {payment}");
    let process_name = format!("process {payment}");
    let spans = collector()
        .wait_for_trace(&retried_trace, WAIT, |spans| {
            spans.iter().filter(|s| s.name == process_name).count() == 2
                && spans.iter().any(|s| s.name == retry_name)
        })
        .await;
    println!("retried order, trace {retried_trace}:\n{}", outline(&spans));
    let retry = one(&spans, &retry_name);
    assert_eq!(
        (retry.kind, retry.service_name.as_str()),
        (SpanKind::Producer, "payment-service")
    );
    let attribute = |span: &ReceivedSpan, key: &str| span.attributes.get(key).cloned();
    assert_eq!(
        attribute(retry, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(retry, "messaging.operation.name").as_deref(),
        Some("retry")
    );
    assert!(
        attribute(retry, "messaging.destination.name").is_some_and(|d| d.starts_with(&ns)),
        "{retry:?}"
    );
    assert_eq!(
        attribute(retry, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some(payment.as_str())
    );
    assert!(attribute(retry, "messaging.message.id").is_some_and(|id| !id.is_empty()));
    assert_eq!(
        attribute(retry, "order.id").as_deref(),
        Some(retried.order_id.as_str())
    );
    assert_eq!(attribute(retry, "retry.attempt").as_deref(), Some("1"));
    let delay: u64 = attribute(retry, "retry.delay_ms").unwrap().parse().unwrap();
    assert!(delay > 0, "{retry:?}");
    assert_eq!(attribute(retry, "error.type").as_deref(), Some("transient"));
    let (_, exception) = retry
        .events
        .iter()
        .find(|(name, _)| name == "exception")
        .expect("the error, as an exception event");
    assert!(
        exception["exception.message"].contains("injected Transient"),
        "{exception:?}"
    );
    assert!(!retry.status_error, "a retry is recovery, not failure");
    // The second attempt continues from the retry.
    let second = spans
        .iter()
        .find(|s| s.name == process_name && s.parent_span_id == retry.span_id)
        .expect("the next attempt is the retry's child");
    assert!(!second.status_error, "{second:?}");

    // The dead-lettering: a failed span with the reason, which the intake continues.
    let inventory = format!("{ns}.inventory.order-created");
    let dead_name = format!("dead-letter {inventory}");
    let intake = format!("process {ns}.order.dead-letters");
    let spans = collector()
        .wait_for_trace(&failed_trace, WAIT, |spans| {
            spans.iter().any(|s| s.name == dead_name) && spans.iter().any(|s| s.name == intake)
        })
        .await;
    println!(
        "dead-lettered order, trace {failed_trace}:\n{}",
        outline(&spans)
    );
    let dead = one(&spans, &dead_name);
    assert_eq!(
        (dead.kind, dead.service_name.as_str()),
        (SpanKind::Producer, "inventory-service")
    );
    assert!(dead.status_error, "{dead:?}");
    assert_eq!(
        attribute(dead, "dead_letter.reason").as_deref(),
        Some("permanent-error")
    );
    assert_eq!(
        attribute(dead, "dead_letter.attempts").as_deref(),
        Some("1")
    );
    assert_eq!(
        attribute(dead, "messaging.operation.name").as_deref(),
        Some("dead-letter")
    );
    assert!(
        dead.events
            .iter()
            .any(|(name, attributes)| name == "exception"
                && attributes["exception.message"].contains("injected Permanent"))
    );
    assert_eq!(one(&spans, &intake).parent_span_id, dead.span_id);

    // The replay: in the operator's trace, linked to the one the message failed in.
    let mut dead_letters = DeadLettersClient::new(connect(server.addr).await);
    let (request, replay_trace) = traced(pb::ReplayRequest {
        queue: "inventory.order-created".into(),
        message_ids: vec![],
        all: true,
    });
    let replayed = dead_letters.replay(request).await.unwrap().into_inner();
    assert_eq!(replayed.replayed.len(), 1, "{replayed:?}");
    wait_for_status(&orders, &failed.order_id, OrderStatus::Completed).await;
    let replay_name = format!("replay {inventory}");
    let process_inventory = format!("process {inventory}");
    let spans = collector()
        .wait_for_trace(&replay_trace, WAIT, |spans| {
            spans.iter().any(|s| s.name == replay_name)
                && spans.iter().any(|s| s.name == process_inventory)
        })
        .await;
    println!("replay, trace {replay_trace}:\n{}", outline(&spans));
    let replay = one(&spans, &replay_name);
    assert_eq!(replay.service_name, "order-service");
    assert_eq!(
        attribute(replay, "order.id").as_deref(),
        Some(failed.order_id.as_str())
    );
    assert_eq!(
        replay.links,
        vec![(failed_trace.clone(), dead.span_id.clone())],
        "linked to the dead-lettering in the original trace"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.name == process_inventory && s.service_name == "inventory-service"),
        "the replayed message is handled in the replay's trace"
    );

    // Each log line about it carries its trace.
    let retried_lines = logged_trace_ids(
        &server,
        "Handling failed; retrying after a delay.",
        &retried.order_id,
    );
    assert_eq!(retried_lines, [retried_trace]);
    let dead_lines = logged_trace_ids(&server, "Dead-lettered a message.", &failed.order_id);
    assert_eq!(dead_lines, [failed_trace]);
    let replay_lines = logged_trace_ids(&server, "Replaying a dead letter.", &failed.order_id);
    assert_eq!(replay_lines, [replay_trace]);
    server.stop().await;
}
