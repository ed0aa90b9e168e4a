//! Idempotent, transactional message handling: the bridge from `bus::Processor` to a service's
//! [`Handler`]. A batch of deliveries shares one database transaction; a delivery that fails is
//! taken out and the rest applied again, so one failure does not undo the others. A delivery's
//! id goes into the `inbox`
//! table in the same transaction as its effects, so a redelivery is recognised and acknowledged
//! without applying anything twice; the outcome it published then is still in the outbox.

use std::{collections::HashSet, future::Future, sync::Arc};

use backon::ExponentialBuilder;
use sqlx::{AnyConnection, Arguments as _, any::AnyArguments};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{
    bus::{Event, HandleError, Incoming, Processor, nth_delay, pause::Pause, propagation},
    db::{self, Database, Tx, Writes},
    fault::Faults,
    outbox::{Outbox, Staged},
    time,
};

/// Work a handler does for one delivery, inside the batch transaction.
pub struct Context<'a> {
    conn: &'a mut AnyConnection,
    db: &'a Database,
    serialized: &'a mut Vec<&'static str>,
    staged: &'a mut Vec<Staged>,
    writes: Writes,
    after_commit: AfterCommit,
}

impl Context<'_> {
    /// The transaction's connection.
    pub fn conn(&mut self) -> &mut AnyConnection {
        self.conn
    }

    /// What to append to a `SELECT` of rows this handler will change (see
    /// [`Database::for_update`]).
    pub fn for_update(&self) -> &'static str {
        self.db.for_update()
    }

    /// Runs the rest of this transaction (the whole batch) one at a time with every other
    /// transaction that takes `name`, across instances (see [`Database::serialize`]).
    pub async fn serialize(&mut self, name: &'static str) -> Result<(), HandleError> {
        if !self.serialized.contains(&name) {
            self.db
                .serialize(self.conn, name)
                .await
                .map_err(HandleError::transient)?;
            self.serialized.push(name);
        }
        Ok(())
    }

    /// Stages `event` for publishing once the transaction commits; returns its message id.
    /// The batch writes every staged event to the outbox in one statement before it commits.
    pub fn publish<E: Event>(&mut self, event: &E) -> String {
        let row = Staged::new(event, &tracing::Span::current().context());
        let id = row.message_id().to_owned();
        self.staged.push(row);
        id
    }

    /// Writes whose results nothing reads, to go with the batch's last round trip before the
    /// commit (see [`Writes`]): what [`Handler::finish`] writes back. Anything read later in
    /// the batch does not see them yet.
    pub fn writes(&mut self) -> &mut Writes {
        &mut self.writes
    }

    /// [`Context::conn`] and [`Context::writes`] at once.
    pub fn conn_and_writes(&mut self) -> (&mut AnyConnection, &mut Writes) {
        (self.conn, &mut self.writes)
    }

    /// Runs `f` after the transaction committed (never if it rolls back).
    pub fn after_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(f));
    }
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("staged", &self.staged.len())
            .field("after_commit", &self.after_commit.len())
            .finish_non_exhaustive()
    }
}

/// What to run once a batch's transaction has committed.
type AfterCommit = Vec<Box<dyn FnOnce() + Send>>;

/// A service's reaction to the messages of one queue.
///
/// A batch's messages are handled one after the other inside one transaction. What they read
/// and write may be gathered per batch instead: [`Handler::prepare`] loads the rows every
/// message of the batch needs with a few statements, [`Handler::handle`] works on those rows in
/// memory, and [`Handler::finish`] writes the changes back with a few more, which go with the
/// outbox rows as the commit's last round trip where they need no answer
/// ([`Context::writes`]). Every round trip to the database's connection thread costs more
/// than the SQL it carries, and under load those round trips are what a message costs.
pub trait Handler: Send + Sync + 'static {
    /// What one batch loaded and has yet to write.
    type Batch: Send;

    /// Loads what `messages` need before any of them is handled.
    fn prepare(
        &self,
        cx: &mut Context<'_>,
        messages: &[&Incoming],
    ) -> impl Future<Output = Result<Self::Batch, HandleError>> + Send;

    /// Applies the effects of `message` through `cx` and `batch`. Must not commit; may fail,
    /// and then the batch is applied again without it.
    fn handle(
        &self,
        cx: &mut Context<'_>,
        batch: &mut Self::Batch,
        message: &Incoming,
    ) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Writes what `batch` holds, after the last message and before the commit, through
    /// [`Context::writes`] where nothing needs an answer.
    fn finish(
        &self,
        cx: &mut Context<'_>,
        batch: Self::Batch,
    ) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// How the inbox recognises a message it has already handled.
pub type DedupKey = fn(&Incoming) -> Option<String>;

/// The default de-duplication key: the producer's `message_id`.
pub fn by_message_id(message: &Incoming) -> Option<String> {
    message.message_id().map(str::to_owned)
}

