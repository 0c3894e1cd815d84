//! The spot breaker's memory shared through the ledger: interruptions other CI jobs saw are
//! read before a launch, and this build's are written when they happen.
//!
//! Guarantees: a slow or failing ledger never holds up or fails a build; each call is
//! bounded by [`LEDGER_CALL_TIMEOUT`], and when it fails the caller warns and the breaker
//! counts this build's own interruptions only.

use std::time::{Duration, SystemTime};

use crate::cloud::breaker::BreakerSettings;
use crate::ledger::{Interruption, LedgerError, LedgerStore};

/// Bound on one breaker read or write.
pub const LEDGER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{place} did not answer within {}s", LEDGER_CALL_TIMEOUT.as_secs())]
    NoAnswer { place: String },
}

/// Interruptions recorded in the ledger within the breaker's window.
pub async fn recent(ledger: &dyn LedgerStore, breaker: BreakerSettings) -> Result<Vec<SystemTime>, SharedError> {
    let since = SystemTime::now() - (breaker.window + breaker.cooldown);
    match tokio::time::timeout(LEDGER_CALL_TIMEOUT, ledger.interruptions(since)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SharedError::NoAnswer { place: ledger.place() }),
    }
}

/// Records one interruption for other builds' breakers.
pub async fn record(ledger: &dyn LedgerStore, i: &Interruption) -> Result<(), SharedError> {
    match tokio::time::timeout(LEDGER_CALL_TIMEOUT, ledger.record_interruption(i)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SharedError::NoAnswer { place: ledger.place() }),
    }
}
