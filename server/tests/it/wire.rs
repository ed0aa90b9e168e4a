//! The wire contract, checked by a raw AMQP consumer: prost-encoded bodies and the required
//! properties on every event, and the namespaced quorum-queue topology.

use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use orderflow_proto::orderflow::v1 as pb;
use prost::Message as _;

use crate::{
    helpers::{WAIT, raw_connection, spawn_app},
    tap::tap,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_protobuf_with_the_contract_properties() {
    let app = spawn_app().await;
    let conn = raw_connection().await;
    let mut consumer = tap(&conn, &format!("{}.events", app.namespace), "#").await;

    let placed = app.place("alice", &[("KB-001", 2)]).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        let p = &delivery.properties;
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/x-protobuf"
        );
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            p.correlation_id().as_ref().unwrap().as_str(),
            placed.order_id
        );
        let message_id = p.message_id().as_ref().unwrap().as_str().to_owned();
        assert!(
            uuid::Uuid::parse_str(&message_id).is_ok(),
            "message_id {message_id}"
        );
        let timestamp = p.timestamp().expect("timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(timestamp) < 60);
        let headers = p.headers().as_ref().expect("headers");
        assert!(
            matches!(
                headers.inner().get("traceparent"),
                Some(AMQPValue::LongString(_))
            ),
            "trace context"
        );
        let kind = p.kind().as_ref().unwrap().as_str().to_owned();
        let app_id = p.app_id().as_ref().unwrap().as_str().to_owned();
        match kind.as_str() {
            "orderflow.v1.OrderCreated" => {
                let event = pb::OrderCreated::decode(delivery.data.as_slice()).unwrap();
                assert_eq!(event.order_id, placed.order_id);
                assert_eq!(event.customer_id, "alice");
                assert_eq!(
                    event.items,
                    vec![pb::OrderLine {
                        sku: "KB-001".into(),
                        quantity: 2
                    }]
                );
                assert!(event.created_at.is_some());
                assert_eq!(app_id, "order-service");
                assert_eq!(delivery.routing_key.as_str(), "order.created");
            }
            "orderflow.v1.InventoryReserved" => {
                let event = pb::InventoryReserved::decode(delivery.data.as_slice()).unwrap();
                assert_eq!(event.total_cents, 2 * 8999);
                assert_eq!(event.items[0].unit_price_cents, 8999);
                assert_eq!(app_id, "inventory-service");
                assert_eq!(delivery.routing_key.as_str(), "inventory.reserved");
            }
            "orderflow.v1.PaymentProcessed" => {
                let event = pb::PaymentProcessed::decode(delivery.data.as_slice()).unwrap();
                assert!(event.transaction_id.starts_with("txn_"));
                assert_eq!(event.amount_cents, 2 * 8999);
                assert_eq!(app_id, "payment-service");
                assert_eq!(delivery.routing_key.as_str(), "payment.processed");
            }
            other => panic!("unexpected event type {other}"),
        }
        assert!(!seen.contains(&message_id), "each event once");
        seen.push(message_id);
    }
    // No JSON anywhere: bodies are protobuf (checked by decoding above) and nothing else came.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err()
    );
    conn.close(200, "ok".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_name_is_namespaced_and_queues_are_durable_quorum_queues() {
    let app = spawn_app().await;
    let conn = raw_connection().await;
    for queue in app.topology().all_queues() {
        assert!(queue.work.starts_with(&format!("{}.", app.namespace)));
        // A passive declare succeeds only if the queue exists; redeclaring with the same
        // arguments (durable quorum) succeeds only if they match.
        let channel = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.work.as_str().into(), passive, FieldTable::default())
            .await
            .expect("work queue exists");
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mismatch = channel
            .queue_declare(queue.work.as_str().into(), durable, quorum)
            .await;
        assert!(mismatch.is_err(), "{} is not a classic queue", queue.work);
    }
    conn.close(200, "ok".into()).await.ok();
}
