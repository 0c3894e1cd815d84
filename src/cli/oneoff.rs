//! `spotbuild test` and `spotbuild run`: one test job, or one command, on a rented machine.
//! Both go through the same controller as `build` and leave nothing running.

use std::path::PathBuf;

use clap::Args;

use super::error::{Error, Exit};
use super::plan::Planned;
use super::remote::{Remote, RemoteFlags, Scope};
use crate::plan::{TestKind, TestRun};
use crate::protocol::BuilderChoice;

const TEST_AFTER_HELP: &str = "\
Examples:
  spotbuild test api unit                 run api's `unit` job on a rented machine
  spotbuild test api e2e -- --shard 2     extra arguments go to the job's command
  spotbuild test end-to-end --script scripts/run_tests -- ./src/e2e_account.test.ts
                                          a script of the project's folder, run on the
                                          instance in a checkout of the commit

Skipped (exit 0, no machine rented) when the image already carries this invocation's
success tag: this content passed it before. A pass adds that tag:
  cache-<hash>-<job>                      a job with no extra arguments
  cache-<hash>-<job>-<digest>             with arguments (each set of arguments, e.g.
                                          each shard, has its own tag)
  cache-<hash>-<ci-job>-<digest>          a script, keyed by --key, else the CI job's name
                                          (JOB_NAME, CIRCLE_JOB, GITHUB_JOB or
                                          BUILDKITE_STEP_KEY), and a digest of the script
                                          and its arguments
`spotbuild plan PROJECT --test JOB -- ARGS --json` shows the tag an invocation uses.
A script runs on the instance itself (not in the image), from the project's folder, with
the project's image pulled and named in SPOTBUILD_IMAGE.
Exit code: 0 passed or skipped, 1 failed, 6 interrupted on every attempt.";

#[derive(Debug, Args)]
#[command(about = "Run one test job (or a project's test script) on a rented machine, unless it already passed", after_help = TEST_AFTER_HELP)]
pub struct TestArgs {
    /// The project to test (it and its dependencies are built first, if they need it).
    pub project: String,
    /// A job of the project's `tests` in the manifest (not with --script).
    #[arg(required_unless_present = "script", conflicts_with = "script")]
    pub job: Option<String>,
    #[command(flatten)]
    pub invocation: InvocationFlags,
    #[command(flatten)]
    pub flags: RemoteFlags,
}

/// How a test is invoked beyond its job name: `test` and `plan --test` share these.
#[derive(Debug, Clone, Args)]
pub struct InvocationFlags {
    /// Run this script (relative to the project's `projectDir`) instead of a job.
    #[arg(long, value_name = "PATH")]
    pub script: Option<String>,
    /// With --script: the name its success tag is keyed by [default: the CI job's name].
    #[arg(long, value_name = "NAME", requires = "script")]
    pub key: Option<String>,
    /// Extra arguments for the job's command, or the script's arguments.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

impl InvocationFlags {
    /// The test invocation these flags, with `job`, describe for `project`.
    pub fn run(&self, project: &str, job: Option<String>) -> Result<TestRun, Error> {
        test_run(project, job, self.script.clone(), self.key.clone(), self.args.clone())
    }
}

/// Environment variables that name the CI job, in the order they are consulted:
/// `setup_env`'s, CircleCI's, GitHub Actions', Buildkite's.
pub const CI_JOB_VARIABLES: [&str; 4] = ["JOB_NAME", "CIRCLE_JOB", "GITHUB_JOB", "BUILDKITE_STEP_KEY"];

/// The test invocation a command line describes.
pub fn test_run(
    project: &str,
    job: Option<String>,
    script: Option<String>,
    key: Option<String>,
    args: Vec<String>,
) -> Result<TestRun, Error> {
    let kind = match (job, script) {
        (Some(job), None) => TestKind::Job(job),
        (None, Some(path)) => {
            let path = path.trim_start_matches("./").to_string();
            if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return Err(Error::new(Exit::Usage, format!("--script `{path}` must be a path inside the project's folder"))
                    .hint("it is relative to the project's `projectDir`, e.g. scripts/run_tests"));
            }
            let key = key.or_else(|| {
                CI_JOB_VARIABLES.iter().find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
            });
            TestKind::Script { path, key }
        }
        _ => return Err(Error::new(Exit::Usage, "name a test job or a --script, not both")),
    };
    Ok(TestRun {
        project: project.to_string(),
        kind,
        args,
    })
}

/// Refuses an invocation of something the project does not have.
pub fn check_test_run(planned: &Planned, run: &TestRun) -> Result<(), Error> {
    let Some(m) = planned.hashes.manifest.get(&run.project) else {
        return Ok(());
    };
    match &run.kind {
        TestKind::Job(job) if !m.tests.contains_key(job) => {
            let jobs: Vec<&str> = m.tests.keys().map(String::as_str).collect();
            let known = if jobs.is_empty() {
                "it has no test jobs in the manifest; a script of its folder runs with --script PATH".to_string()
            } else {
                format!("its jobs: {}", jobs.join(", "))
            };
            Err(Error::new(Exit::Usage, format!("{} has no test job `{job}`", run.project)).hint(known))
        }
        TestKind::Script { path, .. } => {
            let full = if m.project_dir.is_empty() { path.clone() } else { format!("{}/{path}", m.project_dir) };
            let commit = planned.hashes.commit;
            let exists = planned.repo.snapshot(commit)?.file_entry(&full)?.is_some();
            if exists {
                Ok(())
            } else {
                Err(Error::new(Exit::Usage, format!("{} has no script `{full}` at commit {commit}", run.project))
                    .hint("the path is relative to the project's `projectDir`"))
            }
        }
        TestKind::Job(_) => Ok(()),
    }
}

const RUN_AFTER_HELP: &str = "\
Examples:
  spotbuild run --cpus 64 -- make -j64 release
  spotbuild run --commit v1.2.0 -- ./scripts/bench.sh

The command runs on the instance in a checkout of the commit, with its output streamed
here; the machine is torn down afterwards, whatever happens. The exit code is the
command's success (0) or failure (1).";

#[derive(Debug, Args)]
#[command(about = "Run a one-off command on a rented machine at a commit", after_help = RUN_AFTER_HELP)]
pub struct RunArgs {
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub flags: RemoteFlags,
}

pub async fn test(repo: Option<PathBuf>, config: Option<PathBuf>, args: TestArgs) -> Result<Exit, Error> {
    let run = args.invocation.run(&args.project, args.job)?;
    super::remote::build(repo, config, remote(vec![args.project], &args.flags, Scope::Test(run))).await
}

pub async fn run(repo: Option<PathBuf>, config: Option<PathBuf>, args: RunArgs) -> Result<Exit, Error> {
    let scope = Scope::Run { command: args.command };
    super::remote::build(repo, config, remote(Vec::new(), &args.flags, scope)).await
}

/// `test` and `run` use the defaults `build` has flags for.
fn remote(projects: Vec<String>, flags: &RemoteFlags, scope: Scope) -> Remote<'_> {
    Remote {
        projects,
        flags,
        scope,
        registry_auth: None,
        branch: None,
        builder: BuilderChoice::Auto,
        max_instances: None,
        dev: false,
    }
}
