//! The list of instances a build launched and has not yet seen terminated, and the
//! bounded, verified termination every exit path goes through.
//!
//! Guarantees: an id is listed the moment its launch returns, before anything else is
//! done with it, and leaves the list only once EC2 accepted its termination.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::cloud::{Cloud, CloudFailure};

/// How long one terminate call may take before it is tried again.
pub const TERMINATE_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times termination is tried before the ids are left to the caller (and to
/// the instances' own TTL and `spotbuild reap`).
pub const TERMINATE_ROUNDS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("failed to terminate {}", ids.join(", "))]
    Refused {
        ids: Vec<String>,
        #[source]
        source: CloudFailure,
    },
    #[error("failed to terminate {}: no answer within {}s", ids.join(", "), TERMINATE_CALL_TIMEOUT.as_secs())]
    NoAnswer { ids: Vec<String> },
}

/// Instances launched and not yet known to be terminated. Shared by every attempt of a
/// build and by its caller, who terminates whatever is left on every way out.
#[derive(Clone, Default)]
pub struct Teardown {
    // A panic while holding the lock leaves the set intact: recover it rather than lose
    // track of instances.
    ids: Arc<Mutex<BTreeSet<String>>>,
}

impl Teardown {
    pub fn add(&self, id: &str) {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner).insert(id.to_string());
    }
    pub fn done(&self, id: &str) {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }
    pub fn pending(&self) -> Vec<String> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }
    /// Terminates (and verifies) everything still listed; returns what it terminated.
    pub async fn all(&self, cloud: &dyn Cloud) -> Result<Vec<String>, TeardownError> {
        let ids = self.pending();
        if !ids.is_empty() {
            terminate_verified(cloud, &ids).await?;
            for id in &ids {
                self.done(id);
            }
        }
        Ok(ids)
    }
}

/// Terminates `ids`, trying up to [`TERMINATE_ROUNDS`] times, each call bounded by
/// [`TERMINATE_CALL_TIMEOUT`], with a short backoff between rounds.
pub async fn terminate_verified(cloud: &dyn Cloud, ids: &[String]) -> Result<(), TeardownError> {
    let mut last = TeardownError::NoAnswer { ids: ids.to_vec() };
    for round in 0..TERMINATE_ROUNDS {
        match tokio::time::timeout(TERMINATE_CALL_TIMEOUT, cloud.terminate(ids)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(source)) => last = TeardownError::Refused { ids: ids.to_vec(), source },
            Err(_) => last = TeardownError::NoAnswer { ids: ids.to_vec() },
        }
        tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(round))).await;
    }
    Err(last)
}
