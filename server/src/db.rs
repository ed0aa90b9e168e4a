//! A service's database: an embedded SQLite file by default (one per service in the data
//! directory), or a schema of its own in PostgreSQL (`ORDERFLOW_DATABASE_URL`) when several
//! instances of a service share their state. Migrations run on start for either. The stores
//! speak SQL both accept (numbered `$n` parameters, `ON CONFLICT`, `RETURNING`), through sqlx's
//! `Any` driver; the few differences are methods here.
//!
//! SQLite has one writer at a time. Left to itself, a second writer polls the lock with
//! growing sleeps (up to 100 ms each), which under load turns into second-long stalls. So every
//! writer of a process first takes [`Database`]'s async lock and waits its turn in order;
//! SQLite's own busy timeout only arbitrates between processes sharing a file. PostgreSQL needs
//! no such lock: writers run concurrently and row locks order what must be ordered.

use std::{collections::HashSet, path::Path, str::FromStr as _, sync::Arc};

use anyhow::Context as _;
use sqlx::{
    AnyConnection, AnyPool, Executor as _, FromRow,
    any::{AnyArguments, AnyConnectOptions, AnyPoolOptions, AnyRow},
    migrate::Migrator,
};
use tokio::sync::Mutex;

use crate::service::Service;

mod tx;
mod writes;

pub use tx::Tx;
pub use writes::Writes;

/// Key of the PostgreSQL advisory lock taken while creating a schema.
const SCHEMA_LOCK: i64 = 0x6f72_6465_7266_6c6f; // "orderflo"

/// SQLite `synchronous` setting of the connection for writes a power cut may lose.
const UNSYNCED: &str = "OFF";

/// A PostgreSQL URL (`--database-url`).
pub type DatabaseUrl = crate::secret_url::SecretUrl;

/// SQLite `synchronous` setting (see the `--db-sync` help).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DbSync {
    /// Sync every commit.
    Full,
    /// Sync at checkpoints only.
    Normal,
}

/// Which engine a database runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A schema in a PostgreSQL database.
    Postgres,
}

impl Backend {
    /// The engine behind `conn`.
    pub fn of(conn: &AnyConnection) -> Backend {
        match conn.backend_name() {
            "PostgreSQL" => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }
}

/// Where a service keeps its state.
#[derive(Debug, Clone)]
pub enum Location<'a> {
    /// `<data dir>/<service>.db`.
    File(&'a Path),
    /// A PostgreSQL database, in schema `schema`.
    Postgres {
        /// `postgres://…`.
        url: &'a str,
        /// One schema per service (and namespace), created if missing.
        schema: String,
    },
}

/// One service's database.
#[derive(Debug, Clone)]
pub struct Database {
    backend: Backend,
    pool: AnyPool,
    /// SQLite: a connection whose commits do not wait for the disk (see [`Database::unsynced`]).
    unsynced: Option<AnyPool>,
    /// SQLite: the writers' turn.
    writer: Option<Arc<Mutex<()>>>,
}

/// The schema versions of `service` on `backend`: the common outbox and inbox, then its own.
/// Each migrator ignores the other's versions (disjoint ranges), so both share one table.
fn migrators(service: Service, backend: Backend) -> [Migrator; 2] {
    let shared = |mut migrator: Migrator| {
        migrator.set_ignore_missing(true);
        migrator
    };
    match backend {
        Backend::Sqlite => [
            shared(sqlx::migrate!("./migrations/sqlite/common")),
            shared(match service {
                Service::Order => sqlx::migrate!("./migrations/sqlite/order"),
                Service::Inventory => sqlx::migrate!("./migrations/sqlite/inventory"),
                Service::Payment => sqlx::migrate!("./migrations/sqlite/payment"),
            }),
        ],
        Backend::Postgres => [
            shared(sqlx::migrate!("./migrations/postgres/common")),
            shared(match service {
                Service::Order => sqlx::migrate!("./migrations/postgres/order"),
                Service::Inventory => sqlx::migrate!("./migrations/postgres/inventory"),
                Service::Payment => sqlx::migrate!("./migrations/postgres/payment"),
            }),
        ],
    }
}

impl Database {
    /// Opens (creating if missing) `service`'s database at `location` and migrates it.
    pub async fn open(
        location: &Location<'_>,
        sync: DbSync,
        service: Service,
    ) -> anyhow::Result<Database> {
        sqlx::any::install_default_drivers();
        let database = match location {
            Location::File(data_dir) => Self::open_sqlite(data_dir, sync, service).await?,
            Location::Postgres { url, schema } => Self::open_postgres(url, schema).await?,
        };
        for migrator in migrators(service, database.backend) {
            migrator
                .run(&database.pool)
                .await
                .with_context(|| format!("migrating the {service} database"))?;
        }
        Ok(database)
    }

