//! The launch policy: which markets to try, in which order, and what each failure means.
//!
//! - Spot first (unless the policy or an open breaker says on-demand), then on-demand.
//! - Capacity, price and spot-quota failures move on to the next market at once.
//! - Permission, image and configuration failures end the launch at once, with no fallback:
//!   another market would fail the same way.
//! - Throttling retries the same market with jittered exponential backoff, a bounded
//!   number of times; the SDK itself must not retry launches (a capacity error must move
//!   on quickly), so this is the only retry.
//! - An ambiguous failure (no answer read: a timeout, a dropped connection, a 5xx) may hide
//!   an instance that was launched. Before anything else, the attempt's instance is looked
//!   for by its tags (bounded by [`AMBIGUOUS_LOOKUP`], EC2 being eventually consistent) and
//!   adopted if found; otherwise the same request is sent again with the same idempotency
//!   token, which launches nothing more if the first one did. Only then does the policy
//!   move on, and [`LaunchError::ambiguous`] tells the caller that an instance may still
//!   appear (its teardown then searches by tag).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use super::breaker::Breaker;
use super::{tags, Cloud, CloudFailure, FailureKind, InstanceState, LaunchSpec, Launched, Market, MarketPolicy, Pool};

/// How long an ambiguous launch's instance is looked for by its tags before the request is
/// sent again: newly launched instances can take seconds to be listed.
pub const AMBIGUOUS_LOOKUP: Duration = Duration::from_secs(20);
/// Between lookups of an ambiguous launch's instance.
const LOOKUP_EVERY: Duration = Duration::from_secs(2);
/// How many times an ambiguous request is sent again (same token) before moving on.
pub const AMBIGUOUS_RESENDS: usize = 1;

/// How often a throttled launch is retried, and the first delay.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleRetry {
    pub times: usize,
    pub first_delay: Duration,
}

impl Default for ThrottleRetry {
    fn default() -> Self {
        ThrottleRetry {
            times: 5,
            first_delay: Duration::from_millis(500),
        }
    }
}

/// One market that was tried and failed, with every reason given.
#[derive(Debug, Clone, PartialEq)]
pub struct Tried {
    pub market: Market,
    pub failures: Vec<CloudFailure>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub launched: Launched,
    /// From the first request to the instance being fulfilled (all markets tried).
    pub fulfilled_after: Duration,
    /// Markets that failed before this one.
    pub tried: Vec<Tried>,
    /// Why the market used was chosen, when it was not the first choice.
    pub why: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LaunchError {
    #[error("failed to launch: {failure}")]
    Fatal { failure: CloudFailure, tried: Vec<Tried> },
    #[error("failed to launch in any market: {}", summary(tried))]
    Exhausted { tried: Vec<Tried> },
}

impl LaunchError {
    /// Some request got no answer: an instance may exist that was never seen, and only a
    /// search by the build's tag can find it.
    pub fn ambiguous(&self) -> bool {
        let tried = match self {
            LaunchError::Fatal { tried, .. } | LaunchError::Exhausted { tried } => tried,
        };
        tried.iter().flat_map(|t| &t.failures).any(|f| f.kind == FailureKind::Ambiguous)
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            LaunchError::Fatal { failure, .. } => match failure.kind {
                FailureKind::Permission => Some("the controller's IAM policy lacks a permission; see terraform/ for the policy spotbuild needs"),
                FailureKind::Image => Some("check the AMI id or SSM parameter, and that the image is shared with this account and region"),
                FailureKind::Config => Some("check the subnets, security groups and instance profile in spotbuild.toml"),
                _ => None,
            },
            LaunchError::Exhausted { .. } => Some("add instance types or subnets to the pools, or raise the spot price cap"),
        }
    }
}

