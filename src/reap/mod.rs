//! The reaper: one pass ends whatever spotbuild left running. Run from a schedule (the
//! Terraform module's Lambda, [`lambda`]), from cron (`spotbuild reap`), or in a loop
//! (`spotbuild reap --every 5m`).
//!
//! # Guarantees
//! - Nothing without spotbuild's `spotbuild:build-id` tag is ever touched.
//! - Two ways to find the dead ([`decide`]): an instance whose `spotbuild:expires-at`
//!   has passed, and one whose build stopped beating in the ledger for the heartbeat
//!   window (its controller was killed) or says it is over.
//! - Spot requests and launch templates spotbuild left behind are swept too; a build found
//!   dead is marked `abandoned` in the ledger, with its cost up to now.
//! - Idempotent: a second pass finds nothing more to do.
//!
//! # Assumptions
//! - The reaper reads the same ledger the builds write (`--ledger`, `SPOTBUILD_LEDGER`),
//!   and its untrusted part. Without one, only expiry applies.
//!
//! # Caveats
//! - A build whose first ledger write failed has no heartbeat: its instances are reaped at
//!   their expiry only.

pub mod decide;
pub mod lambda;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use decide::{orphaned_requests, orphaned_templates, Decision, RequestVerdict, Rules, TemplateVerdict, Verdict};

use crate::cloud::aws::AwsCloud;
use crate::cloud::{Cloud, CloudFailure};
use crate::errors::error_chain;
use crate::ledger::{Beat, LedgerStore};

/// Bound on each ledger call of a pass.
pub const LEDGER_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The default heartbeat window: ten heartbeats at the default `[ledger] heartbeat`.
pub const DEFAULT_HEARTBEAT_WINDOW: Duration = Duration::from_secs(600);

/// What one pass talks to, and how it judges.
pub struct Reaper<'a> {
    pub cloud: &'a AwsCloud,
    /// Where builds beat: the ledger and its untrusted part (see `ledger::Location`).
    pub ledgers: Vec<&'a dyn LedgerStore>,
    pub rules: Rules,
    pub dry_run: bool,
}

/// What a pass did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// The ledger whose heartbeats were read.
    pub ledger: Option<String>,
    pub terminate: Vec<Verdict>,
    pub keep: Vec<Verdict>,
    pub cancel_requests: Vec<RequestVerdict>,
    pub delete_templates: Vec<TemplateVerdict>,
    /// Builds marked `abandoned` in the ledger.
    pub abandoned_builds: Vec<String>,
    /// What could not be done, with why (the rest of the pass went on).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error("failed to reap: {0}")]
    Cloud(#[from] CloudFailure),
}

