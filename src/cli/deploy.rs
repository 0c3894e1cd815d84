//! `spotbuild deploy`: the gate, the promotion and the hooks of [`crate::deploy`], with
//! progress on stderr and the final table (or `--json`) on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;

use super::error::{Error, Exit};
use crate::deploy::{self, Action, DeployError, DeployEvent, DeployRequest, EnvName, Report, Row, Selection};
use crate::plan::planner::PlanRequest;
use crate::registry::copy::CopyProgress;
use crate::settings::AuthMode;

const DEPLOY_AFTER_HELP: &str = "\
Examples:
  spotbuild deploy --all --env staging                   every project, same registry
  spotbuild deploy api web --env production --to 123456789012.dkr.ecr.eu-west-1.amazonaws.com/prod
  spotbuild deploy --all --env staging --dry-run         the exact plan; nothing changes
  spotbuild deploy api --env staging --closure-only      gate only api and its dependencies

The gate: every project of the manifest (with --closure-only, of the named projects'
closures) must have its cache-<hash> image and every test job's cache-<hash>-<job> tag,
on that same image, in the registry. For a `multiarch: host` project, cache-<hash> is the
index `manifest create` wrote, and each arch's tests passed on that arch's image
(cache-<hash>-<arch>-<job>). Otherwise deploy lists what is missing, exits 8, and
touches nothing.

A project is unchanged, and skipped, when the deploy registry's deployed-<env> tag
already points at its image. The others are copied: a manifest copy within one registry;
across registries, only the blobs the destination lacks, streamed and checked against
their digests, manifest lists and indexes whole. Their tags: the commit sha, <env>, and
each git tag on the commit (which must name the VERSION file's version, when there is
one). Then each project's `deploy` hook of the manifest runs, in dependency order:
  \"deploy\": {\"command\": [\"terraform\", \"apply\", \"-auto-approve\"], \"env\": {...}, \"timeout\": \"20m\"}
in the project's directory, with SPOTBUILD_IMAGE (HOST/REPO@DIGEST), SPOTBUILD_ENV,
SPOTBUILD_COMMIT, SPOTBUILD_PROJECT, SPOTBUILD_PROJECT_DIR, SPOTBUILD_HASH and
SPOTBUILD_DIGEST set. deployed-<env> moves only after the hook succeeded; a failure skips
the hooks of what depends on it, not of independent projects. A rerun finishes what a
failed run left, sending nothing twice.

The deploy registry's basic credentials: SPOTBUILD_DEPLOY_REGISTRY_USERNAME and
SPOTBUILD_DEPLOY_REGISTRY_PASSWORD (ECR hosts get tokens). Each project's result is
recorded in the ledger.
Exit code: 0 deployed (or unchanged), 1 a hook failed (or was skipped for one), 2 usage or
an untrusted ref, 3 a git tag does not match VERSION, 5 a registry failed, 8 the graph is
not green, 130/143 stopped by a signal.";

#[derive(Debug, Args)]
#[command(about = "Promote a green commit's images to an environment, and run their deploy hooks", after_help = DEPLOY_AFTER_HELP)]
pub struct DeployArgs {
    /// Projects to promote (the gate still covers the whole manifest).
    #[arg(value_name = "PROJECT", conflicts_with = "all", required_unless_present = "all")]
    pub projects: Vec<String>,

    /// Promote every project of the manifest.
    #[arg(long)]
    pub all: bool,

    /// The environment: an image tag, and the name of the deployed-<env> tag.
    #[arg(long, value_name = "NAME")]
    pub env: String,

    /// The deploy registry as HOST[:PORT][/PREFIX] [default: `[deploy] registry`, else the
    /// build registry].
    #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_DEPLOY_REGISTRY")]
    pub to: Option<String>,

    /// How to authenticate to the deploy registry [default: `[deploy] auth`, else auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub to_auth: Option<AuthMode>,

    /// Gate only the named projects and their dependencies.
    #[arg(long, requires = "projects")]
    pub closure_only: bool,

    /// Print the plan (gate, copies, tags, hooks) and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Copy and tag only: run no hook, and leave deployed-<env> where it is.
    #[arg(long)]
    pub promote_only: bool,

    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,

    /// The commit to deploy (any revision).
    #[arg(long, value_name = "REV", default_value = "HEAD")]
    pub commit: String,

    /// The build registry as HOST[:PORT][/PREFIX].
    #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_REGISTRY")]
    pub registry: Option<String>,

    /// How to authenticate to the build registry.
    #[arg(long, value_enum, value_name = "MODE")]
    pub registry_auth: Option<AuthMode>,

    /// Where deploy records go: a file, s3://bucket/prefix, or off [default: `[ledger] url`].
    #[arg(long, value_name = "LOCATION", env = "SPOTBUILD_LEDGER")]
    pub ledger: Option<String>,
}

