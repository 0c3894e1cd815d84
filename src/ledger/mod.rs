//! The cost ledger: one entry per build, with every attempt's instance, market, price and
//! phase times, kept in SQLite (one machine) or S3 (a team's CI jobs sharing one ledger);
//! and the spot interruptions that the breaker reads across CI jobs.
//!
//! Guarantees: writing an entry is idempotent (same build id, same key or row); entries
//! come back ordered by start time. Failing to write never fails a build: callers report it.
//! Assumptions: build ids are unique (time-based with 64 random bits, `farm::build::new_build_id`).
//! Caveats: costs are computed from the recorded prices when read (`ledger::cost`), so a
//! report is an estimate of the bill, not the bill (no taxes, credits, or data transfer).

pub mod archive;
pub mod cost;
pub mod html;
pub mod report;
pub mod s3;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::cloud::Market;

/// Bumped when an entry's meaning changes; readers accept older ones.
pub const SCHEMA: u32 = 1;

/// One build, as finance reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildEntry {
    pub schema: u32,
    pub build_id: String,
    /// The projects this build worked on (its cost is shared among them equally).
    pub projects: Vec<String>,
    /// `build`, `test` or `run`.
    pub kind: String,
    pub commit: String,
    pub branch: Option<String>,
    pub ci_job_url: Option<String>,
    /// RFC 3339.
    pub started_at: String,
    pub ended_at: String,
    /// `success`, `failed`, `gave-up`, `error` or `cancelled`.
    pub result: String,
    pub region: Option<String>,
    /// The root volume (gp3) every attempt had.
    pub volume_gb: u32,
    /// What the machines ran (entries written before architectures were recorded were
    /// all x86_64).
    #[serde(default)]
    pub arch: crate::platform::Arch,
    /// The folder of its archived logs (`…/logs/YYYY/MM/DD/<build>/`), when archived:
    /// `spotbuild logs <build>` reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    pub attempts: Vec<AttemptEntry>,
}

/// The instance one attempt rented and what it cost per hour: the controller's attempt
/// record and the ledger's entry share it, so neither copies the other field by field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rental {
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub market: Option<Market>,
    /// USD per hour paid: the spot price at launch (for the pool used) or the on-demand
    /// list price.
    pub hourly_price: Option<f64>,
    /// The on-demand list price of the same type and region: what savings are against.
    pub on_demand_hourly: Option<f64>,
    /// For an on-demand attempt, the spot price of the same pool at launch: what the
    /// fallback cost extra.
    pub spot_reference_hourly: Option<f64>,
    /// Why this market (e.g. every spot pool failed; the breaker was open).
    pub market_reason: Option<String>,
}

/// One attempt: one instance, from the launch request to verified termination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEntry {
    pub attempt: u32,
    #[serde(flatten)]
    pub rental: Rental,
    pub started_at: String,
    pub ended_at: String,
    /// `success`, `failed`, `interrupted`, `lost` or `error`.
    pub outcome: String,
    pub reason: Option<String>,
    /// Seconds per phase: launching, booting, connecting, shipping, running, collecting,
    /// terminating; and, within running, building and testing (from the agent's steps).
    pub seconds: BTreeMap<String, f64>,
}

impl BuildEntry {
    pub fn started(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.started_at).ok()
    }
    /// Wall-clock seconds from the first launch request to the end.
    pub fn duration_seconds(&self) -> f64 {
        seconds_between(&self.started_at, &self.ended_at)
    }
}

impl AttemptEntry {
    /// Seconds the instance existed (what is billed).
    pub fn instance_seconds(&self) -> f64 {
        seconds_between(&self.started_at, &self.ended_at)
    }
}

pub fn seconds_between(a: &str, b: &str) -> f64 {
    match (humantime::parse_rfc3339_weak(a), humantime::parse_rfc3339_weak(b)) {
        (Ok(a), Ok(b)) => b.duration_since(a).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        _ => 0.0,
    }
}

