//! The arrival patterns shared by the order driver and the bench's lapin baseline: closed
//! loop (at most K orders in flight, serial being K = 1) and open loop (a fixed arrival rate),
//! so both systems see exactly the same load and differ only in what one order costs.
//!
//! Open-loop latency is measured from each order's *scheduled* send time, not from when the
//! send happened, so a stalled sender cannot hide the stall (no coordinated omission).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// How orders arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Send the next order as soon as one of the `in_flight` outstanding orders finished.
    Closed { in_flight: usize },
    /// Send order `i` at `start + i / per_sec`, whatever the system does. `max_outstanding`
    /// is only a safety bound (the server caps concurrent watch streams): when it is hit, the
    /// send waits, and that wait shows up in the latency because of the scheduled start.
    Open {
        per_sec: f64,
        max_outstanding: usize,
    },
}

/// One phase: `orders` orders in `pattern`, stopped at `limit` whatever happened by then.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub orders: u64,
    pub pattern: Pattern,
    pub limit: Duration,
}

/// What happened to one order, as the system under test reports it.
#[derive(Debug)]
pub struct Finished {
    /// The order's id, once the system accepted it.
    pub order_id: Option<String>,
    /// When the system accepted the order (PlaceOrder returned / the publish was confirmed),
    /// if it did.
    pub accepted_at: Option<Instant>,
    /// When the completion arrived, or why the order did not complete (a short, stable
    /// category such as `PlaceOrder: Unavailable`, so errors can be counted by kind).
    pub completed_at: Result<Instant, String>,
}

/// One order's record, times relative to its scheduled send.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The order's id, if the system accepted it.
    pub order_id: Option<String>,
    pub accept_latency: Option<Duration>,
    /// End-to-end latency, or the error category.
    pub result: Result<Duration, String>,
    /// Completion (or failure) time, since the phase started.
    pub finished: Duration,
}

/// Everything one phase produced.
#[derive(Debug)]
pub struct PhaseResult {
    /// Orders finished (completed or failed), in completion order.
    pub outcomes: Vec<Outcome>,
    /// Orders sent; `sent - outcomes.len()` were still in flight when the phase was cut.
    pub sent: u64,
    /// Whether `limit` cut the phase short.
    pub hit_limit: bool,
    /// Open loop: the largest delay of a send behind its schedule.
    pub max_send_lag: Duration,
}

impl PhaseResult {
    pub fn unfinished(&self) -> u64 {
        self.sent.saturating_sub(self.outcomes.len() as u64)
    }
}

