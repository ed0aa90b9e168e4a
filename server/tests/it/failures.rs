//! Failure handling against the real broker: delayed retries with growing backoff, dead letters
//! with their context, poison messages, exactly-once effects under duplicates, replay, FAILED
//! orders, and the broker's delivery limit for messages that are never acknowledged.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use orderflow_server::{
    bus::{message::header_str, topology::header},
    fault::parse_rules,
    service::Service,
};
use prost::Message as _;

use crate::{
    helpers::{WAIT, eventually, publish_raw, raw_connection, spawn_app_with, statuses},
    tap::tap,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_with_growing_delays_then_succeed() {
    let app = spawn_app_with(|c| {
        c.faults = parse_rules("payment:transient:3").unwrap();
        c.retry_max_attempts = 5;
        c.retry_initial_delay = Duration::from_millis(200);
        c.retry_max_delay = Duration::from_secs(5);
    })
    .await;
    let conn = raw_connection().await;
    // Every retry copy passes through the fanout exchange of its level: tap them all.
    let mut taps = Vec::new();
    for level in 1..=4 {
        taps.push(
            tap(
                &conn,
                &app.topology().retry_queue(Service::Payment, level),
                "",
            )
            .await,
        );
    }
    let mut retries = futures_util::stream::select_all(taps);

    let start = Instant::now();
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let delivery = tokio::time::timeout(WAIT, retries.next())
            .await
            .expect("retry in time")
            .unwrap()
            .unwrap();
        let p = &delivery.properties;
        let attempt = p
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(header::ATTEMPT))
            .and_then(orderflow_server::bus::message::as_u64);
        let expiration: u64 = p
            .expiration()
            .as_ref()
            .expect("backoff as per-message TTL")
            .as_str()
            .parse()
            .unwrap();
        seen.push((start.elapsed(), attempt.unwrap(), expiration));
    }
    let order = app.terminal(&placed.order_id).await;
    let done = start.elapsed();
    assert_eq!(
        order.status(),
        OrderStatus::Completed,
        "succeeds after the retries"
    );

    // The attempt number travels in a header; the backoff doubles from 200 ms (±20% jitter).
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), vec![2, 3, 4]);
    for ((_, _, expiration), base) in seen.iter().zip([200u64, 400, 800]) {
        assert!(
            (base * 8 / 10..=base * 12 / 10).contains(expiration),
            "delay {expiration} ms for base {base}"
        );
    }
    // And the delays really elapse: each retry is published only after the previous delay.
    for pair in seen.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(pair[0].2 * 9 / 10),
            "gap {gap:?} shorter than delay {} ms",
            pair[0].2
        );
    }
    let last_delay = Duration::from_millis(seen[2].2);
    assert!(
        done >= seen[2].0 + last_delay.mul_f64(0.9),
        "completed {done:?} before the last delay elapsed"
    );
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 0);
    conn.close(200, "ok".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_with_context_and_fail_the_order() {
    let app = spawn_app_with(|c| {
        c.faults = parse_rules("inventory:transient:100").unwrap();
        c.retry_max_attempts = 3;
        c.retry_initial_delay = Duration::from_millis(50);
    })
    .await;
    let mut watch_client = app.client.clone();
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let mut stream = watch_client
        .watch_order(pb::WatchOrderRequest {
            order_id: placed.order_id.clone(),
            resume_after_version: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let mut updates = Vec::new();
    while let Some(update) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("update in time")
        .unwrap()
    {
        updates.push(update);
    }
    assert_eq!(
        statuses(&updates),
        vec![OrderStatus::Pending, OrderStatus::Failed],
        "the watch says so"
    );
    assert!(updates.last().unwrap().terminal);

    let order = app.get(&placed.order_id).await;
    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(
        order.failure_reason.contains(
            "inventory-service could not process orderflow.v1.OrderCreated after 3 attempt(s)"
        ),
        "{}",
        order.failure_reason
    );

    let listed = app.dead_letters_in("inventory.order-created", 1).await;
    let dead = &listed[0];
    assert_eq!(dead.attempts, 3, "exactly the configured attempts");
    assert_eq!(dead.reason, "max-attempts");
    assert_eq!(dead.order_id, placed.order_id);
    assert_eq!(dead.r#type, "orderflow.v1.OrderCreated");
    assert!(
        dead.last_error.contains("injected Transient fault"),
        "{}",
        dead.last_error
    );
    assert_eq!(dead.failing_service, "inventory-service");
    assert_eq!(dead.original_exchange, format!("{}.events", app.namespace));
    assert_eq!(dead.original_routing_key, "order.created");
    let (first, last) = (
        dead.first_failure_at.unwrap(),
        dead.last_failure_at.unwrap(),
    );
    assert!(
        (first.seconds, first.nanos) < (last.seconds, last.nanos),
        "first failure before last"
    );
    assert!(
        dead.headers.contains_key("traceparent"),
        "trace context kept: {:?}",
        dead.headers
    );
    // Body untouched: it still decodes as the original event.
    let event = pb::OrderCreated::decode(dead.payload.as_slice()).unwrap();
    assert_eq!(event.order_id, placed.order_id);
    assert!(
        dead.payload_json.contains("\"customerId\":\"alice\""),
        "{}",
        dead.payload_json
    );
    // Nothing was reserved.
    assert_eq!(app.stock().await["KB-001"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_while_orders_keep_flowing() {
    let app = spawn_app_with(|_| {}).await;
    let conn = raw_connection().await;
    let work = format!("{}.inventory.order-created", app.namespace);
    // Garbage with a plausible type, garbage with no properties at all, and an unknown type.
    let poison = [
        (
            b"\xff\x00garbage".to_vec(),
            BasicProperties::default()
                .with_message_id("poison-1".into())
                .with_type("orderflow.v1.OrderCreated".into()),
        ),
        (b"not even protobuf".to_vec(), BasicProperties::default()),
        (
            b"{}".to_vec(),
            BasicProperties::default()
                .with_message_id("poison-3".into())
                .with_type("acme.Unknown".into()),
        ),
    ];
    for (body, properties) in &poison {
        publish_raw(&conn, "", &work, body, properties.clone()).await;
    }
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed,
        "consumer kept serving"
    );

    let listed = app.dead_letters_in("inventory.order-created", 3).await;
    for dead in &listed {
        assert_eq!(dead.reason, "permanent-error", "{dead:?}");
        assert_eq!(dead.attempts, 1, "poison is not retried");
        assert!(dead.payload_json.is_empty());
    }
    let bodies: Vec<&[u8]> = listed.iter().map(|d| d.payload.as_slice()).collect();
    assert!(
        bodies.contains(&&b"\xff\x00garbage"[..]),
        "bodies are untouched"
    );
    let unknown = listed.iter().find(|d| d.message_id == "poison-3").unwrap();
    assert!(
        unknown.last_error.contains("acme.Unknown"),
        "{}",
        unknown.last_error
    );
    assert!(
        unknown.decode_error.contains("unknown message type"),
        "{}",
        unknown.decode_error
    );
    conn.close(200, "ok".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_deliveries_have_one_effect() {
    let app = spawn_app_with(|_| {}).await;
    let conn = raw_connection().await;
    let events = format!("{}.events", app.namespace);
    let mut reserved_tap = tap(&conn, &events, "inventory.reserved").await;
    let mut processed_tap = tap(&conn, &events, "payment.processed").await;
    let mut created_tap = tap(&conn, &events, "order.created").await;

    let placed = app.place("alice", &[("KB-001", 3)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed
    );
    assert_eq!(app.stock().await["KB-001"], 97);
    let created = tokio::time::timeout(WAIT, created_tap.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let reserved = tokio::time::timeout(WAIT, reserved_tap.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, processed_tap.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The same OrderCreated redelivered twice, and once more under a new message id (a
    // producer that retried its publish): stock must not move.
    let inventory_queue = format!("{}.inventory.order-created", app.namespace);
    for _ in 0..2 {
        publish_raw(
            &conn,
            "",
            &inventory_queue,
            &created.data,
            created.properties.clone(),
        )
        .await;
    }
    let renamed = created
        .properties
        .clone()
        .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into());
    publish_raw(&conn, "", &inventory_queue, &created.data, renamed).await;
    // The same InventoryReserved twice to Payment: no second charge.
    let payment_queue = format!("{}.payment.inventory-reserved", app.namespace);
    for _ in 0..2 {
        publish_raw(
            &conn,
            "",
            &payment_queue,
            &reserved.data,
            reserved.properties.clone(),
        )
        .await;
    }

    // Let the duplicates be consumed, then check nothing happened twice.
    eventually("duplicates consumed", || async {
        let channel = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let a = channel
            .queue_declare(
                inventory_queue.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await
            .unwrap();
        let b = channel
            .queue_declare(
                payment_queue.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel.close(200, "ok".into()).await.ok();
        a.message_count() == 0 && b.message_count() == 0 && a.consumer_count() > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.stock().await["KB-001"], 97, "reserved once");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), reserved_tap.next())
            .await
            .is_err(),
        "no second InventoryReserved"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), processed_tap.next())
            .await
            .is_err(),
        "no second charge"
    );
    let payments = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        app.db_path(Service::Payment).display()
    ))
    .await
    .unwrap();
    let (charges,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM payments")
        .fetch_one(&payments)
        .await
        .unwrap();
    assert_eq!(charges, 1);
    let order = app.get(&placed.order_id).await;
    assert_eq!(order.history.len(), 3, "no extra transitions");
    assert_eq!(
        app.dlq_depth("inventory.order-created").await,
        0,
        "duplicates are acknowledged, not dead-lettered"
    );
    conn.close(200, "ok".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_fault_is_gone_completes_the_order() {
    // The first payment fails permanently; later ones succeed, as after a fix.
    let app = spawn_app_with(|c| c.faults = parse_rules("payment:permanent:1").unwrap()).await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let failed = app.terminal(&placed.order_id).await;
    assert_eq!(failed.status(), OrderStatus::Failed);
    assert!(
        failed.failure_reason.contains("payment-service"),
        "{}",
        failed.failure_reason
    );

    let mut dead_letters = app.dead_letters();
    let listed = dead_letters
        .list_dead_letters(pb::ListDeadLettersRequest {
            queue: "payment.inventory-reserved".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let id = listed.dead_letters[0].message_id.clone();
    let shown = dead_letters
        .get_dead_letter(pb::GetDeadLetterRequest {
            queue: format!("{}.payment.inventory-reserved.dlq", app.namespace),
            message_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.reason, "permanent-error");

    let replayed = dead_letters
        .replay(pb::ReplayRequest {
            queue: "payment.inventory-reserved".into(),
            message_ids: vec![id.clone()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, vec![id.clone()]);
    let updates = app.watch_from(&placed.order_id, Some(failed.version)).await;
    assert_eq!(statuses(&updates), vec![OrderStatus::Completed]);
    let order = app.get(&placed.order_id).await;
    assert_eq!(order.failure_reason, "", "cleared once completed");
    assert!(order.transaction_id.is_some());

    // It is gone from the DLQ: a second replay finds nothing, and nothing is charged twice.
    let again = dead_letters
        .replay(pb::ReplayRequest {
            queue: "payment.inventory-reserved".into(),
            message_ids: vec![id.clone()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed.is_empty());
    assert_eq!(again.not_found, vec![id]);
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_and_purges_never_duplicate_or_lose() {
    let app = spawn_app_with(|c| c.faults = parse_rules("payment:permanent:6").unwrap()).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(app.place(&format!("c{i}"), &[("CB-005", 1)]).await.order_id);
    }
    for id in &ids {
        assert_eq!(app.terminal(id).await.status(), OrderStatus::Failed);
    }
    // The dead-letter queue's count can trail the copy that failed the order by a moment.
    eventually("six dead letters", || async {
        app.dlq_depth("payment.inventory-reserved").await == 6
    })
    .await;

    let request = || pb::ReplayRequest {
        queue: "payment.inventory-reserved".into(),
        message_ids: vec![],
        all: true,
    };
    let (mut a, mut b) = (app.dead_letters(), app.dead_letters());
    let (ra, rb) = tokio::join!(a.replay(request()), b.replay(request()));
    let mut replayed: Vec<String> = ra.unwrap().into_inner().replayed;
    replayed.extend(rb.unwrap().into_inner().replayed);
    replayed.sort();
    let before = replayed.len();
    replayed.dedup();
    assert_eq!(before, replayed.len(), "no message replayed twice");
    assert_eq!(replayed.len(), 6, "every message replayed once");
    for id in &ids {
        // Still FAILED until its replayed message is handled: wait for the outcome.
        crate::helpers::wait_for_status(&app.client, id, OrderStatus::Completed).await;
    }
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 0);

    let purge = app
        .dead_letters()
        .purge(pb::PurgeRequest {
            queue: "payment.inventory-reserved".into(),
            message_ids: vec!["missing".into()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (purge.purged, purge.not_found),
        (0, vec!["missing".to_owned()])
    );
    let bad = app
        .dead_letters()
        .purge(pb::PurgeRequest {
            queue: "nope".into(),
            message_ids: vec![],
            all: true,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_never_acknowledged_is_dead_lettered_by_the_delivery_limit() {
    // Inventory does not run here; a raw consumer plays an inventory that crashes on every
    // delivery (takes the message, dies without acknowledging it).
    let app = spawn_app_with(|c| {
        c.services = vec![Service::Order, Service::Payment];
        c.delivery_limit = 2;
    })
    .await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let work = format!("{}.inventory.order-created", app.namespace);
    let mut crashes = 0;
    let deadline = Instant::now() + WAIT;
    while app.dlq_depth("inventory.order-created").await == 0 {
        assert!(
            Instant::now() < deadline,
            "never dead-lettered after {crashes} crashes"
        );
        let conn = raw_connection().await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                work.as_str().into(),
                "crashing-inventory".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        if let Ok(Some(Ok(_delivery))) =
            tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
        {
            crashes += 1;
        }
        // The "crash": the connection goes away with the delivery unacknowledged.
        drop(consumer);
        conn.close(320, "crash".into()).await.ok();
    }
    assert!(crashes >= 2, "redelivered up to the limit ({crashes})");
    let order = app.terminal(&placed.order_id).await;
    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(
        order.failure_reason.contains("delivery_limit"),
        "{}",
        order.failure_reason
    );
    let dead = app
        .dead_letters()
        .list_dead_letters(pb::ListDeadLettersRequest {
            queue: "inventory.order-created".into(),
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .remove(0);
    assert_eq!(dead.reason, "delivery_limit");
    assert_eq!(header_str(&FieldTable::default(), "x"), None);
    let _ = AMQPValue::Boolean(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_does_not_take_down_the_consumer() {
    let app = spawn_app_with(|c| c.faults = parse_rules("payment:panic:1").unwrap()).await;
    let first = app.place("alice", &[("KB-001", 1)]).await;
    let second = app.place("bob", &[("MS-002", 1)]).await;
    // The panic is caught, the delivery follows the retry path, and the consumer keeps going.
    assert_eq!(
        app.terminal(&first.order_id).await.status(),
        OrderStatus::Completed
    );
    assert_eq!(
        app.terminal(&second.order_id).await.status(),
        OrderStatus::Completed
    );
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 0);
}

/// A database connection lost under a handler is nobody's message's fault: the batch is held
/// and applied again once the database answers, without a trip through the retry queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_lost_mid_batch_holds_the_batch_and_spends_no_attempt() {
    let app = spawn_app_with(|c| c.faults = parse_rules("payment:outage:2").unwrap()).await;
    let conn = raw_connection().await;
    let mut retries = tap(&conn, &app.topology().retry_queue(Service::Payment, 1), "").await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed
    );
    let retried = tokio::time::timeout(Duration::from_millis(500), retries.next()).await;
    assert!(
        retried.is_err(),
        "the batch went the retry way, spending an attempt on the outage"
    );
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 0);
    conn.close(200, "ok".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_wait_in_the_outbox_until_they_can_be_delivered() {
    use lapin::options::QueueBindOptions;
    // The topology is declared up front and the app only verifies it (as with a definitions
    // file), so nothing in the app re-creates the binding this test removes.
    let namespace = crate::helpers::unique_namespace();
    let conn = raw_connection().await;
    let channel = conn.create_channel().await.unwrap();
    orderflow_server::bus::Topology::new(namespace.clone(), 4, 20)
        .declare(&channel)
        .await
        .unwrap();
    let queue = format!("{namespace}.inventory.order-created");
    let events = format!("{namespace}.events");
    let app = spawn_app_with(|c| {
        c.namespace = namespace.clone();
        c.declare_topology = orderflow_server::config::DeclareTopology::Verify;
    })
    .await;
    // Nothing is bound for order.created: a mandatory publish comes back unroutable. (Removed
    // only now: verify refuses to start on a topology that lacks a binding.)
    channel
        .queue_unbind(
            queue.as_str().into(),
            events.as_str().into(),
            "order.created".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let orders = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        app.db_path(Service::Order).display()
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (waiting,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox")
        .fetch_one(&orders)
        .await
        .unwrap();
    assert_eq!(waiting, 1, "not dropped: the event waits in the outbox");
    assert_eq!(
        app.get(&placed.order_id).await.status(),
        OrderStatus::Pending
    );

    channel
        .queue_bind(
            queue.as_str().into(),
            events.as_str().into(),
            "order.created".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        app.terminal(&placed.order_id).await.status(),
        OrderStatus::Completed,
        "delivered once routable"
    );
    eventually("the outbox row cleared", || async {
        let (waiting,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox")
            .fetch_one(&orders)
            .await
            .unwrap();
        waiting == 0
    })
    .await;
    conn.close(200, "ok".into()).await.ok();
}

/// RabbitMQ 4 drops a quorum-queue message handed back more often than its delivery limit
/// (20 by default), so a dead-letter browse that takes and returns messages loses them after
/// about twenty looks. Browsing the store must cost nothing, however often and however
/// concurrently, on either broker version, and a selective purge touches only its selection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_never_uses_up_a_dead_letter() {
    let app = spawn_app_with(|c| c.faults = parse_rules("payment:permanent:3").unwrap()).await;
    let mut orders = Vec::new();
    for i in 0..3 {
        let id = app.place(&format!("b{i}"), &[("CB-005", 1)]).await.order_id;
        assert_eq!(app.terminal(&id).await.status(), OrderStatus::Failed);
        orders.push(id);
    }
    eventually("three dead letters", || async {
        app.dlq_depth("payment.inventory-reserved").await == 3
    })
    .await;
    let list = || {
        let mut client = app.dead_letters();
        async move {
            let listed = client
                .list_dead_letters(pb::ListDeadLettersRequest {
                    queue: "payment.inventory-reserved".into(),
                    limit: 10,
                })
                .await
                .expect("ListDeadLetters")
                .into_inner();
            assert_eq!(listed.depth, 3);
            listed
                .dead_letters
                .into_iter()
                .map(|d| (d.order_id, d.message_id))
                .collect::<Vec<_>>()
        }
    };
    let first = list().await;
    assert_eq!(
        first.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>(),
        orders,
        "oldest first"
    );
    // Far past RabbitMQ 4's default delivery limit, one after another and side by side.
    for _ in 0..30 {
        assert_eq!(list().await, first);
    }
    let concurrent = futures_util::future::join_all((0..30).map(|_| list())).await;
    assert!(concurrent.iter().all(|seen| *seen == first));
    let gets = futures_util::future::join_all(first.iter().cycle().take(30).map(|(_, id)| {
        let mut client = app.dead_letters();
        let queue = format!("{}.payment.inventory-reserved.dlq", app.namespace);
        async move {
            client
                .get_dead_letter(pb::GetDeadLetterRequest {
                    queue,
                    message_id: id.clone(),
                })
                .await
                .map(|d| d.into_inner().message_id)
        }
    }))
    .await;
    assert!(gets.iter().all(Result::is_ok), "{gets:?}");

    let purged = app
        .dead_letters()
        .purge(pb::PurgeRequest {
            queue: "payment.inventory-reserved".into(),
            message_ids: vec![first[1].1.clone()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((purged.purged, purged.not_found.len()), (1, 0));
    let left = app
        .dead_letters()
        .list_dead_letters(pb::ListDeadLettersRequest {
            queue: "payment.inventory-reserved".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let left: Vec<_> = left
        .dead_letters
        .into_iter()
        .map(|d| d.message_id)
        .collect();
    assert_eq!(left, vec![first[0].1.clone(), first[2].1.clone()]);

    let replayed = app
        .dead_letters()
        .replay(pb::ReplayRequest {
            queue: "payment.inventory-reserved".into(),
            message_ids: vec![first[2].1.clone()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, vec![first[2].1.clone()]);
    crate::helpers::wait_for_status(&app.client, &orders[2], OrderStatus::Completed).await;
    assert_eq!(app.get(&orders[0]).await.status(), OrderStatus::Failed);
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 1);
}

/// When a failed message cannot be parked (its dead-letter publish is refused), the consumer
/// hands it back to its queue rather than lose it. That loop must end, on RabbitMQ 3 and 4
/// alike (they count deliveries differently): at the queue's explicit delivery limit the broker
/// dead-letters the message itself, and it reaches the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_parked_ends_at_the_delivery_limit() {
    let app = spawn_app_with(|c| {
        c.faults = parse_rules("payment:permanent:1.0,payment:unparkable:1.0").unwrap();
        c.delivery_limit = 3;
    })
    .await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let order = app.terminal(&placed.order_id).await;
    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(
        order.failure_reason.contains("delivery_limit"),
        "{}",
        order.failure_reason
    );
    let dead = app
        .dead_letters_in("payment.inventory-reserved", 1)
        .await
        .remove(0);
    assert_eq!(dead.reason, "delivery_limit");
    assert_eq!(dead.order_id, placed.order_id);
    assert!(!dead.payload.is_empty(), "body kept");
    // The broker counted the hand-backs, and stopped at the limit.
    let deaths = dead.headers.get("x-death").cloned().unwrap_or_default();
    assert!(deaths.contains("delivery_limit"), "{deaths}");
    assert_eq!(
        app.get(&placed.order_id).await.status(),
        OrderStatus::Failed
    );
    assert_eq!(app.dlq_depth("payment.inventory-reserved").await, 1);
}

/// A namespace declared by an earlier orderflow has a `<work queue>.dlq` per work queue, bound
/// to the dead-letter exchange and holding dead letters. On start they move into the store, so
/// the API still shows them, and the old queue goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_an_earlier_version_move_into_the_store() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    let namespace = crate::helpers::unique_namespace();
    let conn = raw_connection().await;
    let channel = conn.create_channel().await.unwrap();
    orderflow_server::bus::Topology::new(namespace.clone(), 4, 20)
        .declare(&channel)
        .await
        .unwrap();
    let work = format!("{namespace}.payment.inventory-reserved");
    let legacy = format!("{work}.dlq");
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(legacy.as_str().into(), durable, quorum)
        .await
        .unwrap();
    channel
        .queue_bind(
            legacy.as_str().into(),
            format!("{namespace}.dead-letters").as_str().into(),
            work.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Enough of them that two movers taking turns would show as a changed order.
    let old: Vec<String> = (1..=12).map(|i| format!("old-{i:02}")).collect();
    for id in &old {
        let mut headers = FieldTable::default();
        for (key, value) in [
            (header::QUEUE, work.as_str()),
            (header::DEAD_LETTER_REASON, "permanent-error"),
            (header::LAST_FAILURE_AT, "2026-01-02T03:04:05.000Z"),
        ] {
            headers.insert(key.into(), AMQPValue::LongString(value.into()));
        }
        let properties = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_type("orderflow.v1.InventoryReserved".into())
            .with_headers(headers);
        publish_raw(&conn, "", &legacy, b"\x0a\x01x", properties).await;
    }

    let app = spawn_app_with(|c| c.namespace = namespace.clone()).await;
    let moved = app
        .dead_letters_in("payment.inventory-reserved", old.len() as u64)
        .await;
    let ids: Vec<&String> = moved.iter().map(|d| &d.message_id).collect();
    assert_eq!(
        ids,
        old.iter().collect::<Vec<_>>(),
        "all kept, in their order"
    );
    assert!(moved.iter().all(|d| d.reason == "permanent-error"));
    eventually("the old queue deleted", || async {
        let channel = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel
            .queue_declare(legacy.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
    })
    .await;
    conn.close(200, "ok".into()).await.ok();
}
