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
        AgentCommand::Start { job } => start(&job),
        AgentCommand::Receive { to, sha256 } => receive(&to, sha256.as_deref()),
        AgentCommand::Info { mirror } => info(mirror.as_deref()),
        AgentCommand::Fetch { sha256, timeout, command } => fetch(sha256.as_deref(), timeout, &command).await,
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
        .map_err(|e| Error::new(Exit::InvalidInput, crate::errors::error_chain(&e)))?;
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

fn start(job_file: &std::path::Path) -> Result<Exit, Error> {
    use std::os::unix::process::CommandExt;
    let text = std::fs::read(job_file)
        .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to read the job {}: {e}", job_file.display())))?;
    let _ = std::fs::remove_file(job_file);
    let job: Job = serde_json::from_slice(&text)
        .map_err(|e| Error::new(Exit::InvalidInput, format!("failed to parse the job: {e}")))?;
    std::fs::create_dir_all(&job.workdir)
        .map_err(|e| Error::new(Exit::Failed, format!("failed to create {}: {e}", job.workdir.display())))?;
    let log = std::fs::File::create(job.workdir.join("agent.log"))
        .map_err(|e| Error::new(Exit::Failed, format!("failed to create the agent log: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| Error::new(Exit::Failed, format!("failed to find this program: {e}")))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["agent", "run", "--job", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe; a new session outlives the SSH session that
    // started it, so a dropped connection does not stop the build.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::new(Exit::Failed, format!("failed to start the agent: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(&text)
        .map_err(|e| Error::new(Exit::Failed, format!("failed to hand over the job: {e}")))?;
    drop(stdin);
    println!("{}", serde_json::json!({ "pid": child.id() }));
    Ok(Exit::Success)
}

fn receive(to: &std::path::Path, sha256: Option<&str>) -> Result<Exit, Error> {
    use sha2::Digest;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::new(Exit::Failed, format!("failed to {what} {}: {e}", to.display()));
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", &e))?;
    }
    let partial = to.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| fail("create", &e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = std::io::Read::read(&mut stdin, &mut buf).map_err(|e| fail("receive", &e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| fail("write", &e))?;
    }
    file.sync_all().map_err(|e| fail("write", &e))?;
    let got = hex::encode(hasher.finalize());
    if let Some(want) = sha256 {
        if !want.eq_ignore_ascii_case(&got) {
            let _ = std::fs::remove_file(&partial);
            return Err(Error::new(Exit::Failed, format!("{} arrived damaged: sha256 {got}, expected {want}", to.display())));
        }
    }
    std::fs::rename(&partial, to).map_err(|e| fail("write", &e))?;
    Ok(Exit::Success)
}

fn info(mirror: Option<&std::path::Path>) -> Result<Exit, Error> {
    let mirror_commit = mirror.and_then(|m| {
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(m)
            .args(["rev-parse", "--verify", "-q", "HEAD^{commit}"])
            .output()
            .ok()?;
        let c = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !c.is_empty()).then_some(c)
    });
    println!(
        "{}",
        serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "mirror_commit": mirror_commit })
    );
    Ok(Exit::Success)
}

/// The URL is a bearer credential for one object: it is read from the environment and
/// removed from CMD's.
const FETCH_URL_ENV: &str = "SPOTBUILD_FETCH_URL";

async fn fetch(sha256: Option<&str>, timeout: Duration, command: &[String]) -> Result<Exit, Error> {
    use sha2::Digest;
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let url = std::env::var(FETCH_URL_ENV)
        .map_err(|_| Error::new(Exit::Usage, format!("${FETCH_URL_ENV} is not set")).hint("the SSM transport sets it; run this only through the controller"))?;
    // An unlinked file: the input may hold credentials and must not outlive this process.
    let path = std::env::temp_dir().join(format!(".spotbuild-fetch-{}-{:x}", std::process::id(), rand_suffix()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::new(Exit::Failed, format!("failed to create {}: {e}", path.display())))?;
    let _ = std::fs::remove_file(&path);
    let failed = |e: &dyn std::fmt::Display| Error::new(Exit::Failed, format!("failed to fetch the input: {e}"));
    let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| failed(&e))?;
    let mut resp = client.get(&url).send().await.map_err(|e| failed(&e.without_url()))?;
    if !resp.status().is_success() {
        return Err(failed(&format!("the store answered {}", resp.status())));
    }
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| failed(&e.without_url()))? {
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| failed(&e))?;
    }
    let got = hex::encode(hasher.finalize());
    if let Some(want) = sha256 {
        if !want.eq_ignore_ascii_case(&got) {
            return Err(Error::new(Exit::Failed, format!("the input arrived damaged: sha256 {got}, expected {want}")));
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| failed(&e))?;
    let Some((program, args)) = command.split_first() else {
        std::io::copy(&mut file, &mut std::io::stdout().lock()).map_err(|e| failed(&e))?;
        return Ok(Exit::Success);
    };
    let status = std::process::Command::new(program)
        .args(args)
        .env_remove(FETCH_URL_ENV)
        .stdin(file)
        .status()
        .map_err(|e| Error::new(Exit::Failed, format!("failed to run {program}: {e}")))?;
    let _ = std::io::stdout().flush();
    std::process::exit(status.code().unwrap_or(1));
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
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
