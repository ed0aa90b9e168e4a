//! Turning SIGINT/SIGTERM into a cancellation, and stopping a process in stages so nothing in
//! flight is lost: intake first (gRPC calls and watch streams end, consumers finish and settle
//! their batch), then the outbox relays drain, then the broker connections close.
//!
//! `main` owns the root `CancellationToken`; each task gets the token of its [`Stage`]. A second
//! signal means "stop now" and exits the process.

use std::future::Future;

use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info};

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal_received() -> std::io::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}

/// When a long-running task is stopped, in the order the stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Everything that takes work in: the gRPC server, consumers, watch followers.
    Intake,
    /// The outbox relays, which publish what intake committed.
    Relay,
    /// The broker connections the relays publish through.
    Connection,
}

type Tasks = JoinSet<anyhow::Result<()>>;

/// The tasks of one process, grouped by the stage that stops them. Every task runs until its
/// stage's token fires; one that stops earlier is a failure and shuts the process down.
#[derive(Debug, Default)]
pub struct Stages {
    intake: CancellationToken,
    relay: CancellationToken,
    connection: CancellationToken,
    intake_tasks: Tasks,
    relay_tasks: Tasks,
    connection_tasks: Tasks,
    streams: TaskTracker,
}

impl Stages {
    /// Starts `task`, built with the token that stops it.
    pub fn spawn<F>(&mut self, stage: Stage, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let token = self.token(stage);
        let tasks = match stage {
            Stage::Intake => &mut self.intake_tasks,
            Stage::Relay => &mut self.relay_tasks,
            Stage::Connection => &mut self.connection_tasks,
        };
        tasks.spawn(task(token));
    }

    /// The token that stops `stage`'s tasks.
    pub fn token(&self, stage: Stage) -> CancellationToken {
        match stage {
            Stage::Intake => &self.intake,
            Stage::Relay => &self.relay,
            Stage::Connection => &self.connection,
        }
        .clone()
    }

    /// Where per-call tasks (watch streams) run: waited for with intake, as they may be many.
    pub fn streams(&self) -> TaskTracker {
        self.streams.clone()
    }

    /// Waits for `shutdown` (or the first task to stop, which is a failure), then stops
    /// intake, drains the outboxes and closes the connections, in that order.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let failure = tokio::select! {
            _ = shutdown.cancelled() => None,
            Some(result) = self.intake_tasks.join_next() => Some(unexpected_exit(result)),
            Some(result) = self.relay_tasks.join_next() => Some(unexpected_exit(result)),
            Some(result) = self.connection_tasks.join_next() => Some(unexpected_exit(result)),
        };
        if let Some(error) = &failure {
            error!(error = %format!("{error:#}"), "A component stopped; shutting down.");
        }
        info!("Shutting down: finishing in-flight work.");
        self.intake.cancel();
        drain(&mut self.intake_tasks).await;
        self.streams.close();
        self.streams.wait().await;
        info!("Intake stopped; draining the outboxes.");
        self.relay.cancel();
        drain(&mut self.relay_tasks).await;
        info!("Outboxes drained; closing the broker connections.");
        self.connection.cancel();
        drain(&mut self.connection_tasks).await;
        info!("Shutdown complete.");
        failure.map_or(Ok(()), Err)
    }
}

fn unexpected_exit(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow::anyhow!("a component exited before shutdown"),
        Ok(Err(error)) => error,
        Err(join) => anyhow::anyhow!("a component panicked: {join}"),
    }
}

async fn drain(tasks: &mut Tasks) {
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                error!(error = %format!("{error:#}"), "A component failed while stopping.")
            }
            Err(join) => error!(error = %join, "A component panicked while stopping."),
        }
    }
}
