//! `spotbuild build` on a rented instance: plan, and only if something needs doing, hand
//! the job to the controller ([`crate::farm`]), show its events, and make sure that every
//! instance it launched is terminated however this process ends (success, failure, error,
//! panic, SIGINT, SIGTERM).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::future::LocalBoxFuture;
use futures::FutureExt;

use super::build::{build_id, local_job, BuildArgs};
use super::error::{Error, Exit};
use super::plan::{compute, PlanInputs, Planned};
use super::reporter::Reporter;
use crate::cloud::aws::AwsCloud;
use crate::cloud::Cloud;
use crate::farm::attempt::AttemptOutcome;
use crate::farm::spread::{self, Node};
use crate::farm::{BuildRecord, BuildResult, Controller, FarmEvent, Jobs, Teardown};
use crate::plan::TestRun;
use crate::protocol::{ImdsSettings, Job};

/// What a remote command asks of the instance.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Build (and test) what the plan says.
    Build,
    /// One test invocation of one project (building what it needs first).
    Test(TestRun),
    /// A one-off command at the commit, after no builds.
    Run { command: Vec<String> },
}

/// Re-plans before each attempt, so what an interrupted attempt pushed is skipped.
struct Replan {
    repo_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    args: BuildArgs,
    build_id: String,
    /// The first attempt's job, made from the plan the command started with.
    first_job: Option<Job>,
    scope: Scope,
    /// With `--max-instances`: the projects this instance's share of the build covers.
    only: Option<Vec<String>>,
}

fn work_left(planned: &Planned, scope: &Scope, only: Option<&[String]>) -> bool {
    matches!(scope, Scope::Run { .. })
        || planned
            .plan
            .projects
            .iter()
            .filter(|p| only.is_none_or(|o| o.contains(&p.name)))
            .any(|p| work_left_for(p, scope))
}

impl Replan {
    fn job(&self, planned: &Planned) -> Result<Job, Error> {
        let mut job = local_job(planned, &self.args, &self.build_id, std::path::Path::new("/"))?;
        if let Some(only) = &self.only {
            job.projects.retain(|p| only.contains(&p.name));
        }
        match &self.scope {
            Scope::Build => {}
            // The plan covers only the invocation asked for.
            Scope::Test(_) => {}
            Scope::Run { command } => {
                job.projects.clear();
                job.run = vec![crate::protocol::JobCommand {
                    name: "command".into(),
                    command: command.clone(),
                }];
            }
        }
        // On a rented instance: its own metadata service, and its deadline powers it off
        // (unless the settings say otherwise, as the local farm's do).
        job.imds = ImdsSettings::default();
        job.shutdown_command = planned.config.remote.shutdown_command.clone();
        Ok(job)
    }
}

impl Jobs for Replan {
    fn next_job(&mut self, attempt: u32) -> LocalBoxFuture<'_, Result<Option<Job>, String>> {
        async move {
            if let Some(job) = self.first_job.take() {
                return Ok(Some(job));
            }
            let planned = compute(plan_inputs(&self.args, &self.scope, self.repo_dir.clone(), self.config.clone()))
                .await
                .map_err(|e| e.message)?;
            if !work_left(&planned, &self.scope, self.only.as_deref()) {
                if attempt > 1 {
                    eprintln!("nothing left to do: earlier attempts pushed everything");
                }
                return Ok(None);
            }
            self.job(&planned).map(Some).map_err(|e| e.message)
        }
        .boxed_local()
    }
}

