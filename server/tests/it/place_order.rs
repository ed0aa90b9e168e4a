//! PlaceOrder, GetOrder and ListOrders through a real gRPC client: validation errors name
//! their field, idempotency keys return the same order, ids are checked, lists page.

use orderflow_proto::orderflow::v1::{self as pb, OrderStatus};
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::{order_request, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_field() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let cases: Vec<(pb::PlaceOrderRequest, &str)> = vec![
        (order_request("", &[("KB-001", 1)]), "customer_id"),
        (order_request("alice", &[]), "items"),
        (
            order_request("alice", &[("KB-001", 0)]),
            "items[0].quantity",
        ),
        (
            order_request("alice", &[("KB-001", 1), ("KB-001", 2)]),
            "items[1].sku",
        ),
        (order_request("alice", &[("", 1)]), "items[0].sku"),
        (
            order_request(&"a".repeat(500), &[("KB-001", 1)]),
            "customer_id",
        ),
        (
            order_request("alice", &[(&"S".repeat(200), 1)]),
            "items[0].sku",
        ),
        (
            order_request("alice", &[("KB-001", 1_000_000)]),
            "items[0].quantity",
        ),
    ];
    for (request, field) in cases {
        let status = client
            .place_order(request)
            .await
            .expect_err("must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("BadRequest details")
            .field_violations;
        assert_eq!(violations[0].field, field);
    }
    let mut keyed = order_request("alice", &[("KB-001", 1)]);
    keyed.idempotency_key = Some("x".repeat(129));
    assert_eq!(
        client.place_order(keyed).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Nothing was stored for any of them.
    let list = client
        .list_orders(pb::ListOrdersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.orders.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_order() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let mut request = order_request("alice", &[("KB-001", 1), ("MS-002", 2)]);
    request.idempotency_key = Some("checkout-42".into());
    let first = client
        .place_order(request.clone())
        .await
        .unwrap()
        .into_inner();
    // Same lines in another order: still the same request.
    let mut reordered = request.clone();
    reordered.items.reverse();
    let second = client.place_order(reordered).await.unwrap().into_inner();
    assert_eq!(first.order_id, second.order_id);
    assert_eq!(first.idempotency_key.as_deref(), Some("checkout-42"));

    // After processing, a retry returns the order as it is now.
    app.terminal(&first.order_id).await;
    let third = client
        .place_order(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.order_id, first.order_id);
    assert_eq!(third.status(), OrderStatus::Completed);

    // The same key for a different order is refused, and another customer's key is separate.
    let mut different = order_request("alice", &[("KB-001", 5)]);
    different.idempotency_key = Some("checkout-42".into());
    let status = client.place_order(different).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains(&first.order_id),
        "{}",
        status.message()
    );
    let mut other_customer = request.clone();
    other_customer.customer_id = "bob".into();
    let bobs = client
        .place_order(other_customer)
        .await
        .unwrap()
        .into_inner();
    assert_ne!(bobs.order_id, first.order_id);

    let alices = client
        .list_orders(pb::ListOrdersRequest {
            customer_id: Some("alice".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alices.orders.len(), 1, "exactly one order for the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_order_checks_ids() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let unknown = client
        .get_order(pb::GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = client
        .get_order(pb::GetOrderRequest {
            order_id: "order-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(
        malformed.message().starts_with("order_id: "),
        "{}",
        malformed.message()
    );
    let watch = client
        .watch_order(pb::WatchOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
            resume_after_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_orders_pages_newest_first_and_filters_by_customer() {
    let app = spawn_app().await;
    let mut placed = Vec::new();
    for i in 0..5 {
        let customer = if i % 2 == 0 { "even" } else { "odd" };
        placed.push(app.place(customer, &[("CB-005", 1)]).await.order_id);
    }
    let mut client = app.client.clone();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_orders(pb::ListOrdersRequest {
                page_size: 2,
                page_token: token.clone(),
                customer_id: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.orders.len() <= 2);
        seen.extend(page.orders.into_iter().map(|o| o.order_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    placed.reverse();
    assert_eq!(seen, placed, "newest first, every order exactly once");

    let evens = client
        .list_orders(pb::ListOrdersRequest {
            customer_id: Some("even".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(evens.orders.len(), 3);
    assert!(evens.orders.iter().all(|o| o.customer_id == "even"));
    assert!(evens.next_page_token.is_empty());

    let bad = client
        .list_orders(pb::ListOrdersRequest {
            page_token: "nonsense".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}
