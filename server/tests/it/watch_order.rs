//! WatchOrder: the same complete sequence whether the watch starts before, during or after
//! processing; exact resume by version; streams end at a terminal status.

use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use tonic::Code;

use crate::helpers::{spawn_app, spawn_app_with, statuses};

const COMPLETE: [OrderStatus; 3] = [
    OrderStatus::Pending,
    OrderStatus::InventoryReserved,
    OrderStatus::Completed,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_during_and_after_see_the_same_sequence() {
    // Payment retries once (with a delay), so the order stays mid-flow long enough to start a
    // watch "during" processing.
    let app = spawn_app_with(|c| {
        c.faults = orderflow_server::fault::parse_rules("payment:transient:1").unwrap();
        c.retry_initial_delay = std::time::Duration::from_millis(300);
    })
    .await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;

    let before = {
        let app_client = app.client.clone();
        let id = placed.order_id.clone();
        tokio::spawn(async move {
            let mut client = app_client;
            let mut stream = client
                .watch_order(pb::WatchOrderRequest {
                    order_id: id,
                    resume_after_version: Some(0),
                })
                .await
                .unwrap()
                .into_inner();
            let mut updates = Vec::new();
            while let Some(update) = stream.message().await.unwrap() {
                updates.push(update);
            }
            updates
        })
    };

    // During: once reserved, before payment's retry lands.
    let mut client = app.client.clone();
    let mut stream = client
        .watch_order(pb::WatchOrderRequest {
            order_id: placed.order_id.clone(),
            resume_after_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut during = Vec::new();
    while let Some(update) = stream.message().await.unwrap() {
        during.push(update);
    }
    let during_full = app.watch_all(&placed.order_id).await;
    let before = before.await.unwrap();
    let after = app.watch_all(&placed.order_id).await;

    assert_eq!(statuses(&before), COMPLETE);
    assert_eq!(
        before, after,
        "before and after see the same updates, timestamps included"
    );
    assert_eq!(during_full, after);
    // Without a resume point the stream starts at the then-current status and misses nothing
    // after it.
    assert!(!during.is_empty());
    let first = during[0].version as usize;
    assert_eq!(during, after[first - 1..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_version_gets_exactly_what_followed() {
    let app = spawn_app().await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    let all = app.watch_all(&placed.order_id).await;
    assert_eq!(statuses(&all), COMPLETE);

    for seen in 0..3u64 {
        let rest = app.watch_from(&placed.order_id, Some(seen)).await;
        assert_eq!(rest, all[seen as usize..].to_vec(), "resume after v{seen}");
    }
    // After the terminal version there is nothing more: the stream ends empty.
    assert!(app.watch_from(&placed.order_id, Some(3)).await.is_empty());
    // A version from the future is refused.
    let status = app
        .client
        .clone()
        .watch_order(pb::WatchOrderRequest {
            order_id: placed.order_id.clone(),
            resume_after_version: Some(9),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_finished_order_sends_the_final_status_and_ends() {
    let app = spawn_app().await;
    let placed = app.place("alice", &[("KB-001", 1)]).await;
    app.terminal(&placed.order_id).await;
    let updates = app.watch_from(&placed.order_id, None).await;
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].status(), OrderStatus::Completed);
    assert!(updates[0].terminal);
}
