//! `spotbuild build`, `test` and `run` on rented instances: arguments become a
//! [`BuildRequest`], [`crate::farm::run`] does the build, its events are shown as they
//! come, and its outcome becomes the exit code ([`Exit::of_build`]). Nothing here
//! orchestrates.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Args;

use super::error::{Error, Exit};
use super::plan::{compute, PlannedExt};
use super::reporter::Reporter;
use crate::cloud::aws::AwsCloud;
use crate::farm::attempt::AttemptOutcome;
use crate::farm::build::PlanAgain;
use crate::farm::connect::{Connectors, SsmClients};
use crate::farm::job::{self, JobOptions};
use crate::farm::{BuildOutcome, BuildRecord, BuildRequest, Deps, FarmEvent, GroupOutcome, Origin};
use crate::ledger::archive::{ArchiveWriter, LogKey};
use crate::plan::planner::PlanRequest;
use crate::protocol::BuilderChoice;
use crate::settings::AuthMode;

pub use crate::farm::job::Scope;

/// Flags `build`, `test` and `run` share.
#[derive(Debug, Clone, Args)]
pub struct RemoteFlags {
    /// The commit to build or test.
    #[arg(long, value_name = "REV", default_value = "HEAD")]
    pub commit: String,

    /// Print events as NDJSON instead of readable lines.
    #[arg(long)]
    pub json: bool,

    /// Registry as HOST[:PORT][/PREFIX].
    #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_REGISTRY")]
    pub registry: Option<String>,

    /// Stop all work after this long.
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Rent a machine with this many vCPUs: each configured family at that size (and
    /// larger ones up to `[cloud] max_cpus` with `[cloud] sizes = "at-least"`). MIN-MAX
    /// (e.g. 48-192) allows any size in the range, cheapest per vCPU first
    /// [default: the configured types as they are].
    #[arg(long, value_name = "N|MIN-MAX")]
    pub cpus: Option<crate::settings::CpuWant>,

    /// The machine's architecture: x86_64 (amd64) or arm64 (aarch64). An arm64 build
    /// rents only `[cloud.arm64]` types from the arm64 AMI, and builds only the projects
    /// with `multiarch: host` (tagged cache-<hash>-arm64) [default: x86_64].
    #[arg(long, value_name = "ARCH", default_value = "x86_64")]
    pub arch: crate::platform::Arch,

    /// Which markets to use [default: `[cloud] market`, spot then on-demand].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub market: Option<crate::cloud::MarketPolicy>,

    /// Also write the record (attempts, instances, prices, phases) to FILE as JSON (with
    /// `build --max-instances` above 1: an array, one record per instance).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// Where to record what the build cost: a file (SQLite), `s3://bucket/prefix` (one
    /// shared ledger for many CI jobs), or `off` [default: `[ledger] url`, else
    /// ~/.local/share/spotbuild/ledger.sqlite]. Untrusted builds record under its
    /// `untrusted` part.
    #[arg(long, value_name = "LOCATION", env = "SPOTBUILD_LEDGER")]
    pub ledger: Option<String>,

    /// Build as untrusted whatever the ref (trust can only be lowered): write only the
    /// untrusted namespace, with the untrusted instance profile. Pull requests and
    /// branches outside `[trust] trusted_branches` are untrusted anyway.
    #[arg(long)]
    pub untrusted: bool,
}


/// What `build`, `test` and `run` ask of the farm; they differ only in this.
pub struct Remote<'a> {
    pub projects: Vec<String>,
    pub flags: &'a RemoteFlags,
    pub scope: Scope,
    pub registry_auth: Option<AuthMode>,
    pub branch: Option<String>,
    pub builder: BuilderChoice,
    pub max_instances: Option<u32>,
    /// A working-tree build (`watch --remote`): `dev-<hash>` tags, no tests.
    pub dev: bool,
}

