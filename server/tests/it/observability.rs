//! Traces, metrics and deployment definitions: one trace per order across gRPC and RabbitMQ,
//! received by a real OTLP receiver; the Prometheus endpoint scraped over HTTP; the RabbitMQ
//! definitions file docker-compose loads checked against the topology the code declares.

use std::time::Duration;

use futures_util::StreamExt as _;
use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use orderflow_server::{bus::Topology, fault::parse_rules};

use crate::{
    helpers::{WAIT, collector, order_request, raw_connection, scrape, series, spawn_app_with},
    otlp::{ReceivedSpan, SpanKind},
    tap::tap,
};

fn random_hex(bytes: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..bytes * 2].to_owned()
}

/// PlaceOrder as a traced client would call it: with a W3C `traceparent` in the metadata.
async fn place_traced(
    app: &crate::helpers::TestApp,
    trace_id: &str,
    parent: &str,
    items: &[(&str, u32)],
) -> pb::Order {
    let mut request = tonic::Request::new(order_request("alice", items));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    app.client
        .clone()
        .place_order(request)
        .await
        .expect("PlaceOrder")
        .into_inner()
}

fn find<'a>(
    spans: &'a [ReceivedSpan],
    kind: SpanKind,
    name: &str,
    service: &str,
) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.kind == kind && s.name == name && s.service_name == service)
        .unwrap_or_else(|| {
            let seen: Vec<_> = spans
                .iter()
                .map(|s| (&s.service_name, s.kind, &s.name))
                .collect();
            panic!("no {kind:?} span `{name}` from {service}; got {seen:#?}")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_order_across_grpc_and_the_broker() {
    let app = spawn_app_with(|_| {}).await;
    let ns = app.namespace.clone();
    let conn = raw_connection().await;
    let mut events = tap(&conn, &format!("{ns}.events"), "#").await;
    let (trace_id, client_span) = (random_hex(16), random_hex(8));

    let placed = place_traced(&app, &trace_id, &client_span, &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed
    );

    // On the wire: every event carries a traceparent of this trace.
    for _ in 0..3 {
        let delivery = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let headers = delivery.properties.headers().clone().unwrap();
        let traceparent = orderflow_server::bus::message::header_str(&headers, "traceparent")
            .unwrap()
            .to_owned();
        assert!(
            traceparent.starts_with(&format!("00-{trace_id}-")),
            "{traceparent}"
        );
    }

    let events_exchange = format!("publish {ns}.events");
    let spans = collector()
        .wait_for_trace(&trace_id, WAIT, |spans| {
            spans
                .iter()
                .filter(|s| s.kind == SpanKind::Consumer)
                .count()
                >= 4
                && spans
                    .iter()
                    .filter(|s| s.kind == SpanKind::Producer)
                    .count()
                    >= 3
        })
        .await;

    let server = find(
        &spans,
        SpanKind::Server,
        "orderflow.v1.OrderService/PlaceOrder",
        "order-service",
    );
    assert_eq!(
        server.parent_span_id, client_span,
        "continues the client's trace"
    );
    assert_eq!(server.attributes["rpc.system"], "grpc");
    assert_eq!(
        server.attributes["rpc.service"],
        "orderflow.v1.OrderService"
    );
    assert_eq!(server.attributes["rpc.method"], "PlaceOrder");
    assert_eq!(server.attributes["rpc.grpc.status_code"], "0");
    assert_eq!(server.attributes["order.id"], placed.order_id);

    let producers: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Producer && s.name == events_exchange)
        .collect();
    let by_key = |key: &str| -> &ReceivedSpan {
        producers
            .iter()
            .find(|s| {
                s.attributes
                    .get("messaging.rabbitmq.destination.routing_key")
                    .map(String::as_str)
                    == Some(key)
            })
            .unwrap_or_else(|| panic!("no publish span for {key}"))
    };
    let created = by_key("order.created");
    let reserved = by_key("inventory.reserved");
    let processed = by_key("payment.processed");
    assert_eq!(created.service_name, "order-service");
    assert_eq!(
        created.parent_span_id, server.span_id,
        "published from the PlaceOrder call"
    );
    assert_eq!(reserved.service_name, "inventory-service");
    assert_eq!(processed.service_name, "payment-service");

    let inventory = find(
        &spans,
        SpanKind::Consumer,
        &format!("process {ns}.inventory.order-created"),
        "inventory-service",
    );
    let payment = find(
        &spans,
        SpanKind::Consumer,
        &format!("process {ns}.payment.inventory-reserved"),
        "payment-service",
    );
    let order_reserved = find(
        &spans,
        SpanKind::Consumer,
        &format!("process {ns}.order.inventory-reserved"),
        "order-service",
    );
    let order_paid = find(
        &spans,
        SpanKind::Consumer,
        &format!("process {ns}.order.payment-processed"),
        "order-service",
    );
    // Each RabbitMQ hop: the consumer's span is a child of the publish that sent the message,
    // and the next publish a child of that processing.
    assert_eq!(inventory.parent_span_id, created.span_id);
    assert_eq!(reserved.parent_span_id, inventory.span_id);
    assert_eq!(payment.parent_span_id, reserved.span_id);
    assert_eq!(order_reserved.parent_span_id, reserved.span_id);
    assert_eq!(processed.parent_span_id, payment.span_id);
    assert_eq!(order_paid.parent_span_id, processed.span_id);

    for span in [
        created,
        reserved,
        processed,
        inventory,
        payment,
        order_reserved,
        order_paid,
    ] {
        assert_eq!(span.trace_id, trace_id);
        assert_eq!(span.attributes["messaging.system"], "rabbitmq");
        assert!(span.attributes.contains_key("messaging.destination.name"));
        assert!(span.attributes.contains_key("messaging.message.id"));
        assert!(span.attributes.contains_key("messaging.operation.type"));
        assert_eq!(
            span.attributes["messaging.message.conversation_id"],
            placed.order_id
        );
        assert!(!span.status_error);
    }
    assert_eq!(
        inventory.attributes["messaging.destination.name"],
        format!("{ns}.inventory.order-created")
    );
    assert_eq!(inventory.attributes["messaging.operation.type"], "process");
    assert_eq!(
        created.attributes["messaging.destination.name"],
        format!("{ns}.events")
    );
    assert_eq!(
        inventory.attributes["messaging.message.id"],
        created.attributes["messaging.message.id"]
    );
    assert_eq!(created.resource["service.name"], "order-service");
    conn.close(200, "ok".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_marks_its_span_and_records_the_exception() {
    let app = spawn_app_with(|c| c.faults = parse_rules("payment:permanent:1").unwrap()).await;
    let (trace_id, client_span) = (random_hex(16), random_hex(8));
    let placed = place_traced(&app, &trace_id, &client_span, &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Failed
    );
    let name = format!("process {}.payment.inventory-reserved", app.namespace);
    let spans = collector()
        .wait_for_trace(&trace_id, WAIT, |spans| {
            spans.iter().any(|s| s.name == name)
        })
        .await;
    let failed = find(&spans, SpanKind::Consumer, &name, "payment-service");
    assert!(failed.status_error, "{failed:?}");
    let (event, attributes) = failed
        .events
        .iter()
        .find(|(n, _)| n == "exception")
        .expect("exception event");
    assert_eq!(event, "exception");
    assert!(
        attributes["exception.message"].contains("injected Permanent fault"),
        "{attributes:?}"
    );
    // The dead letter keeps the context: the order service's handling of it is in the trace.
    let watcher = format!("process {}.order.dead-letters", app.namespace);
    let spans = collector()
        .wait_for_trace(&trace_id, WAIT, |spans| {
            spans.iter().any(|s| s.name == watcher)
        })
        .await;
    find(&spans, SpanKind::Consumer, &watcher, "order-service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let app = spawn_app_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = app.metrics_addr.expect("metrics served");
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.place(&format!("c{i}"), &[("KB-001", 1)]).await.order_id);
    }
    ids.push(app.place("c9", &[("NOPE", 1)]).await.order_id);
    for id in &ids {
        app.terminal(id).await;
    }
    // The last transitions are counted after commit; give the relays a moment too.
    let mut last;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        last = series(&scrape(addr).await);
        let done = last.get("orderflow_orders_finished_total{status=\"completed\"}") == Some(&3.0)
            && last.get("orderflow_events_published_total{service=\"payment-service\",type=\"orderflow.v1.PaymentProcessed\"}")
                == Some(&3.0);
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = |name: &str| {
        last.get(name)
            .copied()
            .unwrap_or_else(|| panic!("{name} missing from {last:#?}"))
    };
    assert_eq!(m("orderflow_orders_placed_total"), 4.0);
    assert_eq!(
        m("orderflow_orders_finished_total{status=\"completed\"}"),
        3.0
    );
    assert_eq!(
        m("orderflow_orders_finished_total{status=\"rejected\"}"),
        1.0
    );
    assert_eq!(
        m(
            "orderflow_events_published_total{service=\"order-service\",type=\"orderflow.v1.OrderCreated\"}"
        ),
        4.0
    );
    assert_eq!(
        m(
            "orderflow_events_consumed_total{service=\"inventory-service\",type=\"orderflow.v1.OrderCreated\"}"
        ),
        4.0
    );
    assert_eq!(
        m(
            "orderflow_events_published_total{service=\"inventory-service\",type=\"orderflow.v1.InventoryRejected\"}"
        ),
        1.0
    );
    assert_eq!(m("orderflow_saga_duration_seconds_count"), 4.0);
    for service in ["order-service", "inventory-service", "payment-service"] {
        assert_eq!(
            m(&format!(
                "orderflow_outbox_backlog{{service=\"{service}\"}}"
            )),
            0.0
        );
        assert_eq!(
            m(&format!(
                "orderflow_broker_connected{{service=\"{service}\"}}"
            )),
            1.0
        );
    }
    assert_eq!(
        m(&format!(
            "orderflow_dlq_depth{{queue=\"{}.inventory.order-created.dlq\"}}",
            app.namespace
        )),
        0.0
    );
    let handled: f64 = last
        .iter()
        .filter(|(k, _)| k.starts_with("orderflow_handler_duration_seconds_count"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        handled >= 4.0 + 3.0 + 3.0 + 4.0,
        "every delivery timed: {handled}"
    );
    // Every handled delivery came in a batch of its queue's consumer.
    for (key, handled) in last
        .iter()
        .filter(|(k, _)| k.starts_with("orderflow_handler_duration_seconds_count{"))
    {
        let labels = key.trim_start_matches("orderflow_handler_duration_seconds_count");
        let taken = m(&format!("orderflow_consumer_batch_size_sum{labels}"));
        let batches = m(&format!("orderflow_consumer_batch_size_count{labels}"));
        assert!(
            taken >= *handled && batches >= 1.0 && batches <= taken,
            "{labels}: {handled} handled, {taken} taken in {batches} batches"
        );
    }
}

/// The definitions docker-compose's RabbitMQ loads must match the code's topology exactly
/// (the services run with `--declare-topology verify` there): compared with the same spec and
/// the same comparison verify uses, exchanges, queue arguments and bindings included.
#[test]
fn compose_definitions_match_the_declared_topology() {
    use orderflow_server::bus::topology::spec::{self, Argument, Found, FoundExchange, FoundQueue};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/rabbitmq/definitions.json"
    );
    let definitions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let list = |key: &str| definitions[key].as_array().unwrap().clone();
    let mut found = Found::default();
    for exchange in list("exchanges") {
        found.exchanges.insert(
            exchange["name"].as_str().unwrap().to_owned(),
            FoundExchange {
                kind: exchange["type"].as_str().unwrap().to_owned(),
                durable: exchange["durable"] == true,
            },
        );
    }
    for queue in list("queues") {
        let arguments = queue["arguments"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    serde_json::Value::String(s) => Argument::Str(s.clone()),
                    other => other
                        .as_i64()
                        .map_or_else(|| Argument::Other(other.to_string()), Argument::Int),
                };
                (name.clone(), value)
            })
            .collect();
        found.queues.insert(
            queue["name"].as_str().unwrap().to_owned(),
            FoundQueue {
                durable: queue["durable"] == true,
                arguments,
                bindings: Default::default(),
            },
        );
    }
    for binding in list("bindings") {
        assert_eq!(binding["destination_type"], "queue", "{binding}");
        let queue = found
            .queues
            .get_mut(binding["destination"].as_str().unwrap())
            .unwrap_or_else(|| panic!("binding to an undefined queue: {binding}"));
        queue.bindings.insert((
            binding["source"].as_str().unwrap().to_owned(),
            binding["routing_key"].as_str().unwrap().to_owned(),
        ));
    }
    let spec = Topology::new("orderflow", 4, 20).spec();
    let mismatches: Vec<String> = spec::compare(&spec, &found)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert_eq!(
        (found.exchanges.len(), found.queues.len()),
        (spec.exchanges.len(), spec.queues.len()),
        "nothing the code does not declare"
    );
}
