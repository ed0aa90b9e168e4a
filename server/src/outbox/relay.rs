//! The outbox relay: publishes committed outbox rows in order, waits for the broker's confirms,
//! then deletes them. Woken right after each commit for low latency, and by a timer as a
//! safety net. On shutdown it drains what it can before returning.

use std::{collections::HashMap, sync::Arc, time::Duration};

use lapin::types::FieldTable;
use sqlx::FromRow;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::Outbox;
use crate::{
    bus::{Outgoing, Publisher, dead_letters, message, propagation, topology::Topology},
    db::{Backend, Database},
    metrics::Metrics,
};

/// Rows published per round trip; the confirms of a batch are awaited together.
const BATCH: i64 = 256;
/// How often the relay looks even when nobody woke it (e.g. rows left by a crash).
const POLL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Confirmed rows are done; a crash before this delete republishes them, and consumers drop
/// the duplicate by message id.
async fn delete(conn: &mut sqlx::AnyConnection, seqs: &[i64]) -> sqlx::Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    let placeholders: Vec<String> = (1..=seqs.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "DELETE FROM outbox WHERE seq IN ({})",
        placeholders.join(",")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for seq in seqs {
        query = query.bind(seq);
    }
    query.execute(conn).await?;
    Ok(())
}

/// A round's result: rows published, or the error if none could be (later rows of a failed
/// batch are retried next round, in order).
fn settled(published: usize, error: Option<crate::bus::PublishError>) -> anyhow::Result<usize> {
    match error {
        Some(error) if published == 0 => Err(error.into()),
        _ => Ok(published),
    }
}

#[derive(Debug, FromRow)]
struct Row {
    seq: i64,
    message_id: String,
    routing_key: String,
    message_type: String,
    correlation_id: String,
    body: Vec<u8>,
    trace_context: String,
    created_at: i64,
    /// Set for forwarded messages (replays); `None` is the events exchange.
    exchange: Option<String>,
    /// Set for forwarded messages: their own properties (JSON).
    properties: Option<String>,
}

impl Row {
    fn exchange<'a>(&'a self, events: &'a str) -> &'a str {
        self.exchange.as_deref().unwrap_or(events)
    }
}

/// Publishes one service's outbox.
#[derive(Debug)]
pub struct Relay {
    db: Database,
    outbox: Outbox,
    publisher: Arc<Publisher>,
    exchange: String,
    metrics: Metrics,
}

impl Relay {
    /// A relay from `db`'s outbox table to the events exchange of `topology`.
    pub fn new(
        db: Database,
        outbox: Outbox,
        publisher: Arc<Publisher>,
        topology: &Topology,
        metrics: Metrics,
    ) -> Self {
        Relay {
            db,
            outbox,
            publisher,
            exchange: topology.events_exchange(),
            metrics,
        }
    }

