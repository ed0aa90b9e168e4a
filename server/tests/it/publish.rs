//! `Publisher::publish_all` against the real broker. It queues a whole batch before waiting
//! for anything, so these check what that must keep: the messages reach the queue in the
//! order given, and each result is its own message's, the refused ones among them included.

use futures_util::StreamExt as _;
use lapin::BasicProperties;
use orderflow_server::{
    bus::{Broker, Outgoing, PublishError, Publisher, Topology, topology::Declare},
    service::Service,
};
use tokio_util::sync::CancellationToken;

use crate::{
    helpers::{WAIT, amqp_url, raw_connection, unique_namespace},
    tap::tap,
};

/// More than one relay round (256 rows) and more than fits one socket write.
const MESSAGES: usize = 600;
/// Every this-many-th message is routed nowhere: a dozen returns in the batch, so that a
/// return credited to the wrong confirm cannot go unnoticed.
const UNROUTABLE_EVERY: usize = 47;

fn unroutable(i: usize) -> bool {
    i % UNROUTABLE_EVERY == 13
}

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
    let exchange = format!("{namespace}.events");
    let mut tapped = tap(&conn, &exchange, "publish-test.#").await;
    let messages: Vec<Outgoing> = (0..MESSAGES)
        .map(|i| Outgoing {
            exchange: exchange.clone(),
            routing_key: if unroutable(i) {
                "nowhere.bound".to_owned()
            } else {
                format!("publish-test.{i}")
            },
            properties: BasicProperties::default().with_message_id(i.to_string().into()),
            body: i.to_le_bytes().to_vec(),
        })
        .collect();

    let results = Publisher::new(broker).publish_all(&messages).await;
    assert_eq!(results.len(), MESSAGES);
    for (i, result) in results.iter().enumerate() {
        if unroutable(i) {
            assert!(
                matches!(result, Err(PublishError::Unroutable(_))),
                "message {i}: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "message {i}: {result:?}");
        }
    }

    let mut arrived = Vec::new();
    let expected: Vec<String> = (0..MESSAGES)
        .filter(|&i| !unroutable(i))
        .map(|i| i.to_string())
        .collect();
    while arrived.len() < expected.len() {
        let delivery = tokio::time::timeout(WAIT, tapped.next())
            .await
            .expect("every routed message arrives in time")
            .expect("the tap is open")
            .expect("a delivery");
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        arrived.push(id.unwrap_or_default());
    }
    assert_eq!(arrived, expected);

    shutdown.cancel();
    Topology::for_teardown(namespace.as_str())
        .delete_all_at(&amqp_url())
        .await
        .expect("the test's namespace is deleted");
}
