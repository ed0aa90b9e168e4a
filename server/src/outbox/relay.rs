//! The outbox relay: publishes committed outbox rows in order, waits for the broker's confirms,
//! then deletes them. Woken right after each commit for low latency, when the soonest row
//! backing off is due, and by a timer as a safety net. On shutdown it drains what is due.
//!
//! One bad row never stalls the rest: a row the broker refuses (returned unroutable, or
//! nacked) waits out its own backoff while the rows behind it flow ([`super::verdict`]), and
//! after the last attempt it is parked in the dead-letter queue ([`super::park`]). A broker
//! outage is nobody's fault: it costs no row an attempt, and the whole relay backs off.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use backon::ExponentialBuilder;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{
    Outbox,
    feed::{Feed, Next},
    park::{Destination, Refused},
    store::{self, Claim, Reschedule, Row},
    verdict::{self, Verdict},
};
use crate::{
    bus::{
        DeadLetterReason, Outgoing, PublishError, Publisher, RetryPolicy, dead_letters, message,
        nth_delay, propagation,
        recovery::{self, Resend},
        topology::Topology,
    },
    db::Database,
    metrics::Metrics,
    time,
};

/// Rows published per round trip; the confirms of a batch are awaited together.
const BATCH: i64 = 256;
/// How often the relay looks even when nobody woke it (e.g. rows left by a crash, or
/// rescheduled by another instance).
const POLL: Duration = Duration::from_secs(1);
/// SQLite: how long confirmed rows wait for a write transaction to delete them before the
/// relay deletes them itself.
const IDLE_CLEAN_UP: Duration = Duration::from_millis(100);
/// Pauses of the whole relay while the broker cannot be reached: 200 ms doubling to 5 s.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(200))
    .with_max_delay(Duration::from_secs(5));

/// What one round did.
#[derive(Debug, Default)]
struct Round {
    /// Rows taken: every row due when the round started, up to a batch.
    claimed: usize,
    /// Rows whose fate was decided and written: published, parked or rescheduled.
    settled: usize,
    /// Why some rows could not be tried at all (broker unreachable); they stay as they were.
    outage: Option<PublishError>,
    /// When the soonest row rescheduled in this round is due again.
    next_due: Option<Instant>,
}

/// The writes a round ends with, in one transaction.
#[derive(Debug, Default)]
struct RoundWrites {
    delete: Vec<String>,
    reschedule: Vec<Reschedule>,
}

impl RoundWrites {
    fn len(&self) -> usize {
        self.delete.len() + self.reschedule.len()
    }

    async fn apply(&self, conn: &mut sqlx::AnyConnection) -> sqlx::Result<()> {
        store::delete(conn, &self.delete).await?;
        store::reschedule(conn, &self.reschedule).await
    }
}

/// A row refused for the last time, waiting for its park publish.
#[derive(Debug)]
struct Parking {
    index: usize,
    attempt: u32,
    reason: DeadLetterReason,
    error: PublishError,
}

/// Publishes one service's outbox.
#[derive(Debug)]
pub struct Relay {
    db: Database,
    outbox: Outbox,
    publisher: Arc<Publisher>,
    exchange: String,
    parking: Destination,
    policy: RetryPolicy,
    metrics: Metrics,
}

impl Relay {
    /// A relay from `db`'s outbox table to the events exchange of `topology`; rows the broker
    /// refuses are retried, then parked, as `policy` says.
    pub fn new(
        db: Database,
        outbox: Outbox,
        publisher: Arc<Publisher>,
        topology: &Topology,
        policy: RetryPolicy,
        metrics: Metrics,
    ) -> Self {
        let service = outbox.service();
        Relay {
            db,
            outbox,
            publisher,
            exchange: topology.events_exchange(),
            parking: Destination {
                exchange: topology.dead_letter_exchange(),
                route: topology.outbox_route(service),
                service,
            },
            policy,
            metrics,
        }
    }