/// Processes one queue's batches with a [`Handler`], exactly once per message id.
#[derive(Debug)]
pub struct Inbox<H> {
    db: Database,
    outbox: Outbox,
    queue: String,
    handler: Arc<H>,
    dedup_key: DedupKey,
    faults: Faults,
    shutdown: CancellationToken,
    pause: Pause,
}

impl<H: Handler> Inbox<H> {
    /// An inbox for `queue`, recording in `db` and staging events in `outbox`.
    pub fn new(db: Database, outbox: Outbox, queue: String, handler: Arc<H>) -> Self {
        Inbox {
            db,
            outbox,
            queue,
            handler,
            dedup_key: by_message_id,
            faults: Faults::default(),
            shutdown: CancellationToken::new(),
            pause: Pause::default(),
        }
    }

    /// Injects `faults`: handler failures and panics before the handler runs, and the crash
    /// after a commit.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Stops waiting out a database outage at `shutdown` (see [`Processor::process`]).
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Reports a batch held through a database outage on `pause` (its consumer's).
    pub fn with_pause(mut self, pause: Pause) -> Self {
        self.pause = pause;
        self
    }

    /// Uses `key` instead of the message id to recognise duplicates.
    pub fn with_dedup_key(mut self, key: DedupKey) -> Self {
        self.dedup_key = key;
        self
    }

    /// Applies a batch in one transaction. A message whose handler fails may have written
    /// part of its effects, so the transaction is rolled back and the batch applied again
    /// without it: cheaper than a savepoint around every message, as failures are rare. A
    /// conflict lost to another instance's transaction is nobody's fault: the batch runs again
    /// as it was, a few times.
    async fn process_batch(
        &self,
        batch: &[Incoming],
    ) -> Result<Vec<Result<(), HandleError>>, Failure> {
        let keys: Vec<Option<String>> = batch.iter().map(|m| (self.dedup_key)(m)).collect();
        let mut failed: Vec<Option<HandleError>> = keys
            .iter()
            .map(|key| {
                key.is_none().then(|| {
                    HandleError::permanent(anyhow::anyhow!(
                        "message has no message_id, so it cannot be processed exactly once"
                    ))
                })
            })
            .collect();
        let mut conflicts = 0;
        loop {
            match self.attempt(batch, &keys, &failed).await {
                Attempt::Committed(after_commit) => {
                    if self.faults.crash_after_commit() {
                        tracing::error!(
                            "Injected fault: aborting after commit, before publishing."
                        );
                        std::process::abort();
                    }
                    for callback in after_commit {
                        callback();
                    }
                    return Ok(failed.into_iter().map(|f| f.map_or(Ok(()), Err)).collect());
                }
                Attempt::Rejected { index, error, span } => {
                    // Another instance's transaction got in the way, not this message.
                    if is_conflict(&error) && again(&mut conflicts).await {
                        continue;
                    }
                    crate::telemetry::record_error(&span, error.kind(), &error);
                    failed[index] = Some(error);
                }
                Attempt::Failed(failure) => {
                    if failure.is_conflict() && again(&mut conflicts).await {
                        continue;
                    }
                    return Err(failure);
                }
            }
        }
    }

    /// One transaction over the messages of `batch` that have not failed yet. Every outcome
    /// but [`Attempt::Committed`] has rolled it back.
    async fn attempt(
        &self,
        batch: &[Incoming],
        keys: &[Option<String>],
        failed: &[Option<HandleError>],
    ) -> Attempt {
        let pending: Vec<&str> = keys
            .iter()
            .zip(failed)
            .filter_map(|(key, failure)| key.as_deref().filter(|_| failure.is_none()))
            .collect();
        let (mut tx, new) = match self.begin_recording(&pending).await {
            Ok(begun) => begun,
            Err(error) => return Attempt::Failed(error.into()),
        };
        match self.apply_all(&mut tx, batch, keys, failed, &new).await {
            Ok((writes, staged, after_commit)) => {
                match self.outbox.commit(tx, writes, staged).await {
                    Ok(()) => Attempt::Committed(after_commit),
                    Err(error) => Attempt::Failed(error.into()),
                }
            }
            Err(attempt) => match tx.rollback().await {
                Err(error) if matches!(attempt, Attempt::Rejected { .. }) => {
                    Attempt::Failed(error.into())
                }
                _ => attempt,
            },
        }
    }

    /// Begins the batch's transaction by recording `keys` in the inbox (on SQLite the `BEGIN`
    /// goes with the first `INSERT`); returns it and the keys that were not there yet. Keys
    /// already recorded belong to deliveries whose effects are committed.
    async fn begin_recording(&self, keys: &[&str]) -> sqlx::Result<(Tx, HashSet<String>)> {
        let now = time::now_micros();
        let mut chunks = keys.chunks(KEYS_PER_INSERT);
        let Some(first) = chunks.next() else {
            return Ok((self.db.begin().await?, HashSet::new()));
        };
        let (sql, args) = self.record(first, now)?;
        let (mut tx, rows) = self
            .db
            .begin_with::<(String,)>(sql, args, db::worth_caching(first.len()))
            .await?;
        let mut new: HashSet<String> = rows.into_iter().map(|(key,)| key).collect();
        let rest = async {
            for chunk in chunks {
                let (sql, args) = self.record(chunk, now)?;
                let rows: Vec<(String,)> =
                    db::fetch_all(&mut tx, sql, args, db::worth_caching(chunk.len())).await?;
                new.extend(rows.into_iter().map(|(key,)| key));
            }
            Ok(())
        }
        .await;
        if let Err(error) = rest {
            let _ = tx.rollback().await;
            return Err(error);
        }
        Ok((tx, new))
    }

    /// The statement that records `keys` in the inbox, returning those it added.
    fn record(&self, keys: &[&str], now: i64) -> sqlx::Result<(String, AnyArguments)> {
        let sql = format!(
            "INSERT INTO inbox (queue, message_id, processed_at) VALUES {} ON CONFLICT DO NOTHING RETURNING message_id",
            db::values(self.db.backend(), keys.len(), 3)
        );
        let mut args = AnyArguments::default();
        for key in keys {
            args.add(self.queue.as_str())
                .and_then(|()| args.add(*key))
                .and_then(|()| args.add(now))
                .map_err(sqlx::Error::Encode)?;
        }
        Ok((sql, args))
    }

    /// Has the handler apply the messages whose keys are `new` in the inbox, inside `tx`.
    /// Returns the writes still to run, the events to stage and what to run after the commit.
    async fn apply_all(
        &self,
        tx: &mut Tx,
        batch: &[Incoming],
        keys: &[Option<String>],
        failed: &[Option<HandleError>],
        new: &HashSet<String>,
    ) -> Result<(Writes, Vec<Staged>, AfterCommit), Attempt> {
        // This attempt's messages: new, not failed before, and the first of their key.
        let mut seen = HashSet::new();
        let mut todo = Vec::with_capacity(batch.len());
        for (index, (message, key)) in batch.iter().zip(keys).enumerate() {
            let Some(key) = key.as_deref().filter(|_| failed[index].is_none()) else {
                continue;
            };
            // Recorded before (a redelivery), or twice in this batch (a republished copy).
            if !new.contains(key) || !seen.insert(key) {
                message.mark_duplicate();
                tracing::debug!(message.id = %key, "Duplicate delivery; effects already committed.");
                continue;
            }
            todo.push(index);
        }
        let mut staged = Vec::new();
        let mut serialized = Vec::new();
        let mut cx = Context {
            conn: tx,
            db: &self.db,
            serialized: &mut serialized,
            staged: &mut staged,
            writes: Writes::new(self.db.backend()),
            after_commit: Vec::new(),
        };
        let messages: Vec<&Incoming> = todo.iter().map(|&index| &batch[index]).collect();
        let mut loaded = self
            .handler
            .prepare(&mut cx, &messages)
            .await
            .map_err(|error| Attempt::Failed(error.into()))?;
        for index in todo {
            let message = &batch[index];
            let span = process_span(message, &self.queue, self.outbox.service().service_name());
            let applied = self
                .apply(&mut cx, &mut loaded, message)
                .instrument(span.clone())
                .await;
            match applied {
                Ok(()) => {}
                // The database went away mid-batch: not this message's fault.
                Err(error) if is_unavailable(&error) => return Err(Attempt::Failed(error.into())),
                Err(error) => return Err(Attempt::Rejected { index, error, span }),
            }
        }
        self.handler
            .finish(&mut cx, loaded)
            .await
            .map_err(|error| Attempt::Failed(error.into()))?;
        let Context {
            writes,
            after_commit,
            ..
        } = cx;
        Ok((writes, staged, after_commit))
    }

    /// One new message's effects, through its handler.
    async fn apply(
        &self,
        cx: &mut Context<'_>,
        batch: &mut H::Batch,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        // Injected faults act here, where a real handler failure would surface, so no domain
        // handler carries test code.
        self.faults.inject(message)?;
        self.handler.handle(cx, batch, message).await
    }
}

/// How one attempt at a batch ended.
enum Attempt {
    /// Committed; these run now.
    Committed(AfterCommit),
    /// The handler failed the message at `index` (its `span` records why): the batch runs
    /// again without it.
    Rejected {
        index: usize,
        error: HandleError,
        span: tracing::Span,
    },
    /// The transaction as a whole failed.
    Failed(Failure),
}

/// Why a batch's transaction failed as a whole.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// One of the inbox's own statements, the begin or the commit.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The handler's reads or writes for the batch, or the database going away under one
    /// message.
    #[error(transparent)]
    Handler(#[from] HandleError),
}

impl Failure {
    /// Lost to another instance's transaction: worth running again at once.
    fn is_conflict(&self) -> bool {
        match self {
            Failure::Database(error) => db::is_conflict(error),
            Failure::Handler(error) => is_conflict(error),
        }
    }