impl Remote<'_> {
    fn plan_request(&self, repo_dir: Option<PathBuf>, config: Option<PathBuf>) -> PlanRequest {
        PlanRequest {
            repo_dir,
            settings: config,
            projects: self.projects.clone(),
            commit: self.flags.commit.clone(),
            // `run` builds and pushes nothing; a registry is still asked when configured.
            offline: false,
            registry: self.flags.registry.clone(),
            registry_auth: self.registry_auth,
            test: match &self.scope {
                Scope::Test(run) => Some(run.clone()),
                _ => None,
            },
            force_untrusted: self.flags.untrusted,
            arch: self.flags.arch,
        }
    }
}

pub async fn build(repo_dir: Option<PathBuf>, config: Option<PathBuf>, remote: Remote<'_>) -> Result<Exit, Error> {
    let mut request = remote.plan_request(repo_dir, config);
    let mut planned = compute(&request).await?;
    if remote.dev {
        if let Some(client) = &planned.client {
            crate::watch::as_dev_plan(&mut planned.plan, client).await;
        }
    }
    // Re-plans between attempts ask about this commit, whatever `--commit HEAD` (or a
    // branch) points at by then.
    request.commit = planned.plan.commit.clone();
    if let Scope::Test(run) = &remote.scope {
        super::oneoff::check_test_run(&planned, run)?;
    }
    // Entries that could not be planned are said now; the rest are built, and the exit
    // code says that not everything was.
    let unplanned = planned.report_broken();
    let build_id = crate::farm::build::new_build_id();
    let options = JobOptions {
        build_id: build_id.clone(),
        registry_auth: remote.registry_auth,
        branch: remote.branch.clone(),
        builder: remote.builder,
        timeout: remote.flags.timeout,
    };
    let work = job::work(&planned, &remote.scope, &options);
    // Decide before paying: no cloud call at all when everything exists.
    if !work.any_left(None) {
        match &remote.scope {
            Scope::Test(run) => {
                let tag = planned.plan.projects.iter().find(|p| p.name == run.project).and_then(|p| p.tests.first()).map(|t| t.tag.clone());
                eprintln!("skipped: {} {} already passed at this content ({})", run.project, run.name(), tag.unwrap_or_default());
            }
            _ => eprintln!("nothing to build: every image and test tag already exists"),
        }
        return Ok(unplanned);
    }
    let settings = planned.config.clone();
    let ssm = ssm_clients(&settings).await?;
    let ledger = super::report::open_ledger(remote.flags.ledger.as_deref(), &settings, planned.trust.level).await?;
    let cloud = Arc::new(AwsCloud::from_settings(&settings.cloud).await);
    let archive = ledger.as_ref().and_then(|l| l.archive());
    let build_id_for_log = build_id.clone();
    let deps = Deps {
        cloud,
        connector: Arc::new(Connectors { settings: settings.clone(), ssm }),
        ledger,
        planner: Arc::new(PlanAgain {
            request,
            scope: remote.scope.clone(),
            options,
            dev: remote.dev,
        }),
    };
    let build = BuildRequest {
        build_id,
        work,
        settings,
        trust: planned.trust.clone(),
        git_dir: planned.repo.git_dir().to_path_buf(),
        arch: remote.flags.arch,
        cpus: remote.flags.cpus.unwrap_or(crate::settings::CpuWant::Configured),
        max_instances: remote.max_instances,
        market: remote.flags.market,
        timeout: remote.flags.timeout,
        owner: ci_job_url(),
        branch: job::branch(&planned),
        archive: archive.clone(),
    };
    drop(planned);
    let json = remote.flags.json;
    let view = View::new(json, archive.map(|a| (build_id_for_log, ArchiveWriter::start(a))));
    let outcome = crate::farm::run(build, deps, &|e| view.show(&e), super::signals::stopped_with()).await?;
    let (groups, recorded) = match outcome {
        BuildOutcome::Stopped(s) => {
            view.close_archive().await;
            return Ok(Exit::of_signal(s));
        }
        BuildOutcome::Panicked(panic) => {
            view.close_archive().await;
            std::panic::resume_unwind(panic)
        }
        BuildOutcome::Finished { groups, recorded } => (groups, recorded),
    };
    if let Some(path) = &remote.flags.record {
        write_record(path, &groups);
    }
    view.finish(&groups, recorded.as_deref()).await;
    let worst = Exit::of_build(groups.iter().map(|g| &g.record));
    Ok(if worst == Exit::Success { unplanned } else { worst })
}