/// Runs `phase`, calling `order(index)` for each order; the future it returns resolves when
/// the order reached its end. `done` counts finished orders as they finish, for progress
/// reports and the memory timeline. `stop` ends the sending early but lets the orders in
/// flight finish (the phase's limit still cuts them).
pub async fn run<F, Fut>(
    phase: Phase,
    done: Arc<AtomicU64>,
    stop: &CancellationToken,
    order: F,
) -> PhaseResult
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Finished> + Send + 'static,
{
    let (slots, per_sec) = match phase.pattern {
        Pattern::Closed { in_flight } => (in_flight.max(1), None),
        Pattern::Open {
            per_sec,
            max_outstanding,
        } => (max_outstanding.max(1), Some(per_sec.max(f64::MIN_POSITIVE))),
    };
    let slots = Arc::new(Semaphore::new(slots));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    let deadline = start + phase.limit;
    let mut sent = 0;
    let mut max_send_lag = Duration::ZERO;

    let send_all = async {
        for index in 0..phase.orders {
            if stop.is_cancelled() {
                break;
            }
            let scheduled = match per_sec {
                Some(rate) => {
                    let at = start + Duration::from_secs_f64(index as f64 / rate);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep_until(at) => {}
                    }
                    at
                }
                None => Instant::now(),
            };
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else {
                break; // never closed
            };
            if per_sec.is_some() {
                max_send_lag = max_send_lag.max(scheduled.elapsed());
            }
            let scheduled = if per_sec.is_some() {
                scheduled
            } else {
                // Closed loop: the order starts when its slot frees up.
                Instant::now()
            };
            let finished = order(index);
            let tx = tx.clone();
            let done = done.clone();
            tasks.spawn(async move {
                let finished = finished.await;
                let end = match &finished.completed_at {
                    Ok(at) => *at,
                    Err(_) => Instant::now(),
                };
                let outcome = Outcome {
                    order_id: finished.order_id,
                    accept_latency: finished
                        .accepted_at
                        .map(|at| at.saturating_duration_since(scheduled)),
                    result: finished
                        .completed_at
                        .map(|at| at.saturating_duration_since(scheduled)),
                    finished: end.saturating_duration_since(start),
                };
                done.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(outcome);
                drop(permit);
            });
            sent += 1;
            // Reap finished tasks as we go so a long run does not keep every handle.
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    };
    let hit_limit = tokio::time::timeout_at(deadline, send_all).await.is_err();
    // Whatever is still running at the limit is abandoned: dropping a task's future cancels
    // its gRPC calls or its wait for a completion.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let mut outcomes = Vec::new();
    while let Some(outcome) = rx.recv().await {
        outcomes.push(outcome);
    }
    PhaseResult {
        outcomes,
        sent,
        hit_limit,
        max_send_lag,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn completes_after(delay: Duration) -> Finished {
        Finished {
            order_id: Some("o".to_owned()),
            accepted_at: Some(Instant::now()),
            completed_at: Ok(Instant::now() + delay),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_never_exceeds_its_bound() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let phase = Phase {
            orders: 50,
            pattern: Pattern::Closed { in_flight: 4 },
            limit: Duration::from_secs(60),
        };
        let result = run(phase, Arc::default(), &CancellationToken::new(), |_| {
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                completes_after(Duration::ZERO)
            }
        })
        .await;
        assert_eq!(result.sent, 50);
        assert_eq!(result.outcomes.len(), 50);
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        assert!(!result.hit_limit);
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_measures_from_the_schedule() {
        // 10 orders/s, each taking 1 s, outstanding capped at 2: the sender stalls, and the
        // stall is charged to the orders that waited.
        let phase = Phase {
            orders: 6,
            pattern: Pattern::Open {
                per_sec: 10.0,
                max_outstanding: 2,
            },
            limit: Duration::from_secs(60),
        };
        let result = run(
            phase,
            Arc::default(),
            &CancellationToken::new(),
            |_| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                completes_after(Duration::ZERO)
            },
        )
        .await;
        // Orders 0 and 1 take their 1 s. Orders 2 and 3 were due at 0.2 and 0.3 s but could
        // only start at 1.0 and 1.1 s: 1.8 s each, not 1 s. Orders 4 and 5 waited longer still.
        let mut latencies: Vec<u128> = result
            .outcomes
            .iter()
            .map(|o| o.result.clone().unwrap().as_millis())
            .collect();
        latencies.sort_unstable();
        assert_eq!(latencies, [1000, 1000, 1800, 1800, 2600, 2600]);
        assert!(result.max_send_lag >= Duration::from_millis(800));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_cuts_the_phase_and_counts_what_is_left() {
        let phase = Phase {
            orders: 100,
            pattern: Pattern::Closed { in_flight: 10 },
            limit: Duration::from_millis(2500),
        };
        let done = Arc::new(AtomicU64::new(0));
        let result = run(phase, done.clone(), &CancellationToken::new(), |_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            completes_after(Duration::ZERO)
        })
        .await;
        assert!(result.hit_limit);
        assert_eq!(result.outcomes.len(), 20);
        assert_eq!(result.sent, 30);
        assert_eq!(result.unfinished(), 10);
        assert_eq!(done.load(Ordering::SeqCst), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_the_sending_but_lets_orders_in_flight_finish() {
        let phase = Phase {
            orders: 100,
            pattern: Pattern::Open {
                per_sec: 10.0,
                max_outstanding: 100,
            },
            limit: Duration::from_secs(60),
        };
        let stop = CancellationToken::new();
        let stopper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(450)).await;
                stop.cancel();
            })
        };
        let result = run(phase, Arc::default(), &stop, |_| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            completes_after(Duration::ZERO)
        })
        .await;
        stopper.await.unwrap();
        // Orders due at 0, 0.1, … 0.4 s were sent; each still took its 2 s.
        assert_eq!(result.sent, 5);
        assert_eq!(result.outcomes.len(), 5);
        assert!(!result.hit_limit);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_recorded_with_their_category() {
        let phase = Phase {
            orders: 3,
            pattern: Pattern::Closed { in_flight: 1 },
            limit: Duration::from_secs(5),
        };
        let result = run(
            phase,
            Arc::default(),
            &CancellationToken::new(),
            |i| async move {
                if i == 1 {
                    Finished {
                        order_id: None,
                        accepted_at: None,
                        completed_at: Err("PlaceOrder: Unavailable".to_owned()),
                    }
                } else {
                    completes_after(Duration::from_millis(5))
                }
            },
        )
        .await;
        let errors: Vec<_> = result
            .outcomes
            .iter()
            .filter_map(|o| o.result.clone().err())
            .collect();
        assert_eq!(errors, ["PlaceOrder: Unavailable"]);
    }
}
