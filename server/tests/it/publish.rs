//! `Publisher::publish_all` against the real broker. It queues a whole batch before waiting
//! for anything, so these check what that must keep: the messages reach the queue in the
//! order given, and each result is its own message's, a refused one in the middle included.

use std::time::Duration;

use lapin::{
    BasicProperties,
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use orderflow_server::{
    bus::{Broker, Outgoing, PublishError, Publisher, Topology, topology::Declare},
    service::Service,
};
use tokio_util::sync::CancellationToken;

use crate::helpers::{WAIT, amqp_url, raw_connection, unique_namespace};

/// More than one relay round (256 rows) and more than fits one socket write.
const MESSAGES: usize = 600;
/// The one message routed nowhere.
const UNROUTABLE: usize = 317;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reaches_the_queue_in_order_and_each_message_gets_its_own_result() {
    let namespace = unique_namespace();
    let broker = Broker::new(
        amqp_url().parse().expect("AMQP_URL parses"),
        "publish-test",
        Topology::new(namespace.as_str(), 1, 3),
        Declare::All(Service::Order),
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(broker.clone().run(shutdown.clone()));
    tokio::time::timeout(WAIT, broker.link(&shutdown))
        .await
        .expect("the broker connects in time");

    let conn = raw_connection().await;
    let channel = conn.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a queue of this test's own");
    let messages: Vec<Outgoing> = (0..MESSAGES)
        .map(|i| Outgoing {
            exchange: String::new(),
            routing_key: if i == UNROUTABLE {
                format!("{namespace}.nowhere")
            } else {
                queue.name().to_string()
            },
            properties: BasicProperties::default().with_message_id(i.to_string().into()),
            body: i.to_le_bytes().to_vec(),
        })
        .collect();

    let results = Publisher::new(broker).publish_all(&messages).await;
    assert_eq!(results.len(), MESSAGES);
    for (i, result) in results.iter().enumerate() {
        if i == UNROUTABLE {
            assert!(
                matches!(result, Err(PublishError::Unroutable(_))),
                "message {i}: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "message {i}: {result:?}");
        }
    }

    let mut arrived = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while arrived.len() < MESSAGES - 1 && tokio::time::Instant::now() < deadline {
        match channel
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            Some(message) => arrived.push(
                message
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            ),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let expected: Vec<String> = (0..MESSAGES)
        .filter(|&i| i != UNROUTABLE)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(arrived, expected);

    shutdown.cancel();
    Topology::for_teardown(namespace.as_str())
        .delete_all_at(&amqp_url())
        .await
        .expect("the test's namespace is deleted");
}