/// One instance: the record itself; several: one record per instance.
fn write_record(path: &std::path::Path, groups: &[GroupOutcome]) {
    let records: Vec<&BuildRecord> = groups.iter().map(|g| &g.record).collect();
    let bytes = match records.as_slice() {
        [one] => serde_json::to_vec_pretty(one),
        many => serde_json::to_vec_pretty(many),
    };
    let written = bytes.map_err(std::io::Error::other).and_then(|b| std::fs::write(path, b));
    if let Err(e) = written {
        eprintln!("warning: failed to write the record to {}: {e}", path.display());
    }
}

/// Shows a build's events: readable lines, or NDJSON with `--json`; and hands the same
/// NDJSON lines to the log archive, when there is one. A reporter per instance group keeps
/// what its closing summary needs.
struct View {
    json: bool,
    reporters: Mutex<std::collections::BTreeMap<Option<u32>, Reporter>>,
    /// The build's id (a group's log is under `<id>-<group>`) and the archive's writer.
    archive: Option<(String, ArchiveWriter)>,
    /// On a terminal: what the build is doing now, and for how long (redrawn).
    now: Mutex<Option<super::progress::Line>>,
    /// The secrets this controller holds (the agent redacts its own lines already).
    redactor: crate::agent::redact::Redactor,
}

/// What the controller knows that must never reach a log: the registry password and the
/// AWS secrets in its environment.
fn controller_secrets() -> Vec<String> {
    let mut secrets: Vec<String> = crate::registry::auth::Basic::from_env().map(|b| b.password).into_iter().collect();
    for v in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", crate::cli::serve::TOKEN_ENV] {
        if let Ok(s) = std::env::var(v) {
            secrets.push(s);
        }
    }
    secrets
}

impl View {
    fn new(json: bool, archive: Option<(String, ArchiveWriter)>) -> View {
        View {
            json,
            reporters: Mutex::new(Default::default()),
            archive,
            now: Mutex::new(Some(super::progress::Line::spinner(json))),
            redactor: crate::agent::redact::Redactor::new(&controller_secrets()),
        }
    }

    /// Archives (and with `--json` prints) one NDJSON line of `group`'s `attempt`.
    fn line(&self, group: Option<u32>, attempt: u32, line: &serde_json::Value) {
        let text = self.redactor.redact(&line.to_string());
        if let Some((build_id, writer)) = &self.archive {
            let build_id = match group {
                Some(g) => format!("{build_id}-{g}"),
                None => build_id.clone(),
            };
            writer.line(LogKey { build_id, attempt }, text.clone());
        }
        if self.json {
            let _ = writeln!(std::io::stdout().lock(), "{text}");
        }
    }

