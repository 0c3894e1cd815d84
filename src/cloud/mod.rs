//! What spotbuild asks of a cloud: launch tagged instances from pools of instance types and
//! subnets, spot first with an on-demand fallback; observe, terminate and reap them.
//!
//! Core logic talks to [`Cloud`], a narrow trait returning domain types; the AWS adapter
//! is thin and keeps AWS error codes, classified by [`FailureKind`], so that capacity
//! errors can be told from configuration errors without string matching in the core.

pub mod aws;
pub mod breaker;
pub mod launch;
pub mod prices;
pub mod types;
pub mod userdata;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use futures::future::BoxFuture;

/// Tag keys every launched instance (and its volume, spot request and launch template)
/// carries, and EC2's limits on tags.
pub mod tags {
    use std::collections::BTreeMap;

    pub const BUILD_ID: &str = "spotbuild:build-id";
    /// Which attempt of the build launched it: an ambiguous launch looks for its own.
    pub const ATTEMPT: &str = "spotbuild:attempt";
    /// `trusted` or `untrusted`: the untrusted controller role may end only the latter.
    pub const TRUST: &str = "spotbuild:trust";
    pub const PROJECT: &str = "spotbuild:project";
    pub const COMMIT: &str = "spotbuild:commit";
    pub const EXPIRES_AT: &str = "spotbuild:expires-at";
    /// `x86_64` or `arm64`: what the instance's AMI runs.
    pub const ARCH: &str = "spotbuild:arch";
    pub const OWNER: &str = "spotbuild:owner";

    /// EC2's limits: characters in a key, in a value, and tags on one resource.
    pub const MAX_KEY: usize = 128;
    pub const MAX_VALUE: usize = 256;
    pub const MAX_TAGS: usize = 50;

    /// A comma-separated list that fits in one tag value: as many items as fit, then a
    /// count of the rest (`a,b,+17 more`).
    pub fn list_value(items: &[String]) -> String {
        let all = items.join(",");
        if all.chars().count() <= MAX_VALUE {
            return all;
        }
        let (mut shown, mut len) = (0, 0);
        for (i, item) in items.iter().enumerate() {
            let add = item.chars().count() + usize::from(i > 0);
            let tail = format!(",+{} more", items.len() - i - 1).len();
            if len + add + tail > MAX_VALUE {
                break;
            }
            len += add;
            shown = i + 1;
        }
        let rest = items.len() - shown;
        let out = match shown {
            0 => format!("{rest} projects"),
            _ => format!("{},+{rest} more", items[..shown].join(",")),
        };
        truncate(&out, MAX_VALUE)
    }

    fn truncate(s: &str, max: usize) -> String {
        s.chars().take(max).collect()
    }

    /// What had to change for a set of tags to fit EC2's limits.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct Fitted {
        pub tags: BTreeMap<String, String>,
        /// Keys whose values were cut to [`MAX_VALUE`] characters.
        pub cut: Vec<String>,
        /// Keys left out: too long, or past [`MAX_TAGS`] (spotbuild's own come first).
        pub dropped: Vec<String>,
    }

    /// Fits `spotbuild` (kept first) and `extra` tags into EC2's limits: values are cut,
    /// over-long keys and tags past the 50th are dropped, and each change is named.
    pub fn fit(spotbuild: BTreeMap<String, String>, extra: &BTreeMap<String, String>) -> Fitted {
        let mut f = Fitted::default();
        let ordered = spotbuild.into_iter().chain(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (k, v) in ordered {
            if f.tags.contains_key(&k) {
                continue;
            }
            if k.chars().count() > MAX_KEY || f.tags.len() >= MAX_TAGS {
                f.dropped.push(k);
                continue;
            }
            let v = if v.chars().count() > MAX_VALUE {
                f.cut.push(k.clone());
                truncate(&v, MAX_VALUE)
            } else {
                v
            };
            f.tags.insert(k, v);
        }
        f
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    Spot,
    OnDemand,
}

impl fmt::Display for Market {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Market::Spot => "spot",
            Market::OnDemand => "on-demand",
        })
    }
}

