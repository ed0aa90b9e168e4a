//! The dead-letter store. Every dead letter of the namespace reaches Order's intake queue and
//! is kept here, in the same transaction that marks its order FAILED; people browse, replay and
//! purge it here (the `DeadLetters` API), never in a queue.
//!
//! Why a store and not the queues: RabbitMQ 4 counts every message a browse hands back to a
//! quorum queue as a delivery and drops it at the delivery limit, so a queue cannot be read
//! without being consumed. Here, reading is free and concurrent, and a replay or purge is one
//! transaction: two operators can never both take the same dead letter. A replay goes out
//! through the outbox, so it is published with confirms even if the broker is down right now.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, FromRow};
use tracing::info;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{
    bus::{
        Topology,
        dead_letters::{self, Parked},
        propagation,
        recovery::{self, Resend},
    },
    db::Database,
    outbox::{Forward, Outbox},
    service::Service,
    time,
};

/// A place dead letters come from, and the service that gave up on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The work queue, or `<ns>.<service>.outbox`.
    pub name: String,
    /// Its service.
    pub service: Service,
}

/// Every source of dead letters in `topology`'s namespace: each work queue, and each
/// service's outbox.
pub fn sources(topology: &Topology) -> Vec<Source> {
    let queues = topology.all_queues().into_iter().map(|q| Source {
        name: q.work,
        service: q.subscription.service,
    });
    let outboxes = Service::ALL.into_iter().map(|service| Source {
        name: topology.outbox_route(service),
        service,
    });
    queues.chain(outboxes).collect()
}

/// Which dead letters of a source an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every one.
    All,
    /// Those with these message ids.
    Ids(Vec<String>),
}

/// One stored dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Arrival order in the store.
    pub seq: i64,
    /// What was read from the intake.
    pub parked: Parked,
    /// When it was stored (µs since the epoch).
    pub stored_at: i64,
}

#[derive(Debug, FromRow)]
struct Row {
    seq: i64,
    source: String,
    message_id: String,
    message_type: String,
    correlation_id: String,
    body: Vec<u8>,
    properties: String,
    headers: String,
    reason: String,
    last_error: String,
    attempts: i64,
    failing_service: String,
    original_exchange: String,
    original_routing_key: String,
    first_failure_at: Option<i64>,
    last_failure_at: Option<i64>,
    replay_exchange: String,
    replay_routing_key: String,
    stored_at: i64,
}

impl From<Row> for Stored {
    fn from(row: Row) -> Self {
        Stored {
            seq: row.seq,
            stored_at: row.stored_at,
            parked: Parked {
                source: row.source,
                message_id: row.message_id,
                kind: row.message_type,
                correlation_id: row.correlation_id,
                body: row.body,
                properties: row.properties,
                headers: serde_json::from_str::<BTreeMap<String, String>>(&row.headers)
                    .unwrap_or_default(),
                reason: row.reason,
                last_error: row.last_error,
                attempts: row.attempts.clamp(0, i64::from(u32::MAX)) as u32,
                failing_service: row.failing_service,
                original_exchange: row.original_exchange,
                original_routing_key: row.original_routing_key,
                first_failure_at: row.first_failure_at,
                last_failure_at: row.last_failure_at,
                replay_exchange: row.replay_exchange,
                replay_routing_key: row.replay_routing_key,
            },
        }
    }
}

const COLUMNS: &str = "seq, source, message_id, message_type, correlation_id, body, properties, headers, reason, last_error, attempts, failing_service, original_exchange, original_routing_key, first_failure_at, last_failure_at, replay_exchange, replay_routing_key, stored_at";