pub async fn run(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: DeployArgs) -> Result<Exit, Error> {
    let env = EnvName::parse(&args.env).map_err(|e| Error::new(Exit::Usage, e).hint("e.g. --env staging"))?;
    let cwd = match &repo_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().map_err(|e| Error::new(Exit::Usage, format!("failed to read the current directory: {e}")))?,
    };
    let repo = crate::git::Repo::discover(&cwd)?;
    let cfg = crate::settings::Config::load(config.as_deref(), repo.workdir())?;
    let ledger = if args.dry_run {
        None
    } else {
        super::report::open_ledger(args.ledger.as_deref(), &cfg, crate::trust::Level::Trusted).await?
    };
    let request = DeployRequest {
        plan: PlanRequest {
            repo_dir,
            settings: config,
            projects: Vec::new(),
            commit: args.commit.clone(),
            offline: true,
            registry: args.registry.clone(),
            registry_auth: args.registry_auth,
            test: None,
            force_untrusted: false,
            arch: crate::platform::Arch::X86_64,
        },
        selection: if args.all { Selection::All } else { Selection::Named(args.projects.clone()) },
        closure_only: args.closure_only,
        env,
        to: args.to.clone(),
        to_auth: args.to_auth,
        dry_run: args.dry_run,
        promote_only: args.promote_only,
        ci_job_url: super::remote::ci_job_url(),
    };
    let progress = Arc::new(Mutex::new(Progress { json: args.json, copying: None }));
    let sink_progress = progress.clone();
    let sink: deploy::EventSink = Arc::new(move |e| sink_progress.lock().expect("not poisoned").on(e));
    let result = tokio::select! {
        r = deploy::run(&request, ledger, sink) => r,
        signal = super::signals::stopped_with() => {
            let exit = match signal {
                crate::farm::StopSignal::Interrupt => Exit::Sigint,
                crate::farm::StopSignal::Terminate => Exit::Sigterm,
            };
            return Err(Error::new(exit, "deploy stopped: a running hook was killed; no deployed-<env> tag moved for an unfinished project")
                .hint("run the same deploy again: it finishes the job without sending anything twice"));
        }
    };
    let report = result.map_err(error_of)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report).map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
        writeln!(out).ok();
    } else {
        print_table(&mut out, &report).ok();
    }
    Ok(exit_of(&report))
}

fn exit_of(report: &Report) -> Exit {
    let copy_failed = report.projects.iter().any(|r| r.action == Action::Failed && r.hook.is_none());
    if copy_failed {
        Exit::Registry
    } else if report.any(Action::Failed) || report.any(Action::Skipped) {
        Exit::Failed
    } else {
        Exit::Success
    }
}