    fn show(&self, e: &FarmEvent) {
        let mut reporters = self.reporters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((group, attempt, line)) = json_line(e) {
            self.line(group, attempt, &line);
        }
        let now = self.now.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let drawn = now.as_ref().is_some_and(|l| l.is_drawn());
        let above = |print: &mut dyn FnMut()| match now.as_ref() {
            Some(l) => l.above(print),
            None => print(),
        };
        match e {
            FarmEvent::Started { build_id, commit, trust, groups } => {
                if !self.json {
                    let level = match trust.level {
                        crate::trust::Level::Trusted => "trusted",
                        crate::trust::Level::Untrusted => "untrusted",
                    };
                    above(&mut || {
                        eprintln!("build {build_id}: commit {} ({level}: {})", &commit[..commit.len().min(12)], trust.reason);
                        for (i, g) in groups.iter().enumerate() {
                            eprintln!("  instance {}: {}", i + 1, g.join(", "));
                        }
                    });
                }
            }
            FarmEvent::Note { message, .. } => above(&mut || eprintln!("{}", self.redactor.redact(message))),
            FarmEvent::Agent { origin, envelope } => {
                if let (Some(l), crate::protocol::Event::StepStart { step, .. }) = (now.as_ref(), &envelope.event) {
                    l.set(format!("{}: {step}", attempt_tag(origin.group, origin.attempt)));
                }
                let r = reporters.entry(origin.group).or_default();
                if self.json {
                    let _ = r.show(envelope, &mut std::io::sink());
                } else {
                    above(&mut || {
                        let _ = r.show(envelope, &mut std::io::stdout().lock());
                    });
                }
            }
            FarmEvent::Phase { origin, phase, detail } => {
                if let Some(l) = now.as_ref() {
                    l.set(format!("{} {}: {}", attempt_tag(origin.group, origin.attempt), phase.name(), short(detail)));
                }
                // The redrawn line shows a long wait going on; the log keeps the lines.
                let waiting = detail.starts_with("… still ");
                if !self.json && !(drawn && waiting) {
                    above(&mut || {
                        let _ = writeln!(std::io::stdout().lock(), "{}", self.redactor.redact(&readable(e).unwrap_or_default()));
                    });
                }
            }
            FarmEvent::AttemptEnded { .. } => {
                if !self.json {
                    above(&mut || {
                        let _ = writeln!(std::io::stdout().lock(), "{}", self.redactor.redact(&readable(e).unwrap_or_default()));
                    });
                }
            }
        }
    }

