//! Statements whose results nothing reads, held to go with a transaction's last round trip.
//!
//! On SQLite a statement costs less than handing it to the connection's thread and back, so
//! the batch's closing inserts and updates, its outbox rows and the delete of confirmed ones go
//! as one query of several statements. PostgreSQL takes one statement per query once it has
//! parameters, so there they go one by one, as they would have anyway.

use sqlx::{
    AnyConnection, Arguments as _, Encode, Type,
    any::{Any, AnyArguments},
    error::BoxDynError,
};

use super::{Backend, worth_caching};

/// Writes to run together, in order, before a commit.
pub struct Writes {
    backend: Backend,
    queries: Vec<Query>,
    /// The first value that could not be encoded; reported by [`Writes::execute`].
    error: Option<BoxDynError>,
}

/// One query: on SQLite every statement so far, on PostgreSQL one.
struct Query {
    sql: String,
    args: AnyArguments,
    /// Kept prepared only when every statement in it is ([`worth_caching`]).
    cached: bool,
}

impl Writes {
    /// Nothing to write yet, on `backend`.
    pub fn new(backend: Backend) -> Self {
        Writes {
            backend,
            queries: Vec::new(),
            error: None,
        }
    }

    /// The engine they are for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Adds `sql`, a statement of `rows` rows written with bare parameters ([`super::values`],
    /// [`super::params`]), whose values the following [`Writes::bind`]s give.
    pub fn statement(&mut self, sql: String, rows: usize) -> &mut Self {
        // A numbered `$n` would name the n-th value of the whole query on SQLite.
        debug_assert!(
            self.backend == Backend::Postgres || !sql.contains('$'),
            "numbered parameters in {sql}"
        );
        let cached = worth_caching(rows);
        match self.queries.last_mut() {
            // SQLite numbers the bare `?`s of each statement on from those of the one before,
            // so one argument list serves the whole query.
            Some(query) if self.backend == Backend::Sqlite => {
                query.sql.push_str(";\n");
                query.sql.push_str(&sql);
                query.cached &= cached;
            }
            _ => self.queries.push(Query {
                sql,
                args: AnyArguments::default(),
                cached,
            }),
        }
        self
    }

    /// The next parameter value of the last statement.
    pub fn bind<'t, T>(&mut self, value: T) -> &mut Self
    where
        T: Encode<'t, Any> + Type<Any>,
    {
        let query = self
            .queries
            .last_mut()
            .expect("a statement before its values");
        if let Err(error) = query.args.add(value)
            && self.error.is_none()
        {
            self.error = Some(error);
        }
        self
    }

    /// Runs them on `conn`, in order.
    pub async fn execute(self, conn: &mut AnyConnection) -> sqlx::Result<()> {
        if let Some(error) = self.error {
            return Err(sqlx::Error::Encode(error));
        }
        for query in self.queries {
            sqlx::query_with(sqlx::AssertSqlSafe(query.sql), query.args)
                .persistent(query.cached)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("backend", &self.backend)
            .field("queries", &self.queries.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{db, service::Service};

    /// Three statements in one query: each takes its own values, in order.
    #[tokio::test]
    async fn each_statement_of_a_query_takes_its_own_values() {
        let (_dir, db) = db::scratch(Service::Payment).await;
        let mut tx = db.begin().await.expect("a transaction");
        let mut writes = Writes::new(db.backend());
        let insert = |rows| {
            format!(
                "INSERT INTO inbox (queue, message_id, processed_at) VALUES {}",
                db::values(db.backend(), rows, 3)
            )
        };
        writes.statement(insert(2), 2);
        writes.bind("q").bind("a").bind(1_i64);
        writes.bind("q").bind("b").bind(2_i64);
        let delete = format!(
            "DELETE FROM inbox WHERE message_id IN ({})",
            db::params(db.backend(), 1)
        );
        writes.statement(delete, 1).bind("a");
        writes.statement(insert(1), 1);
        writes.bind("r").bind("c").bind(3_i64);
        writes.execute(&mut tx).await.expect("the writes");
        tx.commit().await.expect("a commit");

        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT queue, message_id, processed_at FROM inbox ORDER BY message_id")
                .fetch_all(db.pool())
                .await
                .expect("the inbox");
        assert_eq!(
            rows,
            [("q".into(), "b".into(), 2), ("r".into(), "c".into(), 3)]
        );
    }
}
