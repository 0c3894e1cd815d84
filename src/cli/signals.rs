//! SIGINT and SIGTERM as a future, for commands that must wind down cleanly when a CI job
//! is cancelled.

use tokio::signal::unix::{signal, SignalKind};

use crate::farm::StopSignal;

/// Resolves on the first SIGINT or SIGTERM.
pub async fn stop() {
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        // Without signal handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Resolves on the first SIGINT or SIGTERM, saying which, so that a cancelled CI job
/// reports as cancelled (130 or 143).
pub async fn stopped_with() -> StopSignal {
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => StopSignal::Interrupt,
        _ = term.recv() => StopSignal::Terminate,
    }
}
