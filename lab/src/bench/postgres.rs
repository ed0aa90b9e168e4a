//! orderflow's state in PostgreSQL for a run: a database of its own, created on the given server
//! before the servers start and dropped after they stop, so each run starts empty and leaves
//! nothing behind.

use anyhow::{Context as _, Result};
use sqlx::{Connection as _, Executor as _, PgConnection};

/// A database created for one run.
pub(crate) struct RunDatabase {
    /// `postgres://…/<name>`, for the servers' `--database-url`.
    pub(crate) url: String,
    server: String,
    name: String,
}

impl RunDatabase {
    /// Creates `<prefix>_<random>` on `server` (the URL of any database there).
    pub(crate) async fn create(server: &str, prefix: &str) -> Result<RunDatabase> {
        let name = format!(
            "{}_{}",
            prefix.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut admin = PgConnection::connect(server)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {server}"))?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .context("CREATE DATABASE (the user needs CREATEDB)")?;
        let _ = admin.close().await;
        let base = server.rsplit_once('/').map_or(server, |(base, _)| base);
        Ok(RunDatabase {
            url: format!("{base}/{name}"),
            server: server.to_owned(),
            name,
        })
    }

    /// Drops the database, ending any connection a server left open.
    pub(crate) async fn drop(self) -> Result<()> {
        let mut admin = PgConnection::connect(&self.server).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .await?;
        let _ = admin.close().await;
        Ok(())
    }
}
