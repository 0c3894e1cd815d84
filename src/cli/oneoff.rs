//! `spotbuild test` and `spotbuild run`: one test job, or one command, on a rented machine.
//! Both go through the same controller as `build` and leave nothing running.

use std::path::PathBuf;

use clap::Args;

use super::build::{BuildArgs, RemoteFlags};
use super::error::{Error, Exit};
use super::remote::Scope;
use crate::protocol::BuilderChoice;

const TEST_AFTER_HELP: &str = "\
Examples:
  spotbuild test api unit                 run api's `unit` job on a rented machine
  spotbuild test api e2e -- --shard 2     extra arguments go to the job's command

Skipped (exit 0, no machine rented) when the image already carries cache-<hash>-<job>:
this content passed this job before. A pass adds that tag. Exit code: 0 passed or
skipped, 1 failed, 6 interrupted on every attempt.";

#[derive(Debug, Args)]
#[command(about = "Run one test job on a rented machine, unless it already passed", after_help = TEST_AFTER_HELP)]
pub struct TestArgs {
    pub project: String,
    pub job: String,
    /// Extra arguments for the job's command.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
    #[command(flatten)]
    pub flags: RemoteFlags,
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

fn build_args(projects: Vec<String>, flags: RemoteFlags) -> BuildArgs {
    BuildArgs {
        projects,
        all: false,
        local: false,
        flags,
        registry_auth: None,
        branch: None,
        builder: BuilderChoice::Auto,
        workdir: None,
        keep_workdir: false,
        max_instances: None,
    }
}

pub async fn test(repo: Option<PathBuf>, config: Option<PathBuf>, args: TestArgs) -> Result<Exit, Error> {
    let scope = Scope::Test {
        project: args.project.clone(),
        job: args.job,
        args: args.args,
    };
    super::remote::build(repo, config, build_args(vec![args.project], args.flags), scope).await
}

pub async fn run(repo: Option<PathBuf>, config: Option<PathBuf>, args: RunArgs) -> Result<Exit, Error> {
    let scope = Scope::Run { command: args.command };
    super::remote::build(repo, config, build_args(Vec::new(), args.flags), scope).await
}
