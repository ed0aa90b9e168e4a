//! Stock reservations: all lines of an order or none, decided once per order.
//!
//! A reservation decrements `available` with a conditional update (`available >= quantity`), so
//! stock can never go negative even when several instances reserve the last unit at once.

use std::collections::{HashMap, HashSet};

use orderflow_proto::orderflow::v1 as pb;
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AnyPool};

use crate::{
    db::{self, Writes},
    time,
};

/// One reserved line, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedLine {
    /// SKU.
    pub sku: String,
    /// Units reserved.
    pub quantity: u32,
    /// Price of one unit when reserved.
    pub unit_price_cents: i64,
    /// Catalog name when reserved.
    pub name: String,
}

impl From<ReservedLine> for pb::ReservedLine {
    fn from(line: ReservedLine) -> Self {
        pb::ReservedLine {
            sku: line.sku,
            quantity: line.quantity,
            unit_price_cents: line.unit_price_cents,
            name: line.name,
        }
    }
}

/// What Inventory decided for an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every line is reserved.
    Reserved {
        /// The priced lines.
        lines: Vec<ReservedLine>,
        /// Sum of quantity × unit price.
        total_cents: i64,
    },
    /// Nothing is reserved.
    Rejected {
        /// Unknown SKU wins over insufficient stock.
        reason: pb::RejectionReason,
        /// The lines that could not be satisfied.
        shortfalls: Vec<pb::StockShortfall>,
        /// Human-readable summary.
        detail: String,
    },
    /// This order was decided before (a redelivery); its outcome is already in the outbox.
    AlreadyDecided,
}

/// A catalog row as a reservation sees it: name, unit price, units available.
pub type Row = (String, i64, i64);

/// The orders among `order_ids` that have a decision already (a redelivery, or a copy
/// published again).
pub async fn decided(
    conn: &mut AnyConnection,
    order_ids: &[&str],
) -> sqlx::Result<HashSet<String>> {
    db::existing(conn, "reservations", "order_id", order_ids).await
}

/// The catalog rows of `skus` that exist. `for_update` locks them, in SKU order so two
/// reservations never deadlock.
pub async fn read(
    conn: &mut AnyConnection,
    skus: &[&str],
    for_update: &str,
) -> sqlx::Result<HashMap<String, Row>> {
    let mut rows = HashMap::with_capacity(skus.len());
    for chunk in skus.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT sku, name, price_cents, available FROM stock WHERE sku IN ({}) ORDER BY sku{for_update}",
            db::params(db::Backend::of(conn), chunk.len())
        );
        let mut query = sqlx::query_as::<_, (String, String, i64, i64)>(sqlx::AssertSqlSafe(sql))
            .persistent(db::worth_caching(chunk.len()));
        for sku in chunk {
            query = query.bind(*sku);
        }
        for (sku, name, price, available) in query.fetch_all(&mut *conn).await? {
            rows.insert(sku, (name, price, available));
        }
    }
    Ok(rows)
}

/// Takes `units` of each SKU, all or none: fails if any SKU has fewer available (only
/// possible on a shared database without row locks), which rolls the batch back.
pub async fn take(conn: &mut AnyConnection, units: &[(&str, i64)]) -> sqlx::Result<()> {
    for chunk in units.chunks(KEYS_PER_STATEMENT / 2) {
        // Both engines name a VALUES list's columns column1, column2, …
        let sql = format!(
            "UPDATE stock SET available = stock.available - v.column2 FROM (VALUES {}) AS v
             WHERE stock.sku = v.column1 AND stock.available >= v.column2",
            db::values(db::Backend::of(conn), chunk.len(), 2)
        );
        let mut query =
            sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(db::worth_caching(chunk.len()));
        for (sku, quantity) in chunk {
            query = query.bind(*sku).bind(*quantity);
        }
        let updated = query.execute(&mut *conn).await?.rows_affected();
        if updated != chunk.len() as u64 {
            return Err(sqlx::Error::Protocol(
                "stock changed concurrently".to_owned(),
            ));
        }
    }
    Ok(())
}

/// A decision to store: the order, `reserved` or `rejected`, the lines held, their total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The order decided.
    pub order_id: String,
    /// `reserved` or `rejected`.
    pub status: &'static str,
    /// The lines held (none when rejected).
    pub lines: Vec<ReservedLine>,
    /// Their total.
    pub total_cents: i64,
}

/// Adds the insert of `reservations`, at `now`, to `writes`.
pub fn insert(writes: &mut Writes, reservations: &[Reservation], now: i64) -> sqlx::Result<()> {
    for chunk in reservations.chunks(KEYS_PER_STATEMENT / 6) {
        let sql = format!(
            "INSERT INTO reservations (order_id, status, lines, total_cents, created_at, updated_at) VALUES {}",
            db::values(writes.backend(), chunk.len(), 6)
        );
        writes.statement(sql, chunk.len());
        for reservation in chunk {
            let lines = serde_json::to_string(&reservation.lines)
                .map_err(|e| sqlx::Error::Encode(e.into()))?;
            writes
                .bind(reservation.order_id.clone())
                .bind(reservation.status)
                .bind(lines)
                .bind(reservation.total_cents)
                .bind(now)
                .bind(now);
        }
    }
    Ok(())
}

