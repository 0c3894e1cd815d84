//! `spotbuild agent` (hidden): the instance side of a build. `run` executes a job spec and
//! streams events on stdout; `replay` re-sends the events after a given `seq` from the
//! events file, so a controller that lost its connection resumes without losing a line.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use super::error::{Error, Exit};
use crate::agent;
use crate::protocol::Job;

#[derive(Debug, Args)]
#[command(hide = true, about = "Run a job on this machine (used by the controller)")]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Run a job spec (JSON, version 1) and stream NDJSON events on stdout.
    ///
    /// Exit code: 0 success, 1 failed, 6 interrupted (spot notice), 3 invalid job.
    Run {
        /// The job spec file, or `-` for stdin.
        #[arg(long, value_name = "FILE", default_value = "-")]
        job: String,
    },
    /// Print the events after SEQ from an events file.
    Replay {
        #[arg(long, value_name = "FILE")]
        events: PathBuf,
        /// Print events whose seq is greater than this.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// Keep following the file until a `result` event (or the timeout).
        #[arg(long)]
        follow: bool,
        /// Bound on --follow.
        #[arg(long, value_name = "DURATION", default_value = "6h", value_parser = humantime::parse_duration)]
        follow_timeout: Duration,
    },
}

pub async fn run(args: AgentArgs) -> Result<Exit, Error> {
    match args.command {
        AgentCommand::Run { job } => run_job(&job).await,
        AgentCommand::Replay {
            events,
            after,
            follow,
            follow_timeout,
        } => replay(&events, after, follow, follow_timeout).await,
    }
}

async fn run_job(source: &str) -> Result<Exit, Error> {
    let text = if source == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read the job from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(source)
            .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read the job {source}: {e}")))?
    };
    let job: Job = serde_json::from_str(&text)
        .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to parse the job: {e}")))?;
    let outcome = agent::run(job, tokio::io::stdout(), super::signals::stop())
        .await
        .map_err(|e| Error::new(Exit::InvalidInput, crate::plan::error_chain(&e)))?;
    Ok(match outcome.exit_code() {
        0 => Exit::Success,
        1 => Exit::Failed,
        _ => Exit::Interrupted,
    })
}

async fn replay(file: &std::path::Path, after: u64, follow: bool, timeout: Duration) -> Result<Exit, Error> {
    let started = Instant::now();
    let mut last = after;
    loop {
        let mut out = std::io::stdout().lock();
        let (seen, done) = agent::events::replay(file, last, &mut out)
            .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read {}: {e}", file.display())))?;
        let _ = out.flush();
        drop(out);
        last = seen;
        if !follow || done {
            return Ok(Exit::Success);
        }
        if started.elapsed() > timeout {
            return Err(Error::new(Exit::Failed, format!("no result event within {}", humantime::format_duration(timeout))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
