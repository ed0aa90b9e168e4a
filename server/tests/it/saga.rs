//! The saga end to end through all three services: the happy path, both rejection reasons,
//! and a declined payment whose reservation is released (stock counted exactly).

use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};

use crate::helpers::{TestApp, spawn_app_with, statuses};

const CATALOG: &str = r#"[
  {"sku": "APPLE", "name": "Apple", "price_cents": 150, "stock": 10},
  {"sku": "PEAR", "name": "Pear", "price_cents": 200, "stock": 3},
  {"sku": "GOLD", "name": "Gold bar", "price_cents": 6000000, "stock": 2}
]"#;

async fn app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.json");
    std::fs::write(&catalog, CATALOG).unwrap();
    let app = spawn_app_with(|c| {
        c.catalog = Some(catalog);
        c.payment_limit_cents = 100_000;
    })
    .await;
    // The catalog was read at build time; the directory may go.
    drop(dir);
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_with_prices_total_and_transaction() {
    let app = app().await;
    let placed = app.place("alice", &[("APPLE", 2), ("PEAR", 1)]).await;
    assert_eq!(placed.status(), OrderStatus::Pending);
    assert_eq!(placed.version, 1);

    let updates = app.watch_all(&placed.order_id).await;
    assert_eq!(
        statuses(&updates),
        vec![
            OrderStatus::Pending,
            OrderStatus::InventoryReserved,
            OrderStatus::Completed
        ]
    );
    assert_eq!(
        updates.iter().map(|u| u.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    let order = app.get(&placed.order_id).await;
    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.total_cents, Some(2 * 150 + 200));
    assert!(
        order
            .transaction_id
            .as_deref()
            .is_some_and(|t| t.starts_with("txn_"))
    );
    assert_eq!(order.items[0].unit_price_cents, Some(150));
    assert_eq!(order.items[1].name.as_deref(), Some("Pear"));
    assert_eq!(order.history.len(), 3);
    assert_eq!(order.failure_reason, "");

    let stock = app.stock().await;
    assert_eq!(stock["APPLE"], 8);
    assert_eq!(stock["PEAR"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_stock_rejects_the_whole_order_and_reserves_nothing() {
    let app = app().await;
    let placed = app.place("bob", &[("APPLE", 1), ("PEAR", 4)]).await;
    let order = app.terminal(&placed.order_id).await;
    assert_eq!(order.status(), OrderStatus::Rejected);
    assert!(
        order
            .failure_reason
            .contains("PEAR (requested 4, available 3)"),
        "{}",
        order.failure_reason
    );
    assert_eq!(
        order.history.iter().map(|h| h.status()).collect::<Vec<_>>(),
        vec![OrderStatus::Pending, OrderStatus::Rejected]
    );
    let stock = app.stock().await;
    assert_eq!((stock["APPLE"], stock["PEAR"]), (10, 3), "nothing reserved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sku_is_rejected() {
    let app = app().await;
    let placed = app.place("carol", &[("APPLE", 1), ("BANANA", 1)]).await;
    let order = app.terminal(&placed.order_id).await;
    assert_eq!(order.status(), OrderStatus::Rejected);
    assert!(
        order.failure_reason.contains("unknown SKU: BANANA"),
        "{}",
        order.failure_reason
    );
    assert_eq!(app.stock().await["APPLE"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_releases_the_reservation() {
    let app = app().await;
    // 60,000.00 > the 1,000.00 limit.
    let placed = app.place("dave", &[("GOLD", 1), ("APPLE", 3)]).await;
    let updates = app.watch_all(&placed.order_id).await;
    assert_eq!(
        statuses(&updates),
        vec![
            OrderStatus::Pending,
            OrderStatus::InventoryReserved,
            OrderStatus::PaymentFailed
        ]
    );
    assert!(updates.last().unwrap().terminal);
    let order = app.get(&placed.order_id).await;
    assert!(
        order.failure_reason.contains("exceeds the payment limit"),
        "{}",
        order.failure_reason
    );
    assert_eq!(order.total_cents, Some(6_000_000 + 450));
    assert_eq!(order.transaction_id, None);

    // The release is asynchronous (Inventory consumes PaymentFailed): wait for it.
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    loop {
        let stock = app.stock().await;
        if (stock["GOLD"], stock["APPLE"]) == (2, 10) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stock never released: {stock:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The order records the compensation.
    crate::helpers::eventually("release recorded on the order", || async {
        app.get(&placed.order_id).await.stock_released_at.is_some()
    })
    .await;
    // A later order can use the released stock.
    let again = app.place("erin", &[("APPLE", 10)]).await;
    assert_eq!(
        app.terminal(&again.order_id).await.status(),
        OrderStatus::Completed
    );
    assert_eq!(app.stock().await["APPLE"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_never_oversell() {
    let app = app().await;
    // PEAR has 3 units; 8 orders of one each: exactly 3 complete.
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(app.place(&format!("c{i}"), &[("PEAR", 1)]).await.order_id);
    }
    let mut completed = 0;
    for id in &ids {
        match app.terminal(id).await.status() {
            OrderStatus::Completed => completed += 1,
            OrderStatus::Rejected => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(completed, 3);
    assert_eq!(app.stock().await["PEAR"], 0);
    let _ = pb::OrderStatus::Completed;
}