/// Which markets a launch may use, in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MarketPolicy {
    Spot,
    OnDemand,
    #[default]
    SpotThenOnDemand,
}

/// One place an instance can come from: an instance type in a subnet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    pub instance_type: String,
    pub subnet: String,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.instance_type, self.subnet)
    }
}

/// The machine image: an id, or an SSM parameter resolved at launch (so a team can bake a
/// new image without touching CI configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Image {
    Id(String),
    SsmParameter(String),
}

/// Everything about one launch except the market.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub build_id: String,
    /// The attempt of the build this launch serves (in its tags and idempotency token).
    pub attempt: u32,
    /// What the instance builds, for its `spotbuild:project` tag (cut to fit, with a count).
    pub projects: Vec<String>,
    /// How far its build is trusted (`spotbuild:trust`).
    pub trust: crate::trust::Level,
    pub commit: String,
    /// The CI job URL, when known.
    pub owner: Option<String>,
    /// When the instance must be gone; also armed on the instance itself.
    pub expires_at: SystemTime,
    /// The architecture of the image and of every pool (never mixed).
    pub arch: crate::platform::Arch,
    pub image: Image,
    pub instance_profile: Option<String>,
    pub security_groups: Vec<String>,
    pub root_volume_gb: u32,
    /// In order of preference; EC2 Fleet chooses among them by price and capacity.
    pub pools: Vec<Pool>,
    /// The pools differ in size and are ordered cheapest per vCPU first: the fleet follows
    /// that order among the pools with capacity, instead of comparing prices per instance
    /// (which always favours the smallest).
    pub prioritized: bool,
    /// A cap on the spot price, per vCPU-hour.
    pub max_spot_price_per_vcpu_hour: Option<f64>,
    pub user_data: String,
    /// Cost-allocation tags, added to the spotbuild ones.
    pub extra_tags: BTreeMap<String, String>,
}

impl LaunchSpec {
    /// Every tag of the instance, its volumes, its spot request and its launch template,
    /// fitted to EC2's limits (spotbuild's own first; see [`tags::fit`]).
    pub fn tags(&self) -> tags::Fitted {
        let mut t = BTreeMap::new();
        t.insert(tags::BUILD_ID.into(), self.build_id.clone());
        t.insert(tags::ATTEMPT.into(), self.attempt.to_string());
        t.insert(
            tags::TRUST.into(),
            match self.trust {
                crate::trust::Level::Trusted => "trusted",
                crate::trust::Level::Untrusted => "untrusted",
            }
            .into(),
        );
        t.insert(tags::PROJECT.into(), tags::list_value(&self.projects));
        t.insert(tags::COMMIT.into(), self.commit.clone());
        t.insert(tags::ARCH.into(), self.arch.to_string());
        t.insert(
            tags::EXPIRES_AT.into(),
            humantime::format_rfc3339_seconds(self.expires_at).to_string(),
        );
        if let Some(o) = &self.owner {
            t.insert(tags::OWNER.into(), o.clone());
        }
        tags::fit(t, &self.extra_tags)
    }

    /// The idempotency token of this launch in `market`: retrying the same request after
    /// an answer was lost launches nothing more (EC2 keeps tokens for a while). At most 64
    /// ASCII characters, as EC2 requires.
    pub fn client_token(&self, market: Market) -> String {
        let token = format!("{}-a{}-{market}", self.build_id, self.attempt);
        token.chars().filter(|c| c.is_ascii()).take(64).collect()
    }

    /// The per-launch template's name: the same for a retry, so it is created once.
    pub fn template_name(&self, market: Market) -> String {
        format!("spotbuild-{}", self.client_token(market))
    }
}

/// An instance we launched, as the launch answer names it (where it landed and its
/// address come with the wait for it to run).
#[derive(Debug, Clone, PartialEq)]
pub struct Launched {
    pub instance_id: String,
    pub pool: Pool,
    pub market: Market,
    /// Pools the cloud reported failing on the way (e.g. no capacity in one of them).
    pub pool_failures: Vec<CloudFailure>,
}