impl Reaper<'_> {
    /// One pass.
    pub async fn pass(&self) -> Result<Report, ReapError> {
        let now = SystemTime::now();
        let mut report = Report {
            dry_run: self.dry_run,
            ledger: (!self.ledgers.is_empty()).then(|| self.ledgers.iter().map(|l| l.place()).collect::<Vec<_>>().join(", ")),
            ..Report::default()
        };
        let instances = self.cloud.list_spotbuild_instances().await?;
        let templates = self.cloud.list_templates().await?;
        let builds: BTreeSet<String> = instances
            .iter()
            .filter(|o| !o.ending())
            .filter_map(|o| o.build_id().map(String::from))
            .chain(templates.iter().filter_map(|t| t.build_id.clone()))
            .collect();
        let located = self.beats(builds.into_iter().collect(), &mut report.warnings).await;
        // Keyed by decide::beat_key: the untrusted part's beats never stand for a trusted build.
        let beats: BTreeMap<String, Beat> = located.iter().map(|(id, (_, b))| (id.clone(), b.clone())).collect();
        let decision = decide::decide(&instances, &beats, now, self.rules);
        let ids: Vec<String> = decision.terminate.iter().map(|v| v.instance_id.clone()).collect();
        if !self.dry_run && !ids.is_empty() {
            self.cloud.terminate(&ids).await?;
        }
        // Spot requests left open after their instance (or with none): cancel them too.
        let requests = self.cloud.list_spot_requests().await?;
        report.cancel_requests = orphaned_requests(&requests, &instances, now);
        let request_ids: Vec<String> = report.cancel_requests.iter().map(|v| v.request_id.clone()).collect();
        if !self.dry_run && !request_ids.is_empty() {
            self.cloud.cancel_spot_requests(&request_ids).await?;
        }
        report.delete_templates = orphaned_templates(&templates, &beats, now, self.rules);
        let template_ids: Vec<String> = report.delete_templates.iter().map(|v| v.template_id.clone()).collect();
        if !self.dry_run && !template_ids.is_empty() {
            self.cloud.delete_template_ids(&template_ids).await?;
        }
        if !self.dry_run {
            for (key, beat) in &decision.abandoned {
                let Some((i, _)) = located.get(key) else { continue };
                match self.mark_abandoned(self.ledgers[*i], beat).await {
                    Ok(true) => report.abandoned_builds.push(beat.build_id.clone()),
                    Ok(false) => {}
                    Err(why) => report.warnings.push(format!("build {} was not marked abandoned in the ledger: {why}", beat.build_id)),
                }
            }
        }
        report.terminate = decision.terminate;
        report.keep = decision.keep;
        Ok(report)
    }

    /// The heartbeats of `builds`, by [`decide::beat_key`], from every part of the ledger
    /// (none without a ledger; a part that fails is said and skipped). The first ledger is
    /// the trusted one; any other is its untrusted part.
    async fn beats(&self, builds: Vec<String>, warnings: &mut Vec<String>) -> BTreeMap<String, (usize, Beat)> {
        let mut out = BTreeMap::new();
        if self.rules.heartbeat_window.is_none() || builds.is_empty() {
            return out;
        }
        for (i, ledger) in self.ledgers.iter().enumerate() {
            match tokio::time::timeout(LEDGER_CALL_TIMEOUT, ledger.beats(&builds)).await {
                Ok(Ok(beats)) => out.extend(beats.into_iter().map(|b| (decide::beat_key((i > 0).then_some("untrusted"), &b.build_id), (i, b)))),
                Ok(Err(e)) => warnings.push(format!("heartbeats in {} could not be read, so only expiry applied there: {}", ledger.place(), error_chain(&e))),
                Err(_) => warnings.push(format!("{} did not answer within {}s, so only expiry applied there", ledger.place(), LEDGER_CALL_TIMEOUT.as_secs())),
            }
        }
        out
    }

    /// Marks a dead build's entry `abandoned` in the part of the ledger it beat in, its
    /// attempt under way ending now; whether there was a running entry to mark.
    async fn mark_abandoned(&self, ledger: &dyn LedgerStore, beat: &Beat) -> Result<bool, String> {
        let bounded = |what: &'static str| move |_| format!("{} did not answer {what} within {}s", ledger.place(), LEDGER_CALL_TIMEOUT.as_secs());
        let entry = tokio::time::timeout(LEDGER_CALL_TIMEOUT, ledger.get(&beat.build_id, &beat.started_at))
            .await
            .map_err(bounded("a read"))?
            .map_err(|e| error_chain(&e))?;
        let Some(mut entry) = entry.filter(|e| e.result == crate::farm::record::RUNNING) else { return Ok(false) };
        let now = crate::farm::record::now_rfc3339();
        entry.result = ABANDONED.into();
        entry.ended_at = now.clone();
        for a in entry.attempts.iter_mut().filter(|a| a.outcome == crate::farm::record::RUNNING) {
            a.outcome = ABANDONED.into();
            a.reason = Some("the controller stopped beating; the reaper terminated the instance".into());
            a.ended_at = now.clone();
        }
        let ended = Beat {
            at: now,
            ended: true,
            ..beat.clone()
        };
        let write = async {
            ledger.put(&entry).await?;
            ledger.beat(&ended).await
        };
        tokio::time::timeout(LEDGER_CALL_TIMEOUT, write)
            .await
            .map_err(bounded("a write"))?
            .map_err(|e| error_chain(&e))?;
        Ok(true)
    }
}

/// The ledger's word for a build whose controller died and whose instances the reaper
/// ended.
pub const ABANDONED: &str = "abandoned";

impl Report {
    /// The readable form: one line per thing done or kept, then a count.
    pub fn render(&self) -> String {
        let (verb, cancel, delete) = if self.dry_run {
            ("would terminate", "would cancel", "would delete")
        } else {
            ("terminated", "cancelled", "deleted")
        };
        let mut out = String::new();
        for v in &self.terminate {
            out.push_str(&format!(
                "{verb} {} (build {}, {}): {}\n",
                v.instance_id,
                v.build_id.as_deref().unwrap_or("?"),
                v.project.as_deref().unwrap_or("?"),
                v.reason
            ));
        }
        for v in &self.keep {
            out.push_str(&format!("kept {} (build {}): {}\n", v.instance_id, v.build_id.as_deref().unwrap_or("?"), v.reason));
        }
        for v in &self.cancel_requests {
            out.push_str(&format!("{cancel} spot request {} ({})\n", v.request_id, v.reason));
        }
        for v in &self.delete_templates {
            out.push_str(&format!("{delete} launch template {} ({})\n", v.name, v.reason));
        }
        for b in &self.abandoned_builds {
            out.push_str(&format!("marked build {b} abandoned in the ledger\n"));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out.push_str(&format!(
            "{} instance{} {verb}, {} kept\n",
            self.terminate.len(),
            if self.terminate.len() == 1 { "" } else { "s" },
            self.keep.len()
        ));
        out
    }
}
