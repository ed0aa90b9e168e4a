//! Parsing API requests into validated domain values ("parse, don't validate"). Every rule and
//! limit of the public API lives here, and every violation names its field.

use orderflow_proto::{orderflow::v1 as pb, valid_sku};

use super::error::{Error, Violation};
use crate::order::{Line, NewOrder};

/// Most lines in one order.
pub const MAX_ITEMS: usize = 100;
/// Most units of one line.
pub const MAX_QUANTITY: u32 = 10_000;
/// Longest customer id.
pub const MAX_CUSTOMER_ID: usize = 128;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Default and largest page of `ListOrders`.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page of `ListOrders`; larger requests are served this many.
pub const MAX_PAGE: u32 = 500;

impl TryFrom<pb::PlaceOrderRequest> for NewOrder {
    type Error = Error;

    fn try_from(request: pb::PlaceOrderRequest) -> Result<Self, Self::Error> {
        let mut violations = Vec::new();
        let mut violation =
            |field: String, description: String| violations.push(Violation { field, description });

        if let Err(why) = check_customer_id(&request.customer_id) {
            violation("customer_id".into(), why);
        }
        if request.items.is_empty() {
            violation("items".into(), "must contain at least one item".into());
        } else if request.items.len() > MAX_ITEMS {
            violation(
                "items".into(),
                format!(
                    "must contain at most {MAX_ITEMS} items (got {})",
                    request.items.len()
                ),
            );
        } else {
            let mut seen = std::collections::HashMap::new();
            for (i, item) in request.items.iter().enumerate() {
                if item.sku.is_empty() {
                    violation(format!("items[{i}].sku"), "must not be empty".into());
                } else if !valid_sku(&item.sku) {
                    violation(
                        format!("items[{i}].sku"),
                        "must be 1-64 characters from [A-Za-z0-9._-]".into(),
                    );
                } else if let Some(first) = seen.insert(item.sku.as_str(), i) {
                    violation(
                        format!("items[{i}].sku"),
                        format!("duplicates items[{first}].sku `{}`", item.sku),
                    );
                }
                if item.quantity == 0 {
                    violation(format!("items[{i}].quantity"), "must be at least 1".into());
                } else if item.quantity > MAX_QUANTITY {
                    violation(
                        format!("items[{i}].quantity"),
                        format!("must be at most {MAX_QUANTITY}"),
                    );
                }
            }
        }
        if let Some(key) = &request.idempotency_key {
            let printable = key.bytes().all(|b| (0x20..0x7f).contains(&b));
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !printable {
                violation(
                    "idempotency_key".into(),
                    format!("must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters when set"),
                );
            }
        }

        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        Ok(NewOrder {
            customer_id: request.customer_id,
            lines: request
                .items
                .into_iter()
                .map(|i| Line {
                    sku: i.sku,
                    quantity: i.quantity,
                })
                .collect(),
            idempotency_key: request.idempotency_key,
        })
    }
}

/// A customer id is 1-128 characters from `[A-Za-z0-9._:@-]`.
pub fn check_customer_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_CUSTOMER_ID {
        return Err(format!("must be at most {MAX_CUSTOMER_ID} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
    {
        return Err("may contain only letters, digits and . _ : @ -".into());
    }
    Ok(())
}

/// An order id is a UUID; returns it in canonical (lower-case, hyphenated) form.
pub fn order_id(field: &str, id: &str) -> Result<String, Error> {
    if id.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            Error::invalid(
                field,
                "must be a UUID such as 0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            )
        })
}

/// A validated `ListOrders` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this customer's orders.
    pub customer_id: Option<String>,
    /// Orders older than this order id.
    pub before: Option<String>,
    /// Page size.
    pub limit: u32,
}

impl TryFrom<pb::ListOrdersRequest> for ListQuery {
    type Error = Error;

