//! The orders one batch of messages touches: read with one statement before its messages are
//! applied, changed in memory message by message, and written back with two statements that go
//! with the commit. One statement per order and event would each be a round trip to the database.

use std::collections::{BTreeSet, HashMap};

use sqlx::AnyConnection;

use super::{Change, Order, Status, store};
use crate::{db::Writes, time};

/// The batch's orders, as its messages have left them so far.
#[derive(Debug, Default)]
pub struct Orders {
    /// Every order read so far; `None` where the database has none by that id.
    read: HashMap<String, Option<Order>>,
    /// Ids of the orders changed.
    changed: BTreeSet<String>,
    /// History rows to append, oldest first.
    history: Vec<(String, Change)>,
}

impl Orders {
    /// Reads the orders `ids` (duplicates allowed), appending `for_update`.
    pub async fn load(
        conn: &mut AnyConnection,
        ids: &[&str],
        for_update: &str,
    ) -> sqlx::Result<Orders> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut read: HashMap<String, Option<Order>> =
            ids.iter().map(|id| ((*id).to_owned(), None)).collect();
        for order in store::load_many(conn, &ids, for_update).await? {
            read.insert(order.order_id.clone(), Some(order));
        }
        Ok(Orders {
            read,
            ..Orders::default()
        })
    }

    /// The order as this batch has it, read now if [`Orders::load`] was not told of it.
    pub async fn get(
        &mut self,
        conn: &mut AnyConnection,
        order_id: &str,
        for_update: &str,
    ) -> sqlx::Result<Option<Order>> {
        if !self.read.contains_key(order_id) {
            let order = store::load_locked(conn, order_id, for_update).await?;
            self.read.insert(order_id.to_owned(), order);
        }
        Ok(self.read[order_id].clone())
    }

    /// Whether the order's history, this batch's changes included, contains `status`.
    pub async fn has_reached(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
        status: Status,
    ) -> sqlx::Result<bool> {
        let pending = self
            .history
            .iter()
            .any(|(id, change)| id == order_id && change.status == status);
        Ok(pending || store::has_reached(conn, order_id, status).await?)
    }

    /// Keeps `order`'s new details (no status change).
    pub fn save(&mut self, order: Order) {
        self.changed.insert(order.order_id.clone());
        self.read.insert(order.order_id.clone(), Some(order));
    }

    /// Moves `order` through `statuses`, with `reason` on failures; returns the history rows
    /// appended, oldest first.
    pub fn record(&mut self, mut order: Order, statuses: &[Status], reason: &str) -> Vec<Change> {
        let changes = store::changes(&order, statuses, reason, time::now_micros());
        if let Some(last) = changes.last() {
            order.status = last.status;
            order.version = last.version;
        }
        self.history.extend(
            changes
                .iter()
                .map(|change| (order.order_id.clone(), change.clone())),
        );
        self.save(order);
        changes
    }

    /// Adds the writes of every change of the batch to `writes`.
    pub fn write(self, writes: &mut Writes) -> sqlx::Result<()> {
        let orders: Vec<&Order> = self
            .changed
            .iter()
            .filter_map(|id| self.read.get(id).and_then(Option::as_ref))
            .collect();
        if !orders.is_empty() {
            store::update_many(writes, &orders, time::now_micros())?;
        }
        if !self.history.is_empty() {
            let rows: Vec<(&str, &Change)> = self
                .history
                .iter()
                .map(|(id, change)| (id.as_str(), change))
                .collect();
            store::insert_changes(writes, &rows);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        db,
        order::{Line, NewOrder, store::Placed},
        service::Service,
    };

    /// Two events about one order in one batch: the second sees the first's change, and both
    /// history rows land with consecutive versions.
    #[tokio::test]
    async fn a_batch_sees_its_own_changes_and_writes_them_all() {
        let (_dir, db) = db::scratch(Service::Order).await;
        let request = NewOrder {
            customer_id: "alice".into(),
            lines: vec![Line {
                sku: "KB-001".into(),
                quantity: 1,
            }],
            idempotency_key: None,
        };
        let trace = opentelemetry::Context::new();
        let mut tx = db.begin().await.unwrap();
        let mut writes = Writes::new(db.backend());
        let placed = store::place(&mut tx, &mut writes, &[(&request, &trace)], &mut Vec::new())
            .await
            .unwrap();
        writes.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        let Ok(Placed::Created(order)) = &placed[0] else {
            panic!("{placed:?}")
        };
        let id = order.order_id.as_str();

        let mut tx = db.begin().await.unwrap();
        let mut orders = Orders::load(&mut tx, &[id, id, "unknown"], "")
            .await
            .unwrap();
        assert!(orders.get(&mut tx, "unknown", "").await.unwrap().is_none());
        let order = orders.get(&mut tx, id, "").await.unwrap().unwrap();
        orders.record(order, &[Status::InventoryReserved], "");
        assert!(
            orders
                .has_reached(&mut tx, id, Status::InventoryReserved)
                .await
                .unwrap()
        );
        let mut order = orders.get(&mut tx, id, "").await.unwrap().unwrap();
        assert_eq!(
            (order.status, order.version),
            (Status::InventoryReserved, 2)
        );
        order.transaction_id = Some("tx-1".into());
        let changes = orders.record(order, &[Status::Completed], "");
        assert_eq!(changes[0].version, 3);
        let mut writes = Writes::new(db.backend());
        orders.write(&mut writes).unwrap();
        writes.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();

        let stored = store::get(db.pool(), id).await.unwrap().unwrap();
        assert_eq!((stored.status, stored.version), (Status::Completed, 3));
        assert_eq!(stored.transaction_id.as_deref(), Some("tx-1"));
        let history: Vec<(u64, Status)> = stored
            .history
            .iter()
            .map(|c| (c.version, c.status))
            .collect();
        assert_eq!(
            history,
            [
                (1, Status::Pending),
                (2, Status::InventoryReserved),
                (3, Status::Completed)
            ]
        );
    }
}
