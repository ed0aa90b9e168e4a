//! The stock and reservations one batch of messages reads and changes: read with two
//! statements before its messages are applied, decided in memory order by order, and written
//! back with two statements, the second with the commit. Statements per order and SKU would
//! each be a round trip to the database.

use std::collections::{BTreeMap, HashMap, HashSet};

use orderflow_proto::orderflow::v1 as pb;
use sqlx::AnyConnection;

use super::stock::{self, Decision, Reservation, ReservedLine, Row};
use crate::{
    db::{self, Writes},
    time,
};

/// The batch's view of stock: what the database held, less what the batch reserved so far.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Orders whose decision was looked up, and those already decided (before or in this batch).
    looked_up: HashSet<String>,
    decided: HashSet<String>,
    /// Catalog rows read so far, with what this batch left available.
    catalog: HashMap<String, Row>,
    /// SKUs looked up and not in the catalog.
    unknown: HashSet<String>,
    /// Units this batch took, by SKU, and its decisions, not yet written.
    taken: BTreeMap<String, i64>,
    reservations: Vec<Reservation>,
}

impl Ledger {
    /// Reads what reserving `orders` needs, appending `for_update` to the stock read.
    pub async fn load(
        conn: &mut AnyConnection,
        orders: &[&pb::OrderCreated],
        for_update: &str,
    ) -> sqlx::Result<Ledger> {
        let mut ledger = Ledger::default();
        let ids: Vec<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
        ledger.look_up_orders(conn, &ids).await?;
        let skus: Vec<&str> = orders
            .iter()
            .flat_map(|o| o.items.iter().map(|line| line.sku.as_str()))
            .collect();
        ledger.look_up_skus(conn, &skus, for_update).await?;
        Ok(ledger)
    }

    /// Reserves `lines` for `order_id`, or records why not.
    pub async fn reserve(
        &mut self,
        conn: &mut AnyConnection,
        order_id: &str,
        lines: &[pb::OrderLine],
        for_update: &str,
    ) -> sqlx::Result<Decision> {
        self.look_up_orders(conn, &[order_id]).await?;
        if !self.decided.insert(order_id.to_owned()) {
            return Ok(Decision::AlreadyDecided);
        }
        let skus: Vec<&str> = lines.iter().map(|line| line.sku.as_str()).collect();
        self.look_up_skus(conn, &skus, for_update).await?;
        let decision = stock::decide(lines, &self.catalog);
        let reservation = match &decision {
            Decision::Reserved {
                lines: reserved,
                total_cents,
            } => {
                for line in reserved {
                    let units = i64::from(line.quantity);
                    if let Some(row) = self.catalog.get_mut(&line.sku) {
                        row.2 -= units;
                    }
                    *self.taken.entry(line.sku.clone()).or_default() += units;
                }
                Reservation {
                    order_id: order_id.to_owned(),
                    status: "reserved",
                    lines: reserved.clone(),
                    total_cents: *total_cents,
                }
            }
            Decision::Rejected { .. } | Decision::AlreadyDecided => Reservation {
                order_id: order_id.to_owned(),
                status: "rejected",
                lines: Vec::new(),
                total_cents: 0,
            },
        };
        self.reservations.push(reservation);
        Ok(decision)
    }

    /// Returns the stock of `order_id`'s reservation if it still holds it; `None` if there is
    /// none to release. `for_update` locks the reservation, so two instances never release it
    /// both.
    pub async fn release(
        &mut self,
        conn: &mut AnyConnection,
        order_id: &str,
        for_update: &str,
    ) -> sqlx::Result<Option<Vec<ReservedLine>>> {
        // Released from the database, so a reservation of this batch must be there first.
        if self.reservations.iter().any(|r| r.order_id == order_id) {
            let mut writes = Writes::new(db::Backend::of(conn));
            self.write(conn, &mut writes).await?;
            writes.execute(conn).await?;
        }
        let released = stock::release(conn, order_id, for_update).await?;
        for line in released.iter().flatten() {
            if let Some(row) = self.catalog.get_mut(&line.sku) {
                row.2 += i64::from(line.quantity);
            }
        }
        Ok(released)
    }

    /// Writes what the batch took and decided since the last write: the stock at once, as its
    /// update checks that every row it meant to change was there to change; the reservations
    /// into `writes`.
    pub async fn write(
        &mut self,
        conn: &mut AnyConnection,
        writes: &mut Writes,
    ) -> sqlx::Result<()> {
        let taken: Vec<(&str, i64)> = self
            .taken
            .iter()
            .map(|(sku, units)| (sku.as_str(), *units))
            .collect();
        stock::take(conn, &taken).await?;
        stock::insert(writes, &self.reservations, time::now_micros())?;
        self.taken.clear();
        self.reservations.clear();
        Ok(())
    }

