//! Turning SIGINT/SIGTERM into a cancellation that every component watches.
//!
//! `main` owns the root `CancellationToken`; components get child tokens and finish their
//! in-flight work when it fires. A second signal means "stop now" and exits the process.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal_received() -> std::io::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
