//! A write transaction.
//!
//! On SQLite every statement is a round trip to the connection's thread, which costs more than
//! the SQL it carries. So there the `BEGIN` goes with the transaction's first statement
//! ([`super::Database::begin_with`]) and the `COMMIT` with its last writes
//! ([`Tx::commit_with`]), each in one query. sqlx then does not know of the transaction, so a
//! [`Tx`] dropped before it ended closes its connection, which rolls it back, rather than give
//! the pool a connection in the middle of a transaction. On PostgreSQL, which takes one
//! statement per query once it has parameters, it is sqlx's own transaction.

use std::ops::{Deref, DerefMut};

use sqlx::{Any, AnyConnection, any::AnyArguments, any::AnyRow, pool::PoolConnection};
use tokio::sync::OwnedMutexGuard;

use super::{Backend, Writes};

/// SQLite's statement that starts a write transaction: it takes the file's write lock up
/// front, so the transaction never has to upgrade a read lock midway (which can deadlock).
const BEGIN: &str = "BEGIN IMMEDIATE";

/// A write transaction, holding this process's write turn (SQLite) until it ends.
#[derive(Debug)]
pub struct Tx {
    conn: Conn,
    _writer: Option<OwnedMutexGuard<()>>,
}

#[derive(Debug)]
enum Conn {
    Sqlite(Open),
    Postgres(sqlx::Transaction<'static, Any>),
}

/// A SQLite connection whose transaction sqlx does not track.
#[derive(Debug)]
struct Open {
    conn: PoolConnection<Any>,
    /// Set before the `BEGIN` is sent, cleared once the `COMMIT` or `ROLLBACK` ran.
    open: bool,
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

impl Open {
    /// Rolls back and marks the transaction ended; if that fails, the connection closes on drop.
    async fn rollback(&mut self) -> sqlx::Result<()> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl Tx {
    /// Begins a transaction on SQLite's `conn`, with `first` (and its `args`) in the same
    /// round trip; returns the rows `first` returned.
    pub(super) async fn begin_sqlite<O>(
        conn: PoolConnection<Any>,
        writer: Option<OwnedMutexGuard<()>>,
        first: Option<(String, AnyArguments, bool)>,
    ) -> sqlx::Result<(Tx, Vec<O>)>
    where
        O: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin,
    {
        // Open from before the `BEGIN`: a begin cancelled midway closes the connection.
        let mut open = Open { conn, open: true };
        let rows = match first {
            None => {
                sqlx::query(BEGIN).execute(&mut *open.conn).await?;
                Vec::new()
            }
            Some((sql, args, cached)) => {
                let sql = format!("{BEGIN};\n{sql}");
                match super::fetch_all(&mut open.conn, sql, args, cached).await {
                    Ok(rows) => rows,
                    Err(error) => {
                        // The `BEGIN` may have run.
                        let _ = open.rollback().await;
                        return Err(error);
                    }
                }
            }
        };
        let tx = Tx {
            conn: Conn::Sqlite(open),
            _writer: writer,
        };
        Ok((tx, rows))
    }

    /// A PostgreSQL transaction.
    pub(super) fn postgres(tx: sqlx::Transaction<'static, Any>) -> Tx {
        Tx {
            conn: Conn::Postgres(tx),
            _writer: None,
        }
    }

    /// The engine it runs on.
    pub fn backend(&self) -> Backend {
        match self.conn {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    /// Commits and gives up the write turn.
    pub async fn commit(self) -> sqlx::Result<()> {
        let writes = Writes::new(self.backend());
        self.commit_with(writes, || {}).await
    }

    /// Runs `writes`, commits (in the same round trip on SQLite), then runs `then` before
    /// giving up the write turn: what `then` hands on (the committed outbox rows, to the relay)
    /// reaches its reader in commit order. Rolls back if a write fails; a failed commit may
    /// have taken effect all the same.
    pub async fn commit_with(self, mut writes: Writes, then: impl FnOnce()) -> sqlx::Result<()> {
        // The write turn is held until the end.
        let Tx { conn, _writer } = self;
        match conn {
            Conn::Sqlite(mut open) => {
                writes.statement("COMMIT".to_owned(), 1);
                if let Err(error) = writes.execute(&mut open.conn).await {
                    let _ = open.rollback().await;
                    return Err(error);
                }
                open.open = false;
            }
            Conn::Postgres(mut tx) => {
                if let Err(error) = writes.execute(&mut tx).await {
                    let _ = tx.rollback().await;
                    return Err(error);
                }
                tx.commit().await?;
            }
        }
        then();
        Ok(())
    }

    /// Rolls back and gives up the write turn once the database released its lock.
    pub async fn rollback(self) -> sqlx::Result<()> {
        match self.conn {
            Conn::Sqlite(mut open) => open.rollback().await,
            Conn::Postgres(tx) => tx.rollback().await,
        }
    }
}

impl Deref for Tx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match &self.conn {
            Conn::Sqlite(open) => &open.conn,
            Conn::Postgres(tx) => tx,
        }
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.conn {
            Conn::Sqlite(open) => &mut open.conn,
            Conn::Postgres(tx) => tx,
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Arguments as _;

    use super::*;
    use crate::{db, service::Service};

    /// The inbox's ids, read outside any transaction.
    async fn inbox(db: &db::Database) -> Vec<String> {
        sqlx::query_scalar("SELECT message_id FROM inbox ORDER BY message_id")
            .fetch_all(db.pool())
            .await
            .expect("the inbox")
    }

    /// A transaction whose first statement records `id` in the inbox, and the ids it returned.
    async fn begin_recording(db: &db::Database, id: &str) -> (Tx, Vec<(String,)>) {
        let mut args = AnyArguments::default();
        args.add(id).expect("an id");
        let sql = format!("{INSERT} RETURNING message_id");
        db.begin_with(sql, args, true).await.expect("a transaction")
    }

    /// Writes that record `id` in the inbox.
    fn insert(db: &db::Database, id: &str) -> Writes {
        let mut writes = Writes::new(db.backend());
        writes.statement(INSERT.to_owned(), 1).bind(id.to_owned());
        writes
    }

    const INSERT: &str = "INSERT INTO inbox (queue, message_id, processed_at) VALUES ('q', ?, 0)";

    #[tokio::test]
    async fn the_first_statement_and_the_last_writes_share_the_transaction() {
        let (_dir, db) = db::scratch(Service::Payment).await;
        let (tx, rows) = begin_recording(&db, "a").await;
        assert_eq!(rows, [("a".to_owned(),)]);
        let mut ran = false;
        tx.commit_with(insert(&db, "b"), || ran = true)
            .await
            .expect("a commit");
        assert!(ran);
        assert_eq!(inbox(&db).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_failed_write_rolls_back_the_whole_transaction() {
        let (_dir, db) = db::scratch(Service::Payment).await;
        let (tx, _) = begin_recording(&db, "a").await;
        let mut ran = false;
        // The same primary key again.
        let committed = tx.commit_with(insert(&db, "a"), || ran = true).await;
        assert!(committed.is_err());
        assert!(!ran);
        assert!(inbox(&db).await.is_empty());
        // The connection is free of it: the next transaction begins and commits.
        let (tx, _) = begin_recording(&db, "c").await;
        tx.commit().await.expect("a commit");
        assert_eq!(inbox(&db).await, ["c"]);
    }

    /// A transaction abandoned midway (its task cancelled) never reaches the pool's next user
    /// still open: the unsynced pool has one connection, so the next transaction would get it.
    #[tokio::test]
    async fn a_dropped_transaction_is_rolled_back() {
        let (_dir, db) = db::scratch(Service::Payment).await;
        let mut tx = db.begin_unsynced().await.expect("a transaction");
        sqlx::query("INSERT INTO inbox (queue, message_id, processed_at) VALUES ('q', 'a', 0)")
            .execute(&mut *tx)
            .await
            .expect("a row");
        drop(tx);
        let mut tx = db.begin_unsynced().await.expect("a second transaction");
        sqlx::query("INSERT INTO inbox (queue, message_id, processed_at) VALUES ('q', 'b', 0)")
            .execute(&mut *tx)
            .await
            .expect("a row");
        tx.commit().await.expect("a commit");
        assert_eq!(inbox(&db).await, ["b"]);
    }
}
