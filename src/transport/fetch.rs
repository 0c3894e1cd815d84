//! The instance's side of an SSM `exec`: `spotbuild agent fetch` downloads the command's
//! input from a presigned URL, checks it, and runs the command with it on stdin (SSM cannot
//! carry stdin itself).
//!
//! # Guarantees
//! - The URL, a bearer credential for one object, is read from [`FETCH_URL_ENV`] (never a
//!   command line) and removed from the command's environment.
//! - The input is kept only in an unlinked file (mode 0600): it may hold credentials and
//!   does not outlive this process.
//! - The command's exit code is passed on; stdout is flushed before it is.

use std::path::PathBuf;
use std::time::Duration;

use sha2::Digest;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// Where `agent fetch` finds the presigned URL of its input.
pub const FETCH_URL_ENV: &str = "SPOTBUILD_FETCH_URL";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("${FETCH_URL_ENV} is not set")]
    NoUrl,
    #[error("failed to create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The request failed; the error's URL is left out.
    #[error("failed to fetch the input")]
    Http(#[source] reqwest::Error),
    #[error("failed to fetch the input: the store answered {0}")]
    Status(reqwest::StatusCode),
    #[error("failed to fetch the input")]
    Io(#[source] std::io::Error),
    #[error("the input arrived damaged: sha256 {got}, expected {want}")]
    Damaged { got: String, want: String },
    #[error("failed to run {program}")]
    Run {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// What became of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// No command was given: the input went to stdout.
    Printed,
    /// The command ran and exited with this code.
    Ran { code: u8 },
}

/// Fetches the input (within `timeout`), checks its SHA-256 if given, and runs `command`
/// with it on stdin, or prints it when there is no command.
pub async fn fetch(sha256: Option<&str>, timeout: Duration, command: &[String]) -> Result<Fetched, FetchError> {
    let url = std::env::var(FETCH_URL_ENV).map_err(|_| FetchError::NoUrl)?;
    let path = std::env::temp_dir().join(format!(".spotbuild-fetch-{}-{:x}", std::process::id(), rand_suffix()));
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .await
        .map_err(|source| FetchError::Create { path: path.clone(), source })?;
    let _ = tokio::fs::remove_file(&path).await;
    let client = reqwest::Client::builder().timeout(timeout).build().map_err(FetchError::Http)?;
    let mut resp = client.get(&url).send().await.map_err(|e| FetchError::Http(e.without_url()))?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status()));
    }
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| FetchError::Http(e.without_url()))? {
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(FetchError::Io)?;
    }
    let got = hex::encode(hasher.finalize());
    if let Some(want) = sha256 {
        if !want.eq_ignore_ascii_case(&got) {
            return Err(FetchError::Damaged { got, want: want.to_string() });
        }
    }
    file.flush().await.map_err(FetchError::Io)?;
    file.rewind().await.map_err(FetchError::Io)?;
    let mut stdout = tokio::io::stdout();
    let Some((program, args)) = command.split_first() else {
        tokio::io::copy(&mut file, &mut stdout).await.map_err(FetchError::Io)?;
        stdout.flush().await.map_err(FetchError::Io)?;
        return Ok(Fetched::Printed);
    };
    let status = tokio::process::Command::new(program)
        .args(args)
        .env_remove(FETCH_URL_ENV)
        .stdin(file.into_std().await)
        .status()
        .await
        .map_err(|source| FetchError::Run {
            program: program.clone(),
            source,
        })?;
    let _ = stdout.flush().await;
    // A command killed by a signal has no code of its own: it failed.
    let code = status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1);
    Ok(Fetched::Ran { code })
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}
