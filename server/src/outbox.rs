//! Transactional outbox. A service stages the events its state change causes ([`Staged`]
//! rows) and [`Outbox::commit`]s them with the transaction that made the change, so either both
//! are committed or neither. The [`relay`]
//! publishes committed rows with publisher confirms and deletes them; a crash between commit
//! and publish only delays the publish until the relay runs again, and nothing that was rolled
//! back is ever published. A row the broker refuses backs off on its own and is finally parked
//! as a dead letter, never dropped.

mod feed;
mod park;
pub mod relay;
mod store;
mod verdict;

use std::sync::Arc;

use feed::Feed;
use sqlx::AnyConnection;
use tokio::sync::Notify;

use crate::{
    bus::{Event, propagation},
    db::{self, Backend, Tx, Writes},
    service::Service,
    time,
};

/// A message staged with [`Outbox::stage_forward`].
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// Target exchange (`""` for the default exchange, straight to a queue).
    pub exchange: &'a str,
    /// Routing key (a queue name, through the default exchange).
    pub routing_key: &'a str,
    /// Its message id, kept so consumers still recognise it.
    pub message_id: &'a str,
    /// The AMQP `type`.
    pub message_type: &'a str,
    /// The order id.
    pub correlation_id: &'a str,
    /// Untouched body.
    pub body: &'a [u8],
    /// AMQP properties as JSON (see `bus::dead_letters`).
    pub properties: &'a str,
    /// Trace context the publish span continues (JSON object).
    pub trace_context: &'a str,
}

/// A service's outbox: where it stages events, and the bell that wakes its relay.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service: Service,
    wake: Notify,
    /// SQLite: committed rows go to the relay in memory ([`feed`]). PostgreSQL: every
    /// instance's relay claims rows from the table.
    feed: Option<Feed>,
}

impl Outbox {
    /// The outbox of `service`, whose database runs on `backend`.
    pub fn new(service: Service, backend: Backend) -> Self {
        Outbox {
            inner: Arc::new(Inner {
                service,
                wake: Notify::new(),
                feed: (backend == Backend::Sqlite).then(Feed::new),
            }),
        }
    }

    /// The service whose events these are.
    pub fn service(&self) -> Service {
        self.inner.service
    }

    /// Stages a message that is not one of this service's events, such as a replayed dead
    /// letter, to be published as it is. Returns `false` when a row with its message id is
    /// already waiting: the message is on its way.
    pub async fn stage_forward(
        &self,
        conn: &mut AnyConnection,
        message: &Forward<'_>,
    ) -> sqlx::Result<bool> {
        let staged = sqlx::query(
            "INSERT INTO outbox (message_id, routing_key, message_type, correlation_id, body, trace_context, created_at, exchange, properties)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message.message_id)
        .bind(message.routing_key)
        .bind(message.message_type)
        .bind(message.correlation_id)
        .bind(message.body)
        .bind(message.trace_context)
        .bind(time::now_micros())
        .bind(message.exchange)
        .bind(message.properties)
        .execute(conn)
        .await?;
        Ok(staged.rows_affected() == 1)
    }

    /// Hands `rows`, just committed, to the relay and wakes it.
    fn committed(&self, rows: Vec<Staged>) {
        if rows.is_empty() {
            return;
        }
        if let Some(feed) = &self.inner.feed {
            feed.committed(rows);
        }
        self.inner.wake.notify_one();
    }

    /// Wakes the relay to read the table, after a commit that staged rows without handing
    /// them over (a forwarded message). A wake with nobody waiting is kept, so a commit racing
    /// the relay's last look is never missed.
    pub fn wake(&self) {
        if let Some(feed) = &self.inner.feed {
            feed.sweep();
        }
        self.inner.wake.notify_one();
    }

    /// Runs `writes` (the transaction's last ones), writes `staged` (its events) in `tx`,
    /// deletes the rows the broker has confirmed since the last write (SQLite; on PostgreSQL
    /// each relay deletes its own), and commits, all in one round trip on SQLite; then hands the
    /// events to the relay. Rolls back on failure, and then has the relay read the table: a
    /// failed commit may have taken effect all the same.
    pub async fn commit(
        &self,
        tx: Tx,
        mut writes: Writes,
        staged: Vec<Staged>,
    ) -> sqlx::Result<()> {
        let cleanup = Cleanup {
            outbox: self,
            message_ids: self.feed().map(Feed::take_confirmed).unwrap_or_default(),
        };
        store::add_delete(&mut writes, &cleanup.message_ids);
        write(&mut writes, &staged);
        // Handed over before the write turn is given up, so in commit order.
        let committed = tx
            .commit_with(writes, || {
                cleanup.committed();
                self.committed(staged);
            })
            .await;
        if committed.is_err() {
            self.wake();
        }
        committed
    }

    /// The relay's in-memory feed (SQLite).
    fn feed(&self) -> Option<&Feed> {
        self.inner.feed.as_ref()
    }

    /// Confirmed rows not yet deleted, which the table still counts.
    fn confirmed_len(&self) -> usize {
        self.inner
            .feed
            .as_ref()
            .map_or(0, feed::Feed::confirmed_len)
    }

    async fn woken(&self) {
        self.inner.wake.notified().await;
    }
}

/// Confirmed outbox rows a transaction deletes on its way; back to the relay's list unless
/// the transaction commits.
struct Cleanup<'a> {
    outbox: &'a Outbox,
    message_ids: Vec<String>,
}