/// Keeps `parked`, in the caller's transaction (the intake's inbox makes it once per dead
/// letter).
pub async fn record(conn: &mut AnyConnection, parked: &Parked) -> sqlx::Result<()> {
    let headers = serde_json::to_string(&parked.headers).unwrap_or_else(|_| "{}".to_owned());
    sqlx::query(
        "INSERT INTO dead_letters (source, message_id, message_type, correlation_id, body, properties, headers, reason, last_error, attempts, failing_service, original_exchange, original_routing_key, first_failure_at, last_failure_at, replay_exchange, replay_routing_key, stored_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(&parked.source)
    .bind(&parked.message_id)
    .bind(&parked.kind)
    .bind(&parked.correlation_id)
    .bind(&parked.body)
    .bind(&parked.properties)
    .bind(headers)
    .bind(&parked.reason)
    .bind(&parked.last_error)
    .bind(i64::from(parked.attempts))
    .bind(&parked.failing_service)
    .bind(&parked.original_exchange)
    .bind(&parked.original_routing_key)
    .bind(parked.first_failure_at)
    .bind(parked.last_failure_at)
    .bind(&parked.replay_exchange)
    .bind(&parked.replay_routing_key)
    .bind(time::now_micros())
    .execute(conn)
    .await?;
    Ok(())
}

/// The dead letters kept by one Order database.
#[derive(Debug, Clone)]
pub struct DeadLetterStore {
    db: Database,
    outbox: Outbox,
}

impl DeadLetterStore {
    /// The store in `db`; replays are staged in `outbox`.
    pub fn new(db: Database, outbox: Outbox) -> Self {
        DeadLetterStore { db, outbox }
    }

    /// How many dead letters each source holds (sources with none are absent).
    pub async fn depths(&self) -> sqlx::Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT source, COUNT(*) FROM dead_letters GROUP BY source")
                .fetch_all(self.db.pool())
                .await?;
        Ok(rows
            .into_iter()
            .map(|(source, n)| (source, n.max(0) as u64))
            .collect())
    }

    /// The oldest `limit` dead letters of `source`, and how many it holds.
    pub async fn list(&self, source: &str, limit: u32) -> sqlx::Result<(Vec<Stored>, u64)> {
        let sql =
            format!("SELECT {COLUMNS} FROM dead_letters WHERE source = $1 ORDER BY seq LIMIT $2");
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(source)
            .bind(i64::from(limit))
            .fetch_all(self.db.pool())
            .await?;
        let (depth,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM dead_letters WHERE source = $1")
                .bind(source)
                .fetch_one(self.db.pool())
                .await?;
        Ok((
            rows.into_iter().map(Stored::from).collect(),
            depth.max(0) as u64,
        ))
    }

    /// The oldest dead letter of `source` with `message_id`.
    pub async fn get(&self, source: &str, message_id: &str) -> sqlx::Result<Option<Stored>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE source = $1 AND message_id = $2 ORDER BY seq LIMIT 1"
        );
        let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(source)
            .bind(message_id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.map(Stored::from))
    }

    /// Sends the selected dead letters of `source` back where they failed, with a fresh attempt
    /// count, and removes them, in one transaction: they leave the store exactly when their
    /// publish is staged. Returns what was replayed and the requested ids not found.
    pub async fn replay(
        &self,
        source: &str,
        selection: &Selection,
    ) -> anyhow::Result<(Vec<Stored>, Vec<String>)> {
        let mut tx = self.db.begin().await?;
        let taken = take(&mut tx, &self.db, source, selection).await?;
        for stored in &taken {
            let parked = &stored.parked;
            let properties = dead_letters::replay_properties(&parked.properties)?;
            let resend = Resend {
                service: Service::Order,
                queue: source,
                exchange: &parked.replay_exchange,
                routing_key: &parked.replay_routing_key,
                message_id: &parked.message_id,
                order_id: &parked.correlation_id,
                event_type: &parked.kind,
            };
            // The replayed message travels in the trace of the request that replays it, which
            // links back to the one it failed in.
            let span = recovery::replay_span(&resend, &parked.trace_context());
            span.in_scope(|| {
                info!(
                    queue = source,
                    message.id = %parked.message_id,
                    order.id = %parked.correlation_id,
                    event.type = %parked.kind,
                    reason = %parked.reason,
                    "Replaying a dead letter."
                )
            });
            let trace = propagation::to_map(&span.context());
            let trace = serde_json::to_string(&trace).unwrap_or_else(|_| "{}".to_owned());
            self.outbox
                .stage_forward(
                    &mut tx,
                    &Forward {
                        exchange: &parked.replay_exchange,
                        routing_key: &parked.replay_routing_key,
                        message_id: &parked.message_id,
                        message_type: &parked.kind,
                        correlation_id: &parked.correlation_id,
                        body: &parked.body,
                        properties: &properties,
                        trace_context: &trace,
                    },
                )
                .await?;
        }
        tx.commit().await?;
        if !taken.is_empty() {
            self.outbox.wake();
        }
        let missing = not_found(selection, &taken);
        Ok((taken, missing))
    }

    /// Deletes the selected dead letters of `source`; returns how many, and the ids not found.
    pub async fn purge(
        &self,
        source: &str,
        selection: &Selection,
    ) -> sqlx::Result<(u64, Vec<String>)> {
        let mut tx = self.db.begin().await?;
        let taken = take(&mut tx, &self.db, source, selection).await?;
        tx.commit().await?;
        let missing = not_found(selection, &taken);
        Ok((taken.len() as u64, missing))
    }
}