    async fn open_sqlite(
        data_dir: &Path,
        sync: DbSync,
        service: Service,
    ) -> anyhow::Result<Database> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let dir = data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", data_dir.display()))?;
        let path = dir.join(format!("{}.db", service.as_str()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let options = AnyConnectOptions::from_str(&url)
            .with_context(|| format!("opening {}", path.display()))?;
        let synchronous = match sync {
            DbSync::Full => "FULL",
            DbSync::Normal => "NORMAL",
        };
        let pool = sqlite_pool(options.clone(), 8, synchronous)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        // Commits on this connection do not wait for the disk. Only for writes a power cut may
        // lose without harm (the relay's deletes of confirmed outbox rows: a lost delete means
        // a republish, which consumers de-duplicate); later synced commits of other connections
        // make them durable anyway (WAL order).
        let unsynced = sqlite_pool(options, 1, UNSYNCED)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Database {
            backend: Backend::Sqlite,
            pool,
            unsynced: Some(unsynced),
            writer: Some(Arc::new(Mutex::new(()))),
        })
    }

    async fn open_postgres(url: &str, schema: &str) -> anyhow::Result<Database> {
        anyhow::ensure!(
            schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "schema `{schema}`: use lower-case letters, digits and _"
        );
        let options = AnyConnectOptions::from_str(url).context("invalid ORDERFLOW_DATABASE_URL")?;
        // The schema must exist before a connection can make it its search path.
        let setup = AnyPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .context("connecting to PostgreSQL")?;
        // Instances starting together would race on CREATE SCHEMA (IF NOT EXISTS does not
        // guard against a concurrent creation); an advisory lock takes them in turn.
        setup
            .execute(sqlx::AssertSqlSafe(format!(
                "DO $$ BEGIN PERFORM pg_advisory_xact_lock({SCHEMA_LOCK}); CREATE SCHEMA IF NOT EXISTS {schema}; END $$"
            )))
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        setup.close().await;
        let search_path = Arc::<str>::from(format!("SET search_path TO {schema}"));
        let pool = AnyPoolOptions::new()
            .max_connections(10)
            .after_connect(move |conn, _| {
                let search_path = search_path.clone();
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(search_path.to_string()))
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .context("connecting to PostgreSQL")?;
        Ok(Database {
            backend: Backend::Postgres,
            pool,
            unsynced: None,
            writer: None,
        })
    }

    /// The engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for reads (and for writes done through [`Database::begin`]).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a write transaction. On SQLite it waits for the writers of this process before
    /// it, and takes the file's write lock up front.
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        let (tx, _) = self.start::<()>(&self.pool, None).await?;
        Ok(tx)
    }

    /// Starts a write transaction with `sql` (and its `args`; kept prepared if `cached`) as its
    /// first statement, in the same round trip as the `BEGIN` on SQLite; returns the rows it
    /// returned.
    pub async fn begin_with<O>(
        &self,
        sql: String,
        args: AnyArguments,
        cached: bool,
    ) -> sqlx::Result<(Tx, Vec<O>)>
    where
        O: for<'r> FromRow<'r, AnyRow> + Send + Unpin,
    {
        self.start(&self.pool, Some((sql, args, cached))).await
    }

    /// A transaction for writes a power cut may lose without harm: on SQLite through the
    /// unsynced connection (with the write turn held), on PostgreSQL a plain one.
    pub async fn begin_unsynced(&self) -> sqlx::Result<Tx> {
        let pool = self.unsynced.as_ref().unwrap_or(&self.pool);
        let (tx, _) = self.start::<()>(pool, None).await?;
        Ok(tx)
    }