fn summary(tried: &[Tried]) -> String {
    tried
        .iter()
        .map(|t| {
            let reasons: Vec<String> = t.failures.iter().map(|f| f.to_string()).collect();
            format!("{}: {}", t.market, reasons.join("; "))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WaitError {
    #[error("instance {instance_id} was not running after {}", humantime::format_duration(*waited))]
    Timeout { instance_id: String, waited: Duration },
    #[error("instance {instance_id} ended while starting ({})", reason.as_deref().unwrap_or("no reason given"))]
    Ended { instance_id: String, reason: Option<String> },
    #[error("failed to observe instance {instance_id}: {failure}")]
    Observe { instance_id: String, failure: CloudFailure },
}

/// Polls until the instance runs, within `limit`. Returns its description and how long it
/// took. An instance that ends while starting (a spot reclaim already) is an error that
/// names EC2's reason.
pub async fn wait_running(
    cloud: &dyn Cloud,
    instance_id: &str,
    limit: Duration,
    every: Duration,
) -> Result<(super::Observed, Duration), WaitError> {
    let started = tokio::time::Instant::now();
    let ids = [instance_id.to_string()];
    loop {
        match cloud.describe(&ids).await {
            Ok(seen) => {
                if let Some(o) = seen.into_iter().find(|o| o.instance_id == instance_id) {
                    match o.state {
                        InstanceState::Running => return Ok((o, started.elapsed())),
                        // Not listed yet, right after the launch: keep polling.
                        InstanceState::Pending | InstanceState::NotFound => {}
                        _ => {
                            return Err(WaitError::Ended {
                                instance_id: instance_id.to_string(),
                                reason: o.state_reason,
                            })
                        }
                    }
                }
            }
            // A fresh instance id may not be visible yet (eventual consistency): keep polling.
            Err(f) if f.is_not_found() => {}
            Err(failure) => {
                return Err(WaitError::Observe {
                    instance_id: instance_id.to_string(),
                    failure,
                })
            }
        }
        if started.elapsed() + every > limit {
            return Err(WaitError::Timeout {
                instance_id: instance_id.to_string(),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// The markets to try, in order.
pub fn markets(policy: MarketPolicy, breaker: Breaker) -> Vec<Market> {
    match (policy, breaker) {
        (MarketPolicy::Spot, _) => vec![Market::Spot],
        (MarketPolicy::OnDemand, _) => vec![Market::OnDemand],
        (MarketPolicy::SpotThenOnDemand, Breaker::Open { .. }) => vec![Market::OnDemand],
        (MarketPolicy::SpotThenOnDemand, Breaker::Closed) => vec![Market::Spot, Market::OnDemand],
    }
}

fn all(failures: &[CloudFailure], kind: FailureKind) -> bool {
    !failures.is_empty() && failures.iter().all(|f| f.kind == kind)
}

/// After an ambiguous launch: this attempt's instance, if EC2 lists it within
/// [`AMBIGUOUS_LOOKUP`].
async fn find_launched(cloud: &dyn Cloud, spec: &LaunchSpec, market: Market) -> Option<Launched> {
    let started = tokio::time::Instant::now();
    let ids = [spec.build_id.clone()];
    let attempt = spec.attempt.to_string();
    loop {
        if let Ok(found) = cloud.find(&ids).await {
            let mine = found.into_iter().find(|o| o.tags.get(tags::ATTEMPT) == Some(&attempt) && !o.ending());
            if let Some(o) = mine {
                tracing::info!(instance = %o.instance_id, "an ambiguous launch had launched: adopted");
                let pool = Pool {
                    instance_type: o.instance_type.clone().unwrap_or_default(),
                    subnet: spec.pools.first().map(|p| p.subnet.clone()).unwrap_or_default(),
                };
                let pool = spec.pools.iter().find(|p| Some(&p.instance_type) == o.instance_type.as_ref()).cloned().unwrap_or(pool);
                return Some(Launched {
                    instance_id: o.instance_id,
                    pool,
                    market: o.market.unwrap_or(market),
                    pool_failures: Vec::new(),
                });
            }
        }
        if started.elapsed() + LOOKUP_EVERY > AMBIGUOUS_LOOKUP {
            return None;
        }
        tokio::time::sleep(LOOKUP_EVERY).await;
    }
}

/// Launches one instance according to `policy`.
pub async fn launch(
    cloud: &dyn Cloud,
    spec: &LaunchSpec,
    policy: MarketPolicy,
    breaker: Breaker,
    retry: ThrottleRetry,
) -> Result<Report, LaunchError> {
    let mut tried: Vec<Tried> = Vec::new();
    let mut why = match (policy, breaker) {
        (MarketPolicy::SpotThenOnDemand, Breaker::Open { until, .. }) => Some(format!(
            "recent spot interruptions opened the breaker until {}",
            humantime::format_rfc3339_seconds(until)
        )),
        _ => None,
    };
    let started = tokio::time::Instant::now();
    for market in markets(policy, breaker) {
        let attempt = || async {
            match cloud.launch(spec, market).await {
                Err(failures) if all(&failures, FailureKind::Ambiguous) => match find_launched(cloud, spec, market).await {
                    Some(found) => Ok(found),
                    None => Err(failures),
                },
                other => other,
            }
        };
        let mut resends = 0;
        let result = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(retry.first_delay)
                    .with_max_times(retry.times)
                    .with_jitter(),
            )
            // The same token: a resent request launches nothing more if the first one did.
            .when(|failures: &Vec<CloudFailure>| {
                if all(failures, FailureKind::Ambiguous) {
                    resends += 1;
                    return resends <= AMBIGUOUS_RESENDS;
                }
                all(failures, FailureKind::Throttled)
            })
            .notify(|failures: &Vec<CloudFailure>, after| tracing::debug!(%market, retry_in = ?after, kind = ?failures.first().map(|f| f.kind), "launch retried"))
            .await;
        match result {
            Ok(launched) => {
                return Ok(Report {
                    launched,
                    fulfilled_after: started.elapsed(),
                    tried,
                    why,
                })
            }
            Err(failures) => {
                if let Some(fatal) = failures
                    .iter()
                    .find(|f| matches!(f.kind, FailureKind::Permission | FailureKind::Image | FailureKind::Config))
                {
                    return Err(LaunchError::Fatal {
                        failure: fatal.clone(),
                        tried,
                    });
                }
                why = Some(format!("{market} failed: {}", summary(&[Tried { market, failures: failures.clone() }])));
                tried.push(Tried { market, failures });
            }
        }
    }
    Err(LaunchError::Exhausted { tried })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Mutex;
    use std::time::SystemTime;

    use futures::future::BoxFuture;

    use super::*;
    use crate::cloud::{InstanceState, Observed, Pool};

    type Answer = Result<Launched, Vec<CloudFailure>>;

    /// Answers launches from a script, per market, and records every call.
    #[derive(Default)]
    struct Scripted {
        script: Mutex<BTreeMap<Market, VecDeque<Answer>>>,
        calls: Mutex<Vec<Market>>,
        states: Mutex<VecDeque<(InstanceState, Option<&'static str>)>>,
        /// What a search by tag finds (an instance an ambiguous launch started), and how
        /// often it was asked.
        tagged: Mutex<Option<Observed>>,
        finds: Mutex<u32>,
    }

    impl Scripted {
        fn then(self, market: Market, r: Answer) -> Self {
            self.script.lock().unwrap().entry(market).or_default().push_back(r);
            self
        }
        fn calls(&self) -> Vec<Market> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Cloud for Scripted {
        fn launch<'a>(&'a self, _: &'a LaunchSpec, market: Market) -> BoxFuture<'a, Result<Launched, Vec<CloudFailure>>> {
            self.calls.lock().unwrap().push(market);
            let next = self.script.lock().unwrap().get_mut(&market).and_then(|q| q.pop_front());
            Box::pin(async move { next.expect("the script covers every call") })
        }
        fn describe<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
            let next = self.states.lock().unwrap().pop_front();
            Box::pin(async move {
                let (state, reason) = next.expect("the script covers every describe");
                Ok(vec![Observed {
                    state,
                    state_reason: reason.map(String::from),
                    ..Observed::not_found(&ids[0])
                }])
            })
        }
        fn find<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
            *self.finds.lock().unwrap() += 1;
            let found = self.tagged.lock().unwrap().clone();
            Box::pin(async move { Ok(found.into_iter().collect()) })
        }
        fn terminate<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>> {
            Box::pin(async { Ok(()) })
        }
        fn delete_templates<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, CloudFailure>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    fn launched(market: Market) -> Launched {
        Launched {
            instance_id: "i-1".into(),
            pool: Pool {
                instance_type: "m7a.16xlarge".into(),
                subnet: "subnet-1".into(),
            },
            market,
            pool_failures: Vec::new(),
        }
    }

    fn fail(code: &str) -> Vec<CloudFailure> {
        vec![CloudFailure::new(code, "scripted", None)]
    }

    const FAST: ThrottleRetry = ThrottleRetry {
        times: 3,
        first_delay: Duration::from_millis(100),
    };

    #[tokio::test(start_paused = true)]
    async fn capacity_failures_fall_back_to_on_demand_and_say_why() {
        let cloud = Scripted::default()
            .then(Market::Spot, Err(fail("InsufficientInstanceCapacity")))
            .then(Market::OnDemand, Ok(launched(Market::OnDemand)));
        let r = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST).await.unwrap();
        assert_eq!(r.launched.market, Market::OnDemand);
        assert_eq!(r.tried.len(), 1);
        assert!(r.why.unwrap().contains("InsufficientInstanceCapacity"));
        assert_eq!(cloud.calls(), [Market::Spot, Market::OnDemand]);
    }

    #[tokio::test(start_paused = true)]
    async fn permission_and_image_errors_fail_at_once_without_fallback() {
        for code in ["UnauthorizedOperation", "InvalidAMIID.NotFound", "InvalidSubnetID.NotFound"] {
            let cloud = Scripted::default().then(Market::Spot, Err(fail(code)));
            let e = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST).await.unwrap_err();
            assert!(matches!(e, LaunchError::Fatal { .. }), "{code}: {e:?}");
            assert!(e.hint().is_some());
            assert_eq!(cloud.calls(), [Market::Spot], "{code}: no fallback");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_then_succeeds() {
        let cloud = Scripted::default()
            .then(Market::Spot, Err(fail("RequestLimitExceeded")))
            .then(Market::Spot, Err(fail("RequestLimitExceeded")))
            .then(Market::Spot, Ok(launched(Market::Spot)));
        let r = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST).await.unwrap();
        assert_eq!(r.launched.market, Market::Spot);
        assert!(r.tried.is_empty());
        assert_eq!(cloud.calls(), [Market::Spot, Market::Spot, Market::Spot]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_goes_straight_to_on_demand() {
        let cloud = Scripted::default().then(Market::OnDemand, Ok(launched(Market::OnDemand)));
        let open = Breaker::Open {
            until: SystemTime::UNIX_EPOCH + Duration::from_secs(3600),
            tripped_at: SystemTime::UNIX_EPOCH,
        };
        let r = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::SpotThenOnDemand, open, FAST).await.unwrap();
        assert_eq!(cloud.calls(), [Market::OnDemand]);
        assert!(r.why.unwrap().contains("breaker"));
    }

    fn scripted_states(states: &[(InstanceState, Option<&'static str>)]) -> Scripted {
        let s = Scripted::default();
        s.states.lock().unwrap().extend(states.iter().copied());
        s
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_running_is_bounded_and_timed() {
        let every = Duration::from_secs(2);
        let cloud = scripted_states(&[(InstanceState::Pending, None), (InstanceState::Pending, None), (InstanceState::Running, None)]);
        let (o, took) = wait_running(&cloud, "i-1", Duration::from_secs(60), every).await.unwrap();
        assert_eq!(o.state, InstanceState::Running);
        assert_eq!(took, Duration::from_secs(4));

        let cloud = scripted_states(&[(InstanceState::Pending, None); 10]);
        let e = wait_running(&cloud, "i-1", Duration::from_secs(10), every).await.unwrap_err();
        assert!(matches!(e, WaitError::Timeout { .. }), "{e}");

        let cloud = scripted_states(&[(InstanceState::Pending, None), (InstanceState::ShuttingDown, Some("Server.SpotInstanceTermination"))]);
        let e = wait_running(&cloud, "i-1", Duration::from_secs(60), every).await.unwrap_err();
        assert!(e.to_string().contains("Server.SpotInstanceTermination"), "{e}");
    }

    fn ambiguous() -> Vec<CloudFailure> {
        vec![CloudFailure::ambiguous("no answer was read: operation timed out")]
    }

    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_launch_that_launched_is_found_by_its_tags_and_adopted() {
        let cloud = Scripted::default().then(Market::Spot, Err(ambiguous()));
        let mut o = Observed {
            state: InstanceState::Pending,
            instance_type: Some("c7a.16xlarge".into()),
            market: Some(Market::Spot),
            ..Observed::not_found("i-7")
        };
        o.tags.insert(tags::ATTEMPT.into(), "1".into());
        *cloud.tagged.lock().unwrap() = Some(o);
        let r = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST).await.unwrap();
        assert_eq!(r.launched.instance_id, "i-7");
        assert_eq!(r.launched.pool.instance_type, "c7a.16xlarge");
        assert_eq!(cloud.calls(), [Market::Spot], "no second launch, no on-demand");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_launch_with_nothing_found_is_resent_with_its_token_before_moving_on() {
        let cloud = Scripted::default()
            .then(Market::Spot, Err(ambiguous()))
            .then(Market::Spot, Ok(launched(Market::Spot)));
        let started = tokio::time::Instant::now();
        let r = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST).await.unwrap();
        assert_eq!(r.launched.market, Market::Spot);
        assert_eq!(cloud.calls(), [Market::Spot, Market::Spot]);
        assert!(*cloud.finds.lock().unwrap() >= 2, "looked for it, bounded");
        assert!(started.elapsed() >= AMBIGUOUS_LOOKUP - LOOKUP_EVERY);

        // Ambiguous every time: the next market, and the error says an instance may exist.
        let mut cloud = Scripted::default();
        for _ in 0..=AMBIGUOUS_RESENDS {
            cloud = cloud.then(Market::Spot, Err(ambiguous()));
        }
        let e = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::Spot, Breaker::Closed, FAST).await.unwrap_err();
        assert!(e.ambiguous(), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_not_listed_yet_is_waited_for() {
        let cloud = scripted_states(&[(InstanceState::NotFound, None), (InstanceState::Running, None)]);
        let (o, _) = wait_running(&cloud, "i-1", Duration::from_secs(60), Duration::from_secs(1)).await.unwrap();
        assert_eq!(o.state, InstanceState::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn spot_only_reports_every_reason_when_exhausted() {
        let cloud = Scripted::default().then(
            Market::Spot,
            Err(vec![
                CloudFailure::new("InsufficientInstanceCapacity", "no capacity", None),
                CloudFailure::new("SpotMaxPriceTooLow", "too cheap", None),
            ]),
        );
        let e = launch(&cloud, &crate::cloud::test_spec(), MarketPolicy::Spot, Breaker::Closed, FAST).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("InsufficientInstanceCapacity") && text.contains("SpotMaxPriceTooLow"), "{text}");
    }
}