/// Parameters per statement: under SQLite's oldest limit of 999.
const KEYS_PER_STATEMENT: usize = 900;

/// The decision for `lines` given the catalog rows `(name, price_cents, available)` by SKU.
pub fn decide(lines: &[pb::OrderLine], catalog: &HashMap<String, Row>) -> Decision {
    let unknown: Vec<_> = lines
        .iter()
        .filter(|l| !catalog.contains_key(&l.sku))
        .collect();
    if !unknown.is_empty() {
        let skus: Vec<&str> = unknown.iter().map(|l| l.sku.as_str()).collect();
        return Decision::Rejected {
            reason: pb::RejectionReason::UnknownSku,
            shortfalls: unknown
                .iter()
                .map(|l| pb::StockShortfall {
                    sku: l.sku.clone(),
                    requested: l.quantity,
                    available: 0,
                    unknown_sku: true,
                })
                .collect(),
            detail: format!("unknown SKU: {}", skus.join(", ")),
        };
    }
    let short: Vec<pb::StockShortfall> = lines
        .iter()
        .filter_map(|l| {
            let available = catalog[&l.sku].2;
            (available < i64::from(l.quantity)).then(|| pb::StockShortfall {
                sku: l.sku.clone(),
                requested: l.quantity,
                available: available.clamp(0, i64::from(u32::MAX)) as u32,
                unknown_sku: false,
            })
        })
        .collect();
    if !short.is_empty() {
        let detail = short
            .iter()
            .map(|s| {
                format!(
                    "{} (requested {}, available {})",
                    s.sku, s.requested, s.available
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Decision::Rejected {
            reason: pb::RejectionReason::InsufficientStock,
            shortfalls: short,
            detail: format!("insufficient stock: {detail}"),
        };
    }
    let lines: Vec<ReservedLine> = lines
        .iter()
        .map(|l| {
            let (name, price, _) = &catalog[&l.sku];
            ReservedLine {
                sku: l.sku.clone(),
                quantity: l.quantity,
                unit_price_cents: *price,
                name: name.clone(),
            }
        })
        .collect();
    let total_cents = lines
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price_cents)
        .sum();
    Decision::Reserved { lines, total_cents }
}

/// Returns the stock of a still-held reservation; `None` if there is none to release.
/// `for_update` locks the reservation, so two instances never release it both.
pub async fn release(
    conn: &mut AnyConnection,
    order_id: &str,
    for_update: &str,
) -> sqlx::Result<Option<Vec<ReservedLine>>> {
    let select = format!("SELECT status, lines FROM reservations WHERE order_id = $1{for_update}");
    let row: Option<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(select))
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((status, lines)) = row else {
        return Ok(None);
    };
    if status != "reserved" {
        return Ok(None);
    }
    let lines: Vec<ReservedLine> =
        serde_json::from_str(&lines).map_err(|e| sqlx::Error::Decode(e.into()))?;
    for line in &lines {
        sqlx::query("UPDATE stock SET available = available + $1 WHERE sku = $2")
            .bind(i64::from(line.quantity))
            .bind(&line.sku)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("UPDATE reservations SET status = 'released', updated_at = $1 WHERE order_id = $2")
        .bind(time::now_micros())
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    Ok(Some(lines))
}

/// Units available of every SKU, for operators and tests.
pub async fn levels(pool: &AnyPool) -> sqlx::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT sku, available FROM stock")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> HashMap<String, (String, i64, i64)> {
        HashMap::from([
            ("A".to_owned(), ("Apple".to_owned(), 100, 5)),
            ("B".to_owned(), ("Bean".to_owned(), 7, 0)),
        ])
    }

    fn line(sku: &str, quantity: u32) -> pb::OrderLine {
        pb::OrderLine {
            sku: sku.into(),
            quantity,
        }
    }

    #[test]
    fn reserves_and_prices_every_line() {
        let Decision::Reserved { lines, total_cents } = decide(&[line("A", 5)], &catalog()) else {
            panic!()
        };
        assert_eq!(total_cents, 500);
        assert_eq!(lines[0].name, "Apple");
    }

    #[test]
    fn short_stock_rejects_everything() {
        let Decision::Rejected {
            reason,
            shortfalls,
            detail,
        } = decide(&[line("A", 6), line("B", 1)], &catalog())
        else {
            panic!()
        };
        assert_eq!(reason, pb::RejectionReason::InsufficientStock);
        assert_eq!(shortfalls.len(), 2);
        assert!(detail.contains("A (requested 6, available 5)"), "{detail}");
    }

    #[test]
    fn unknown_sku_wins() {
        let Decision::Rejected {
            reason, shortfalls, ..
        } = decide(&[line("A", 99), line("Z", 1)], &catalog())
        else {
            panic!()
        };
        assert_eq!(reason, pb::RejectionReason::UnknownSku);
        assert_eq!(
            shortfalls,
            vec![pb::StockShortfall {
                sku: "Z".into(),
                requested: 1,
                available: 0,
                unknown_sku: true
            }]
        );
    }
}