pub async fn build(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: BuildArgs, scope: Scope) -> Result<Exit, Error> {
    let planned = compute(plan_inputs(&args, &scope, repo_dir.clone(), config.clone())).await?;
    if let Scope::Test(run) = &scope {
        super::oneoff::check_test_run(&planned, run)?;
    }
    // Entries that could not be planned are said now; the rest are built, and the exit
    // code says that not everything was.
    let unplanned = planned.report_broken();
    // Decide before paying: no cloud call at all when everything exists.
    if !work_left(&planned, &scope, None) {
        match &scope {
            Scope::Test(run) => {
                let tag = planned.plan.projects.iter().find(|p| p.name == run.project).and_then(|p| p.tests.first()).map(|t| t.tag.clone());
                eprintln!("skipped: {} {} already passed at this content ({})", run.project, run.name(), tag.unwrap_or_default());
            }
            _ => eprintln!("nothing to build: every image and test tag already exists"),
        }
        return Ok(unplanned);
    }
    let mut cfg = planned.config.clone();
    let missing = cfg.cloud.missing_for_launch();
    if !missing.is_empty() {
        return Err(Error::new(Exit::Usage, format!("cannot rent an instance: [cloud] {} not set in spotbuild.toml", missing.join(", ")))
            .hint("set them (see `terraform output spotbuild_toml`), or build here with --local"));
    }
    if let Some(n) = args.flags.cpus {
        let fit: Vec<String> =
            cfg.cloud.instance_types.iter().filter(|t| crate::cloud::aws::vcpus(t) == Some(n)).cloned().collect();
        if fit.is_empty() {
            return Err(Error::new(Exit::Usage, format!("no configured instance type has {n} vCPUs"))
                .hint("add types of that size to [cloud] instance_types"));
        }
        cfg.cloud.instance_types = fit;
    }
    let build_id = build_id();
    let commit = planned.plan.commit.clone();
    let git_dir = planned.repo.git_dir().to_path_buf();
    // Independent parts of the graph may go to separate instances.
    let max_instances = args.max_instances.unwrap_or(cfg.remote.max_instances).max(1) as usize;
    let nodes: Vec<Node> = planned
        .plan
        .projects
        .iter()
        .map(|p| Node {
            name: p.name.clone(),
            dependencies: p.dependencies.clone(),
            work: work_left_for(p, &scope),
        })
        .collect();
    let groups: Vec<Option<Vec<String>>> = match (&scope, spread::groups(&nodes, max_instances)) {
        (Scope::Build, g) if g.len() > 1 => g.into_iter().map(Some).collect(),
        _ => vec![None],
    };
    let ssm = ssm_clients(&cfg).await?;
    let ledger = super::report::open_ledger(args.flags.ledger.as_deref(), &cfg).await?;
    let started_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let branch = super::build::current_branch(planned.repo.workdir().unwrap_or(planned.repo.git_dir()));
    let cloud: Arc<dyn Cloud> = Arc::new(AwsCloud::from_env(cfg.cloud.region.clone(), cfg.cloud.endpoint.clone()).await);
    let teardown = Teardown::default();
    let json = args.flags.json;
    let market = args.flags.market.unwrap_or(cfg.cloud.market);
    let deadline = tokio::time::Instant::now() + args.flags.timeout;
    let record_path = args.flags.record.clone();
    if !json {
        eprintln!("build {build_id}: commit {}", &commit[..commit.len().min(12)]);
        if groups.len() > 1 {
            for (i, g) in groups.iter().enumerate() {
                eprintln!("  instance {}: {}", i + 1, g.as_deref().unwrap_or_default().join(", "));
            }
        }
    }
    let mut runs = Vec::new();
    let mut reporters = Vec::new();
    let mut dirs = Vec::new();
    let mut group_projects = Vec::new();
    for (i, only) in groups.iter().enumerate() {
        let group = (groups.len() > 1).then_some(i as u32 + 1);
        let id = match group {
            Some(g) => format!("{build_id}-{g}"),
            None => build_id.clone(),
        };
        // The SSH control socket lives in here: a Unix socket path must stay short.
        let mut local_dir = std::env::temp_dir().join(format!("spotbuild-{id}"));
        if !crate::transport::ssh::short_enough(&local_dir) {
            local_dir = PathBuf::from("/tmp").join(format!("spotbuild-{id}"));
        }
        crate::transport::keys::private_dir(&local_dir).map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
        dirs.push(local_dir.clone());
        // What this instance builds, for its spotbuild:project tag.
        let project = planned
            .plan
            .projects
            .iter()
            .filter(|p| p.needs_build == Some(true) && only.as_ref().is_none_or(|o| o.contains(&p.name)))
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        group_projects.push(match &scope {
            Scope::Test(run) => vec![run.project.clone()],
            Scope::Run { .. } => Vec::new(),
            Scope::Build => project.split(',').filter(|p| !p.is_empty()).map(String::from).collect(),
        });
        let reporter = Arc::new(Mutex::new(Reporter::default()));
        reporters.push(reporter.clone());
        let controller = Controller {
            cloud: cloud.clone(),
            config: cfg.clone(),
            build_id: id.clone(),
            project,
            commit: commit.clone(),
            owner: ci_job_url(),
            git_dir: git_dir.clone(),
            local_dir,
            teardown: teardown.clone(),
            deadline,
            interruptions: Vec::new(),
            breaker: Default::default(),
            market,
            ssm: ssm.clone(),
            ledger: ledger.clone(),
            on_event: Box::new(move |e| show(&reporter, &e, json, group)),
        };
        let mut jobs = Replan {
            repo_dir: repo_dir.clone(),
            config: config.clone(),
            args: args.clone(),
            build_id: id,
            first_job: None,
            scope: scope.clone(),
            only: only.clone(),
        };
        // Every instance's first job comes from the one plan already made.
        jobs.first_job = Some(jobs.job(&planned)?);
        runs.push((controller, jobs));
    }
    let work = std::panic::AssertUnwindSafe(futures::future::join_all(
        runs.iter_mut().map(|(controller, jobs)| controller.run(jobs)),
    ))
    .catch_unwind();
    let signal = super::signals::stopped_with();
    let ended = tokio::select! {
        r = work => Ended::Done(r),
        code = signal => Ended::Signal(code),
    };
    // Whatever happened, nothing launched stays up.
    if let Ended::Signal(code) = &ended {
        eprintln!("received {}: terminating this build's instances", if *code == 130 { "SIGINT" } else { "SIGTERM" });
    }
    let left = teardown.pending();
    if !left.is_empty() {
        match teardown.all(&*cloud).await {
            Ok(ids) => eprintln!("terminated {}", ids.join(", ")),
            Err(e) => eprintln!("error: {e} (hint: run `spotbuild reap`; the instances also end at their TTL)"),
        }
    }
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    let records = match ended {
        Ended::Signal(code) => return Ok(if code == 130 { Exit::Sigint } else { Exit::Sigterm }),
        Ended::Done(Err(panic)) => std::panic::resume_unwind(panic),
        Ended::Done(Ok(records)) => records,
    };
    if let Some(path) = &record_path {
        // One instance: the record itself; several: one record per instance.
        let bytes = match records.as_slice() {
            [one] => serde_json::to_vec_pretty(one),
            many => serde_json::to_vec_pretty(many),
        };
        if let Err(e) = std::fs::write(path, bytes.expect("serialisable")) {
            eprintln!("warning: failed to write the record to {}: {e}", path.display());
        }
    }
    let entries: Vec<crate::ledger::BuildEntry> = records
        .iter()
        .zip(&group_projects)
        .map(|(r, projects)| crate::ledger::BuildEntry {
            schema: crate::ledger::SCHEMA,
            build_id: r.build_id.clone(),
            projects: projects.clone(),
            kind: match &scope {
                Scope::Build => "build",
                Scope::Test(_) => "test",
                Scope::Run { .. } => "run",
            }
            .into(),
            commit: r.commit.clone(),
            branch: branch.clone(),
            ci_job_url: ci_job_url(),
            started_at: started_at.clone(),
            ended_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            result: serde_json::to_value(r.result).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            region: cfg.cloud.region.clone(),
            volume_gb: cfg.cloud.root_volume_gb,
            attempts: r.attempts.iter().map(|a| a.to_entry()).collect(),
        })
        .collect();
    // Recording never fails a build; a failure to record is reported.
    let mut recorded = None;
    if let Some(ledger) = &ledger {
        let mut ok = true;
        for e in &entries {
            match tokio::time::timeout(std::time::Duration::from_secs(30), ledger.put(e)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    ok = false;
                    eprintln!("warning: the build's cost was not recorded: {err}");
                }
                Err(_) => {
                    ok = false;
                    eprintln!("warning: the build's cost was not recorded: {} did not answer within 30s", ledger.place());
                }
            }
        }
        if ok {
            recorded = Some(ledger.place());
        }
    }
    let mut out = std::io::stdout().lock();
    for (i, record) in records.iter().enumerate() {
        if json {
            let mut line = serde_json::json!({ "type": "build_record", "record": record });
            if records.len() > 1 {
                line["group"] = (i + 1).into();
            }
            let _ = writeln!(out, "{line}");
        } else {
            if records.len() > 1 {
                let _ = writeln!(out, "\n== instance {} of {}", i + 1, records.len());
            }
            let _ = reporters[i].lock().expect("not poisoned").summary(&mut out);
            let _ = summary(record, &entries[i], &mut out);
        }
    }
    if !json {
        if let Some(place) = &recorded {
            let _ = writeln!(out, "recorded in {place} (see `spotbuild report`)");
        }
    }
    // The worst result decides the exit code.
    let exit = |r: BuildResult| match r {
        BuildResult::Success => Exit::Success,
        BuildResult::Failed => Exit::Failed,
        BuildResult::GaveUp => Exit::Interrupted,
        BuildResult::Error => Exit::Cloud,
    };
    let rank = |e: Exit| match e {
        Exit::Success => 0,
        Exit::Interrupted => 1,
        Exit::Failed => 2,
        _ => 3,
    };
    let worst = records.iter().map(|r| exit(r.result)).max_by_key(|e| rank(*e)).unwrap_or(Exit::Success);
    Ok(if worst == Exit::Success { unplanned } else { worst })
}

