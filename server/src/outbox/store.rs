//! The outbox table as the relay sees it: which rows are due, and what happens to a row after
//! its publish: deleted once confirmed (or parked), or rescheduled after a refusal. The SQL is
//! the same on SQLite and PostgreSQL; only the claim differs (see [`due`]).

use sqlx::{AnyConnection, FromRow};

use super::Staged;
use crate::db::{self, Writes};

/// One staged event, with its retry state.
#[derive(Debug, Clone, FromRow)]
pub(super) struct Row {
    pub(super) message_id: String,
    pub(super) routing_key: String,
    pub(super) message_type: String,
    pub(super) correlation_id: String,
    pub(super) body: Vec<u8>,
    pub(super) trace_context: String,
    pub(super) created_at: i64,
    /// Publishes the broker refused so far.
    pub(super) attempts: i64,
    /// When the first refusal happened (µs since the epoch), if one did.
    pub(super) first_failed_at: Option<i64>,
    /// Set for forwarded messages (replays); `None` is the events exchange.
    pub(super) exchange: Option<String>,
    /// Set for forwarded messages: their own properties (JSON).
    pub(super) properties: Option<String>,
}

impl From<Staged> for Row {
    /// A row just committed: never tried yet.
    fn from(staged: Staged) -> Self {
        Row {
            message_id: staged.message_id,
            routing_key: staged.routing_key.to_owned(),
            message_type: staged.message_type,
            correlation_id: staged.correlation_id,
            body: staged.body,
            trace_context: staged.trace,
            created_at: staged.created_at,
            attempts: 0,
            first_failed_at: None,
            exchange: None,
            properties: None,
        }
    }
}

impl Row {
    /// Where it is published: its own exchange, or `events`.
    pub(super) fn exchange<'a>(&'a self, events: &'a str) -> &'a str {
        self.exchange.as_deref().unwrap_or(events)
    }

    /// Refusals so far, as the retry policy counts them.
    pub(super) fn attempts(&self) -> u32 {
        u32::try_from(self.attempts.max(0)).unwrap_or(u32::MAX)
    }
}

/// How the relay takes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// Just read them: the only relay of a SQLite file.
    Read,
    /// Lock them, skipping rows another relay holds (PostgreSQL, several instances). The
    /// locks last until the caller's transaction ends.
    SkipLocked,
}

/// Up to `limit` rows that are due at `now` (µs since the epoch), oldest first. Rows backing
/// off after a refusal are skipped, so they never hold up the rows behind them.
pub(super) async fn due(
    conn: &mut AnyConnection,
    now: i64,
    limit: i64,
    claim: Claim,
) -> sqlx::Result<Vec<Row>> {
    const SELECT: &str = "SELECT message_id, routing_key, message_type, correlation_id, body, trace_context, created_at, attempts, first_failed_at, exchange, properties
         FROM outbox WHERE next_attempt_at <= $1 ORDER BY seq LIMIT $2";
    let sql = match claim {
        Claim::Read => SELECT.to_owned(),
        Claim::SkipLocked => format!("{SELECT} FOR UPDATE SKIP LOCKED"),
    };
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// Message ids per DELETE: under SQLite's oldest limit of 999 parameters.
const IDS_PER_DELETE: usize = 500;

/// Deletes rows whose publish (or park) the broker confirmed, by message id. A crash before
/// this delete republishes them, and consumers drop the duplicate by message id.
pub(super) async fn delete(conn: &mut AnyConnection, message_ids: &[String]) -> sqlx::Result<()> {
    let mut writes = Writes::new(db::Backend::of(conn));
    add_delete(&mut writes, message_ids);
    writes.execute(conn).await
}

/// Adds [`delete`]'s statements to `writes`.
pub(super) fn add_delete(writes: &mut Writes, message_ids: &[String]) {
    for chunk in message_ids.chunks(IDS_PER_DELETE) {
        let sql = format!(
            "DELETE FROM outbox WHERE message_id IN ({})",
            db::params(writes.backend(), chunk.len())
        );
        writes.statement(sql, chunk.len());
        for id in chunk {
            writes.bind(id.clone());
        }
    }
}

/// A refused row's next try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reschedule {
    pub(super) message_id: String,
    /// Refusals so far, this one included.
    pub(super) attempts: u32,
    /// Not before this (µs since the epoch).
    pub(super) next_attempt_at: i64,
    /// When this refusal happened; kept only if it is the first.
    pub(super) failed_at: i64,
}

