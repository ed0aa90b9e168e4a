//! Opening a service's embedded SQLite database: one file per service in the data directory,
//! WAL mode so readers never block the writer, and the service's migrations applied on start.

use std::{path::Path, str::FromStr as _, time::Duration};

use anyhow::Context as _;
use sqlx::{
    SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::config::DbSync;

/// A write transaction. `BEGIN IMMEDIATE` takes the write lock up front, so two writers never
/// deadlock upgrading from a read lock.
pub type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Tables every service has: the outbox and the inbox.
pub fn common_migrations() -> Migrator {
    shared(sqlx::migrate!("./migrations/common"))
}

/// Lets `migrator` share its database with other migrators: each ignores the versions it does
/// not know (the common set and a service's set use disjoint version ranges).
pub fn shared(mut migrator: Migrator) -> Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// Opens (creating if missing) the database at `path` and runs `migrators` in order. Each
/// migrator ignores the others' migrations, so a service's schema is the common one plus its own.
pub async fn open(path: &Path, sync: DbSync, migrators: &[Migrator]) -> anyhow::Result<SqlitePool> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match sync {
            DbSync::Full => SqliteSynchronous::Full,
            DbSync::Normal => SqliteSynchronous::Normal,
        })
        .foreign_keys(true)
        // Other processes (a second instance, a restarted one) may hold the write lock briefly.
        .busy_timeout(Duration::from_secs(10));
    // Writers queue for SQLite's single write lock anyway; more connections let reads
    // (watch streams, GetOrder) proceed while writers wait.
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    for migrator in migrators {
        migrator
            .run(&pool)
            .await
            .with_context(|| format!("migrating {}", path.display()))?;
    }
    Ok(pool)
}

/// A one-connection pool on an already migrated database whose commits do not wait for the
/// disk. Only for writes that may be lost in a power cut without harm: the outbox relay's
/// deletes of confirmed rows (a lost delete means a republish, which consumers de-duplicate).
/// Later synced commits of other connections make these durable anyway (WAL order).
pub async fn open_unsynced(path: &Path) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Off)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .with_context(|| format!("opening {}", path.display()))
}

/// Starts a write transaction.
pub async fn begin(pool: &SqlitePool) -> sqlx::Result<Tx> {
    pool.begin_with("BEGIN IMMEDIATE").await
}