    /// A transaction on `pool`, behind this process's earlier writers on SQLite.
    async fn start<O>(
        &self,
        pool: &AnyPool,
        first: Option<(String, AnyArguments, bool)>,
    ) -> sqlx::Result<(Tx, Vec<O>)>
    where
        O: for<'r> FromRow<'r, AnyRow> + Send + Unpin,
    {
        match self.backend {
            Backend::Sqlite => {
                let writer = match &self.writer {
                    Some(writer) => Some(writer.clone().lock_owned().await),
                    None => None,
                };
                Tx::begin_sqlite(pool.acquire().await?, writer, first).await
            }
            Backend::Postgres => {
                let mut tx = pool.begin().await?;
                let rows = match first {
                    Some((sql, args, cached)) => fetch_all(&mut tx, sql, args, cached).await?,
                    None => Vec::new(),
                };
                Ok((Tx::postgres(tx), rows))
            }
        }
    }

    /// Takes the transaction-scoped lock `name` (one per schema) on PostgreSQL, so that
    /// transactions of every instance that take it run one at a time; a no-op on SQLite,
    /// whose writers already do. For changes whose row locks could not be taken in one global
    /// order (a batch touching many rows), where row locks alone would deadlock.
    pub async fn serialize(&self, conn: &mut AnyConnection, name: &str) -> sqlx::Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query(
                "SELECT 1 FROM pg_advisory_xact_lock(hashtext(current_schema() || '.' || $1))",
            )
            .bind(name)
            .execute(conn)
            .await?;
        }
        Ok(())
    }

    /// ` FOR UPDATE` on PostgreSQL, where concurrent writers must lock the rows they read
    /// before changing them; nothing on SQLite, whose writers never overlap.
    pub fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }
}

async fn sqlite_pool(
    options: AnyConnectOptions,
    connections: u32,
    synchronous: &'static str,
) -> sqlx::Result<AnyPool> {
    AnyPoolOptions::new()
        .max_connections(connections)
        // A ping before each acquire is one more hop to the SQLite worker thread per round
        // trip, and finds nothing: a local file's connection does not drop.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // Other processes (a restarted instance) may hold the write lock briefly.
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "PRAGMA synchronous = {synchronous}"
                )))
                .await?;
                // A checkpoint run by a connection that does not sync skips the sync of the
                // database file as well, and the WAL is then written over from its start: a
                // power cut could lose commits that the synced connections had made durable.
                // So only those checkpoint, and they commit far more often anyway.
                if synchronous == UNSYNCED {
                    conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                }
                conn.execute("PRAGMA foreign_keys = ON").await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
}

/// The rows of `sql` run with `args` on `conn`, kept prepared if `cached` ([`worth_caching`]):
/// for statements whose values are gathered before the query is built.
pub async fn fetch_all<O>(
    conn: &mut AnyConnection,
    sql: String,
    args: AnyArguments,
    cached: bool,
) -> sqlx::Result<Vec<O>>
where
    O: for<'r> FromRow<'r, AnyRow> + Send + Unpin,
{
    sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args)
        .persistent(cached)
        .fetch_all(conn)
        .await
}

/// Whether `error` means only that concurrent transactions got in each other's way (deadlock,
/// serialization failure, lock timeout): the same work, run again, can succeed.
pub fn is_conflict(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| matches!(code.as_ref(), "40P01" | "40001" | "55P03"))
}

/// Whether `error` means the database cannot be reached right now (no connection within the
/// pool's timeout, a broken socket, the server shutting down or refusing connections): nothing
/// about the work itself, which will succeed once the database is back.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
        // cannot connect now.
        _ => error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
    }
}

