//! A service's embedded SQLite database: one file per service in the data directory, WAL mode
//! so readers never block the writer, and the service's migrations applied on start.
//!
//! SQLite has one writer at a time. Left to itself, a second writer polls the lock with
//! growing sleeps (up to 100 ms each), which under load turns into second-long stalls. So every
//! writer of this process first takes [`Database`]'s async lock and waits its turn in order;
//! SQLite's own busy timeout only arbitrates between processes sharing a file.

use std::{
    ops::{Deref, DerefMut},
    path::Path,
    str::FromStr as _,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use sqlx::{
    Sqlite, SqliteConnection, SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::config::DbSync;

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

/// One service's database.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    unsynced: SqlitePool,
    writer: Arc<Mutex<()>>,
}

impl Database {
    /// Opens (creating if missing) the database at `path` and runs `migrators` in order. Each
    /// migrator ignores the others' migrations, so a service's schema is the common one plus its
    /// own.
    pub async fn open(
        path: &Path,
        sync: DbSync,
        migrators: &[Migrator],
    ) -> anyhow::Result<Database> {
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
            // Other processes (a second instance, a restarted one) may hold the write lock.
            .busy_timeout(Duration::from_secs(10));
        // Writers take turns anyway; more connections let reads (watch streams, GetOrder)
        // proceed while a writer works.
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        for migrator in migrators {
            migrator
                .run(&pool)
                .await
                .with_context(|| format!("migrating {}", path.display()))?;
        }
        // Commits on this connection do not wait for the disk. Only for writes a power cut may
        // lose without harm (the relay's deletes of confirmed outbox rows: a lost delete means
        // a republish, which consumers de-duplicate); later synced commits make them durable
        // anyway (WAL order).
        let unsynced = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.synchronous(SqliteSynchronous::Off))
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Database {
            pool,
            unsynced,
            writer: Arc::new(Mutex::new(())),
        })
    }

    /// The pool, for reads (and for writes done through [`Database::begin`]).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts a write transaction, after the writers of this process before it.
    /// `BEGIN IMMEDIATE` takes SQLite's write lock up front, so it never has to upgrade a read
    /// lock midway (which can deadlock).
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        let writer = self.writer.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(Tx {
            tx,
            _writer: writer,
        })
    }

    /// The unsynced connection, with the write turn held (see [`Database::open`]).
    pub async fn unsynced(
        &self,
    ) -> sqlx::Result<(OwnedMutexGuard<()>, sqlx::pool::PoolConnection<Sqlite>)> {
        let writer = self.writer.clone().lock_owned().await;
        let conn = self.unsynced.acquire().await?;
        Ok((writer, conn))
    }
}

/// A write transaction holding this process's write turn until it commits or is dropped.
#[derive(Debug)]
pub struct Tx {
    tx: sqlx::Transaction<'static, Sqlite>,
    _writer: OwnedMutexGuard<()>,
}

impl Tx {
    /// Commits and gives up the write turn.
    pub async fn commit(self) -> sqlx::Result<()> {
        self.tx.commit().await
    }

    /// Rolls back and gives up the write turn once SQLite's lock is released.
    pub async fn rollback(self) -> sqlx::Result<()> {
        self.tx.rollback().await
    }
}

impl Deref for Tx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}
