//! What a build and each of its attempts leave behind: the record `--record` writes and
//! reporters show, and its mapping to the ledger's entries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::attempt::{AttemptOutcome, Phase};
use crate::ledger::{AttemptEntry, BuildEntry, Rental};

/// One attempt, as the ledger and the final table need it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    /// The instance and its prices (all empty when the launch failed).
    #[serde(flatten)]
    pub rental: Rental,
    /// RFC 3339.
    pub started_at: String,
    pub ended_at: String,
    #[serde(flatten)]
    pub outcome: AttemptOutcome,
    /// Seconds spent in each phase, in order.
    pub phases: Vec<(Phase, f64)>,
    /// Bytes of the git bundle shipped, and whether it relied on the baked mirror.
    pub shipped_bytes: Option<u64>,
    pub thin_bundle: Option<bool>,
    /// Seconds the agent spent in build (and push) steps, and in test steps.
    pub building_seconds: f64,
    pub testing_seconds: f64,
}

impl AttemptRecord {
    /// An attempt that has just begun: nothing rented yet.
    pub fn begin(attempt: u32) -> AttemptRecord {
        AttemptRecord {
            attempt,
            rental: Rental::default(),
            started_at: now_rfc3339(),
            ended_at: String::new(),
            outcome: AttemptOutcome::Error("unfinished".into()),
            phases: Vec::new(),
            shipped_bytes: None,
            thin_bundle: None,
            building_seconds: 0.0,
            testing_seconds: 0.0,
        }
    }

    /// The ledger's form of this attempt.
    pub fn to_entry(&self) -> AttemptEntry {
        let (outcome, reason) = match &self.outcome {
            AttemptOutcome::Success => ("success", None),
            AttemptOutcome::Failed => ("failed", None),
            AttemptOutcome::Interrupted => ("interrupted", None),
            AttemptOutcome::Lost(r) => ("lost", Some(r.clone())),
            AttemptOutcome::Error(r) => ("error", Some(r.clone())),
        };
        let mut seconds = BTreeMap::new();
        for (phase, secs) in &self.phases {
            *seconds.entry(phase.name().to_string()).or_insert(0.0) += secs;
        }
        seconds.insert("building".into(), self.building_seconds);
        seconds.insert("testing".into(), self.testing_seconds);
        AttemptEntry {
            attempt: self.attempt,
            rental: self.rental.clone(),
            started_at: self.started_at.clone(),
            ended_at: self.ended_at.clone(),
            outcome: outcome.into(),
            reason,
            seconds,
        }
    }

    /// Seconds from launch to the end of teardown: what the instance is billed for.
    pub fn instance_seconds(&self) -> Option<f64> {
        let start = humantime::parse_rfc3339(&self.started_at).ok()?;
        let end = humantime::parse_rfc3339(&self.ended_at).ok()?;
        Some(end.duration_since(start).ok()?.as_secs_f64())
    }
}

/// How one instance group's share of a build ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildRecord {
    pub build_id: String,
    pub commit: String,
    pub attempts: Vec<AttemptRecord>,
    pub result: BuildResult,
    /// Why the build could not go on, when `result` is `error` before or between attempts
    /// (an attempt's own error is in its outcome). Kept typed for the exit code.
    #[serde(skip)]
    pub error: Option<Arc<super::BuildError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildResult {
    Success,
    Failed,
    /// Every attempt was interrupted or lost.
    GaveUp,
    Error,
    /// The build's overall timeout passed.
    TimedOut,
}

impl BuildResult {
    /// The ledger's word for it.
    pub fn name(self) -> &'static str {
        match self {
            BuildResult::Success => "success",
            BuildResult::Failed => "failed",
            BuildResult::GaveUp => "gave-up",
            BuildResult::Error => "error",
            BuildResult::TimedOut => "timed-out",
        }
    }
}

/// The ledger's word for a build still going (its entry is the heartbeat).
pub const RUNNING: &str = "running";
/// The ledger's word for a build stopped by SIGINT or SIGTERM.
pub const CANCELLED: &str = "cancelled";
/// The ledger's word for a build that ended in a bug (a panic).
pub const PANICKED: &str = "panicked";

/// What one instance group has done so far, shared with the heartbeat and every way out,
/// so that a build stopped at any moment is recorded with what it rented.
#[derive(Clone, Default)]
pub struct Progress(Arc<Mutex<Done>>);

#[derive(Default)]
struct Done {
    attempts: Vec<AttemptRecord>,
    current: Option<AttemptRecord>,
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, Done> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The attempt under way, as it stands.
    pub fn update(&self, current: &AttemptRecord) {
        self.lock().current = Some(current.clone());
    }

    /// An attempt ended.
    pub fn finish(&self, record: &AttemptRecord) {
        let mut done = self.lock();
        done.current = None;
        done.attempts.push(record.clone());
    }

    /// Every attempt so far, as the ledger keeps them; one still under way ends now, its
    /// outcome `unfinished` (`running`, `cancelled`, `panicked`).
    pub fn attempt_entries(&self, unfinished: &str) -> Vec<AttemptEntry> {
        let done = self.lock();
        let mut all: Vec<AttemptEntry> = done.attempts.iter().map(AttemptRecord::to_entry).collect();
        if let Some(c) = &done.current {
            let mut e = c.to_entry();
            e.ended_at = now_rfc3339();
            e.outcome = unfinished.to_string();
            e.reason = None;
            all.push(e);
        }
        all
    }
}

/// What the ledger needs besides the record, to make its entry.
#[derive(Debug, Clone)]
pub struct EntryContext {
    /// `build`, `test` or `run`.
    pub kind: &'static str,
    pub projects: Vec<String>,
    pub branch: Option<String>,
    pub ci_job_url: Option<String>,
    pub started_at: String,
    pub region: Option<String>,
    pub volume_gb: u32,
    pub arch: crate::platform::Arch,
    /// Where its logs are archived.
    pub log: Option<String>,
}

impl BuildRecord {
    /// The ledger's entry for this record, ending now.
    pub fn to_entry(&self, cx: &EntryContext) -> BuildEntry {
        cx.entry(&self.build_id, &self.commit, self.attempts.iter().map(AttemptRecord::to_entry).collect(), self.result.name())
    }
}

impl EntryContext {
    /// The ledger's entry for a group with these attempts, ending now with `result`.
    pub fn entry(&self, build_id: &str, commit: &str, attempts: Vec<AttemptEntry>, result: &str) -> BuildEntry {
        BuildEntry {
            schema: crate::ledger::SCHEMA,
            build_id: build_id.to_string(),
            projects: self.projects.clone(),
            kind: self.kind.into(),
            commit: commit.to_string(),
            branch: self.branch.clone(),
            ci_job_url: self.ci_job_url.clone(),
            started_at: self.started_at.clone(),
            ended_at: now_rfc3339(),
            result: result.into(),
            region: self.region.clone(),
            volume_gb: self.volume_gb,
            arch: self.arch,
            log: self.log.clone(),
            attempts,
        }
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