impl Cleanup<'_> {
    /// The transaction committed: the rows are gone.
    fn committed(mut self) {
        self.message_ids.clear();
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(feed) = self.outbox.feed()
            && !self.message_ids.is_empty()
        {
            feed.restore(std::mem::take(&mut self.message_ids));
        }
    }
}

/// An event ready to be written to the outbox, with its trace context: what a batch of
/// deliveries collects while its handlers run, to write in one statement before it commits.
#[derive(Debug, Clone)]
pub struct Staged {
    message_id: String,
    routing_key: &'static str,
    message_type: String,
    correlation_id: String,
    body: Vec<u8>,
    trace: String,
    created_at: i64,
}

impl Staged {
    /// `event`, with a new message id and `trace` as the context its publish continues.
    pub fn new<E: Event>(event: &E, trace: &opentelemetry::Context) -> Self {
        let trace =
            serde_json::to_string(&propagation::to_map(trace)).unwrap_or_else(|_| "{}".to_owned());
        Staged {
            message_id: uuid::Uuid::now_v7().to_string(),
            routing_key: E::ROUTING_KEY,
            message_type: E::full_name(),
            correlation_id: event.order_id().to_owned(),
            body: event.encode_to_vec(),
            trace,
            created_at: time::now_micros(),
        }
    }

    /// The message id it will be published with.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }
}

/// Rows per INSERT: seven parameters each stays under SQLite's oldest limit of 999.
const ROWS_PER_INSERT: usize = 128;

/// Adds the insert of `rows` to `writes`, in order, a statement per [`ROWS_PER_INSERT`] rows.
fn write(writes: &mut Writes, rows: &[Staged]) {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO outbox (message_id, routing_key, message_type, correlation_id, body, trace_context, created_at) VALUES {}",
            db::values(writes.backend(), chunk.len(), 7)
        );
        writes.statement(sql, chunk.len());
        for row in chunk {
            writes
                .bind(row.message_id.clone())
                .bind(row.routing_key)
                .bind(row.message_type.clone())
                .bind(row.correlation_id.clone())
                .bind(row.body.clone())
                .bind(row.trace.clone())
                .bind(row.created_at);
        }
    }
}

/// Outbox rows not yet published, and how long the oldest of them has waited, read at scrape
/// time with one query.
pub fn backlog_probe(outbox: Outbox, pool: sqlx::AnyPool) -> crate::metrics::Probe {
    let service = outbox.service();
    Box::new(move || {
        let pool = pool.clone();
        let outbox = outbox.clone();
        Box::pin(async move {
            // Bounded: with the database gone the pool waits for a connection far longer
            // than a scrape may take, and the other readings (database_up first) must still
            // come through.
            let backlog = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                sqlx::query_as::<_, (i64, Option<i64>)>(
                    "SELECT COUNT(*), MIN(created_at) FROM outbox",
                )
                .fetch_one(&pool),
            )
            .await;
            let Ok(Ok((rows, oldest))) = backlog else {
                return vec![];
            };
            // Rows confirmed but not deleted yet are not waiting for the broker. (The oldest
            // age may count one of them for the moment until its delete.)
            let rows = (rows as usize).saturating_sub(outbox.confirmed_len());
            let labels = vec![("service", service.service_name().to_owned())];
            // Zero when empty, so "nothing waits" reads as zero rather than as no data.
            let age = oldest.map_or(0.0, |created| {
                (time::now_micros().saturating_sub(created)).max(0) as f64 / 1e6
            });
            vec![
                (
                    "orderflow_outbox_backlog",
                    "Events committed but not yet confirmed by the broker.",
                    labels.clone(),
                    rows as f64,
                ),
                (
                    "orderflow_outbox_oldest_age_seconds",
                    "How long the oldest event not yet confirmed by the broker has waited.",
                    labels,
                    age,
                ),
            ]
        })
    })
}
