//! The relay's in-memory feed, for a SQLite outbox (whose only relay runs in this process).
//!
//! Writers hand the rows they just committed straight to the relay, so it publishes without
//! reading them back; once the broker confirms them, their deletes ride along in the next write
//! transaction instead of costing one of their own. On an idle database the relay deletes them
//! itself. Round trips to SQLite's connection thread, not the SQL, are what the outbox costs:
//! this takes a read and a three-statement transaction off every relay round.
//!
//! The table stays the truth. The relay sweeps it (see [`Feed::sweep`]) at start, after any
//! publish that did not go through, when a row backing off is due, when a row was staged
//! outside the feed (a replay) or a commit failed in a way that may have committed, when too
//! many rows wait in memory, when idle, and every few seconds whatever happens. Writers hand rows over while they
//! still hold the database's write turn, and a sweep reads the table holding it too, so a
//! sweep sees every row the feed holds and the feed can simply be emptied: nothing is published
//! twice, and nothing committed is missed.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::Staged;

/// Committed rows kept in memory at most; past that, the relay reads the table instead.
const MAX_WAITING: usize = 4096;
/// The longest the relay goes without reading the table, even while writers keep it busy.
const SAFETY_SWEEP: Duration = Duration::from_secs(5);

/// What the relay does next.
#[derive(Debug)]
pub(super) enum Next {
    /// Publish these rows, committed in this order.
    Rows(Vec<Staged>),
    /// Read the due rows from the table.
    Sweep,
}

/// Rows on their way through the relay.
#[derive(Debug)]
pub(super) struct Feed {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Committed, not yet taken by the relay.
    waiting: Vec<Staged>,
    /// Published and confirmed, not yet deleted: their message ids.
    confirmed: Vec<String>,
    /// The table may hold rows the feed does not.
    sweep: bool,
    /// When the last sweep started.
    swept_at: Instant,
}

impl Feed {
    pub(super) fn new() -> Self {
        Feed {
            state: Mutex::new(State {
                waiting: Vec::new(),
                confirmed: Vec::new(),
                // Rows a previous run left behind.
                sweep: true,
                swept_at: Instant::now(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes rows a writer just committed (call while holding the write turn).
    pub(super) fn committed(&self, rows: Vec<Staged>) {
        let mut state = self.state();
        if state.sweep || state.waiting.len() + rows.len() > MAX_WAITING {
            // The table has them; the sweep to come reads them with the rest.
            state.waiting.clear();
            state.sweep = true;
        } else {
            state.waiting.extend(rows);
        }
    }

    /// Makes the relay's next round read the table.
    pub(super) fn sweep(&self) {
        self.state().sweep = true;
    }

    /// Up to `max` rows to publish, or a sweep.
    pub(super) fn next(&self, max: usize) -> Next {
        let mut state = self.state();
        if state.sweep || state.swept_at.elapsed() >= SAFETY_SWEEP {
            return Next::Sweep;
        }
        let take = state.waiting.len().min(max);
        Next::Rows(state.waiting.drain(..take).collect())
    }

    /// Starts a sweep (call while holding the write turn): forgets the waiting rows, which the
    /// sweep reads from the table.
    pub(super) fn start_sweep(&self) {
        let mut state = self.state();
        state.waiting.clear();
        state.sweep = false;
        state.swept_at = Instant::now();
    }

    /// Rows the broker confirmed, to delete.
    pub(super) fn confirmed(&self, message_ids: impl IntoIterator<Item = String>) {
        self.state().confirmed.extend(message_ids);
    }

    /// Whether confirmed rows wait for their delete.
    pub(super) fn has_confirmed(&self) -> bool {
        !self.state().confirmed.is_empty()
    }

    /// How many confirmed rows wait for their delete.
    pub(super) fn confirmed_len(&self) -> usize {
        self.state().confirmed.len()
    }

    /// Takes the confirmed rows for a transaction to delete; see [`Feed::restore`].
    pub(super) fn take_confirmed(&self) -> Vec<String> {
        std::mem::take(&mut self.state().confirmed)
    }

    /// Gives back confirmed rows whose delete did not commit.
    pub(super) fn restore(&self, message_ids: Vec<String>) {
        self.state().confirmed.extend(message_ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_proto::orderflow::v1 as pb;

    fn row(order: &str) -> Staged {
        let event = pb::OrderCreated {
            order_id: order.to_owned(),
            ..Default::default()
        };
        Staged::new(&event, &opentelemetry::Context::new())
    }

    fn orders(next: Next) -> Vec<String> {
        match next {
            Next::Rows(rows) => rows.into_iter().map(|r| r.correlation_id).collect(),
            Next::Sweep => panic!("expected rows, got a sweep"),
        }
    }

    #[test]
    fn starts_with_a_sweep_then_hands_over_rows_in_commit_order() {
        let feed = Feed::new();
        assert!(
            matches!(feed.next(10), Next::Sweep),
            "rows of an earlier run"
        );
        // Committed before the sweep started: the sweep reads them from the table.
        feed.committed(vec![row("early")]);
        feed.start_sweep();
        assert!(orders(feed.next(10)).is_empty());
        feed.committed(vec![row("a"), row("b")]);
        feed.committed(vec![row("c")]);
        assert_eq!(orders(feed.next(2)), ["a", "b"]);
        assert_eq!(orders(feed.next(2)), ["c"]);
    }

    #[test]
    fn a_requested_sweep_drops_what_waits_and_takes_nothing_until_it_ran() {
        let feed = Feed::new();
        feed.start_sweep();
        feed.committed(vec![row("a")]);
        feed.sweep();
        feed.committed(vec![row("b")]);
        assert!(matches!(feed.next(10), Next::Sweep));
        feed.start_sweep();
        assert!(orders(feed.next(10)).is_empty(), "the sweep read a and b");
    }

    #[test]
    fn too_many_waiting_rows_turn_into_a_sweep() {
        let feed = Feed::new();
        feed.start_sweep();
        feed.committed((0..MAX_WAITING).map(|i| row(&i.to_string())).collect());
        feed.committed(vec![row("one too many")]);
        assert!(matches!(feed.next(10), Next::Sweep));
    }

    #[test]
    fn confirmed_rows_come_back_when_their_delete_did_not_commit() {
        let feed = Feed::new();
        feed.confirmed(["m1".to_owned(), "m2".to_owned()]);
        let taken = feed.take_confirmed();
        assert_eq!(taken, ["m1", "m2"]);
        assert!(!feed.has_confirmed());
        feed.confirmed(["m3".to_owned()]);
        feed.restore(taken);
        assert_eq!(feed.confirmed_len(), 3);
    }
}
