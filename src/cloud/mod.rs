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
pub mod reap;
pub mod userdata;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use futures::future::BoxFuture;

/// Tag keys every launched instance (and its volume) carries.
pub mod tags {
    pub const BUILD_ID: &str = "spotbuild:build-id";
    pub const PROJECT: &str = "spotbuild:project";
    pub const COMMIT: &str = "spotbuild:commit";
    pub const EXPIRES_AT: &str = "spotbuild:expires-at";
    pub const OWNER: &str = "spotbuild:owner";
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
    pub project: String,
    pub commit: String,
    /// The CI job URL, when known.
    pub owner: Option<String>,
    /// When the instance must be gone; also armed on the instance itself.
    pub expires_at: SystemTime,
    pub image: Image,
    pub instance_profile: Option<String>,
    pub security_groups: Vec<String>,
    pub root_volume_gb: u32,
    /// In order of preference; EC2 Fleet chooses among them by price and capacity.
    pub pools: Vec<Pool>,
    /// A cap on the spot price, per vCPU-hour.
    pub max_spot_price_per_vcpu_hour: Option<f64>,
    pub user_data: String,
    /// Cost-allocation tags, added to the spotbuild ones.
    pub extra_tags: BTreeMap<String, String>,
}

impl LaunchSpec {
    /// All tags for the instance and its volumes, spotbuild's first.
    pub fn tags(&self) -> BTreeMap<String, String> {
        let mut t = self.extra_tags.clone();
        t.insert(tags::BUILD_ID.into(), self.build_id.clone());
        t.insert(tags::PROJECT.into(), self.project.clone());
        t.insert(tags::COMMIT.into(), self.commit.clone());
        t.insert(
            tags::EXPIRES_AT.into(),
            humantime::format_rfc3339_seconds(self.expires_at).to_string(),
        );
        if let Some(o) = &self.owner {
            t.insert(tags::OWNER.into(), o.clone());
        }
        t
    }
}

/// A running (or starting) instance we launched.
#[derive(Debug, Clone, PartialEq)]
pub struct Launched {
    pub instance_id: String,
    pub pool: Pool,
    pub availability_zone: Option<String>,
    pub market: Market,
    pub private_ip: Option<String>,
    /// The spot request, if any (cancelled on terminate).
    pub spot_request_id: Option<String>,
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
    pub fn new(code: &str, message: impl Into<String>, pool: Option<Pool>) -> CloudFailure {
        CloudFailure {
            kind: FailureKind::of_code(code),
            code: Some(code.to_string()),
            message: message.into(),
            pool,
        }
    }
}

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
    /// EC2 no longer knows it.
    Gone,
}

impl Observed {
    /// An instance EC2 no longer knows.
    pub fn gone(instance_id: &str) -> Observed {
        Observed {
            instance_id: instance_id.to_string(),
            state: InstanceState::Gone,
            state_reason: None,
            private_ip: None,
            launched_at: None,
            spot_request_id: None,
            tags: BTreeMap::new(),
        }
    }

    /// Spot reclaimed it: an interruption, not a failure of the build.
    pub fn interrupted(&self) -> bool {
        self.state_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("Server.SpotInstance"))
    }

    pub fn ending(&self) -> bool {
        matches!(
            self.state,
            InstanceState::ShuttingDown | InstanceState::Terminated | InstanceState::Gone
        )
    }
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

    fn describe<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>>;

    /// Terminates (idempotently: gone or terminating counts as done) and cancels the spot
    /// request, if any.
    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>>;

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
        project: "api".into(),
        commit: "abc".into(),
        owner: None,
        expires_at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
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
        assert_eq!(FailureKind::of_code("InternalError"), FailureKind::Other);
        assert!(FailureKind::Capacity.moves_on() && !FailureKind::Permission.moves_on());
    }

    #[test]
    fn spot_reclaims_are_interruptions() {
        let o = Observed {
            instance_id: "i-1".into(),
            state: InstanceState::ShuttingDown,
            state_reason: Some("Server.SpotInstanceTermination".into()),
            private_ip: None,
            launched_at: None,
            spot_request_id: None,
            tags: BTreeMap::new(),
        };
        assert!(o.interrupted() && o.ending());
    }
}
