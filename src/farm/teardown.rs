//! What a build must tear down, and the bounded, verified termination every exit path goes
//! through.
//!
//! # Guarantees
//! - A build (instance group) id is watched before its first launch call, so whatever a
//!   launch started is found by its `spotbuild:build-id` tag even if its answer was lost.
//! - [`Teardown::all`] waits for launches still in flight to settle (a launch is never
//!   dropped mid-call: it runs as a task of its own), then terminates every instance the
//!   build's tags find as well as every id it saw, and deletes the build's launch templates
//!   (they hold host private keys).
//! - An id leaves the list only once EC2 is seen terminating it; "not found" never counts.
//!
//! # Caveats
//! - After an ambiguous launch, EC2 may list its instance only some time later: the tag
//!   search is repeated for [`AMBIGUOUS_SETTLE`], and the reaper is the backstop.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::cloud::{Cloud, CloudFailure};

/// How long one terminate call (terminate, then verify) may take before it is tried again;
/// above the adapter's own verification bound.
pub const TERMINATE_CALL_TIMEOUT: Duration = Duration::from_secs(150);
/// How many times termination is tried before the ids are left to the caller (and to the
/// instances' own TTL and `spotbuild reap`).
pub const TERMINATE_ROUNDS: u32 = 3;
/// How long teardown waits for launches still in flight before searching by tag anyway.
pub const LAUNCH_SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// After an ambiguous launch, how long the search by tag is repeated.
pub const AMBIGUOUS_SETTLE: Duration = Duration::from_secs(30);
/// Between repeated searches by tag.
const SEARCH_EVERY: Duration = Duration::from_secs(5);
/// Bound on one search by tag, and on deleting the launch templates.
pub const SEARCH_TIMEOUT: Duration = Duration::from_secs(60);

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
    #[error("failed to search for instances tagged with build {}", builds.join(", "))]
    Search {
        builds: Vec<String>,
        #[source]
        source: CloudFailure,
    },
    #[error("failed to search for instances tagged with build {}: no answer within {}s", builds.join(", "), SEARCH_TIMEOUT.as_secs())]
    SearchTimeout { builds: Vec<String> },
}

#[derive(Default)]
struct Inner {
    builds: BTreeSet<String>,
    ids: BTreeSet<String>,
    /// A launch got no answer: its instance may appear in a listing only later.
    ambiguous: bool,
}

/// Everything a build launched or may have launched. Shared by every attempt and by the
/// caller, who tears down whatever is left on every way out.
#[derive(Clone)]
pub struct Teardown {
    // A panic while holding the lock leaves the sets intact: recover them rather than lose
    // track of instances.
    inner: Arc<Mutex<Inner>>,
    in_flight: Arc<watch::Sender<usize>>,
}

impl Default for Teardown {
    fn default() -> Teardown {
        Teardown {
            inner: Arc::default(),
            in_flight: Arc::new(watch::Sender::new(0)),
        }
    }
}

/// A launch in flight: teardown waits until it is dropped.
pub struct InFlight(Arc<watch::Sender<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What [`Teardown::all`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Instances it terminated (verified).
    pub terminated: Vec<String>,
    /// Launch templates it deleted.
    pub templates: Vec<String>,
    /// Launches still in flight when it stopped waiting for them.
    pub unsettled: usize,
}

impl Teardown {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whatever carries this build id's tag is torn down, seen or not.
    pub fn watch(&self, build_id: &str) {
        self.lock().builds.insert(build_id.to_string());
    }
    pub fn add(&self, id: &str) {
        self.lock().ids.insert(id.to_string());
    }
    pub fn done(&self, id: &str) {
        self.lock().ids.remove(id);
    }
    /// Instance ids launched and not yet seen terminating.
    pub fn pending(&self) -> Vec<String> {
        self.lock().ids.iter().cloned().collect()
    }
    /// Marks a launch as in flight until the guard is dropped.
    pub fn launching(&self) -> InFlight {
        self.in_flight.send_modify(|n| *n += 1);
        InFlight(self.in_flight.clone())
    }
    /// A launch got no answer: an instance may exist that no id names.
    pub fn maybe_launched(&self) {
        self.lock().ambiguous = true;
    }

    /// Waits (up to `limit`) for launches in flight; returns how many are still going.
    pub async fn settle(&self, limit: Duration) -> usize {
        let mut rx = self.in_flight.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        let left = *rx.borrow();
        left
    }

    /// Terminates (and verifies) everything the build launched, by tag and by id, and
    /// deletes its launch templates. Safe to call more than once.
    pub async fn all(&self, cloud: &dyn Cloud) -> Result<Swept, TeardownError> {
        let unsettled = self.settle(LAUNCH_SETTLE_TIMEOUT).await;
        let (builds, ambiguous) = {
            let inner = self.lock();
            (inner.builds.iter().cloned().collect::<Vec<_>>(), inner.ambiguous)
        };
        let search_until = tokio::time::Instant::now() + if ambiguous { AMBIGUOUS_SETTLE } else { Duration::ZERO };
        let mut swept = Swept {
            unsettled,
            ..Swept::default()
        };
        // The last search's failure, if it failed: then what no id names may be left.
        let mut failed: Option<TeardownError>;
        loop {
            match self.search(cloud, &builds).await {
                Ok(found) => {
                    failed = None;
                    for o in found.iter().filter(|o| !o.ending()) {
                        self.add(&o.instance_id);
                    }
                }
                Err(e) => failed = Some(e),
            }
            // What a failed search could not see is still torn down by id.
            let ids = self.pending();
            if !ids.is_empty() {
                terminate_verified(cloud, &ids).await?;
                for id in &ids {
                    self.done(id);
                }
                swept.terminated.extend(ids);
            }
            if tokio::time::Instant::now() >= search_until {
                break;
            }
            tokio::time::sleep(SEARCH_EVERY).await;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if !builds.is_empty() {
            if let Ok(Ok(names)) = tokio::time::timeout(SEARCH_TIMEOUT, cloud.delete_templates(&builds)).await {
                swept.templates = names;
            }
        }
        Ok(swept)
    }

    async fn search(&self, cloud: &dyn Cloud, builds: &[String]) -> Result<Vec<crate::cloud::Observed>, TeardownError> {
        if builds.is_empty() {
            return Ok(Vec::new());
        }
        match tokio::time::timeout(SEARCH_TIMEOUT, cloud.find(builds)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(source)) => Err(TeardownError::Search {
                builds: builds.to_vec(),
                source,
            }),
            Err(_) => Err(TeardownError::SearchTimeout { builds: builds.to_vec() }),
        }
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
