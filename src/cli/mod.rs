//! The command line: argument parsing, logging set-up, and mapping results to exit codes.
//! Commands live in their own files and return [`error::Error`] for expected failures.

mod agent;
mod build;
mod deploy;
pub mod error;
mod farm;
mod logs;
mod manifest;
mod plan;
mod progress;
mod oneoff;
mod reap;
mod report;
mod remote;
mod reporter;
pub(crate) mod serve;
mod signals;
mod watch;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use error::{Error, Exit, EXIT_CODES_HELP};

const ABOUT: &str = "Build farm controller for monorepos on EC2 spot instances";

const LONG_ABOUT: &str = "\
Build farm controller for monorepos on EC2 spot instances.

spotbuild decides what needs building before renting anything: each project of
build_manifest.json (or .yml) gets a content hash of its inputs at a commit, and the image
registry says which hashes were already built (tag cache-<hash>) or tested
(tag cache-<hash>-<job>).";

#[derive(Debug, Parser)]
#[command(name = "spotbuild", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Run as if started in DIR (any directory inside the repository).
    #[arg(short = 'C', long = "repo", value_name = "DIR", global = true)]
    pub repo: Option<PathBuf>,

    /// Settings file [default: spotbuild.toml at the repository root, if present].
    #[arg(long, value_name = "FILE", env = "SPOTBUILD_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Plan(plan::PlanArgs),
    Build(build::BuildArgs),
    Test(oneoff::TestArgs),
    Run(oneoff::RunArgs),
    Deploy(deploy::DeployArgs),
    Manifest(manifest::ManifestArgs),
    Registry(manifest::RegistryArgs),
    Reap(reap::ReapArgs),
    Report(report::ReportArgs),
    Logs(logs::LogsArgs),
    Serve(serve::ServeArgs),
    Watch(watch::WatchArgs),
    Farm(farm::FarmArgs),
    Agent(agent::AgentArgs),
}

/// Entry point for the binary.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    run_command(cli)
}

/// Entry point for the binary named `bootstrap`: the reaper's Lambda function, configured
/// from its environment (see [`crate::reap::lambda`]).
pub fn lambda_main() -> std::process::ExitCode {
    if let Err(e) = crate::reap::lambda::window_from_env() {
        let err = Error::new(Exit::Usage, format!("{}: {e}", crate::reap::lambda::WINDOW_ENV)).hint("a duration such as 10m");
        eprint!("{}", err.render());
        return std::process::ExitCode::from(err.exit.code());
    }
    let cli = Cli {
        repo: None,
        config: None,
        command: Command::Reap(reap::lambda_args()),
    };
    run_command(cli)
}

fn run_command(cli: Cli) -> std::process::ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprint!("{}", Error::new(Exit::Failed, format!("failed to start the async runtime: {e}")).render());
            return std::process::ExitCode::from(Exit::Failed.code());
        }
    };
    let result = runtime.block_on(run(cli));
    // Whatever is still running in the background (a blocked write to a closed pipe, a
    // metadata request) does not keep the process up once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(exit) => std::process::ExitCode::from(exit.code()),
        Err(e) => {
            eprint!("{}", e.render());
            std::process::ExitCode::from(e.exit.code())
        }
    }
}

pub async fn run(cli: Cli) -> Result<Exit, Error> {
    match cli.command {
        Command::Plan(args) => plan::run(cli.repo, cli.config, args).await,
        Command::Build(args) => build::run(cli.repo, cli.config, args).await,
        Command::Test(args) => oneoff::test(cli.repo, cli.config, args).await,
        Command::Run(args) => oneoff::run(cli.repo, cli.config, args).await,
        Command::Deploy(args) => deploy::run(cli.repo, cli.config, args).await,
        Command::Manifest(args) => manifest::run(cli.repo, cli.config, args).await,
        Command::Registry(args) => manifest::registry(cli.repo, cli.config, args).await,
        Command::Reap(args) => reap::run(args).await,
        Command::Report(args) => report::run(cli.repo, cli.config, args).await,
        Command::Logs(args) => logs::run(cli.repo, cli.config, args).await,
        Command::Serve(args) => serve::run(cli.repo, cli.config, args).await,
        Command::Watch(args) => watch::run(cli.repo, cli.config, args).await,
        Command::Farm(args) => farm::run(args).await,
        Command::Agent(args) => agent::run(args).await,
    }
}

/// `SPOTBUILD_LOG` takes `tracing` filter directives (e.g. `debug`, `spotbuild=trace`).
/// The AWS SDK stays at warn unless asked for by name.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOTBUILD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let filter = ["aws_config", "aws_smithy_runtime", "aws_sdk_ecr", "aws_sdk_ec2", "hyper", "reqwest"]
        .iter()
        .fold(filter, |f, target| match format!("{target}=warn").parse() {
            Ok(d) if !std::env::var("SPOTBUILD_LOG").unwrap_or_default().contains(target) => f.add_directive(d),
            _ => f,
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
