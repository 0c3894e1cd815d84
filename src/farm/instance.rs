//! The instance's side of shipping a commit, starting the agent and checking on it: what
//! `spotbuild agent info`, `agent receive`, `agent start` and `agent status` do when the
//! controller runs them there.
//!
//! # Guarantees
//! - A received file appears whole and checked, or not at all: it is written beside its
//!   name (mode 0600), synced, checked against its SHA-256, then renamed.
//! - The job file is removed as soon as it is read: it may hold registry credentials.
//! - The started agent is in a session of its own, so a dropped connection does not stop it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::protocol::{AgentInfo, AgentStatus, Job};

/// What this machine offers a controller: the agent's version, and the commit of the git
/// mirror at `mirror` (none when there is no mirror there, or git cannot read it).
pub async fn info(mirror: Option<&Path>) -> AgentInfo {
    let mirror_commit = match mirror {
        Some(m) => mirror_commit(m).await,
        None => None,
    };
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        mirror_commit,
    }
}

async fn mirror_commit(mirror: &Path) -> Option<String> {
    let out = tokio::process::Command::new("git")
        .arg("--git-dir")
        .arg(mirror)
        .args(["rev-parse", "--verify", "-q", "HEAD^{commit}"])
        .output()
        .await
        .ok()?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !commit.is_empty()).then_some(commit)
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("failed to create the directory of {}", to.display())]
    Directory {
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create {}", to.display())]
    Create {
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to receive {}", to.display())]
    Read {
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {}", to.display())]
    Write {
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} arrived damaged: sha256 {got}, expected {want}", to.display())]
    Damaged { to: PathBuf, got: String, want: String },
}

/// Writes `input` to `to` (mode 0600, atomically), checking its SHA-256 if given.
pub async fn receive(to: &Path, sha256: Option<&str>, mut input: impl AsyncRead + Unpin) -> Result<(), ReceiveError> {
    let path = || to.to_path_buf();
    if let Some(dir) = to.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|source| ReceiveError::Directory { to: path(), source })?;
    }
    let partial = to.with_extension("partial");
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(|source| ReceiveError::Create { to: path(), source })?;
    let write = |source| ReceiveError::Write { to: path(), source };
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = input.read(&mut buf).await.map_err(|source| ReceiveError::Read { to: path(), source })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await.map_err(write)?;
    }
    file.sync_all().await.map_err(write)?;
    drop(file);
    let got = hex::encode(hasher.finalize());
    if let Some(want) = sha256 {
        if !want.eq_ignore_ascii_case(&got) {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ReceiveError::Damaged {
                to: path(),
                got,
                want: want.to_string(),
            });
        }
    }
    tokio::fs::rename(&partial, to).await.map_err(write)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to read the job {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse the job")]
    Parse(#[source] serde_json::Error),
    #[error("failed to create {}", path.display())]
    Workdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create the agent log")]
    Log(#[source] std::io::Error),
    #[error("failed to find this program")]
    Program(#[source] std::io::Error),
    #[error("failed to start the agent")]
    Spawn(#[source] std::io::Error),
    #[error("failed to hand over the job")]
    HandOver(#[source] std::io::Error),
}

impl StartError {
    /// The job file was unreadable or not a job (rather than this machine failing).
    pub fn is_invalid_job(&self) -> bool {
        matches!(self, StartError::Read { .. } | StartError::Parse(_))
    }
}

/// Starts `agent run` on the job in `job_file`, in the background and detached from this
/// session, with its stderr in the job's `agent.log`. Returns its pid.
pub async fn start(job_file: &Path) -> Result<u32, StartError> {
    let text = tokio::fs::read(job_file).await.map_err(|source| StartError::Read {
        path: job_file.to_path_buf(),
        source,
    })?;
    let _ = tokio::fs::remove_file(job_file).await;
    let job: Job = serde_json::from_slice(&text).map_err(StartError::Parse)?;
    tokio::fs::create_dir_all(&job.workdir).await.map_err(|source| StartError::Workdir {
        path: job.workdir.clone(),
        source,
    })?;
    let log = tokio::fs::File::create(job.workdir.join("agent.log")).await.map_err(StartError::Log)?;
    let log = log.into_std().await;
    let exe = std::env::current_exe().map_err(StartError::Program)?;
    // std's Command: its child always has a pid to report (tokio's has none once reaped),
    // and spawning does not block.
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
    let mut child = cmd.spawn().map_err(StartError::Spawn)?;
    let pid = child.id();
    // The job may be larger than a pipe holds: written without blocking this thread.
    let stdin = child.stdin.take().ok_or_else(|| StartError::HandOver(std::io::Error::other("its stdin is not a pipe")))?;
    let mut stdin = tokio::process::ChildStdin::from_std(stdin).map_err(StartError::HandOver)?;
    stdin.write_all(&text).await.map_err(StartError::HandOver)?;
    Ok(pid)
}

/// How many lines of the agent's log a status carries.
const LOG_TAIL_LINES: usize = 20;

/// Whether the agent started as `pid` for the job in `workdir` still runs, and the end of
/// its log. A pid that now belongs to another program (reused) counts as dead.
pub async fn status(pid: u32, workdir: &Path) -> AgentStatus {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = tokio::fs::read(proc_dir.join("cmdline")).await.unwrap_or_default();
    let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_agent = words.windows(2).any(|w| w[0] == b"agent" && w[1] == b"run");
    let state = tokio::fs::read_to_string(proc_dir.join("stat")).await.unwrap_or_default();
    // The state follows the parenthesised command name: Z is a zombie, X dead.
    let zombie = state.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s == "Z" || s == "X");
    let log = tokio::fs::read(workdir.join("agent.log")).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<String> = text.lines().map(String::from).collect();
    AgentStatus {
        alive: is_agent && !zombie,
        log_tail: lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pid_that_is_not_an_agent_is_dead_and_the_log_tail_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let log: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(dir.path().join("agent.log"), log).unwrap();
        // This test process is alive, but it is no agent.
        let s = status(std::process::id(), dir.path()).await;
        assert!(!s.alive);
        assert_eq!(s.log_tail.len(), LOG_TAIL_LINES);
        assert_eq!(s.log_tail.last().map(String::as_str), Some("line 30"));
        let gone = status(u32::MAX - 1, dir.path()).await;
        assert!(!gone.alive);
    }

    #[tokio::test]
    async fn a_received_file_arrives_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("sub/job.json");
        let bytes = b"{\"v\": 1}".to_vec();
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        receive(&to, Some(&sha.to_uppercase()), &bytes[..]).await.unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), bytes);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!to.with_extension("partial").exists());
    }

    #[tokio::test]
    async fn a_damaged_file_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("commit.bundle");
        let err = receive(&to, Some(&"0".repeat(64)), &b"bundle bytes"[..]).await.unwrap_err();
        assert!(matches!(err, ReceiveError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("arrived damaged"), "{err}");
        assert!(!to.exists());
        assert!(!to.with_extension("partial").exists());
    }

    #[tokio::test]
    async fn no_mirror_means_no_mirror_commit() {
        let dir = tempfile::tempdir().unwrap();
        let info = info(Some(dir.path())).await;
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.mirror_commit, None);
        assert_eq!(super::info(None).await.mirror_commit, None);
    }

    #[tokio::test]
    async fn a_job_file_that_is_not_a_job_is_an_invalid_job() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job.json");
        std::fs::write(&job, "not json").unwrap();
        let err = start(&job).await.unwrap_err();
        assert!(err.is_invalid_job(), "{err}");
        assert!(!job.exists(), "the job file is removed once read");
        let err = start(&dir.path().join("missing.json")).await.unwrap_err();
        assert!(err.is_invalid_job(), "{err}");
    }
}