/// Deletes and returns the selected rows, oldest first. On PostgreSQL the rows are locked
/// first, so of two concurrent operations on the same dead letter only one gets it; SQLite
/// runs one writing transaction at a time anyway.
async fn take(
    conn: &mut AnyConnection,
    db: &Database,
    source: &str,
    selection: &Selection,
) -> sqlx::Result<Vec<Stored>> {
    let lock = db.for_update();
    let rows: Vec<Row> = match selection {
        Selection::All => {
            let sql =
                format!("SELECT {COLUMNS} FROM dead_letters WHERE source = $1 ORDER BY seq{lock}");
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(source)
                .fetch_all(&mut *conn)
                .await?
        }
        Selection::Ids(ids) => {
            let mut rows = Vec::new();
            for id in ids {
                let sql = format!(
                    "SELECT {COLUMNS} FROM dead_letters WHERE source = $1 AND message_id = $2 ORDER BY seq{lock}"
                );
                let found: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(source)
                    .bind(id)
                    .fetch_all(&mut *conn)
                    .await?;
                rows.extend(found);
            }
            rows.sort_by_key(|r| r.seq);
            rows.dedup_by_key(|r| r.seq);
            rows
        }
    };
    for row in &rows {
        sqlx::query("DELETE FROM dead_letters WHERE seq = $1")
            .bind(row.seq)
            .execute(&mut *conn)
            .await?;
    }
    Ok(rows.into_iter().map(Stored::from).collect())
}

fn not_found(selection: &Selection, taken: &[Stored]) -> Vec<String> {
    match selection {
        Selection::All => Vec::new(),
        Selection::Ids(ids) => {
            let mut missing: Vec<String> = ids
                .iter()
                .filter(|id| !taken.iter().any(|s| &s.parked.message_id == *id))
                .cloned()
                .collect();
            missing.sort();
            missing.dedup();
            missing
        }
    }
}

/// Dead letters kept per source, read from the store at scrape time (no broker involved, so a
/// resource alarm does not hold it up).
pub fn depth_probe(store: DeadLetterStore, topology: Topology) -> crate::metrics::Probe {
    Box::new(move || {
        let (store, topology) = (store.clone(), topology.clone());
        Box::pin(async move {
            // Bounded, like the outbox backlog: a database outage must not hold up the scrape.
            let read = tokio::time::timeout(std::time::Duration::from_secs(2), store.depths());
            let Ok(Ok(mut depths)) = read.await else {
                return vec![];
            };
            // Every known source, empty ones too, so a dashboard sees zero rather than nothing.
            for source in sources(&topology) {
                depths.entry(source.name).or_insert(0);
            }
            depths
                .into_iter()
                .map(|(source, depth)| {
                    (
                        "orderflow_dlq_depth",
                        "Dead letters kept, per work queue (or outbox) they failed in.",
                        vec![("queue", format!("{source}.dlq"))],
                        depth as f64,
                    )
                })
                .collect()
        })
    })
}
