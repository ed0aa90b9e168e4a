//! Group commit for `PlaceOrder`. Every commit of the order database waits for the disk (with
//! `--db-sync full`, milliseconds), so concurrent PlaceOrder calls hand their orders to one
//! writer task that stores everything waiting in a single transaction: under load, one disk
//! sync serves a whole batch; alone, an order is committed at once. Each caller gets its answer
//! only after the commit, so "accepted" still means "durable".

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{
    NewOrder,
    store::{self, PlaceError, Placed},
    watch::Hub,
};
use crate::{
    db::{Database, Writes},
    outbox::Outbox,
};

/// Most orders one transaction stores.
const BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Placed, PlaceError>>;

struct Request {
    order: NewOrder,
    trace: opentelemetry::Context,
    reply: Reply,
}

/// Hands orders to the writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Placements {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("customer", &self.order.customer_id)
            .finish_non_exhaustive()
    }
}

impl Placements {
    /// Stores `order` (or finds it by idempotency key); returns once committed.
    pub async fn place(&self, order: NewOrder) -> Result<Placed, PlaceError> {
        let (reply, answer) = oneshot::channel();
        let trace = tracing::Span::current().context();
        self.tx
            .send(Request {
                order,
                trace,
                reply,
            })
            .await
            .map_err(|_| PlaceError::ShuttingDown)?;
        answer.await.map_err(|_| PlaceError::ShuttingDown)?
    }
}

/// The writer task's state.
#[derive(Debug)]
pub struct Writer {
    rx: mpsc::Receiver<Request>,
    db: Database,
    outbox: Outbox,
    hub: Hub,
}

/// A writer and the handle callers use. Requests queue up to `BATCH * 4`; beyond that callers
/// wait, so a burst is absorbed without unbounded memory.
pub fn writer(db: Database, outbox: Outbox, hub: Hub) -> (Placements, Writer) {
    let (tx, rx) = mpsc::channel(BATCH * 4);
    (
        Placements { tx },
        Writer {
            rx,
            db,
            outbox,
            hub,
        },
    )
}

impl Writer {
    /// Stores orders until `shutdown`, then finishes what is already queued.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let first = tokio::select! {
                request = self.rx.recv() => match request {
                    Some(request) => request,
                    None => return Ok(()),
                },
                _ = shutdown.cancelled() => {
                    self.rx.close();
                    while let Some(request) = self.rx.recv().await {
                        self.commit(request).await;
                    }
                    return Ok(());
                }
            };
            self.commit(first).await;
        }
    }

    /// Stores `first` and every order waiting behind it (up to [`BATCH`]) in one transaction,
    /// and answers every caller.
    async fn commit(&mut self, first: Request) {
        // The batch is taken once the database's write turn is ours: orders that arrive while
        // the consumers' transactions hold it join this commit instead of waiting for the next.
        let began = self.db.begin().await;
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match self.rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let mut tx = match began {
            Ok(tx) => tx,
            Err(error) => return fail_all(batch, &error),
        };
        let mut staged = Vec::with_capacity(batch.len());
        let orders: Vec<_> = batch.iter().map(|r| (&r.order, &r.trace)).collect();
        // A reused key is found by a read before anything is written, so a refused order
        // leaves nothing behind and needs no savepoint; a database error leaves a half-written
        // batch, which fails as a whole (callers retry with their idempotency keys).
        let mut writes = Writes::new(self.db.backend());
        let results = match store::place(&mut tx, &mut writes, &orders, &mut staged).await {
            Ok(results) => results,
            Err(error) => {
                let _ = tx.rollback().await;
                return fail_all(batch, &error);
            }
        };
        if let Err(error) = self.outbox.commit(tx, writes, staged).await {
            return fail_all(batch, &error);
        }
        for (result, request) in results.into_iter().zip(batch) {
            if let Ok(Placed::Created(order)) = &result {
                // In the poll that committed: the saga cannot have moved the order on yet.
                self.hub.placed(order);
            }
            // A caller that went away (deadline, disconnect) still has its order stored; a
            // retry with the same idempotency key finds it.
            let _ = request.reply.send(result);
        }
    }
}

fn fail_all(batch: Vec<Request>, error: &sqlx::Error) {
    // Two instances inserting the same idempotency key: the loser's callers retry and find the
    // winner's order.
    let contended = error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation());
    for request in batch {
        let reason = if contended {
            PlaceError::Contended
        } else {
            PlaceError::Database(clone_error(error))
        };
        let _ = request.reply.send(Err(reason));
    }
}

/// sqlx errors are not `Clone`; keep the message for each caller.
fn clone_error(error: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(format!("storing the order failed: {error}"))
}
