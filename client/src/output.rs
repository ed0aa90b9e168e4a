//! Rendering of orders, pages and status updates: aligned text for people, JSON for scripts.
//!
//! The JSON is built by hand from the generated types rather than derived, so its shape is a
//! deliberate, documented contract that does not move when the proto grows a field. Field
//! names follow the proto JSON mapping (lowerCamelCase); every key is always present, with
//! `null` for a value the server did not set (absent optional field, empty reason, missing
//! timestamp). Integers, including 64-bit ones, are JSON numbers, not strings.

use std::fmt::Write as _;

use orderflow_proto::orderflow::v1 as pb;
use serde_json::{Value, json};

use crate::time::rfc3339;

/// Human name of a status, e.g. `ORDER_STATUS_COMPLETED`; a value this build does not know
/// (a newer server) shows as `UNKNOWN(7)` rather than failing.
pub(crate) fn status_name(status: i32) -> String {
    match pb::OrderStatus::try_from(status) {
        Ok(s) => s.as_str_name().to_owned(),
        Err(_) => format!("UNKNOWN({status})"),
    }
}

/// Whether no further status change can follow; only these end a watch.
pub(crate) fn is_terminal(status: i32) -> bool {
    matches!(
        pb::OrderStatus::try_from(status),
        Ok(pb::OrderStatus::Completed | pb::OrderStatus::Rejected | pb::OrderStatus::PaymentFailed)
    )
}

/// Status as JSON: the enum name, or the bare number for a value this build does not know,
/// as the proto JSON mapping does.
fn status_json(status: i32) -> Value {
    match pb::OrderStatus::try_from(status) {
        Ok(s) => Value::from(s.as_str_name()),
        Err(_) => Value::from(status),
    }
}

pub(crate) fn timestamp_json(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(rfc3339).map_or(Value::Null, Value::from)
}

pub(crate) fn timestamp_text(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(rfc3339).unwrap_or_else(|| "-".to_owned())
}

/// Proto3 cannot tell an empty string from an unset one; both mean "no reason".
fn non_empty_json(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::from(s)
    }
}

/// An order as JSON:
///
/// ```json
/// {
///   "orderId": "0193…", "customerId": "alice",
///   "status": "ORDER_STATUS_COMPLETED", "failureReason": null, "version": 3,
///   "totalCents": 1250,
///   "items": [{"sku": "sku-1", "quantity": 2, "unitPriceCents": 625, "name": "Widget"}],
///   "transactionId": "tx-…", "idempotencyKey": null, "stockReleasedAt": null,
///   "createdAt": "2026-11-26T23:40:00.512Z", "updatedAt": "2026-11-26T23:40:02.001Z",
///   "history": [{"version": 1, "status": "ORDER_STATUS_PENDING", "reason": null,
///                "at": "2026-11-26T23:40:00.512Z"}]
/// }
/// ```
///
/// `totalCents`, `unitPriceCents` and `name` are `null` until Inventory priced the order;
/// `history` is empty for orders from `list`, which carry none.
pub(crate) fn order_json(order: &pb::Order) -> Value {
    let items: Vec<Value> = order
        .items
        .iter()
        .map(|item| {
            json!({
                "sku": item.sku,
                "quantity": item.quantity,
                "unitPriceCents": item.unit_price_cents,
                "name": item.name,
            })
        })
        .collect();
    let history: Vec<Value> = order
        .history
        .iter()
        .map(|change| {
            json!({
                "version": change.version,
                "status": status_json(change.status),
                "reason": non_empty_json(&change.reason),
                "at": timestamp_json(change.at.as_ref()),
            })
        })
        .collect();
    json!({
        "orderId": order.order_id,
        "customerId": order.customer_id,
        "status": status_json(order.status),
        "failureReason": non_empty_json(&order.failure_reason),
        "version": order.version,
        "totalCents": order.total_cents,
        "items": items,
        "transactionId": order.transaction_id,
        "idempotencyKey": order.idempotency_key,
        "stockReleasedAt": timestamp_json(order.stock_released_at.as_ref()),
        "createdAt": timestamp_json(order.created_at.as_ref()),
        "updatedAt": timestamp_json(order.updated_at.as_ref()),
        "history": history,
    })
}

/// One page of `list` as JSON: `{"orders": [<order>…], "nextPageToken": "…" | null}`, with
/// each order shaped as in [`order_json`] and `nextPageToken` null on the last page.
pub(crate) fn page_json(page: &pb::ListOrdersResponse) -> Value {
    json!({
        "orders": page.orders.iter().map(order_json).collect::<Vec<_>>(),
        "nextPageToken": non_empty_json(&page.next_page_token),
    })
}

