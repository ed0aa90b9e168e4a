//! Wake-ups for `WatchOrder` streams. The database is the truth; the hub says "order X may have
//! changed". Changes committed in this process ring the bell right after commit and carry the
//! history rows just written, so a stream sends them without reading them back; changes
//! committed by another process sharing the database are picked up by [`Hub::follow`], which
//! tails the global `order_history.seq`, and a stream reads those from the database.
//!
//! Watchers register before they first read, so no change can fall between read and wait.
//!
//! The hub also keeps the whole history of the orders this process placed or changed lately
//! ([`Hub::known`]), as long as it heard every change, so a stream opened right after
//! PlaceOrder (as clients do) needs no read at all. A change by another process, heard by
//! version only, drops the order from it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Change, Order, store};
use crate::db::{Backend, Database};

/// How often changes made by other processes are looked for.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
const FOLLOW_BATCH: i64 = 1000;
/// History rows re-read behind the cursor on PostgreSQL (see [`Hub::follow`]).
const LOOKBACK: i64 = 500;

/// Registry of watched orders. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Hub {
    watched: Arc<Mutex<HashMap<String, Watched>>>,
    known: Arc<Mutex<Known>>,
}

/// Orders whose every change this process committed (or heard of with its rows), newest
/// last; the oldest go first beyond [`KNOWN_ORDERS`].
#[derive(Debug, Default)]
struct Known {
    orders: HashMap<String, History>,
    arrival: VecDeque<String>,
}

/// An order's owner and its status changes from version 1, with no gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Who placed it.
    pub customer_id: String,
    /// Every change, oldest first.
    pub changes: Vec<Change>,
}

/// Orders kept in [`Hub::known`]: a few seconds of placements at full load, a few MiB.
const KNOWN_ORDERS: usize = 10_000;

#[derive(Debug)]
struct Watched {
    bell: watch::Sender<Rung>,
    watchers: usize,
}

/// What the bell last said: the newest version heard of, and the latest history rows committed
/// in this process, oldest first, when they are known (empty otherwise).
#[derive(Debug, Clone, Default)]
struct Rung {
    version: u64,
    recent: Vec<Change>,
}

/// Committed rows kept per watched order: a saga writes at most three at a time.
const RECENT: usize = 8;

/// One watcher's registration; unregisters on drop.
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    order_id: String,
    bell: watch::Receiver<Rung>,
}

impl Subscription {
    /// Resolves when the order may have changed since the last call.
    pub async fn changed(&mut self) {
        // The sender lives as long as any subscription to this order, including this one.
        let _ = self.bell.changed().await;
    }

    /// Every change after version `after`, if this process committed them all and still holds
    /// them; `None` means "read the database".
    pub fn changes_after(&self, after: u64) -> Option<Vec<Change>> {
        let rung = self.bell.borrow();
        if rung.version <= after {
            return Some(Vec::new());
        }
        let first = rung.recent.iter().position(|c| c.version == after + 1)?;
        let changes = rung.recent[first..].to_vec();
        (changes.last().map(|c| c.version) == Some(rung.version)).then_some(changes)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watched = self.hub.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = watched.get_mut(&self.order_id) {
            entry.watchers -= 1;
            if entry.watchers == 0 {
                watched.remove(&self.order_id);
            }
        }
    }
}

impl Hub {
    /// Registers interest in `order_id`.
    pub fn subscribe(&self, order_id: &str) -> Subscription {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let entry = watched
            .entry(order_id.to_owned())
            .or_insert_with(|| Watched {
                bell: watch::Sender::new(Rung::default()),
                watchers: 0,
            });
        entry.watchers += 1;
        let mut bell = entry.bell.subscribe();
        bell.mark_unchanged();
        Subscription {
            hub: self.clone(),
            order_id: order_id.to_owned(),
            bell,
        }
    }

    /// Rings for `order_id`, which reached `version`, unless it already rang for that version
    /// (changes are heard both from this process and from the database).
    pub fn notify(&self, order_id: &str, version: u64) {
        self.remember(order_id, version, &[]);
        self.ring(order_id, version, &[]);
    }

