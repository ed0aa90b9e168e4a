//! A PostgreSQL database of its own per test, shared by the test binaries (`#[path]`-included
//! by each): created on a real server, dropped when the test ends, pass or fail.

use std::time::Duration;

use sqlx::{Connection as _, Executor as _, PgConnection};

/// The PostgreSQL server: `ORDERFLOW_TEST_POSTGRES` if set (any database on it; tests create
/// their own next to it), else the local one with trust auth.
fn postgres_server() -> String {
    std::env::var("ORDERFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database created for one test and dropped when the test ends, pass or fail.
pub(crate) struct PgDatabase {
    /// `postgres://…/<name>`.
    pub(crate) url: String,
    name: String,
}

impl PgDatabase {
    /// Creates `of_<random>`; fails the test with instructions if PostgreSQL is not there.
    pub(crate) async fn create() -> PgDatabase {
        let server = postgres_server();
        let mut admin = connect_admin(&server).await;
        let name = format!("of_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("CREATE DATABASE (the test user needs CREATEDB)");
        let _ = admin.close().await;
        let base = server
            .rsplit_once('/')
            .map_or(server.as_str(), |(base, _)| base);
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

async fn connect_admin(server: &str) -> PgConnection {
    match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(server)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => panic!(
            "PostgreSQL is not reachable at {server} ({error}). These tests need a real one: \
             start it (Debian: `service postgresql start`; it must accept the `postgres` user \
             from 127.0.0.1 without a password) or point ORDERFLOW_TEST_POSTGRES at another."
        ),
        Err(_) => panic!("PostgreSQL at {server} did not answer within 10s"),
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop runs outside any runtime a test could still use: drop the database on a
        // runtime of its own.
        let (server, name) = (postgres_server(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&server).await?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
    }
}