/// One status update of `watch` as JSON:
///
/// ```json
/// {"orderId": "0193…", "version": 2, "status": "ORDER_STATUS_INVENTORY_RESERVED",
///  "reason": null, "at": "2026-11-26T23:40:01.123Z", "terminal": false}
/// ```
pub(crate) fn update_json(update: &pb::OrderUpdate) -> Value {
    json!({
        "orderId": update.order_id,
        "version": update.version,
        "status": status_json(update.status),
        "reason": non_empty_json(&update.reason),
        "at": timestamp_json(update.at.as_ref()),
        "terminal": update.terminal,
    })
}

/// Cents as a decimal amount (`1250` → `12.50`); the API has no currency, so none is shown.
pub(crate) fn cents_text(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

fn optional_cents_text(cents: Option<i64>) -> String {
    cents.map_or_else(|| "-".to_owned(), cents_text)
}

/// The line `place` prints for the order it got back.
pub(crate) fn placed_text(order: &pb::Order) -> String {
    format!("order {} {}", order.order_id, status_name(order.status))
}

/// One status transition, e.g. `v2 ORDER_STATUS_INVENTORY_RESERVED 2026-11-26T23:40:01.123Z`,
/// followed by the reason when there is one. Shared by `watch` and `get`'s history.
fn change_text(
    version: u64,
    status: i32,
    at: Option<&prost_types::Timestamp>,
    reason: &str,
) -> String {
    let mut line = format!("v{version} {} {}", status_name(status), timestamp_text(at));
    if !reason.is_empty() {
        line.push(' ');
        line.push_str(reason);
    }
    line
}

pub(crate) fn update_text(update: &pb::OrderUpdate) -> String {
    change_text(
        update.version,
        update.status,
        update.at.as_ref(),
        &update.reason,
    )
}

/// Everything `get` shows: a key/value header, the items table and the history.
pub(crate) fn order_text(order: &pb::Order) -> String {
    let mut fields = vec![
        ("order", order.order_id.clone()),
        ("customer", order.customer_id.clone()),
        ("status", status_name(order.status)),
    ];
    if !order.failure_reason.is_empty() {
        fields.push(("failure reason", order.failure_reason.clone()));
    }
    fields.push(("total", optional_cents_text(order.total_cents)));
    if let Some(transaction_id) = &order.transaction_id {
        fields.push(("transaction", transaction_id.clone()));
    }
    if let Some(key) = &order.idempotency_key {
        fields.push(("idempotency key", key.clone()));
    }
    if let Some(released) = &order.stock_released_at {
        fields.push(("stock released", timestamp_text(Some(released))));
    }
    fields.push(("created", timestamp_text(order.created_at.as_ref())));
    fields.push(("updated", timestamp_text(order.updated_at.as_ref())));

    let label_width = fields
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in &fields {
        let _ = writeln!(out, "{label:<label_width$}  {value}");
    }

    out.push_str("\nitems:\n");
    let rows: Vec<Vec<String>> = order
        .items
        .iter()
        .map(|item| {
            vec![
                item.sku.clone(),
                item.quantity.to_string(),
                optional_cents_text(item.unit_price_cents),
                item.name.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            ("SKU", Align::Left),
            ("QTY", Align::Right),
            ("UNIT PRICE", Align::Right),
            ("NAME", Align::Left),
        ],
        &rows,
        "  ",
    ));

    out.push_str("\nhistory:\n");
    for change in &order.history {
        let _ = writeln!(
            out,
            "  {}",
            change_text(
                change.version,
                change.status,
                change.at.as_ref(),
                &change.reason
            )
        );
    }
    // The caller adds the final newline, as for every other rendering.
    out.truncate(out.trim_end().len());
    out
}

/// The `list` table: one row per order, newest first as the server sent them.
pub(crate) fn orders_table(orders: &[pb::Order]) -> String {
    let rows: Vec<Vec<String>> = orders
        .iter()
        .map(|order| {
            vec![
                order.order_id.clone(),
                order.customer_id.clone(),
                status_name(order.status),
                optional_cents_text(order.total_cents),
                timestamp_text(order.created_at.as_ref()),
            ]
        })
        .collect();
    let mut out = table(
        &[
            ("ID", Align::Left),
            ("CUSTOMER", Align::Left),
            ("STATUS", Align::Left),
            ("TOTAL", Align::Right),
            ("CREATED", Align::Left),
        ],
        &rows,
        "",
    );
    out.truncate(out.trim_end().len());
    out
}

#[derive(Debug, Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Lays out `rows` under `columns` with two spaces between columns, each line prefixed by
/// `indent`. Widths count chars, which is right for the ASCII ids and close enough for names.
fn table(columns: &[(&str, Align)], rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = columns
        .iter()
        .map(|(name, _)| name.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = indent.to_owned();
        for (i, ((cell, width), (_, align))) in row.iter().zip(&widths).zip(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width - cell.chars().count();
            match align {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use prost_types::Timestamp;

    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    /// A completed order as GetOrder would return it.
    fn completed_order() -> pb::Order {
        pb::Order {
            order_id: "0193a5e4-7c1f-7000-8000-000000000001".to_owned(),
            customer_id: "alice".to_owned(),
            items: vec![
                pb::OrderLineItem {
                    sku: "sku-1".to_owned(),
                    quantity: 2,
                    unit_price_cents: Some(625),
                    name: Some("Widget".to_owned()),
                },
                pb::OrderLineItem {
                    sku: "sku-22".to_owned(),
                    quantity: 1,
                    unit_price_cents: Some(1999),
                    name: None,
                },
            ],
            total_cents: Some(3249),
            status: pb::OrderStatus::Completed as i32,
            failure_reason: String::new(),
            version: 3,
            created_at: at(1_795_736_400, 512_000_000),
            updated_at: at(1_795_736_402, 0),
            history: vec![
                pb::StatusChange {
                    version: 1,
                    status: pb::OrderStatus::Pending as i32,
                    reason: String::new(),
                    at: at(1_795_736_400, 512_000_000),
                },
                pb::StatusChange {
                    version: 2,
                    status: pb::OrderStatus::InventoryReserved as i32,
                    reason: String::new(),
                    at: at(1_795_736_401, 123_000_000),
                },
                pb::StatusChange {
                    version: 3,
                    status: pb::OrderStatus::Completed as i32,
                    reason: String::new(),
                    at: at(1_795_736_402, 0),
                },
            ],
            transaction_id: Some("tx-42".to_owned()),
            idempotency_key: Some("retry-1".to_owned()),
            stock_released_at: None,
        }
    }

    #[test]
    fn renders_an_order_as_json() {
        assert_eq!(
            order_json(&completed_order()),
            json!({
                "orderId": "0193a5e4-7c1f-7000-8000-000000000001",
                "customerId": "alice",
                "status": "ORDER_STATUS_COMPLETED",
                "failureReason": null,
                "version": 3,
                "totalCents": 3249,
                "items": [
                    {"sku": "sku-1", "quantity": 2, "unitPriceCents": 625, "name": "Widget"},
                    {"sku": "sku-22", "quantity": 1, "unitPriceCents": 1999, "name": null},
                ],
                "transactionId": "tx-42",
                "idempotencyKey": "retry-1",
                "stockReleasedAt": null,
                "createdAt": "2026-11-26T23:40:00.512Z",
                "updatedAt": "2026-11-26T23:40:02Z",
                "history": [
                    {"version": 1, "status": "ORDER_STATUS_PENDING", "reason": null,
                     "at": "2026-11-26T23:40:00.512Z"},
                    {"version": 2, "status": "ORDER_STATUS_INVENTORY_RESERVED", "reason": null,
                     "at": "2026-11-26T23:40:01.123Z"},
                    {"version": 3, "status": "ORDER_STATUS_COMPLETED", "reason": null,
                     "at": "2026-11-26T23:40:02Z"},
                ],
            })
        );
    }

    #[test]
    fn json_keeps_its_keys_when_the_server_sets_nothing() {
        let order = pb::Order {
            status: 42, // a status added after this build
            ..Default::default()
        };
        assert_eq!(
            order_json(&order),
            json!({
                "orderId": "",
                "customerId": "",
                "status": 42,
                "failureReason": null,
                "version": 0,
                "totalCents": null,
                "items": [],
                "transactionId": null,
                "idempotencyKey": null,
                "stockReleasedAt": null,
                "createdAt": null,
                "updatedAt": null,
                "history": [],
            })
        );
    }

    #[test]
    fn renders_a_failed_order_reason_in_json() {
        let order = pb::Order {
            status: pb::OrderStatus::Rejected as i32,
            failure_reason: "insufficient stock for sku-1".to_owned(),
            history: vec![pb::StatusChange {
                version: 2,
                status: pb::OrderStatus::Rejected as i32,
                reason: "insufficient stock for sku-1".to_owned(),
                at: at(0, 0),
            }],
            ..Default::default()
        };
        let value = order_json(&order);
        assert_eq!(value["status"], "ORDER_STATUS_REJECTED");
        assert_eq!(value["failureReason"], "insufficient stock for sku-1");
        assert_eq!(
            value["history"][0]["reason"],
            "insufficient stock for sku-1"
        );
        assert_eq!(value["history"][0]["at"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn renders_pages_and_updates_as_json() {
        let page = pb::ListOrdersResponse {
            orders: vec![completed_order()],
            next_page_token: String::new(),
        };
        let value = page_json(&page);
        assert_eq!(value["nextPageToken"], Value::Null);
        assert_eq!(value["orders"][0], order_json(&completed_order()));

        let update = pb::OrderUpdate {
            order_id: "o-1".to_owned(),
            version: 4,
            status: pb::OrderStatus::PaymentFailed as i32,
            reason: "card declined".to_owned(),
            at: at(1_795_736_401, 123_000_000),
            terminal: true,
        };
        assert_eq!(
            update_json(&update),
            json!({
                "orderId": "o-1",
                "version": 4,
                "status": "ORDER_STATUS_PAYMENT_FAILED",
                "reason": "card declined",
                "at": "2026-11-26T23:40:01.123Z",
                "terminal": true,
            })
        );
    }

    #[test]
    fn renders_updates_as_text() {
        let mut update = pb::OrderUpdate {
            order_id: "o-1".to_owned(),
            version: 2,
            status: pb::OrderStatus::InventoryReserved as i32,
            reason: String::new(),
            at: at(1_795_736_401, 123_000_000),
            terminal: false,
        };
        assert_eq!(
            update_text(&update),
            "v2 ORDER_STATUS_INVENTORY_RESERVED 2026-11-26T23:40:01.123Z"
        );
        update.status = pb::OrderStatus::Rejected as i32;
        update.reason = "unknown sku: sku-9".to_owned();
        update.at = None;
        assert_eq!(
            update_text(&update),
            "v2 ORDER_STATUS_REJECTED - unknown sku: sku-9"
        );
    }

    #[test]
    fn renders_an_order_as_text() {
        let text = order_text(&completed_order());
        let expected = "\
order            0193a5e4-7c1f-7000-8000-000000000001
customer         alice
status           ORDER_STATUS_COMPLETED
total            32.49
transaction      tx-42
idempotency key  retry-1
created          2026-11-26T23:40:00.512Z
updated          2026-11-26T23:40:02Z

items:
  SKU     QTY  UNIT PRICE  NAME
  sku-1     2        6.25  Widget
  sku-22    1       19.99  -

history:
  v1 ORDER_STATUS_PENDING 2026-11-26T23:40:00.512Z
  v2 ORDER_STATUS_INVENTORY_RESERVED 2026-11-26T23:40:01.123Z
  v3 ORDER_STATUS_COMPLETED 2026-11-26T23:40:02Z";
        assert_eq!(text, expected);
    }

    #[test]
    fn renders_the_list_table() {
        let pending = pb::Order {
            order_id: "o-2".to_owned(),
            customer_id: "bob".to_owned(),
            status: pb::OrderStatus::Pending as i32,
            created_at: at(0, 0),
            ..Default::default()
        };
        let expected = "\
ID                                    CUSTOMER  STATUS                  TOTAL  CREATED
o-2                                   bob       ORDER_STATUS_PENDING        -  1970-01-01T00:00:00Z
0193a5e4-7c1f-7000-8000-000000000001  alice     ORDER_STATUS_COMPLETED  32.49  2026-11-26T23:40:00.512Z";
        assert_eq!(orders_table(&[pending, completed_order()]), expected);
    }

    #[test]
    fn formats_cents() {
        assert_eq!(cents_text(0), "0.00");
        assert_eq!(cents_text(5), "0.05");
        assert_eq!(cents_text(1250), "12.50");
        assert_eq!(cents_text(-1250), "-12.50");
        assert_eq!(cents_text(i64::MIN), "-92233720368547758.08");
    }

    #[test]
    fn names_statuses_including_unknown_ones() {
        assert_eq!(
            status_name(pb::OrderStatus::Pending as i32),
            "ORDER_STATUS_PENDING"
        );
        assert_eq!(status_name(99), "UNKNOWN(99)");
        assert!(is_terminal(pb::OrderStatus::PaymentFailed as i32));
        assert!(!is_terminal(pb::OrderStatus::InventoryReserved as i32));
        assert!(!is_terminal(99));
    }
}
