//! `spotbuild agent` (hidden): the instance side of a build. `run` executes a job spec and
//! streams events on stdout; `replay` re-sends the events after a given `seq` from the
//! events file, so a controller that lost its connection resumes without losing a line.
//! The commands the controller ships and starts with live beside the code that calls them
//! (`farm::instance`: info, receive, start; `transport::fetch`: fetch); this maps their
//! arguments, output and errors.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use super::error::{Error, Exit};
use crate::agent;
use crate::errors::error_chain;
use crate::farm::instance;
use crate::protocol::{Job, Outcome};
use crate::transport::fetch::{self, FetchError, Fetched};

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
    /// Start a job file in the background, detached from this session, and print its pid.
    /// The job file is removed once read: it may hold registry credentials. Events go to
    /// the job's events file; follow them with `replay --follow`.
    Start {
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
    },
    /// Write stdin to FILE (mode 0600, atomically), checking its SHA-256 if given.
    Receive {
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// Print whether the agent started as PID still runs, and the end of its log, as
    /// JSON (the controller asks when it has heard nothing for a while).
    Status {
        #[arg(long)]
        pid: u32,
        /// The job's working directory (where `agent.log` is).
        #[arg(long, value_name = "DIR")]
        workdir: PathBuf,
    },
    /// Print what this machine offers a controller as JSON: version, and the commit of
    /// the baked git mirror (so only what it lacks is shipped).
    Info {
        #[arg(long, value_name = "DIR")]
        mirror: Option<PathBuf>,
    },
    /// Fetch a command's input from the presigned URL in $SPOTBUILD_FETCH_URL (never on a
    /// command line), check its SHA-256, and run CMD with it on stdin (or print it).
    /// Exits with CMD's exit code. Used by the SSM transport.
    Fetch {
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Bound on the download.
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Put stdin to S3 as numbered chunks of whole lines under PREFIX, then an `end`
    /// marker, for a controller to follow. Used by the SSM transport.
    UploadChunks {
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        region: Option<String>,
        /// An S3-compatible endpoint (an emulator); addressing is then path-style.
        #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
        endpoint: Option<String>,
        /// Put a chunk at most this long after its first line.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
        flush_every: Duration,
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
        AgentCommand::Start { job } => {
            let pid = instance::start(&job).await.map_err(|e| {
                let exit = if e.is_invalid_job() { Exit::InvalidInput } else { Exit::Failed };
                Error::new(exit, error_chain(&e))
            })?;
            println!("{}", serde_json::json!({ "pid": pid }));
            Ok(Exit::Success)
        }
        AgentCommand::Receive { to, sha256 } => {
            instance::receive(&to, sha256.as_deref(), tokio::io::stdin())
                .await
                .map_err(|e| Error::new(Exit::Failed, error_chain(&e)))?;
            Ok(Exit::Success)
        }
        AgentCommand::Status { pid, workdir } => {
            let status = instance::status(pid, &workdir).await;
            println!("{}", serde_json::to_string(&status).expect("a status always serialises"));
            Ok(Exit::Success)
        }
        AgentCommand::Info { mirror } => {
            let info = instance::info(mirror.as_deref()).await;
            println!("{}", serde_json::to_string(&info).expect("agent info always serialises"));
            Ok(Exit::Success)
        }
        AgentCommand::Fetch { sha256, timeout, command } => match fetch::fetch(sha256.as_deref(), timeout, &command).await {
            Ok(Fetched::Printed) => Ok(Exit::Success),
            Ok(Fetched::Ran { code }) => Ok(Exit::Command(code)),
            Err(e @ FetchError::NoUrl) => {
                Err(Error::new(Exit::Usage, e.to_string()).hint("the SSM transport sets it; run this only through the controller"))
            }
            Err(e) => Err(Error::new(Exit::Failed, error_chain(&e))),
        },
        AgentCommand::UploadChunks {
            bucket,
            prefix,
            region,
            endpoint,
            flush_every,
        } => upload_chunks(bucket, &prefix, region, endpoint, flush_every).await,
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
        tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::stdin(), &mut s)
            .await
            .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read the job from stdin: {e}")))?;
        s
    } else {
        tokio::fs::read_to_string(source)
            .await
            .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read the job {source}: {e}")))?
    };
    let job: Job = serde_json::from_str(&text)
        .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to parse the job: {e}")))?;
    let outcome = agent::run(job, tokio::io::stdout(), super::signals::stop()).await.map_err(|e| {
        let exit = if e.is_invalid_job() { Exit::InvalidInput } else { Exit::Failed };
        Error::new(exit, error_chain(&e))
    })?;
    Ok(match outcome {
        Outcome::Success => Exit::Success,
        Outcome::Failed => Exit::Failed,
        Outcome::Interrupted => Exit::Interrupted,
    })
}

async fn replay(file: &std::path::Path, after: u64, follow: bool, timeout: Duration) -> Result<Exit, Error> {
    let started = Instant::now();
    let mut at = agent::events::Replay {
        last: after,
        ..Default::default()
    };
    loop {
        // Reading the file and writing stdout block: not on the runtime's threads. Each
        // poll reads only what was added since the last one.
        let path = file.to_path_buf();
        let (replayed, next) = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            let replayed = at.more(&path, &mut out);
            let _ = out.flush();
            (replayed, at)
        })
        .await
        .expect("replaying does not panic");
        replayed.map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read {}: {e}", file.display())))?;
        at = next;
        if !follow || at.done {
            return Ok(Exit::Success);
        }
        if started.elapsed() > timeout {
            return Err(Error::new(Exit::Failed, format!("no result event within {}", humantime::format_duration(timeout))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn upload_chunks(bucket: String, prefix: &str, region: Option<String>, endpoint: Option<String>, flush_every: Duration) -> Result<Exit, Error> {
    use crate::transport::chunks;
    let store = crate::objects::s3::S3Store::from_env(bucket, region, endpoint).await;
    let settings = chunks::UploadSettings {
        flush_every,
        ..Default::default()
    };
    let prefix = prefix.trim_end_matches('/');
    chunks::upload(&store, prefix, tokio::io::stdin(), settings)
        .await
        .map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
    Ok(Exit::Success)
}