    fn try_from(request: pb::ListOrdersRequest) -> Result<Self, Self::Error> {
        let mut violations = Vec::new();
        if let Some(customer) = &request.customer_id
            && let Err(why) = check_customer_id(customer)
        {
            violations.push(Violation {
                field: "customer_id".into(),
                description: why,
            });
        }
        let before = if request.page_token.is_empty() {
            None
        } else {
            match order_id("page_token", &request.page_token) {
                Ok(id) => Some(id),
                Err(_) => {
                    violations.push(Violation {
                        field: "page_token".into(),
                        description: "is not a token returned by ListOrders".into(),
                    });
                    None
                }
            }
        };
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        let limit = match request.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        Ok(ListQuery {
            customer_id: request.customer_id,
            before,
            limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(customer: &str, items: &[(&str, u32)]) -> pb::PlaceOrderRequest {
        pb::PlaceOrderRequest {
            customer_id: customer.into(),
            items: items
                .iter()
                .map(|(s, q)| pb::OrderItem {
                    sku: (*s).into(),
                    quantity: *q,
                })
                .collect(),
            idempotency_key: None,
        }
    }

    fn fields(result: Result<NewOrder, Error>) -> Vec<String> {
        match result {
            Err(Error::Invalid(v)) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_order() {
        let order =
            NewOrder::try_from(request("alice@example", &[("KB-001", 2), ("MS-002", 1)])).unwrap();
        assert_eq!(order.lines.len(), 2);
    }

    #[test]
    fn names_each_bad_field() {
        assert_eq!(
            fields(request("", &[("A", 1)]).try_into()),
            vec!["customer_id"]
        );
        assert_eq!(fields(request("c", &[]).try_into()), vec!["items"]);
        assert_eq!(
            fields(request("c", &[("A", 0)]).try_into()),
            vec!["items[0].quantity"]
        );
        assert_eq!(
            fields(request("c", &[("A", 1), ("", 1)]).try_into()),
            vec!["items[1].sku"]
        );
        assert_eq!(
            fields(request("c", &[("A", 1), ("A", 2)]).try_into()),
            vec!["items[1].sku"]
        );
        assert_eq!(
            fields(request("c", &[("A", MAX_QUANTITY + 1)]).try_into()),
            vec!["items[0].quantity"]
        );
        assert_eq!(
            fields(request(&"x".repeat(129), &[("A", 1)]).try_into()),
            vec!["customer_id"]
        );
        assert_eq!(
            fields(request("bad id", &[("A", 1)]).try_into()),
            vec!["customer_id"]
        );
        assert_eq!(
            fields(request("c", &[(&"S".repeat(65), 1)]).try_into()),
            vec!["items[0].sku"]
        );
        let many: Vec<(String, u32)> = (0..=MAX_ITEMS).map(|i| (format!("S{i}"), 1)).collect();
        let many: Vec<(&str, u32)> = many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
        assert_eq!(fields(request("c", &many).try_into()), vec!["items"]);
    }

    #[test]
    fn reports_all_violations_together() {
        assert_eq!(
            fields(request("", &[("A", 0)]).try_into()),
            vec!["customer_id", "items[0].quantity"]
        );
    }

    #[test]
    fn idempotency_key_limits() {
        let mut r = request("c", &[("A", 1)]);
        r.idempotency_key = Some(String::new());
        assert_eq!(fields(r.clone().try_into()), vec!["idempotency_key"]);
        r.idempotency_key = Some("k".repeat(129));
        assert_eq!(fields(r.clone().try_into()), vec!["idempotency_key"]);
        r.idempotency_key = Some("retry-1\n".into());
        assert_eq!(fields(r.clone().try_into()), vec!["idempotency_key"]);
        r.idempotency_key = Some("checkout-42".into());
        assert!(NewOrder::try_from(r).is_ok());
    }

    #[test]
    fn order_ids_must_be_uuids() {
        assert!(order_id("order_id", "not-a-uuid").is_err());
        assert!(order_id("order_id", "").is_err());
        assert_eq!(
            order_id("order_id", "0193A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B").unwrap(),
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        );
    }

    #[test]
    fn page_sizes_default_and_cap() {
        let q = |size| {
            ListQuery::try_from(pb::ListOrdersRequest {
                page_size: size,
                ..Default::default()
            })
            .unwrap()
            .limit
        };
        assert_eq!(q(0), DEFAULT_PAGE);
        assert_eq!(q(10), 10);
        assert_eq!(q(10_000), MAX_PAGE);
        let bad = pb::ListOrdersRequest {
            page_token: "garbage".into(),
            ..Default::default()
        };
        assert!(ListQuery::try_from(bad).is_err());
    }
}