    /// The closing lines: one record line per group with `--json`, else each group's
    /// summary and cost table. Then the archive is completed.
    async fn finish(self, groups: &[GroupOutcome], recorded: Option<&str>) {
        // The redrawn line goes before the closing lines.
        drop(self.now.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        {
            let mut reporters = self.reporters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let several = groups.len() > 1;
            for (i, g) in groups.iter().enumerate() {
                let group = several.then_some(i as u32 + 1);
                let mut line = serde_json::json!({ "type": "build_record", "record": g.record });
                if let Some(n) = group {
                    line["group"] = n.into();
                }
                self.line(group, 0, &line);
                if !self.json {
                    let mut out = std::io::stdout().lock();
                    if several {
                        let _ = writeln!(out, "\n== instance {} of {}", i + 1, groups.len());
                    }
                    let _ = reporters.entry(group).or_default().summary(&mut out);
                    let _ = summary(&g.record, &g.entry, &mut out);
                }
            }
            if !self.json {
                if let Some(place) = recorded {
                    let _ = writeln!(std::io::stdout().lock(), "recorded in {place} (see `spotbuild report`)");
                }
            }
        }
        self.close_archive().await;
    }

    /// Completes the archive's logs, saying what could not be written.
    async fn close_archive(self) {
        drop(self.now.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        if let Some((build_id, writer)) = self.archive {
            for warning in writer.close().await {
                eprintln!("warning: {warning}");
            }
            if !self.json {
                eprintln!("log archived: `spotbuild logs {build_id}`");
            }
        }
    }
}

/// The `--json` line of an event (what the archive keeps too): its group, the attempt
/// whose log it belongs to (0: the build's own), and the line.
pub fn json_line(e: &FarmEvent) -> Option<(Option<u32>, u32, serde_json::Value)> {
    let with_group = |mut v: serde_json::Value, group: Option<u32>| {
        if let Some(g) = group {
            v["group"] = g.into();
        }
        v
    };
    Some(match e {
        FarmEvent::Started { build_id, commit, trust, groups } => (
            None,
            0,
            serde_json::json!({ "type": "build", "build_id": build_id, "commit": commit, "trust": trust, "groups": groups }),
        ),
        FarmEvent::Note { group, message } => (*group, 0, with_group(serde_json::json!({ "type": "note", "message": message, "ts": now() }), *group)),
        FarmEvent::Agent {
            envelope,
            origin: Origin { attempt, group },
        } => {
            let mut v = serde_json::to_value(envelope).ok()?;
            v["attempt"] = (*attempt).into();
            (*group, *attempt, with_group(v, *group))
        }
        FarmEvent::Phase {
            origin: Origin { attempt, group },
            phase,
            detail,
        } => (
            *group,
            *attempt,
            with_group(serde_json::json!({ "type": "controller", "attempt": attempt, "phase": phase, "detail": detail, "ts": now() }), *group),
        ),
        FarmEvent::AttemptEnded { group, record } => {
            (*group, record.attempt, with_group(serde_json::json!({ "type": "attempt_ended", "attempt": record }), *group))
        }
    })
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The readable line of a controller event (agent events have the [`Reporter`]'s).
fn readable(e: &FarmEvent) -> Option<String> {
    match e {
        FarmEvent::Phase {
            origin: Origin { attempt, group },
            phase,
            detail,
        } => Some(controller_line(&now(), *group, *attempt, phase.name(), detail)),
        FarmEvent::AttemptEnded { group, record: a } => Some(format!("{} ended: {}", attempt_tag(*group, a.attempt), describe(&a.outcome))),
        _ => None,
    }
}

/// A detail cut to fit the redrawn line.
fn short(detail: &str) -> String {
    const MAX: usize = 70;
    match detail.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &detail[..i]),
        None => detail.to_string(),
    }
}

fn attempt_tag(group: Option<u32>, attempt: u32) -> String {
    match group {
        Some(g) => format!("[instance {g} attempt {attempt}]"),
        None => format!("[attempt {attempt}]"),
    }
}

/// `HH:MM:SS [attempt N] phase detail`: a controller line as the console shows it, at
/// `ts` (RFC 3339), live or from the archive.
pub fn controller_line(ts: &str, group: Option<u32>, attempt: u32, phase: &str, detail: &str) -> String {
    format!("{} {} {phase:<11} {detail}", ts.get(11..19).unwrap_or(ts), attempt_tag(group, attempt))
}

/// `[attempt N] ended: …` from an archived `attempt_ended` line's record.
pub fn attempt_ended_line(group: Option<u32>, record: &serde_json::Value) -> String {
    let mut outcome = serde_json::json!({ "outcome": record["outcome"] });
    if !record["reason"].is_null() {
        outcome["reason"] = record["reason"].clone();
    }
    let said = serde_json::from_value::<AttemptOutcome>(outcome)
        .map(|o| describe(&o))
        .unwrap_or_else(|_| record["outcome"].as_str().unwrap_or("?").to_string());
    format!("{} ended: {said}", attempt_tag(group, record["attempt"].as_u64().unwrap_or_default() as u32))
}

fn describe(o: &AttemptOutcome) -> String {
    match o {
        AttemptOutcome::Success => "success".into(),
        AttemptOutcome::Failed => "a build or test failed".into(),
        AttemptOutcome::Interrupted => "interrupted (spot); a new attempt skips what was pushed".into(),
        AttemptOutcome::Lost(why) => format!("lost the host: {why}"),
        AttemptOutcome::Error(why) => format!("error: {why}"),
    }
}

/// The closing table: one line per attempt with what it cost, then the build's total and
/// what spot saved (`ledger::cost` rules: per second, 60 s minimum, storage pro rata).
fn summary(r: &BuildRecord, entry: &crate::ledger::BuildEntry, out: &mut impl Write) -> std::io::Result<()> {
    use crate::ledger::cost::attempt_cost;
    use crate::ledger::report::usd;
    writeln!(out, "\n{:<8} {:<20} {:<14} {:<10} {:>9} {:>10}  result", "attempt", "instance", "type", "market", "duration", "cost")?;
    let (mut total, mut savings, mut priced) = (0.0, 0.0, true);
    for (a, e) in r.attempts.iter().zip(&entry.attempts) {
        let c = attempt_cost(e, entry.volume_gb);
        total += c.total;
        savings += c.savings;
        priced &= c.priced;
        writeln!(
            out,
            "{:<8} {:<20} {:<14} {:<10} {:>9} {:>10}  {}",
            a.attempt,
            a.rental.instance_id.as_deref().unwrap_or("-"),
            a.rental.instance_type.as_deref().unwrap_or("-"),
            a.rental.market.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            format!("{:.1}s", a.instance_seconds().unwrap_or(0.0)),
            if c.priced { usd(c.total) } else { "unknown".into() },
            describe(&a.outcome),
        )?;
    }
    let mut line = format!("total {:>71}", usd(total));
    if savings > 0.0 {
        line.push_str(&format!("  (spot saved {} against on-demand)", usd(savings)));
    }
    if !priced {
        line.push_str("  (some prices unknown: counted as $0)");
    }
    writeln!(out, "{line}")?;
    writeln!(out, "build {}: {:?}", r.build_id, r.result)
}

/// The CI job's URL, for the instance's `spotbuild:owner` tag.
pub(super) fn ci_job_url() -> Option<String> {
    ["CIRCLE_BUILD_URL", "BUILD_URL", "CI_JOB_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            let (server, repo, run) = (std::env::var("GITHUB_SERVER_URL").ok()?, std::env::var("GITHUB_REPOSITORY").ok()?, std::env::var("GITHUB_RUN_ID").ok()?);
            Some(format!("{server}/{repo}/actions/runs/{run}"))
        })
}


/// The SSM API and bucket, when the config asks for the SSM transport.
async fn ssm_clients(cfg: &crate::settings::Config) -> Result<Option<SsmClients>, Error> {
    use crate::settings::TransportKind;
    if cfg.remote.transport != TransportKind::Ssm {
        return Ok(None);
    }
    let ssm = &cfg.remote.ssm;
    let Some(bucket) = ssm.bucket.clone() else {
        return Err(Error::new(Exit::Usage, "[remote] transport = \"ssm\" needs [remote.ssm] bucket")
            .hint("the instance fetches the commit from it and writes its events to it; `terraform output spotbuild_toml` names one"));
    };
    if cfg.cloud.instance_profile.is_none() {
        return Err(Error::new(Exit::Usage, "[remote] transport = \"ssm\" needs [cloud] instance_profile")
            .hint("the instance's SSM agent registers, and writes to the bucket, with its role"));
    }
    let region = cfg.cloud.region.clone();
    let endpoint = ssm.endpoint.clone().or_else(|| cfg.cloud.endpoint.clone());
    let s3_endpoint = ssm.s3_endpoint.clone().or_else(|| cfg.cloud.endpoint.clone());
    let commands = crate::transport::ssm::AwsCommands::from_env(region.clone(), endpoint).await;
    let objects = crate::objects::s3::S3Store::from_env(bucket, region, s3_endpoint).await;
    Ok(Some(SsmClients {
        commands: Arc::new(commands),
        objects: Arc::new(objects),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::archive::{self, DirArchive, LogArchive};

    #[tokio::test]
    async fn the_controllers_lines_are_redacted_before_they_are_printed_or_archived() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn LogArchive> = Arc::new(DirArchive::new(dir.path()));
        let mut view = View::new(false, Some(("b1".into(), ArchiveWriter::start(store.clone()))));
        view.redactor = crate::agent::redact::Redactor::new(&["hunter2-is-the-password".to_string()]);
        view.line(None, 0, &serde_json::json!({ "type": "note", "message": "login with hunter2-is-the-password failed" }));
        view.close_archive().await;
        let bytes = store.read(&LogKey { build_id: "b1".into(), attempt: 0 }).await.unwrap().unwrap();
        let (lines, _) = archive::lines(&bytes);
        assert_eq!(lines.len(), 1);
        assert!(!lines[0].contains("hunter2") && lines[0].contains(crate::agent::redact::MASK), "{}", lines[0]);
    }
}
