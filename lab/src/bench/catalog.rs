//! The bench's catalog and its orders: a handful of SKUs with far more stock than any run can
//! use, and one single-line order per index, rotating over the SKUs so stock updates are not
//! all on one row. orderflow and the baseline place exactly these orders.

use orderflow_proto::orderflow::v1 as pb;

/// SKUs of the bench catalog; orders rotate over them so stock updates are not all on one row.
pub(crate) const SKUS: usize = 8;
/// Price of every bench SKU, in cents.
pub(crate) const PRICE_CENTS: i64 = 100;

/// The bench catalog: [`SKUS`] items with far more stock than any run can use.
pub(crate) fn catalog_json() -> String {
    let entries: Vec<serde_json::Value> = (0..SKUS)
        .map(|i| {
            serde_json::json!({
                "sku": sku(i as u64),
                "name": format!("Bench item {i}"),
                "price_cents": PRICE_CENTS,
                "stock": 1_000_000_000_i64,
            })
        })
        .collect();
    serde_json::Value::Array(entries).to_string()
}

pub(crate) fn sku(index: u64) -> String {
    format!("BENCH-{}", index % SKUS as u64)
}

/// Order `index` of a run: one unit of one SKU, customers rotating over a hundred.
pub(crate) fn order(index: u64) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        customer_id: format!("bench-customer-{}", index % 100),
        items: vec![pb::OrderItem {
            sku: sku(index),
            quantity: 1,
        }],
        idempotency_key: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_every_sku_the_orders_use() {
        let catalog: Vec<serde_json::Value> = serde_json::from_str(&catalog_json()).unwrap();
        assert_eq!(catalog.len(), SKUS);
        for index in [0, 1, 7, 8, 12_345] {
            let sku = sku(index);
            assert!(catalog.iter().any(|e| e["sku"] == sku.as_str()), "{sku}");
        }
        assert!(
            catalog
                .iter()
                .all(|e| e["stock"].as_i64() > Some(1_000_000))
        );
    }
}
