//! Whether a process can work, as `grpc.health.v1.Health` (through `api`) and `/metrics` tell it:
//! SERVING only while, for every service it runs, the broker connection is up, the broker is
//! not blocking its publishes (a memory or disk alarm), and its database answers. A pause from
//! any of these shows for as long as it lasts, as NOT_SERVING and as the gauges
//! `orderflow_broker_connected`, `orderflow_broker_blocked` and `orderflow_database_up`.
//!
//! Each service's endpoint registers its dependencies; nothing here acts on the pause: the services ride it
//! out on their own (outbox, retries), this only makes it visible.

use std::{future::Future, pin::Pin, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{bus::Broker, db::Database, metrics, service::Service};

/// How often a service's database is asked whether it answers.
const DATABASE_PROBE_EVERY: Duration = Duration::from_secs(1);
/// A database that takes longer than this to answer `SELECT 1` counts as down: past it, a
/// pool that cannot hand out a connection is as good as no database.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one service depends on.
#[derive(Debug, Clone)]
pub struct Dependencies {
    /// The service.
    pub service: Service,
    /// Its broker connection.
    pub broker: Broker,
    /// `true` while its database answers (see [`watch_database`]).
    pub database_up: watch::Receiver<bool>,
}

impl Dependencies {
    /// Whether the service can work: connected, not blocked, database answering.
    fn ready(&self) -> bool {
        self.broker.current().is_some() && !self.broker.blocked() && *self.database_up.borrow()
    }
}

type Change<'a> = Pin<Box<dyn Future<Output = Result<(), watch::error::RecvError>> + Send + 'a>>;

/// Asks `database` `SELECT 1` every second until `shutdown`; the receiver follows whether it
/// answered. Starts `true`: the database was just opened.
pub fn watch_database(
    service: Service,
    database: Database,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<bool>,
    impl Future<Output = anyhow::Result<()>> + Send + 'static,
) {
    let (tx, rx) = watch::channel(true);
    let task = async move {
        let mut tick = tokio::time::interval(DATABASE_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let probe = sqlx::query("SELECT 1").execute(database.pool());
            let up = matches!(
                tokio::time::timeout(DATABASE_PROBE_TIMEOUT, probe).await,
                Ok(Ok(_))
            );
            if tx.send_replace(up) != up {
                if up {
                    info!(
                        service = service.service_name(),
                        "The database answers again."
                    );
                } else {
                    warn!(
                        service = service.service_name(),
                        "The database does not answer; reporting NOT_SERVING."
                    );
                }
            }
        }
    };
    (rx, task)
}

/// Follows `dependencies` until `shutdown`: the receiver is `true` while every one of them can
/// work, and turns `false` (then closes) at shutdown. Starts `false`: nothing has connected yet,
/// and a probe answered before the first broker connection would be told a lie.
pub fn readiness(
    mut dependencies: Vec<Dependencies>,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<bool>,
    impl Future<Output = anyhow::Result<()>> + Send + 'static,
) {
    let (ready, rx) = watch::channel(false);
    let task = async move {
        let mut links: Vec<_> = dependencies.iter().map(|d| d.broker.subscribe()).collect();
        let mut blocks: Vec<_> = dependencies
            .iter()
            .map(|d| d.broker.subscribe_blocked())
            .collect();
        loop {
            // Mark everything seen before reading, so a change after the read wakes the wait.
            links.iter_mut().for_each(|w| drop(w.borrow_and_update()));
            blocks.iter_mut().for_each(|w| drop(w.borrow_and_update()));
            dependencies
                .iter_mut()
                .for_each(|d| drop(d.database_up.borrow_and_update()));
            ready.send_replace(dependencies.iter().all(Dependencies::ready));
            let mut changes: Vec<Change<'_>> = Vec::new();
            changes.extend(
                links
                    .iter_mut()
                    .map(|w| Box::pin(w.changed()) as Change<'_>),
            );
            changes.extend(
                blocks
                    .iter_mut()
                    .map(|w| Box::pin(w.changed()) as Change<'_>),
            );
            changes.extend(
                dependencies
                    .iter_mut()
                    .map(|d| Box::pin(d.database_up.changed()) as Change<'_>),
            );
            let changed = futures_util::future::select_all(changes);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    ready.send_replace(false);
                    return Ok(());
                }
                _ = changed => {}
            }
        }
    };
    (rx, task)
}

/// Gauges for one service: broker connected, broker blocking its publishes, database up.
pub fn probe(dependencies: Dependencies) -> metrics::Probe {
    Box::new(move || {
        let labels = vec![("service", dependencies.service.service_name().to_owned())];
        let broker = &dependencies.broker;
        let rows = vec![
            (
                "orderflow_broker_connected",
                "1 while the service is connected to RabbitMQ.",
                labels.clone(),
                f64::from(u8::from(broker.current().is_some())),
            ),
            (
                "orderflow_broker_blocked",
                "1 while RabbitMQ blocks the service's publishes (memory or disk alarm).",
                labels.clone(),
                f64::from(u8::from(broker.blocked())),
            ),
            (
                "orderflow_database_up",
                "1 while the service's database answers.",
                labels,
                f64::from(u8::from(*dependencies.database_up.borrow())),
            ),
        ];
        Box::pin(async move { rows })
    })
}