/// What to plan for this scope: a test scope plans its one invocation.
fn plan_inputs<'a>(args: &'a BuildArgs, scope: &'a Scope, repo_dir: Option<PathBuf>, config: Option<PathBuf>) -> PlanInputs<'a> {
    let mut inputs = args.plan_inputs(repo_dir, config);
    if let Scope::Test(run) = scope {
        inputs.test = Some(run);
    }
    inputs
}

/// Whether one project has work in this scope.
fn work_left_for(p: &crate::plan::ProjectPlan, scope: &Scope) -> bool {
    match scope {
        Scope::Build => p.needs_build == Some(true) || p.tests.iter().any(|t| t.needs_run == Some(true)),
        Scope::Test(run) => p.name == run.project && p.tests.iter().any(|t| t.needs_run == Some(true)),
        Scope::Run { .. } => true,
    }
}

enum Ended {
    Done(std::thread::Result<Vec<BuildRecord>>),
    Signal(u8),
}

fn show(reporter: &Mutex<Reporter>, e: &FarmEvent, json: bool, group: Option<u32>) {
    let mut out = std::io::stdout().lock();
    let tag = |attempt: &u32| match group {
        Some(g) => format!("[instance {g} attempt {attempt}]"),
        None => format!("[attempt {attempt}]"),
    };
    match e {
        FarmEvent::Agent { envelope, attempt } => {
            let mut r = reporter.lock().expect("not poisoned");
            if json {
                let mut v = serde_json::to_value(envelope).expect("serialisable");
                v["attempt"] = (*attempt).into();
                if let Some(g) = group {
                    v["group"] = g.into();
                }
                let _ = writeln!(out, "{v}");
                let _ = r.show(envelope, &mut std::io::sink());
            } else {
                let _ = r.show(envelope, &mut out);
            }
        }
        FarmEvent::Phase { attempt, phase, detail } => {
            if json {
                let mut v = serde_json::json!({ "type": "controller", "attempt": attempt, "phase": phase, "detail": detail, "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string() });
                if let Some(g) = group {
                    v["group"] = g.into();
                }
                let _ = writeln!(out, "{v}");
            } else {
                let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
                let _ = writeln!(out, "{} {} {:<11} {detail}", t.get(11..19).unwrap_or(&t), tag(attempt), format!("{phase:?}").to_lowercase());
            }
        }
        FarmEvent::AttemptEnded(a) => {
            if json {
                let mut v = serde_json::json!({ "type": "attempt_ended", "attempt": a });
                if let Some(g) = group {
                    v["group"] = g.into();
                }
                let _ = writeln!(out, "{v}");
            } else {
                let _ = writeln!(out, "{} ended: {}", tag(&a.attempt), describe(&a.outcome));
            }
        }
    }
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
            a.instance_id.as_deref().unwrap_or("-"),
            a.instance_type.as_deref().unwrap_or("-"),
            a.market.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
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
fn ci_job_url() -> Option<String> {
    ["CIRCLE_BUILD_URL", "BUILD_URL", "CI_JOB_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            let (server, repo, run) = (std::env::var("GITHUB_SERVER_URL").ok()?, std::env::var("GITHUB_REPOSITORY").ok()?, std::env::var("GITHUB_RUN_ID").ok()?);
            Some(format!("{server}/{repo}/actions/runs/{run}"))
        })
}


/// The SSM API and bucket, when the config asks for the SSM transport.
async fn ssm_clients(cfg: &crate::settings::Config) -> Result<Option<crate::farm::SsmClients>, Error> {
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
    Ok(Some(crate::farm::SsmClients {
        commands: Arc::new(commands),
        objects: Arc::new(objects),
    }))
}