/// Why a launch (or one pool of it) failed, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// No capacity in that pool (or the pool does not exist in that zone): try elsewhere.
    Capacity,
    /// The spot price is above the cap.
    Price,
    /// The spot quota is exhausted: on-demand has a quota of its own.
    SpotQuota,
    /// Throttled: the same call may succeed after a backoff.
    Throttled,
    /// No answer was read (a timeout, a dropped connection, a 5xx): the request may have
    /// taken effect. A launch must look for what it may have started before moving on.
    Ambiguous,
    /// Permissions: nothing else will work either.
    Permission,
    /// The machine image is missing or unusable.
    Image,
    /// The request itself is wrong (subnet, security group, profile, parameters).
    Config,
    /// Anything else (5xx, unknown codes).
    Other,
}

impl FailureKind {
    /// Classifies an EC2 error code.
    pub fn of_code(code: &str) -> FailureKind {
        match code {
            "InsufficientInstanceCapacity"
            | "InsufficientHostCapacity"
            | "InsufficientCapacity"
            | "InsufficientReservedInstanceCapacity"
            | "InsufficientFreeAddressesInSubnet"
            | "Unsupported"
            | "UnfulfillableCapacity" => FailureKind::Capacity,
            "SpotMaxPriceTooLow" | "bad-parameters.price-too-low" | "price-too-low" => FailureKind::Price,
            "MaxSpotInstanceCountExceeded" | "MaxSpotFleetRequestCountExceeded" | "VcpuLimitExceeded" => {
                FailureKind::SpotQuota
            }
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled" => {
                FailureKind::Throttled
            }
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" | "RequestTimeout"
            | "RequestTimeoutException" => FailureKind::Ambiguous,
            "UnauthorizedOperation" | "AuthFailure" | "OptInRequired" | "Blocked" | "InvalidClientTokenId"
            | "SignatureDoesNotMatch" | "AccessDenied" | "AccessDeniedException" => FailureKind::Permission,
            c if c.starts_with("InvalidAMIID") => FailureKind::Image,
            c if c.starts_with("Invalid") || c.starts_with("Missing") || c == "InvalidParameterCombination" => {
                FailureKind::Config
            }
            _ => FailureKind::Other,
        }
    }

    /// Whether another pool or market may succeed where this failed.
    pub fn moves_on(self) -> bool {
        matches!(self, FailureKind::Capacity | FailureKind::Price | FailureKind::SpotQuota)
    }
}

/// A failure the cloud reported, with its code kept.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}: {message}", code.as_deref().unwrap_or("error"), pool.as_ref().map(|p| format!(" ({p})")).unwrap_or_default())]
pub struct CloudFailure {
    pub kind: FailureKind,
    pub code: Option<String>,
    pub message: String,
    /// The pool it concerns, for per-pool fleet errors.
    pub pool: Option<Pool>,
}

impl CloudFailure {
    /// No answer could be read: the request may or may not have taken effect.
    pub fn ambiguous(message: impl Into<String>) -> CloudFailure {
        CloudFailure {
            kind: FailureKind::Ambiguous,
            code: None,
            message: message.into(),
            pool: None,
        }
    }

    /// EC2 does not (yet) know an instance id it was given.
    pub fn is_not_found(&self) -> bool {
        self.code.as_deref() == Some(NOT_FOUND)
    }

    pub fn new(code: &str, message: impl Into<String>, pool: Option<Pool>) -> CloudFailure {
        CloudFailure {
            kind: FailureKind::of_code(code),
            code: Some(code.to_string()),
            message: message.into(),
            pool,
        }
    }
}

/// EC2's error code for an instance id it does not know (yet, or any more).
pub const NOT_FOUND: &str = "InvalidInstanceID.NotFound";

