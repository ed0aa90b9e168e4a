//! `WatchOrder` streams: one task per stream, reading the order's history from the database
//! and waking on the hub's bell. Reading by version makes resuming exact: a client that saw
//! version N asks for everything after N and gets it, with no gap and no repeat.
//!
//! Each task ends when the order reaches a terminal status, when the client goes away
//! (`tx.closed()`), or at shutdown, when the client is told to resume elsewhere.

use orderflow_proto::orderflow::v1 as pb;
use sqlx::AnyPool;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument as _, debug, warn};

use super::{OrderApi, error::Error, response::update};
use crate::order::{Change, store, watch::Subscription};

/// Updates buffered per stream; a slow client makes its own task wait, nobody else.
const BUFFER: usize = 16;
/// A stream reads again after this long even without a bell: the hub can miss a change
/// another instance committed out of `seq` order (see `Hub::follow`); this bounds the delay.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The stream type of `WatchOrder`.
pub(super) type UpdateStream = ReceiverStream<Result<pb::OrderUpdate, Status>>;

/// Starts following `order_id`, from after `resume_after` or from its current status. A caller
/// restricted to one customer (`only_customer`) cannot watch another's orders.
pub(super) async fn start(
    api: &OrderApi,
    order_id: String,
    resume_after: Option<u64>,
    only_customer: Option<&str>,
) -> Result<UpdateStream, Error> {
    let permit = api.watch_slots.clone().try_acquire_owned().map_err(|_| {
        Error::Exhausted(format!(
            "too many concurrent watch streams (limit {}); retry later",
            api.max_watches
        ))
    })?;
    // Subscribe before the first read, so a change between the read and the wait still rings.
    let subscription = api.hub.subscribe(&order_id);
    // An order this process placed and moved on needs no read (see `Hub::known`).
    let held = api.hub.known(&order_id);
    let latest = held
        .as_ref()
        .and_then(|history| history.changes.last())
        .map(|change| (change.version, change.status));
    let (customer_id, version, status, known) = match (held, latest) {
        (Some(held), Some((version, status))) => {
            (held.customer_id, version, status, Some(held.changes))
        }
        _ => {
            let mut conn = api.pool.acquire().await?;
            let Some(order) = store::load(&mut conn, &order_id).await? else {
                return Err(Error::NotFound(order_id));
            };
            (order.customer_id, order.version, order.status, None)
        }
    };
    if only_customer.is_some_and(|own| own != customer_id) {
        return Err(Error::NotFound(order_id));
    }
    let after = match resume_after {
        Some(v) if v > version => {
            return Err(Error::invalid(
                "resume_after_version",
                format!("is {v} but the order's latest version is {version}"),
            ));
        }
        Some(v) => v,
        None => version - 1,
    };
    let (tx, rx) = mpsc::channel(BUFFER);
    // Nothing can follow a final status. A FAILED order can still move on (a replayed dead
    // letter), so resuming after its FAILED version waits for that.
    if !(after >= version && status.is_final()) {
        let task = Follow {
            pool: api.pool.clone(),
            order_id,
            after,
            known: known.map(|changes| changes.into_iter().filter(|c| c.version > after).collect()),
            subscription,
            tx,
            shutdown: api.shutdown.clone(),
        };
        api.streams.spawn(task.run(permit).in_current_span());
    }
    Ok(ReceiverStream::new(rx))
}

struct Follow {
    pool: AnyPool,
    order_id: String,
    after: u64,
    /// The changes to send first, when the hub held them; otherwise the first are read.
    known: Option<Vec<Change>>,
    subscription: Subscription,
    tx: mpsc::Sender<Result<pb::OrderUpdate, Status>>,
    shutdown: CancellationToken,
}

impl Follow {
    async fn run(mut self, _permit: OwnedSemaphorePermit) {
        // The first changes come from the hub when it held them, else from the database; after
        // a bell, the changes it carries are used when they reach the newest version with no
        // gap.
        let mut woken = false;
        loop {
            let held = if woken {
                self.subscription.changes_after(self.after)
            } else {
                self.known.take()
            };
            let read = match held {
                Some(changes) => Ok(changes),
                None => self.read().await,
            };
            let changes = match read {
                Ok(changes) => changes,
                Err(error) => {
                    warn!(order.id = %self.order_id, error = %error, "Watch stream failed reading history.");
                    let _ = self
                        .tx
                        .send(Err(Status::unavailable(
                            "could not read the order; resume later",
                        )))
                        .await;
                    return;
                }
            };
            for change in &changes {
                if self
                    .tx
                    .send(Ok(update(&self.order_id, change)))
                    .await
                    .is_err()
                {
                    return; // the client went away
                }
                self.after = change.version;
                if change.status.is_terminal() {
                    debug!(order.id = %self.order_id, version = change.version, "Watch stream complete.");
                    return;
                }
            }
            woken = false;
            tokio::select! {
                _ = self.subscription.changed() => woken = true,
                _ = tokio::time::sleep(RECHECK) => {}
                _ = self.tx.closed() => return,
                _ = self.shutdown.cancelled() => {
                    let message = format!("server shutting down; resume with resume_after_version={}", self.after);
                    let _ = self.tx.send(Err(Status::unavailable(message))).await;
                    return;
                }
            }
        }
    }

    async fn read(&self) -> sqlx::Result<Vec<Change>> {
        let mut conn = self.pool.acquire().await?;
        store::history_after(&mut conn, &self.order_id, self.after).await
    }
}