/// Records refusals: the attempt count, when to try again, and the first failure's time.
pub(super) async fn reschedule(conn: &mut AnyConnection, rows: &[Reschedule]) -> sqlx::Result<()> {
    for row in rows {
        sqlx::query(
            "UPDATE outbox SET attempts = $1, next_attempt_at = $2,
                 first_failed_at = COALESCE(first_failed_at, $3)
             WHERE message_id = $4",
        )
        .bind(i64::from(row.attempts))
        .bind(row.next_attempt_at)
        .bind(row.failed_at)
        .bind(&row.message_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{db, service::Service};

    async fn stage(conn: &mut AnyConnection, id: &str) {
        sqlx::query(
            "INSERT INTO outbox (message_id, routing_key, message_type, correlation_id, body, created_at)
             VALUES ($1, 'order.created', 't', 'o', $2, 0)",
        )
        .bind(id)
        .bind(vec![1u8])
        .execute(conn)
        .await
        .unwrap();
    }

    fn ids(rows: &[Row]) -> Vec<&str> {
        rows.iter().map(|r| r.message_id.as_str()).collect()
    }

    /// The real schema (migrations included) on SQLite, in a directory of its own.
    #[tokio::test]
    async fn rows_backing_off_are_skipped_until_due_and_keep_their_first_failure() {
        let (_dir, db) = db::scratch(Service::Order).await;
        let mut conn = db.pool().acquire().await.unwrap();
        for id in ["a", "b", "c"] {
            stage(&mut conn, id).await;
        }
        let rows = due(&mut conn, 1_000, 10, Claim::Read).await.unwrap();
        assert_eq!(ids(&rows), ["a", "b", "c"], "new rows are due at once");
        assert!(
            rows.iter()
                .all(|r| r.attempts() == 0 && r.first_failed_at.is_none())
        );
        assert_eq!(
            ids(&due(&mut conn, 1_000, 2, Claim::Read).await.unwrap()),
            ["a", "b"]
        );

        // `a` is refused at t=1000 and waits until t=5000: `b` and `c` come first.
        let a = rows[0].message_id.clone();
        let refusal = Reschedule {
            message_id: a.clone(),
            attempts: 1,
            next_attempt_at: 5_000,
            failed_at: 1_000,
        };
        reschedule(&mut conn, std::slice::from_ref(&refusal))
            .await
            .unwrap();
        assert_eq!(
            ids(&due(&mut conn, 4_999, 2, Claim::Read).await.unwrap()),
            ["b", "c"]
        );
        let again = due(&mut conn, 5_000, 10, Claim::Read).await.unwrap();
        assert_eq!(ids(&again), ["a", "b", "c"], "due again, in order");
        assert_eq!(again[0].attempts(), 1);
        assert_eq!(again[0].first_failed_at, Some(1_000));

        // A second refusal counts, but the first failure's time stays.
        let second = Reschedule {
            attempts: 2,
            next_attempt_at: 9_000,
            failed_at: 5_000,
            ..refusal
        };
        reschedule(&mut conn, &[second]).await.unwrap();
        let later = due(&mut conn, 9_000, 1, Claim::Read).await.unwrap();
        assert_eq!(
            (later[0].attempts(), later[0].first_failed_at),
            (2, Some(1_000))
        );

        delete(&mut conn, &[a, again[1].message_id.clone()])
            .await
            .unwrap();
        assert_eq!(
            ids(&due(&mut conn, 9_000, 10, Claim::Read).await.unwrap()),
            ["c"]
        );
    }
}