    /// Relays until `stop`; then drains the outbox while the broker takes messages.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut failures = 0u32;
        loop {
            match self.relay_batch().await {
                Ok(0) if stop.is_cancelled() => break,
                Ok(0) => {
                    failures = 0;
                    tokio::select! {
                        _ = self.outbox.woken() => {}
                        _ = tokio::time::sleep(POLL) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                Ok(_) => failures = 0,
                Err(error) => {
                    failures += 1;
                    if stop.is_cancelled() {
                        warn!(
                            service = self.outbox.service().service_name(),
                            error = %format!("{error:#}"),
                            "Outbox not drained at shutdown; the rest is published on the next start."
                        );
                        break;
                    }
                    let delay =
                        Duration::from_millis(100 * 2u64.pow(failures.min(6))).min(BACKOFF_MAX);
                    // One warning per outage, not one per retry.
                    if failures == 1 {
                        warn!(
                            service = self.outbox.service().service_name(),
                            error = %format!("{error:#}"),
                            "Outbox relay cannot publish; events stay stored and are retried."
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        }
        debug!(
            service = self.outbox.service().service_name(),
            "Outbox relay stopped."
        );
        Ok(())
    }

    /// Publishes up to one batch; returns how many rows were published and deleted.
    ///
    /// SQLite: one relay per database file reads the oldest rows, publishes, and deletes them
    /// in a short transaction (holding the file's write lock across a broker round trip would
    /// stall every writer). PostgreSQL: every instance's relay claims rows with
    /// `FOR UPDATE SKIP LOCKED` in a transaction that lasts until they are deleted, so two
    /// relays never publish the same row.
    async fn relay_batch(&self) -> anyhow::Result<usize> {
        const SELECT: &str = "SELECT seq, message_id, routing_key, message_type, correlation_id, body, trace_context, created_at, exchange, properties
             FROM outbox ORDER BY seq LIMIT $1";
        match self.db.backend() {
            Backend::Sqlite => {
                let rows: Vec<Row> = sqlx::query_as(SELECT)
                    .bind(BATCH)
                    .fetch_all(self.db.pool())
                    .await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                let (published, error) = self.publish(&rows).await;
                if !published.is_empty() {
                    let mut tx = self.db.begin_unsynced().await?;
                    delete(&mut tx, &published).await?;
                    tx.commit().await?;
                }
                settled(published.len(), error)
            }
            Backend::Postgres => {
                let mut tx = self.db.begin().await?;
                let claim = format!("{SELECT} FOR UPDATE SKIP LOCKED");
                let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(claim))
                    .bind(BATCH)
                    .fetch_all(&mut *tx)
                    .await?;
                if rows.is_empty() {
                    tx.rollback().await?;
                    return Ok(0);
                }
                let (published, error) = self.publish(&rows).await;
                delete(&mut tx, &published).await?;
                tx.commit().await?;
                settled(published.len(), error)
            }
        }
    }

    /// Publishes `rows` with confirms; returns the `seq`s the broker took and the first error.
    async fn publish(&self, rows: &[Row]) -> (Vec<i64>, Option<crate::bus::PublishError>) {
        let service = self.outbox.service().service_name();
        let spans: Vec<tracing::Span> = rows.iter().map(|row| self.publish_span(row)).collect();
        let messages: Vec<Outgoing> = rows
            .iter()
            .zip(&spans)
            .map(|(row, span)| self.message(row, span))
            .collect();
        let results = self
            .publisher
            .publish_all(&messages)
            .instrument(tracing::Span::none())
            .await;
        let mut published = Vec::with_capacity(rows.len());
        let mut first_error = None;
        for ((row, span), result) in rows.iter().zip(&spans).zip(results) {
            match result {
                Ok(()) => {
                    let _entered = span.enter();
                    info!(
                        target: "orderflow::message",
                        service,
                        event.type = %row.message_type,
                        order.id = %row.correlation_id,
                        message.id = %row.message_id,
                        routing_key = %row.routing_key,
                        "Published event."
                    );
                    self.metrics.published(service, &row.message_type);
                    published.push(row.seq);
                }
                Err(error) => {
                    crate::telemetry::record_error(span, "publish", &error);
                    first_error.get_or_insert(error);
                }
            }
        }
        (published, first_error)
    }

    fn publish_span(&self, row: &Row) -> tracing::Span {
        let context: HashMap<String, String> =
            serde_json::from_str(&row.trace_context).unwrap_or_default();
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish {}", row.exchange(&self.exchange)),
            otel.kind = "producer",
            service.name = self.outbox.service().service_name(),
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %row.exchange(&self.exchange),
            messaging.rabbitmq.destination.routing_key = %row.routing_key,
            messaging.message.id = %row.message_id,
            messaging.message.conversation_id = %row.correlation_id,
            messaging.message.body.size = row.body.len(),
        );
        let _ = span.set_parent(propagation::from_map(&context));
        span
    }

    fn message(&self, row: &Row, span: &tracing::Span) -> Outgoing {
        // A forwarded message keeps the properties it was stored with, trace context included:
        // a replay continues the original trace.
        if let Some(properties) = row
            .properties
            .as_deref()
            .and_then(|json| dead_letters::stored_properties(json).ok())
        {
            return Outgoing {
                exchange: row.exchange(&self.exchange).to_owned(),
                routing_key: row.routing_key.clone(),
                properties,
                body: row.body.clone(),
            };
        }
        let mut headers = FieldTable::default();
        propagation::inject(&span.context(), &mut headers);
        let properties = message::properties(
            &row.message_id,
            &row.message_type,
            &row.correlation_id,
            self.outbox.service().service_name(),
            (row.created_at / 1_000_000) as u64,
        )
        .with_headers(headers);
        Outgoing {
            exchange: self.exchange.clone(),
            routing_key: row.routing_key.clone(),
            properties,
            body: row.body.clone(),
        }
    }
}