/// A spot interruption, recorded when it happens so that other CI jobs' breakers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interruption {
    /// RFC 3339.
    pub at: String,
    pub build_id: String,
    pub attempt: u32,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
}

/// A running build's sign of life, written by its controller every `[ledger] heartbeat`
/// and once more when it ends; `spotbuild reap` terminates the instances of a build whose
/// beats stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub build_id: String,
    /// When it was written (RFC 3339).
    pub at: String,
    /// When the build started (RFC 3339): where its entry is.
    pub started_at: String,
    /// The build is over (its entry has its result): nothing of it should still run.
    pub ended: bool,
}

impl Beat {
    pub fn at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.at).ok()
    }
}

/// One project's part in one `spotbuild deploy`: what the environment got, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployEntry {
    pub schema: u32,
    pub deploy_id: String,
    pub env: String,
    pub project: String,
    pub commit: String,
    /// The project's content hash at the commit.
    pub hash: String,
    /// The image's manifest digest (equal in both registries).
    pub digest: String,
    /// `HOST/REPOSITORY` the image was promoted to.
    pub destination: String,
    /// `deployed`, `unchanged`, `failed` or `skipped`.
    pub action: String,
    pub tags: Vec<String>,
    /// The hook's outcome: `ok`, `failed: …`, `timed out`, `not run`, or none without a hook.
    pub hook: Option<String>,
    pub ci_job_url: Option<String>,
    /// RFC 3339.
    pub at: String,
}

impl DeployEntry {
    pub fn at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.at).ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger at {place} failed: {message}")]
    Store {
        place: String,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("`{0}` is not a ledger location (a file path, `s3://bucket/prefix`, or `off`)")]
    BadLocation(String),
}

/// Where entries are kept.
pub trait LedgerStore: Send + Sync {
    /// Where this is, for messages (`sqlite:/path`, `s3://bucket/prefix`).
    fn place(&self) -> String;

    /// Writes (or rewrites) the build's entry.
    fn put<'a>(&'a self, entry: &'a BuildEntry) -> BoxFuture<'a, Result<(), LedgerError>>;

    /// Entries of builds started in `[since, until)`, by start time.
    fn list(&self, since: SystemTime, until: SystemTime) -> BoxFuture<'_, Result<Vec<BuildEntry>, LedgerError>>;

    fn record_interruption<'a>(&'a self, i: &'a Interruption) -> BoxFuture<'a, Result<(), LedgerError>>;

    /// When interruptions since `since` happened, any build's.
    fn interruptions(&self, since: SystemTime) -> BoxFuture<'_, Result<Vec<SystemTime>, LedgerError>>;

    /// The entry of `build_id`, which started at `started_at` (RFC 3339), if there is one.
    fn get<'a>(&'a self, build_id: &'a str, started_at: &'a str) -> BoxFuture<'a, Result<Option<BuildEntry>, LedgerError>>;

    /// Writes (or rewrites) a build's heartbeat.
    fn beat<'a>(&'a self, beat: &'a Beat) -> BoxFuture<'a, Result<(), LedgerError>>;

    /// The heartbeats of these builds (those that have one).
    fn beats<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Beat>, LedgerError>>;

    /// Where this ledger keeps builds' logs: beside a SQLite file, in an S3 ledger's bucket.
    fn archive(&self) -> Option<Arc<dyn archive::LogArchive>> {
        None
    }

    /// Writes (or rewrites) one project's record of a deploy.
    fn record_deploy<'a>(&'a self, entry: &'a DeployEntry) -> BoxFuture<'a, Result<(), LedgerError>> {
        let _ = entry;
        Box::pin(async move { Err(self.keeps_no_deploys()) })
    }

    /// Deploy records made in `[since, until)`, oldest first.
    fn deploys(&self, since: SystemTime, until: SystemTime) -> BoxFuture<'_, Result<Vec<DeployEntry>, LedgerError>> {
        let _ = (since, until);
        Box::pin(async move { Err(self.keeps_no_deploys()) })
    }

    /// The error of a store that does not keep deploy records.
    fn keeps_no_deploys(&self) -> LedgerError {
        LedgerError::Store {
            place: self.place(),
            message: "this ledger keeps no deploy records".into(),
            source: None,
        }
    }
}