    async fn look_up_orders(&mut self, conn: &mut AnyConnection, ids: &[&str]) -> sqlx::Result<()> {
        let new: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| self.looked_up.insert((*id).to_owned()))
            .collect();
        if !new.is_empty() {
            self.decided.extend(stock::decided(conn, &new).await?);
        }
        Ok(())
    }

    async fn look_up_skus(
        &mut self,
        conn: &mut AnyConnection,
        skus: &[&str],
        for_update: &str,
    ) -> sqlx::Result<()> {
        let mut new: Vec<&str> = skus
            .iter()
            .copied()
            .filter(|sku| !self.catalog.contains_key(*sku) && !self.unknown.contains(*sku))
            .collect();
        new.sort_unstable();
        new.dedup();
        if new.is_empty() {
            return Ok(());
        }
        let rows = stock::read(conn, &new, for_update).await?;
        self.unknown.extend(
            new.iter()
                .filter(|sku| !rows.contains_key(**sku))
                .map(|sku| (*sku).to_owned()),
        );
        self.catalog.extend(rows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{db, service::Service};

    fn order(id: &str, sku: &str, quantity: u32) -> pb::OrderCreated {
        pb::OrderCreated {
            order_id: id.into(),
            items: vec![pb::OrderLine {
                sku: sku.into(),
                quantity,
            }],
            ..Default::default()
        }
    }

    /// Orders of one batch compete for stock as if each had its own transaction: the second
    /// sees what the first took, a copy of the first is not decided again, and the writes
    /// land together.
    #[tokio::test]
    async fn a_batch_decides_its_orders_one_after_the_other() {
        let (_dir, db) = db::scratch(Service::Inventory).await;
        sqlx::query(
            "INSERT INTO stock (sku, name, price_cents, available) VALUES ('A', 'Apple', 100, 3)",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let batch = [
            order("o1", "A", 2),
            order("o2", "A", 2),
            order("o3", "Z", 1),
        ];
        let refs: Vec<&pb::OrderCreated> = batch.iter().collect();

        let mut tx = db.begin().await.unwrap();
        let mut ledger = Ledger::load(&mut tx, &refs, "").await.unwrap();
        let mut decisions = Vec::new();
        for o in batch.iter().chain([&batch[0]]) {
            decisions.push(
                ledger
                    .reserve(&mut tx, &o.order_id, &o.items, "")
                    .await
                    .unwrap(),
            );
        }
        let mut writes = Writes::new(db.backend());
        ledger.write(&mut tx, &mut writes).await.unwrap();
        writes.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();

        assert!(matches!(
            decisions[0],
            Decision::Reserved {
                total_cents: 200,
                ..
            }
        ));
        let Decision::Rejected { shortfalls, .. } = &decisions[1] else {
            panic!("the second order finds one unit left: {:?}", decisions[1]);
        };
        assert_eq!(shortfalls[0].available, 1);
        assert!(matches!(
            &decisions[2],
            Decision::Rejected { reason, .. } if *reason == pb::RejectionReason::UnknownSku
        ));
        assert_eq!(decisions[3], Decision::AlreadyDecided);
        assert_eq!(stock::levels(db.pool()).await.unwrap()["A"], 1);
        let (reservations,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM reservations")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(reservations, 3);

        // A later batch knows the stored decisions and returns the units of a release.
        let mut tx = db.begin().await.unwrap();
        let mut ledger = Ledger::load(&mut tx, &refs[..1], "").await.unwrap();
        assert_eq!(
            ledger
                .reserve(&mut tx, "o1", &batch[0].items, "")
                .await
                .unwrap(),
            Decision::AlreadyDecided
        );
        let released = ledger.release(&mut tx, "o1", "").await.unwrap().unwrap();
        assert_eq!(released[0].quantity, 2);
        let again = ledger
            .reserve(&mut tx, "o4", &order("o4", "A", 3).items, "")
            .await
            .unwrap();
        assert!(matches!(again, Decision::Reserved { .. }), "{again:?}");
        let mut writes = Writes::new(db.backend());
        ledger.write(&mut tx, &mut writes).await.unwrap();
        writes.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(stock::levels(db.pool()).await.unwrap()["A"], 0);
    }
}