    fn service(&self) -> &'static str {
        self.outbox.service().service_name()
    }

    /// Relays until `stop`; then drains the rows that are due while the broker takes messages.
    /// Rows backing off stay for the next start.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut failures = 0u32;
        let mut next_due: Option<Instant> = None;
        loop {
            if let Some(feed) = self.outbox.feed()
                && next_due.is_some_and(|due| due <= Instant::now())
            {
                // A row backing off is due: it is in the table only.
                feed.sweep();
                next_due = None;
            }
            let mut took_some = false;
            let failure = match self.round().await {
                Ok(round) => {
                    took_some = round.claimed > 0;
                    next_due = soonest(next_due, round.next_due);
                    match round.outage {
                        // Nothing got through: the broker is away, not one row at fault.
                        Some(outage) if round.settled == 0 => Some(anyhow::Error::from(outage)),
                        // A full batch: more may be due right now.
                        _ if round.claimed >= BATCH as usize => {
                            failures = 0;
                            continue;
                        }
                        // Everything due was taken. What was committed since has woken the
                        // outbox (a wake with nobody waiting is kept), so wait for that rather
                        // than look again at a table that is most likely empty.
                        _ => None,
                    }
                }
                Err(error) => Some(error),
            };
            let Some(error) = failure else {
                // Nothing more due.
                let feed = self.outbox.feed();
                if stop.is_cancelled() {
                    // Draining: look until a round finds nothing, as nothing wakes us now,
                    // reading the table (which deletes what was confirmed).
                    if took_some || feed.is_some_and(Feed::has_confirmed) {
                        feed.inspect(|feed| feed.sweep());
                        continue;
                    }
                    break;
                }
                failures = 0;
                let now = Instant::now();
                next_due = next_due.filter(|due| *due > now);
                let mut wake_at = next_due.map_or(now + POLL, |due| due.min(now + POLL));
                if feed.is_some_and(Feed::has_confirmed) {
                    wake_at = wake_at.min(now + IDLE_CLEAN_UP);
                }
                tokio::select! {
                    _ = self.outbox.woken() => {}
                    _ = tokio::time::sleep_until(wake_at) => {
                        // Nobody woke us: a row backing off is due, confirmed rows wait for a
                        // write to delete them, or it is time for the safety look.
                        feed.inspect(|feed| feed.sweep());
                    }
                    _ = stop.cancelled() => {}
                }
                continue;
            };
            failures += 1;
            if stop.is_cancelled() {
                warn!(
                    service = self.service(),
                    error = %format!("{error:#}"),
                    "Outbox not drained at shutdown; the rest is published on the next start."
                );
                break;
            }
            let delay = nth_delay(BACKOFF, failures);
            // One warning per outage, not one per retry.
            if failures == 1 {
                warn!(
                    service = self.service(),
                    error = %format!("{error:#}"),
                    "Outbox relay cannot publish; events stay stored and are retried."
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => {}
            }
        }
        debug!(service = self.service(), "Outbox relay stopped.");
        Ok(())
    }

    /// Takes up to one batch of due rows, publishes them and writes down what became of each.
    ///
    /// SQLite: the one relay of a database file takes the rows writers handed over ([`feed`]),
    /// or sweeps the table for them; confirmed rows are deleted by the next write transaction
    /// (or by the next sweep), refusals rescheduled in a short transaction of their own (holding
    /// the file's write lock across a broker round trip would stall every writer).
    /// PostgreSQL: every instance's relay claims rows with `FOR UPDATE SKIP LOCKED` in a
    /// transaction that lasts until they are deleted or rescheduled, so two relays never
    /// publish the same row, nor count the same refusal twice.
    async fn round(&self) -> anyhow::Result<Round> {
        let now = time::now_micros();
        match self.outbox.feed() {
            Some(feed) => {
                let rows: Vec<Row> = match feed.next(BATCH as usize) {
                    Next::Rows(rows) => rows.into_iter().map(Row::from).collect(),
                    Next::Sweep => self.sweep(feed, now).await?,
                };
                if rows.is_empty() {
                    return Ok(Round::default());
                }
                let (round, writes) = self.relay(&rows).await;
                feed.confirmed(writes.delete);
                let rescheduled = self.record_refusals(&writes.reschedule).await;
                if round.outage.is_some() || rescheduled.is_err() {
                    // The rows not settled are in the table only now.
                    feed.sweep();
                }
                rescheduled?;
                Ok(round)
            }
            None => {
                let mut tx = self.db.begin().await?;
                let rows = store::due(&mut tx, now, BATCH, Claim::SkipLocked).await?;
                if rows.is_empty() {
                    tx.rollback().await?;
                    return Ok(Round::default());
                }
                let (round, writes) = self.relay(&rows).await;
                writes.apply(&mut tx).await?;
                tx.commit().await?;
                Ok(round)
            }
        }
    }

    /// Records refusals in a short transaction of their own.
    async fn record_refusals(&self, rows: &[Reschedule]) -> sqlx::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_unsynced().await?;
        store::reschedule(&mut tx, rows).await?;
        tx.commit().await
    }

    /// Deletes the confirmed rows and reads the due ones from the table, holding the write
    /// turn so that no writer hands rows over meanwhile: what the feed held is read with the
    /// rest.
    async fn sweep(&self, feed: &Feed, now: i64) -> anyhow::Result<Vec<Row>> {
        let mut tx = self.db.begin_unsynced().await?;
        let confirmed = feed.take_confirmed();
        let swept = async {
            store::delete(&mut tx, &confirmed).await?;
            store::due(&mut tx, now, BATCH, Claim::Read).await
        }
        .await;
        let rows = match swept {
            Ok(rows) => rows,
            Err(error) => {
                feed.restore(confirmed);
                let _ = tx.rollback().await;
                return Err(error.into());
            }
        };
        feed.start_sweep();
        if let Err(error) = tx.commit().await {
            feed.restore(confirmed);
            feed.sweep();
            return Err(error.into());
        }
        if rows.len() >= BATCH as usize {
            // More may be due than one batch: read again next round.
            feed.sweep();
        }
        Ok(rows)
    }

    /// Publishes `rows` with confirms and decides each one's fate; parks the rows refused for
    /// the last time. Nothing is written yet: a row is deleted only with its confirm in hand.
    async fn relay(&self, rows: &[Row]) -> (Round, RoundWrites) {
        let service = self.service();
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
        let mut round = Round {
            claimed: rows.len(),
            ..Round::default()
        };
        let mut writes = RoundWrites::default();
        let mut parking = Vec::new();
        for (index, result) in results.into_iter().enumerate() {
            let (row, span) = (&rows[index], &spans[index]);
            let error = match result {
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
                    writes.delete.push(row.message_id.clone());
                    continue;
                }
                Err(error) => error,
            };
            crate::telemetry::record_error(span, "publish", &error);
            match verdict::judge(&error, row.attempts(), &self.policy) {
                Verdict::Outage => {
                    round.outage.get_or_insert(error);
                }
                Verdict::Retry { attempt, delay } => {
                    warn!(
                        service,
                        event.type = %row.message_type,
                        order.id = %row.correlation_id,
                        message.id = %row.message_id,
                        routing_key = %row.routing_key,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %error,
                        "The broker refused an outbox event; retrying it after a delay while later events go ahead."
                    );
                    self.metrics.outbox_retried(service, &row.message_type);
                    writes
                        .reschedule
                        .push(self.reschedule(row, attempt, delay, &mut round));
                }
                Verdict::Park { attempt, reason } => parking.push(Parking {
                    index,
                    attempt,
                    reason,
                    error,
                }),
            }
        }
        if !parking.is_empty() {
            self.park(rows, &messages, parking, &mut round, &mut writes)
                .await;
        }
        round.settled = writes.len();
        (round, writes)
    }

    /// Publishes the dead letters of rows refused for the last time, with confirms. A row is
    /// deleted only once its dead letter is confirmed; if the park itself is refused, the row
    /// stays and is tried again after a delay; if the broker is away, it stays untouched.
    async fn park(
        &self,
        rows: &[Row],
        messages: &[Outgoing],
        parking: Vec<Parking>,
        round: &mut Round,
        writes: &mut RoundWrites,
    ) {
        let service = self.service();
        let now = SystemTime::now();
        let (copies, spans): (Vec<Outgoing>, Vec<tracing::Span>) = parking
            .iter()
            .map(|p| {
                let (row, message) = (&rows[p.index], &messages[p.index]);
                let refused = Refused {
                    message,
                    attempt: p.attempt,
                    reason: p.reason,
                    error: p.error.to_string(),
                    first_failed_at: row.first_failed_at,
                };
                let resend = Resend {
                    service: self.outbox.service(),
                    queue: &self.parking.route,
                    exchange: &self.parking.exchange,
                    routing_key: &self.parking.route,
                    message_id: &row.message_id,
                    order_id: &row.correlation_id,
                    event_type: &row.message_type,
                };
                let span = recovery::dead_letter_span(
                    &resend,
                    p.reason.as_str(),
                    p.attempt,
                    &p.error,
                    propagation::extract(message.properties.headers().as_ref()),
                );
                let copy = self.parking.copy(&refused, now);
                (copy.with_trace_context(&span.context()), span)
            })
            .unzip();
        let results = self
            .publisher
            .publish_all(&copies)
            .instrument(tracing::Span::none())
            .await;
        for ((p, result), span) in parking.into_iter().zip(results).zip(spans) {
            let row = &rows[p.index];
            let _entered = span.enter();
            match result {
                Ok(()) => {
                    error!(
                        service,
                        event.type = %row.message_type,
                        order.id = %row.correlation_id,
                        message.id = %row.message_id,
                        routing_key = %row.routing_key,
                        attempt = p.attempt,
                        reason = p.reason.as_str(),
                        dead_letter.exchange = %self.parking.exchange,
                        dead_letter.routing_key = %self.parking.route,
                        error = %p.error,
                        "The broker kept refusing an outbox event; parked it as a dead letter."
                    );
                    self.metrics.outbox_parked(service, &row.message_type);
                    writes.delete.push(row.message_id.clone());
                }
                Err(park_error) if verdict::is_outage(&park_error) => {
                    round.outage.get_or_insert(park_error);
                }
                Err(park_error) => {
                    let delay = self.policy.delay(p.attempt);
                    crate::telemetry::record_error(&span, "park", &park_error);
                    warn!(
                        service,
                        event.type = %row.message_type,
                        order.id = %row.correlation_id,
                        message.id = %row.message_id,
                        routing_key = %row.routing_key,
                        attempt = p.attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        dead_letter.routing_key = %self.parking.route,
                        error = %park_error,
                        "Could not park a refused outbox event; it stays in the outbox and is tried again."
                    );
                    writes
                        .reschedule
                        .push(self.reschedule(row, p.attempt, delay, round));
                }
            }
        }
    }

    /// `row`'s next try after its `attempt`-th refusal, `delay` from now.
    fn reschedule(
        &self,
        row: &Row,
        attempt: u32,
        delay: Duration,
        round: &mut Round,
    ) -> Reschedule {
        let now = time::now_micros();
        // Read after the wall clock, so the relay never wakes before the row is due.
        round.next_due = soonest(round.next_due, Some(Instant::now() + delay));
        Reschedule {
            message_id: row.message_id.clone(),
            attempts: attempt,
            next_attempt_at: verdict::due_at(now, delay),
            failed_at: now,
        }
    }

    fn publish_span(&self, row: &Row) -> tracing::Span {
        let context: HashMap<String, String> =
            serde_json::from_str(&row.trace_context).unwrap_or_default();
        // A replay goes straight to its queue through the default exchange, whose name is
        // empty; the messaging conventions call it `amq.default`.
        let exchange = match row.exchange(&self.exchange) {
            "" => "amq.default",
            exchange => exchange,
        };
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish {exchange}"),
            otel.kind = "producer",
            service.name = self.outbox.service().service_name(),
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %exchange,
            messaging.rabbitmq.destination.routing_key = %row.routing_key,
            messaging.message.id = %row.message_id,
            messaging.message.conversation_id = %row.correlation_id,
            messaging.message.body.size = row.body.len(),
        );
        let _ = span.set_parent(propagation::from_map(&context));
        span
    }

    fn message(&self, row: &Row, span: &tracing::Span) -> Outgoing {
        // A forwarded message (a replay) keeps the properties it was stored with, but travels
        // in the trace the row was staged in: the replay's, which links to the original.
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
            }
            .with_trace_context(&span.context());
        }
        let properties = message::properties(
            &row.message_id,
            &row.message_type,
            &row.correlation_id,
            self.outbox.service().service_name(),
            (row.created_at / 1_000_000) as u64,
        );
        Outgoing {
            exchange: self.exchange.clone(),
            routing_key: row.routing_key.clone(),
            properties,
            body: row.body.clone(),
        }
        .with_trace_context(&span.context())
    }
}

/// The sooner of two optional instants.
fn soonest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