    /// The database cannot be reached: the batch is held until it can.
    fn is_unavailable(&self) -> bool {
        match self {
            Failure::Database(error) => db::is_unavailable(error),
            Failure::Handler(error) => is_unavailable(error),
        }
    }
}

/// Inbox records per INSERT: three parameters each stays under SQLite's oldest limit of 999.
const KEYS_PER_INSERT: usize = 300;

/// Times a batch is run again after losing a conflict with another instance's transaction,
/// before its deliveries go the usual retry way.
const MAX_CONFLICT_RETRIES: u32 = 5;

/// Counts one more lost conflict and pauses before the batch runs again; false once the batch
/// has lost [`MAX_CONFLICT_RETRIES`].
async fn again(conflicts: &mut u32) -> bool {
    if *conflicts >= MAX_CONFLICT_RETRIES {
        return false;
    }
    *conflicts += 1;
    conflict_pause(*conflicts).await;
    true
}

/// A short random pause, growing with `conflicts`, so the transactions that collided do not
/// collide again in lockstep.
async fn conflict_pause(conflicts: u32) {
    use rand::Rng as _;
    let millis = rand::rng().random_range(1..=10 * u64::from(conflicts));
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
}

/// Whether a handler failed only because the database could not be reached.
fn is_unavailable(error: &HandleError) -> bool {
    caused_by(error, db::is_unavailable)
}

/// Whether a handler failed only because of a conflict with a concurrent transaction.
fn is_conflict(error: &HandleError) -> bool {
    caused_by(error, db::is_conflict)
}

/// Whether a transient failure has a database error that passes `test` among its causes.
fn caused_by(error: &HandleError, test: fn(&sqlx::Error) -> bool) -> bool {
    match error {
        HandleError::Transient(error) => error
            .chain()
            .any(|cause| cause.downcast_ref::<sqlx::Error>().is_some_and(test)),
        HandleError::Permanent(_) => false,
    }
}

impl<H: Handler> Processor for Inbox<H> {
    /// While the database cannot be reached, the batch is held (unacknowledged) and tried again
    /// once it answers: an outage is nobody's message's fault, and spending the messages'
    /// attempts on it would dead-letter them in any outage longer than the retry schedule.
    async fn process(&self, batch: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut pauses = 0;
        let mut waited = false;
        // Dropped on every return: the batch is settled, one way or the other, right after.
        let mut _held = None;
        loop {
            let error = match self.process_batch(batch).await {
                Ok(results) => {
                    if waited {
                        tracing::info!(queue = %self.queue, "The database answers again; carrying on.");
                    }
                    return results;
                }
                Err(error) => error,
            };
            if !error.is_unavailable() || self.shutdown.is_cancelled() {
                // Nothing of the batch was committed: every delivery is retried.
                let error = anyhow::Error::from(error).context("database transaction failed");
                return batch
                    .iter()
                    .map(|_| Err(HandleError::transient(anyhow::anyhow!("{error:#}"))))
                    .collect();
            }
            if !waited {
                tracing::warn!(
                    queue = %self.queue,
                    held = batch.len(),
                    error = %format!("{error:#}"),
                    "The database cannot be reached; holding the batch until it answers."
                );
                waited = true;
                _held = Some(self.pause.holding());
            }
            pauses += 1;
            tokio::select! {
                _ = tokio::time::sleep(nth_delay(OUTAGE_PAUSES, pauses)) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
    }
}

/// Pauses between tries of a batch while the database cannot be reached: 200 ms doubling to 2 s.
const OUTAGE_PAUSES: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(std::time::Duration::from_millis(200))
    .with_max_delay(std::time::Duration::from_secs(2));

/// The CONSUMER span of one delivery, continuing the producer's trace from the headers.
fn process_span(message: &Incoming, queue: &str, service: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {queue}"),
        otel.kind = "consumer",
        service.name = service,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %queue,
        messaging.rabbitmq.destination.routing_key = %message.routing_key(),
        messaging.message.id = message.message_id().unwrap_or_default(),
        messaging.message.conversation_id = message.correlation_id().unwrap_or_default(),
        messaging.message.body.size = message.body().len(),
        messaging.message.delivery_attempt = message.attempt(),
        event.type = message.kind().unwrap_or_default(),
    );
    let _ = span.set_parent(propagation::extract(message.headers()));
    span
}