    /// Rings for `order_id` with the history rows this process just committed.
    pub fn notify_changes(&self, order_id: &str, changes: &[Change]) {
        if let Some(last) = changes.last() {
            self.remember(order_id, last.version, changes);
            self.ring(order_id, last.version, changes);
        }
    }

    /// Starts keeping the history of `order`, which this process just placed. Called right
    /// after the commit, before anything can have moved the order on.
    pub fn placed(&self, order: &Order) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let history = History {
            customer_id: order.customer_id.clone(),
            changes: order.history.clone(),
        };
        if known
            .orders
            .insert(order.order_id.clone(), history)
            .is_none()
        {
            known.arrival.push_back(order.order_id.clone());
        }
        while known.arrival.len() > KNOWN_ORDERS {
            if let Some(oldest) = known.arrival.pop_front() {
                known.orders.remove(&oldest);
            }
        }
    }

    /// The order's whole history, if this process holds it; `None` means "read the database".
    pub fn known(&self, order_id: &str) -> Option<History> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.orders.get(order_id).cloned()
    }

    /// Extends a known history with `changes` (which reach `version`), or forgets it when they
    /// do not follow on from it: another process's change, heard by version only.
    fn remember(&self, order_id: &str, version: u64, changes: &[Change]) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let Some(history) = known.orders.get_mut(order_id) else {
            return;
        };
        let last = history.changes.last().map_or(0, |c| c.version);
        if version <= last {
            return;
        }
        match changes.first() {
            Some(first) if first.version == last + 1 => history.changes.extend_from_slice(changes),
            // Left in `arrival` until its turn comes: the queue stays bounded all the same.
            _ => {
                known.orders.remove(order_id);
            }
        }
    }

    /// Whether any order's history is held, so changes by other processes must be heard.
    fn holds_any(&self) -> bool {
        !self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .orders
            .is_empty()
    }

    fn ring(&self, order_id: &str, version: u64, changes: &[Change]) {
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = watched.get(order_id) {
            entry.bell.send_if_modified(|rung| {
                if version <= rung.version {
                    return false;
                }
                // Held rows always lead up to the rung version; a gap (another process's
                // change, heard by version only) means they no longer do.
                if changes
                    .first()
                    .is_none_or(|c| c.version != rung.version + 1)
                {
                    rung.recent.clear();
                }
                rung.recent.extend_from_slice(changes);
                let excess = rung.recent.len().saturating_sub(RECENT);
                rung.recent.drain(..excess);
                rung.version = version;
                true
            });
        }
    }

    /// Number of orders being watched.
    pub fn watched(&self) -> usize {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Follows changes committed by any process sharing `pool` until `shutdown`.
    pub async fn follow(self, db: Database, shutdown: CancellationToken) -> anyhow::Result<()> {
        let pool = db.pool().clone();
        // PostgreSQL hands out `seq` at insert but commits in any order: a change may appear
        // behind the cursor. Re-reading a window behind it catches those; the bell ignores
        // versions it has already rung for. SQLite commits one writer at a time, in order.
        let lookback = match db.backend() {
            Backend::Sqlite => 0,
            Backend::Postgres => LOOKBACK,
        };
        let mut cursor = store::last_change_seq(&pool).await?;
        let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            if self.watched() == 0 && !self.holds_any() {
                // Nobody to wake and nothing held: skip ahead instead of reading every change.
                match store::last_change_seq(&pool).await {
                    Ok(seq) => cursor = seq,
                    Err(error) => warn!(error = %error, "Reading the order history failed."),
                }
                continue;
            }
            match store::changes_since(&pool, cursor - lookback, FOLLOW_BATCH + lookback).await {
                Ok(changes) => {
                    for (seq, order_id, version) in changes {
                        cursor = cursor.max(seq);
                        self.notify(&order_id, version);
                    }
                }
                Err(error) => warn!(error = %error, "Reading the order history failed."),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notifies_only_subscribers_of_that_order() {
        let hub = Hub::default();
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        hub.notify("a", 2);
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.changed())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_ring_before_waiting_is_not_lost() {
        let hub = Hub::default();
        let mut a = hub.subscribe("a");
        hub.notify("a", 2);
        hub.notify("a", 3);
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .unwrap();
    }

    fn change(version: u64) -> Change {
        Change {
            version,
            status: crate::order::Status::Pending,
            reason: String::new(),
            at: 0,
        }
    }

    #[test]
    fn committed_changes_are_held_until_a_gap() {
        let hub = Hub::default();
        let a = hub.subscribe("a");
        assert_eq!(a.changes_after(0), Some(vec![]));
        hub.notify("a", 1);
        assert_eq!(a.changes_after(0), None, "version 1 was only heard of");
        hub.notify_changes("a", &[change(2)]);
        hub.notify_changes("a", &[change(3), change(4)]);
        assert_eq!(
            a.changes_after(1),
            Some(vec![change(2), change(3), change(4)])
        );
        assert_eq!(a.changes_after(3), Some(vec![change(4)]));
        assert_eq!(a.changes_after(4), Some(vec![]));
        assert_eq!(a.changes_after(0), None, "version 1 is not held");
        // Another process's change: only its version is known.
        hub.notify("a", 5);
        assert_eq!(a.changes_after(4), None);
        hub.notify_changes("a", &[change(6)]);
        assert_eq!(a.changes_after(5), Some(vec![change(6)]));
        assert_eq!(a.changes_after(4), None);
        // An old ring changes nothing.
        hub.notify_changes("a", &[change(3)]);
        assert_eq!(a.changes_after(5), Some(vec![change(6)]));
    }

    fn placed(hub: &Hub, order_id: &str) {
        let order = Order::pending(order_id, "alice", Vec::new());
        hub.placed(&order);
    }

    #[test]
    fn a_placed_order_is_known_while_every_change_is_heard() {
        let hub = Hub::default();
        assert_eq!(hub.known("a"), None);
        placed(&hub, "a");
        hub.notify_changes("a", &[change(2)]);
        hub.notify_changes("a", &[change(3), change(4)]);
        hub.notify("a", 4); // the follower reading this process's own change back
        let known = hub.known("a").unwrap();
        assert_eq!(known.customer_id, "alice");
        assert_eq!(
            known.changes,
            vec![change(1), change(2), change(3), change(4)]
        );
        // Another process's change, heard by version only: the copy is stale, read instead.
        hub.notify("a", 5);
        assert_eq!(hub.known("a"), None);
        hub.notify_changes("a", &[change(6)]);
        assert_eq!(hub.known("a"), None, "not known again after a gap");

        placed(&hub, "b");
        hub.notify_changes("b", &[change(3)]);
        assert_eq!(hub.known("b"), None, "a gap in this process's rows");
    }

    #[test]
    fn known_orders_are_bounded() {
        let hub = Hub::default();
        for i in 0..KNOWN_ORDERS + 10 {
            placed(&hub, &format!("o{i}"));
        }
        assert_eq!(hub.known("o0"), None, "the oldest went first");
        assert!(hub.known(&format!("o{}", KNOWN_ORDERS + 9)).is_some());
        let known = hub.known.lock().unwrap();
        assert_eq!(known.orders.len(), KNOWN_ORDERS);
        assert_eq!(known.arrival.len(), KNOWN_ORDERS);
    }

    #[test]
    fn unregisters_on_drop() {
        let hub = Hub::default();
        let a1 = hub.subscribe("a");
        let a2 = hub.subscribe("a");
        assert_eq!(hub.watched(), 1);
        drop(a1);
        assert_eq!(hub.watched(), 1);
        drop(a2);
        assert_eq!(hub.watched(), 0);
        hub.notify("a", 1); // nobody listening: no effect, no panic
    }
}
