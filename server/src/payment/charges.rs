//! The charge decisions of one batch of messages: which of its orders were charged before,
//! read with one statement before its messages are applied, and the new decisions, written
//! with one statement that goes with the commit. A charge is never made twice: an order charged
//! before, or earlier in the batch, is skipped.

use std::collections::HashSet;

use sqlx::AnyConnection;

use crate::{
    db::{self, Writes},
    time,
};

/// One decision to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The order charged.
    pub order_id: String,
    /// `processed` or `declined`.
    pub status: &'static str,
    /// What was charged (or refused).
    pub amount_cents: i64,
    /// The provider's transaction, when approved.
    pub transaction_id: Option<String>,
    /// Why it was declined.
    pub reason: String,
}

/// The batch's charges.
#[derive(Debug, Default)]
pub struct Charges {
    /// Orders whose charge was looked up, and those charged (before or in this batch).
    looked_up: HashSet<String>,
    charged: HashSet<String>,
    /// Decisions not yet written.
    new: Vec<Decision>,
}

impl Charges {
    /// Reads which of `order_ids` were charged before.
    pub async fn load(conn: &mut AnyConnection, order_ids: &[&str]) -> sqlx::Result<Charges> {
        let mut charges = Charges::default();
        charges.look_up(conn, order_ids).await?;
        Ok(charges)
    }

    /// Whether `order_id` was charged, before or in this batch.
    pub async fn charged(
        &mut self,
        conn: &mut AnyConnection,
        order_id: &str,
    ) -> sqlx::Result<bool> {
        self.look_up(conn, &[order_id]).await?;
        Ok(self.charged.contains(order_id))
    }

    /// Keeps `decision`, to be written with the batch.
    pub fn record(&mut self, decision: Decision) {
        self.charged.insert(decision.order_id.clone());
        self.new.push(decision);
    }

    /// Adds the insert of the batch's decisions to `writes`.
    pub fn write(self, writes: &mut Writes) {
        let now = time::now_micros();
        for chunk in self.new.chunks(DECISIONS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO payments (order_id, status, amount_cents, transaction_id, reason, created_at) VALUES {}",
                db::values(writes.backend(), chunk.len(), 6)
            );
            writes.statement(sql, chunk.len());
            for decision in chunk {
                writes
                    .bind(decision.order_id.clone())
                    .bind(decision.status)
                    .bind(decision.amount_cents)
                    .bind(decision.transaction_id.clone())
                    .bind(decision.reason.clone())
                    .bind(now);
            }
        }
    }

    async fn look_up(&mut self, conn: &mut AnyConnection, order_ids: &[&str]) -> sqlx::Result<()> {
        let new: Vec<&str> = order_ids
            .iter()
            .copied()
            .filter(|id| self.looked_up.insert((*id).to_owned()))
            .collect();
        self.charged
            .extend(db::existing(conn, "payments", "order_id", &new).await?);
        Ok(())
    }
}

/// Decisions per INSERT: six parameters each stays under SQLite's oldest limit of 999.
const DECISIONS_PER_INSERT: usize = 150;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Service;

    fn approved(order_id: &str) -> Decision {
        Decision {
            order_id: order_id.into(),
            status: "processed",
            amount_cents: 100,
            transaction_id: Some(format!("tx-{order_id}")),
            reason: String::new(),
        }
    }

    #[tokio::test]
    async fn an_order_is_charged_once_within_a_batch_and_across_batches() {
        let (_dir, db) = db::scratch(Service::Payment).await;
        let mut tx = db.begin().await.unwrap();
        let mut charges = Charges::load(&mut tx, &["a", "b"]).await.unwrap();
        assert!(!charges.charged(&mut tx, "a").await.unwrap());
        charges.record(approved("a"));
        assert!(
            charges.charged(&mut tx, "a").await.unwrap(),
            "a copy later in the batch"
        );
        assert!(
            !charges.charged(&mut tx, "c").await.unwrap(),
            "an order prepare did not see"
        );
        charges.record(approved("c"));
        let mut writes = Writes::new(db.backend());
        charges.write(&mut writes);
        writes.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = db.begin().await.unwrap();
        let mut charges = Charges::load(&mut tx, &["a", "b", "c"]).await.unwrap();
        for (order, charged) in [("a", true), ("b", false), ("c", true)] {
            assert_eq!(
                charges.charged(&mut tx, order).await.unwrap(),
                charged,
                "{order}"
            );
        }
    }
}