/// What EC2 says about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub instance_id: String,
    pub state: InstanceState,
    /// e.g. `Server.SpotInstanceTermination`.
    pub state_reason: Option<String>,
    pub private_ip: Option<String>,
    pub launched_at: Option<SystemTime>,
    /// The spot request behind a spot instance (cancelled at teardown).
    pub spot_request_id: Option<String>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    /// Spot or on-demand, when EC2 said.
    pub market: Option<Market>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Stopping,
    Stopped,
    Terminated,
    /// EC2 does not list it. Right after a launch that is eventual consistency, not proof
    /// that it is not running: never a reason to stop tearing down.
    NotFound,
}

impl Observed {
    /// An instance EC2 did not list.
    pub fn not_found(instance_id: &str) -> Observed {
        Observed {
            instance_id: instance_id.to_string(),
            state: InstanceState::NotFound,
            state_reason: None,
            private_ip: None,
            launched_at: None,
            spot_request_id: None,
            instance_type: None,
            availability_zone: None,
            market: None,
            tags: BTreeMap::new(),
        }
    }

    /// Spot reclaimed it: an interruption, not a failure of the build.
    pub fn interrupted(&self) -> bool {
        self.state_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("Server.SpotInstance"))
    }

    /// EC2 says it is shutting down or terminated: it bills no more compute. (Not listed
    /// is not ending: see [`InstanceState::NotFound`].)
    pub fn ending(&self) -> bool {
        matches!(self.state, InstanceState::ShuttingDown | InstanceState::Terminated)
    }

    /// The build (instance group) that launched it, from its tag.
    pub fn build_id(&self) -> Option<&str> {
        self.tags.get(tags::BUILD_ID).map(String::as_str)
    }
}

/// An open or active spot request, as EC2 reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotRequest {
    pub id: String,
    pub instance_id: Option<String>,
    pub created_at: Option<SystemTime>,
    pub tags: BTreeMap<String, String>,
}

/// A launch template spotbuild made for one launch (it holds the host key in its user
/// data, so it must not outlive the launch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub build_id: Option<String>,
    pub created_at: Option<SystemTime>,
}

/// The narrow interface to EC2. Implemented by the AWS adapter and by test fakes.
pub trait Cloud: Send + Sync {
    /// One instance in `market`, from any of `spec.pools`. On failure, every reason given,
    /// per pool where the cloud said which.
    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        market: Market,
    ) -> BoxFuture<'a, Result<Launched, Vec<CloudFailure>>>;

    /// One [`Observed`] per id, in any order; an id EC2 does not list is
    /// [`InstanceState::NotFound`].
    fn describe<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>>;

    /// The instances tagged with any of these build ids that are not terminated. What a
    /// teardown terminates besides the ids it saw, and what an ambiguous launch looks for.
    fn find<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>>;

    /// Terminates, cancels the spot requests, and verifies that every instance is ending.
    /// An id EC2 does not know is retried until it does (or the call's bound passes):
    /// not found is never taken as terminated.
    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>>;

    /// Deletes the launch templates tagged with any of these build ids; returns their names.
    fn delete_templates<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, CloudFailure>>;

    /// The current spot price (USD per hour) of a pool in an availability zone, if known.
    fn spot_price<'a>(
        &'a self,
        instance_type: &'a str,
        availability_zone: &'a str,
    ) -> BoxFuture<'a, Result<Option<f64>, CloudFailure>> {
        let _ = (instance_type, availability_zone);
        Box::pin(async { Ok(None) })
    }
}

