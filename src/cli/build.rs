//! `spotbuild build`: plan, then build what is needed. `--local` runs the agent on this
//! machine, through the same job spec and event stream as an instance would.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::error::{Error, Exit};
use super::plan::{compute, PlannedExt};
use super::remote::{Remote, RemoteFlags, Scope};
use super::reporter::Reporter;
use crate::farm::job::{self, JobOptions};
use crate::plan::planner::PlanRequest;
use crate::protocol::{BuilderChoice, Envelope, Job, Outcome};
use crate::settings::AuthMode;

const BUILD_AFTER_HELP: &str = "\
Examples:
  spotbuild build --all                   rent an instance, build and test what the plan says
  spotbuild build api --cpus 64           api and what it depends on, on a 64-vCPU machine
  spotbuild build --all --max-instances 3 independent parts of the graph on up to 3 machines
  spotbuild build --local api             the same on this machine, renting nothing
  spotbuild build --all --json            NDJSON events and a final build record, for machines

The plan comes first: when every image and test tag exists, nothing is rented and no cloud
API is called. Projects build in dependency order; `FROM <project>` in a Dockerfile is
pinned to that project's cache-<hash> image. Each build uses the project's branch and
main-branch images as cache sources. A passed test job tags the image cache-<hash>-<job>.
A spot interruption or a lost host starts a new attempt that skips what was pushed; every
instance is terminated before the command exits (also on SIGINT and SIGTERM).
Exit code: 0 success, 1 a build or test failed, 3 some entries could not be planned,
4/5 a git/registry failure (also when re-planning between attempts), 6 interrupted on
every attempt, 7 an error another attempt would not fix, 130/143 stopped by a signal.";

#[derive(Debug, Clone, Args)]
#[command(about = "Build (and test) what the plan says needs it", after_help = BUILD_AFTER_HELP)]
pub struct BuildArgs {
    /// Projects to build, with their dependencies [default: all].
    #[arg(value_name = "PROJECT", conflicts_with = "all")]
    pub projects: Vec<String>,

    /// Every project (the default when none is named).
    #[arg(long)]
    pub all: bool,

    /// Run on this machine, with no instance.
    #[arg(long)]
    pub local: bool,

    #[command(flatten)]
    pub flags: RemoteFlags,

    /// How to authenticate to the registry.
    #[arg(long, value_enum, value_name = "MODE")]
    pub registry_auth: Option<AuthMode>,

    /// The branch whose cache tag is used and updated [default: CI's branch variable, else
    /// the checked-out branch].
    #[arg(long, value_name = "NAME")]
    pub branch: Option<String>,

    /// Which Docker builder to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub builder: BuilderChoice,

    /// Scratch directory [default: a new one under the system's temp dir].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Keep the checkout in the scratch directory afterwards.
    #[arg(long)]
    pub keep_workdir: bool,

    /// Spread independent parts of the dependency graph over up to N instances
    /// [default: `[remote] max_instances`, 1].
    #[arg(long, value_name = "N")]
    pub max_instances: Option<u32>,
}

impl BuildArgs {
    /// What the farm is asked, for a remote build.
    fn remote(&self) -> Remote<'_> {
        Remote {
            projects: self.projects.clone(),
            flags: &self.flags,
            scope: Scope::Build,
            registry_auth: self.registry_auth,
            branch: self.branch.clone(),
            builder: self.builder,
            max_instances: self.max_instances,
            dev: false,
        }
    }
}

pub async fn run(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: BuildArgs) -> Result<Exit, Error> {
    if !args.local {
        return super::remote::build(repo_dir, config, args.remote()).await;
    }
    let planned = compute(&PlanRequest {
        repo_dir,
        settings: config,
        projects: args.projects.clone(),
        commit: args.flags.commit.clone(),
        offline: false,
        registry: args.flags.registry.clone(),
        registry_auth: args.registry_auth,
        test: None,
        force_untrusted: args.flags.untrusted,
        arch: args.flags.arch,
    })
    .await?;
    let unplanned = planned.report_broken();
    if !planned.plan.projects.iter().any(|p| Scope::Build.work_for(p)) {
        eprintln!("nothing to build: every image and test tag already exists");
        return Ok(unplanned);
    }
    let build_id = crate::farm::build::new_build_id();
    let workdir = args
        .workdir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("spotbuild-{build_id}")));
    let job = job::local(&planned, &options(&args, build_id), &workdir);
    let events_file = job.events_file.clone().unwrap_or_else(|| workdir.join("events.ndjson"));
    let outcome = run_agent(&job, args.flags.json).await?;
    if !args.keep_workdir {
        let _ = std::fs::remove_dir_all(workdir.join("src"));
        let _ = std::fs::remove_dir_all(workdir.join("docker-config"));
    }
    if !args.flags.json {
        eprintln!("events: {}", events_file.display());
    }
    Ok(match outcome {
        Some(Outcome::Success) => unplanned,
        Some(Outcome::Interrupted) => Exit::Interrupted,
        _ => Exit::Failed,
    })
}

fn options(args: &BuildArgs, build_id: String) -> JobOptions {
    JobOptions {
        build_id,
        registry_auth: args.registry_auth,
        branch: args.branch.clone(),
        builder: args.builder,
        timeout: args.flags.timeout,
    }
}

/// Runs this binary as the agent with `job` on stdin, showing or passing through its
/// events. A SIGINT/SIGTERM is passed on to the agent, which winds down and reports.
pub async fn run_agent(job: &Job, json: bool) -> Result<Option<Outcome>, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::new(Exit::Failed, format!("failed to find this program's path: {e}")))?;
    let mut child = tokio::process::Command::new(exe)
        .args(["agent", "run", "--job", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::new(Exit::Failed, format!("failed to start the agent: {e}")))?;
    let spec = serde_json::to_vec(job).expect("a job always serialises");
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(&spec)
        .await
        .map_err(|e| Error::new(Exit::Failed, format!("failed to hand the job to the agent: {e}")))?;
    drop(stdin);

    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut reporter = Reporter::default();
    let stop = super::signals::stop();
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = &mut stop, if !stopping => {
                stopping = true;
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                continue;
            }
        };
        let Ok(Some(line)) = line else { break };
        let mut stdout = std::io::stdout().lock();
        if json {
            let _ = writeln!(stdout, "{line}");
        }
        if let Ok(env) = serde_json::from_str::<Envelope>(&line) {
            // With --json the reporter only keeps track; the events themselves are the output.
            let _ = if json { reporter.show(&env, &mut std::io::sink()) } else { reporter.show(&env, &mut stdout) };
        }
    }
    let status = child.wait().await;
    if !json {
        let _ = reporter.summary(&mut std::io::stdout().lock());
    }
    if reporter.outcome().is_none() {
        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        return Err(Error::new(Exit::Failed, format!("the agent ended without a result ({status})")));
    }
    Ok(reporter.outcome())
}