/// A ledger location as the user gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    S3 { bucket: String, prefix: String },
    Off,
}

impl std::str::FromStr for Location {
    type Err = LedgerError;
    fn from_str(s: &str) -> Result<Location, LedgerError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(LedgerError::BadLocation(s.into()));
        }
        if s == "off" {
            return Ok(Location::Off);
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(LedgerError::BadLocation(s.into()));
            }
            return Ok(Location::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if s.contains("://") {
            return Err(LedgerError::BadLocation(s.into()));
        }
        Ok(Location::Sqlite(PathBuf::from(s.strip_prefix("sqlite:").unwrap_or(s))))
    }
}

impl Location {
    /// Where untrusted builds record: a part of the ledger of its own (`PREFIX/untrusted`,
    /// or `NAME-untrusted.sqlite`), so that a trusted build's breaker never reads what an
    /// untrusted one wrote, and IAM can let untrusted controllers write only there.
    pub fn untrusted(&self) -> Location {
        match self {
            Location::Sqlite(path) => {
                let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "ledger".into());
                let name = match path.extension() {
                    Some(ext) => format!("{stem}-untrusted.{}", ext.to_string_lossy()),
                    None => format!("{stem}-untrusted"),
                };
                Location::Sqlite(path.with_file_name(name))
            }
            Location::S3 { bucket, prefix } => Location::S3 {
                bucket: bucket.clone(),
                prefix: if prefix.is_empty() { "untrusted".into() } else { format!("{prefix}/untrusted") },
            },
            Location::Off => Location::Off,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Location::Off => f.write_str("off"),
        }
    }
}

/// The default: a file under the user's data directory.
pub fn default_location() -> Location {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    Location::Sqlite(base.join("spotbuild").join("ledger.sqlite"))
}

/// Opens the store at `location`; `None` for `off`. S3 uses `region` and `endpoint`.
pub async fn open(location: &Location, region: Option<String>, endpoint: Option<String>) -> Result<Option<std::sync::Arc<dyn LedgerStore>>, LedgerError> {
    Ok(match location {
        Location::Off => None,
        Location::Sqlite(path) => {
            // Creating the file, migrating it and waiting out another writer's lock block.
            let owned = path.clone();
            let opened = tokio::task::spawn_blocking(move || sqlite::SqliteLedger::open(&owned))
                .await
                .map_err(|e| sqlite::store_error(path, e))??;
            Some(std::sync::Arc::new(opened))
        }
        Location::S3 { bucket, prefix } => {
            let store = crate::objects::s3::S3Store::from_env(bucket.clone(), region, endpoint).await;
            Some(std::sync::Arc::new(s3::S3Ledger::new(std::sync::Arc::new(store), prefix.clone())))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_bad_ones_are_refused() {
        assert_eq!("off".parse::<Location>().unwrap(), Location::Off);
        assert_eq!(
            "s3://acme-ledger/ci/spotbuild/".parse::<Location>().unwrap(),
            Location::S3 {
                bucket: "acme-ledger".into(),
                prefix: "ci/spotbuild".into()
            }
        );
        assert_eq!("/var/lib/l.sqlite".parse::<Location>().unwrap(), Location::Sqlite("/var/lib/l.sqlite".into()));
        assert!("gs://x/y".parse::<Location>().is_err());
        assert_eq!(
            "s3://acme-ledger/ci".parse::<Location>().unwrap().untrusted(),
            Location::S3 {
                bucket: "acme-ledger".into(),
                prefix: "ci/untrusted".into()
            }
        );
        assert_eq!("/var/lib/l.sqlite".parse::<Location>().unwrap().untrusted(), Location::Sqlite("/var/lib/l-untrusted.sqlite".into()));
        assert!("s3:///nobucket".parse::<Location>().is_err());
    }
}