/// `($1, …, $n), ($n+1, …)`: `rows` tuples of `columns` parameters, for a multi-row `VALUES`
/// list (one statement for many rows, as each statement is a round trip). See [`params`].
pub fn values(backend: Backend, rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|row| format!("({})", numbered(backend, row * columns + 1, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$1, …, $count`: a list of parameters, for `IN (…)`. Only for a statement whose parameters
/// are all in the list, in order: on SQLite the list is of bare `?`s, which SQLite numbers by
/// position. It reads `$n` as a name instead, and looks each one up among the names before it,
/// which in a statement of hundreds of parameters costs more than the statement itself.
pub fn params(backend: Backend, count: usize) -> String {
    numbered(backend, 1, count)
}

/// Whether a statement written for `rows` rows is kept prepared on its connection. The
/// single-row texts are few, and an unloaded system runs nothing else, so preparing them once
/// saves a parse per statement (10% of the server's CPU per order, one order at a time). Not
/// the multi-row ones: a text per batch size, cached on every connection, cost 18 MiB more RSS
/// at saturation for no measurable gain.
pub fn worth_caching(rows: usize) -> bool {
    rows <= CACHED_ROWS
}

/// Rows of the largest statement [`worth_caching`].
const CACHED_ROWS: usize = 1;

/// Which of `keys` are in `column` of `table`: one `IN (…)` read per few hundred keys.
pub async fn existing(
    conn: &mut AnyConnection,
    table: &'static str,
    column: &'static str,
    keys: &[&str],
) -> sqlx::Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in keys.chunks(KEYS_PER_IN_LIST) {
        let sql = format!(
            "SELECT {column} FROM {table} WHERE {column} IN ({})",
            params(Backend::of(conn), chunk.len())
        );
        let mut query = sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(sql))
            .persistent(worth_caching(chunk.len()));
        for key in chunk {
            query = query.bind(*key);
        }
        found.extend(
            query
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .map(|(key,)| key),
        );
    }
    Ok(found)
}

/// Keys per `IN (…)` list: under SQLite's oldest limit of 999 parameters.
const KEYS_PER_IN_LIST: usize = 900;

fn numbered(backend: Backend, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| match backend {
            Backend::Sqlite => "?".to_owned(),
            Backend::Postgres => format!("${n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A PostgreSQL schema name for `service` in `namespace`: `<namespace>_<service>`, lower-case,
/// `-` turned into `_`; prefixed with `of_` where PostgreSQL reserves the name (`pg_…`).
pub fn schema_name(namespace: &str, service: Service) -> String {
    let name = format!(
        "{}_{}",
        namespace.to_ascii_lowercase().replace('-', "_"),
        service.as_str()
    );
    if name.starts_with("pg_") {
        format!("of_{name}")
    } else {
        name
    }
}

/// `service`'s database, with its real schema, on SQLite in a directory of its own (removed
/// with the returned guard): for unit tests of the stores.
#[cfg(test)]
pub async fn scratch(service: Service) -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = Database::open(&Location::File(dir.path()), DbSync::Normal, service)
        .await
        .expect("opening a scratch database");
    (dir, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_told_apart_from_a_failing_query() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::PoolClosed));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }

    #[test]
    fn values_number_parameters_row_by_row() {
        assert_eq!(values(Backend::Postgres, 1, 3), "($1, $2, $3)");
        assert_eq!(values(Backend::Postgres, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(values(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(params(Backend::Postgres, 3), "$1, $2, $3");
        assert_eq!(params(Backend::Sqlite, 2), "?, ?");
    }

    #[tokio::test]
    async fn only_synced_connections_checkpoint() {
        let (_dir, db) = scratch(Service::Payment).await;
        // About 1,600 pages of WAL, past SQLite's automatic checkpoint at 1,000, in commits
        // of the unsynced connection alone.
        let body = vec![7u8; 4096];
        for batch in 0..32 {
            let mut tx = db.begin_unsynced().await.expect("an unsynced transaction");
            for row in 0..50 {
                sqlx::query(
                    "INSERT INTO outbox (message_id, routing_key, message_type, correlation_id, body, created_at)
                     VALUES ($1, 'key', 'type', 'order', $2, 0)",
                )
                .bind(format!("m-{batch}-{row}"))
                .bind(&body)
                .execute(&mut *tx)
                .await
                .expect("an outbox row");
            }
            tx.commit().await.expect("a commit");
        }
        // (busy, frames in the WAL, frames checkpointed), read on a synced connection: had the
        // unsynced one checkpointed, the WAL would have started over and hold a few frames.
        let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(db.pool())
            .await
            .expect("a checkpoint");
        assert!(frames > 1500, "the WAL holds {frames} frames");
    }

    #[test]
    fn schema_names_are_safe_identifiers() {
        assert_eq!(
            schema_name("test-AB12", Service::Inventory),
            "test_ab12_inventory"
        );
        assert_eq!(schema_name("orderflow", Service::Order), "orderflow_order");
        assert_eq!(schema_name("pg-1", Service::Payment), "of_pg_1_payment");
    }
}