/// A launch of the default pools' kind, for tests of the policy and the adapter.
#[cfg(test)]
pub(crate) fn test_spec() -> LaunchSpec {
    LaunchSpec {
        build_id: "b1".into(),
        attempt: 1,
        projects: vec!["api".into()],
        trust: crate::trust::Level::Trusted,
        commit: "abc".into(),
        owner: None,
        expires_at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
        arch: crate::platform::Arch::X86_64,
        image: Image::SsmParameter("/spotbuild/ami".into()),
        instance_profile: Some("spotbuild-instance".into()),
        security_groups: vec!["sg-1".into()],
        root_volume_gb: 150,
        pools: ["m7a.16xlarge", "c7a.16xlarge"]
            .map(|t| Pool {
                instance_type: t.into(),
                subnet: "subnet-1".into(),
            })
            .to_vec(),
        prioritized: false,
        max_spot_price_per_vcpu_hour: Some(0.05),
        user_data: "#!/bin/sh\n".into(),
        extra_tags: BTreeMap::new(),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_classified_for_the_fallback_policy() {
        assert_eq!(FailureKind::of_code("InsufficientInstanceCapacity"), FailureKind::Capacity);
        assert_eq!(FailureKind::of_code("SpotMaxPriceTooLow"), FailureKind::Price);
        assert_eq!(FailureKind::of_code("MaxSpotInstanceCountExceeded"), FailureKind::SpotQuota);
        assert_eq!(FailureKind::of_code("RequestLimitExceeded"), FailureKind::Throttled);
        assert_eq!(FailureKind::of_code("UnauthorizedOperation"), FailureKind::Permission);
        assert_eq!(FailureKind::of_code("InvalidAMIID.NotFound"), FailureKind::Image);
        assert_eq!(FailureKind::of_code("InvalidSubnetID.NotFound"), FailureKind::Config);
        assert_eq!(FailureKind::of_code("InternalError"), FailureKind::Ambiguous);
        assert_eq!(FailureKind::of_code("SomethingNew"), FailureKind::Other);
        assert!(FailureKind::Capacity.moves_on() && !FailureKind::Permission.moves_on());
    }

    #[test]
    fn spot_reclaims_are_interruptions() {
        let o = Observed {
            state: InstanceState::ShuttingDown,
            state_reason: Some("Server.SpotInstanceTermination".into()),
            ..Observed::not_found("i-1")
        };
        assert!(o.interrupted() && o.ending());
        assert!(!Observed::not_found("i-1").ending(), "not listed is not proof of termination");
    }

    #[test]
    fn a_long_project_list_fits_one_tag_value_with_a_count() {
        let projects: Vec<String> = (0..40).map(|i| format!("project-number-{i:02}")).collect();
        let v = tags::list_value(&projects);
        assert!(v.chars().count() <= tags::MAX_VALUE, "{} chars: {v}", v.len());
        assert!(v.starts_with("project-number-00,project-number-01,"), "{v}");
        let shown = v.matches("project-number-").count();
        assert!(v.ends_with(&format!(",+{} more", 40 - shown)), "{v}");
        assert_eq!(tags::list_value(&projects[..3]), "project-number-00,project-number-01,project-number-02");
        let huge = vec!["x".repeat(300)];
        assert!(tags::list_value(&huge).chars().count() <= tags::MAX_VALUE);
    }

    #[test]
    fn tags_are_fitted_to_ec2_limits_keeping_spotbuilds_own() {
        let mut spec = test_spec();
        spec.projects = (0..40).map(|i| format!("project-number-{i:02}")).collect();
        spec.owner = Some(format!("https://ci.example/{}", "j".repeat(400)));
        spec.extra_tags = (0..60).map(|i| (format!("team-{i:02}"), "x".into())).collect();
        spec.extra_tags.insert("k".repeat(129), "v".into());
        let f = spec.tags();
        assert_eq!(f.tags.len(), tags::MAX_TAGS);
        assert!(f.tags.values().all(|v| v.chars().count() <= tags::MAX_VALUE));
        assert!(f.tags.keys().all(|k| k.chars().count() <= tags::MAX_KEY));
        for k in [tags::BUILD_ID, tags::ATTEMPT, tags::TRUST, tags::PROJECT, tags::COMMIT, tags::ARCH, tags::EXPIRES_AT, tags::OWNER] {
            assert!(f.tags.contains_key(k), "{k} kept");
        }
        assert_eq!(f.cut, [tags::OWNER.to_string()]);
        assert_eq!(f.dropped.len(), 60 + 1 - (tags::MAX_TAGS - 8));
        assert!(spec.client_token(Market::OnDemand).len() <= 64);
        assert_eq!(spec.client_token(Market::Spot), "b1-a1-spot");
    }
}