fn error_of(e: DeployError) -> Error {
    match e {
        DeployError::Planning(p) => p.into(),
        DeployError::Untrusted(_) => Error::of(Exit::Usage, e)
            .hint("deploy from a protected branch or a tag (`[trust] trusted_branches`, `trusted_tags`)"),
        DeployError::NotGreen { ref missing, ref broken, ref commit, .. } => {
            let mut err = Error::new(Exit::NotGreen, e.to_string());
            for b in broken {
                err.message.push_str(&format!("\n  cannot be planned: {b}"));
            }
            for m in missing {
                err.message.push_str(&format!("\n  {} {}: {} ({})", m.project, m.what, m.reason, m.image));
            }
            err.hint(format!("build and test every project at {} first (`spotbuild plan --commit {}` shows what is left)", short(commit), short(commit)))
        }
        DeployError::Version { .. } => Error::of(Exit::InvalidInput, e)
            .hint("tag the release with the version the VERSION file says (v1.2.3 for 1.2.3), or update VERSION"),
        DeployError::Destination(r) => {
            let exit = Exit::of_registry(&r);
            let hint = match &r {
                crate::registry::RegistryError::Unauthorized { .. } | crate::registry::RegistryError::MissingCredentials { .. } => Some(
                    "set SPOTBUILD_DEPLOY_REGISTRY_USERNAME and SPOTBUILD_DEPLOY_REGISTRY_PASSWORD, or `[deploy] auth`".to_string(),
                ),
                other => other.hint(),
            };
            let mut err = Error::new(exit, format!("the deploy registry: {}", crate::errors::error_chain(&r)));
            if let Some(h) = hint {
                err = err.hint(h);
            }
            err
        }
        DeployError::Registry(r) => r.into(),
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// What stderr shows as the deploy runs: one line per step, and while blobs copy a
/// redrawn bar with bytes and rate on a terminal, else a byte count with its rate at most
/// once a second.
struct Progress {
    json: bool,
    copying: Option<Copying>,
}

struct Copying {
    project: String,
    total: u64,
    sent: u64,
    started: Instant,
    last_line: Instant,
    /// The redrawn bar, on a terminal.
    bar: super::progress::Line,
}

fn mb(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} kB", bytes as f64 / 1e3)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

impl Progress {
    fn on(&mut self, event: DeployEvent) {
        match event {
            DeployEvent::GatePassed { checked } => eprintln!("deploy: gate passed: {checked} project(s) built and tested at this commit"),
            DeployEvent::Planned { rows } => {
                for r in rows {
                    match r.action {
                        Action::Unchanged => eprintln!("deploy: {}: unchanged ({} already is this image)", r.project, r.destination),
                        _ => eprintln!(
                            "deploy: {}: promote to {} ({} blob(s), {} to send)",
                            r.project,
                            r.destination,
                            r.blobs_to_send,
                            mb(r.bytes_to_send)
                        ),
                    }
                }
            }
            DeployEvent::CopyStarted { project, bytes, .. } => {
                let now = Instant::now();
                self.copying = Some(Copying {
                    bar: super::progress::Line::bytes(self.json, bytes, &format!("deploy: {project}")),
                    project,
                    total: bytes,
                    sent: 0,
                    started: now,
                    last_line: now,
                });
            }
            DeployEvent::Copy { progress, .. } => {
                let Some(c) = &mut self.copying else { return };
                if let CopyProgress::Bytes(n) = progress {
                    c.sent += n;
                    c.bar.advance(n);
                    if !c.bar.is_drawn() && c.last_line.elapsed() >= Duration::from_secs(1) {
                        c.last_line = Instant::now();
                        let rate = c.sent as f64 / c.started.elapsed().as_secs_f64().max(0.001);
                        eprintln!("deploy: {}: {} of {} sent ({}/s)", c.project, mb(c.sent), mb(c.total), mb(rate as u64));
                    }
                }
            }
            DeployEvent::CopyFinished { project, stats } => {
                let secs = self.copying.take().map_or(0.0, |c| c.started.elapsed().as_secs_f64());
                eprintln!(
                    "deploy: {project}: copied in {secs:.1}s: {} blob(s) sent ({}), {} mounted, {} already there; {} manifest(s) put",
                    stats.blobs_sent,
                    mb(stats.bytes_sent),
                    stats.blobs_mounted,
                    stats.blobs_present,
                    stats.manifests_put
                );
            }
            DeployEvent::HookStarted { project, command } => eprintln!("deploy: {project}: hook: {}", command.join(" ")),
            DeployEvent::HookFinished { project, outcome } => eprintln!("deploy: {project}: hook {}", outcome.summary()),
            DeployEvent::Finished { row } => {
                if let Some(e) = &row.error {
                    eprintln!("deploy: {}: {e}", row.project);
                }
            }
            DeployEvent::Warning { message } => match &self.copying {
                Some(c) => c.bar.above(|| eprintln!("warning: {message}")),
                None => eprintln!("warning: {message}"),
            },
            DeployEvent::LedgerFailed { detail } => eprintln!("warning: the deploy was not recorded in the ledger: {detail}"),
        }
    }
}

fn print_table(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let action = |r: &Row| -> String {
        match (report.dry_run, r.action) {
            (true, Action::Deployed) if report.promote_only => "would promote".into(),
            (true, Action::Deployed) => "would deploy".into(),
            (_, a) => a.as_str().into(),
        }
    };
    let hook = |r: &Row| -> String {
        match (&r.hook, &r.hook_command) {
            (Some(h), _) => h.summary(),
            (None, Some(cmd)) if report.dry_run => format!("would run: {}", cmd.join(" ")),
            (None, Some(_)) => "not run".into(),
            (None, None) => "-".into(),
        }
    };
    let rows: Vec<[String; 5]> = report
        .projects
        .iter()
        .map(|r| {
            let digest = r.digest.strip_prefix("sha256:").map_or(r.digest.clone(), |d| format!("sha256:{}", &d[..12.min(d.len())]));
            let mut tags = r.tags.join(" ");
            if report.dry_run && r.action == Action::Deployed && !report.promote_only {
                tags.push_str(&format!(" (+ deployed-{})", report.env.as_str()));
            }
            if tags.is_empty() {
                tags = "-".into();
            }
            [r.project.clone(), action(r), digest, tags, hook(r)]
        })
        .collect();
    let head = ["PROJECT", "ACTION", "DIGEST", "TAGS", "HOOK"];
    let width = |i: usize| rows.iter().map(|r| r[i].len()).chain([head[i].len()]).max().unwrap_or(0);
    let w: Vec<usize> = (0..4).map(width).collect();
    if report.dry_run {
        writeln!(out, "dry run: nothing was changed")?;
    }
    writeln!(
        out,
        "deploy {} of {} to {} (from {})",
        report.env.as_str(),
        short(&report.commit),
        report.destination,
        report.source
    )?;
    writeln!(out, "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}", head[0], head[1], head[2], head[3], head[4], w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3])?;
    for r in &rows {
        writeln!(out, "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}", r[0], r[1], r[2], r[3], r[4], w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3])?;
    }
    for r in &report.projects {
        if report.dry_run && r.blobs_to_send > 0 {
            writeln!(out, "{}: {} blob(s) to send, {}", r.project, r.blobs_to_send, mb(r.bytes_to_send))?;
        }
        if !r.platforms.is_empty() {
            writeln!(out, "{}: index of {}", r.project, r.platforms.join(", "))?;
        }
    }
    Ok(())
}
