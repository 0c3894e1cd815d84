//! `dependencies` scripts: a manifest entry whose `dependencies` is a string names a script
//! (relative to `buildDir`) that prints the entry's dependencies. It runs in a checkout of
//! the commit being planned, with the project folder as its argument, bounded in time.
//!
//! # Guarantees
//! - The script sees the files of the commit being planned: the work tree when it has that
//!   commit checked out, else a temporary export of the commit (removed afterwards).
//! - It never outlives its bound: on timeout its whole process group is killed.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::git::{CommitId, Repo};
use crate::manifest::ScriptFailure;

/// Why the commit could not be checked out for its scripts.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CheckoutFailed(pub String);

/// Where scripts run: a folder holding the commit's files.
pub enum Checkout {
    /// The repository's own work tree, which has the commit checked out.
    WorkTree(PathBuf),
    /// An export of the commit, deleted on drop.
    Export(tempfile::TempDir),
}

impl Checkout {
    /// The checkout of `commit`, or why it could not be made (kept, and reported for each
    /// script that needed it, as [`ScriptFailure::Checkout`]).
    pub fn of(repo: &Repo, commit: CommitId) -> Result<Checkout, CheckoutFailed> {
        if let Some(dir) = repo.workdir() {
            if repo.resolve_commit("HEAD").ok() == Some(commit) {
                return Ok(Checkout::WorkTree(dir.to_path_buf()));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("spotbuild-deps-")
            .tempdir()
            .map_err(|e| CheckoutFailed(format!("failed to make a folder: {e}")))?;
        // `git archive | tar -x`: the repository itself is only read.
        let mut archive = Command::new("git")
            .arg("--git-dir")
            .arg(repo.git_dir())
            .args(["archive", "--format=tar", &commit.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CheckoutFailed(format!("failed to run git archive: {e}")))?;
        let stdout = archive.stdout.take().expect("piped");
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(dir.path())
            .stdin(stdout)
            .output()
            .map_err(|e| CheckoutFailed(format!("failed to run tar: {e}")))?;
        let git = archive.wait_with_output().map_err(|e| CheckoutFailed(format!("git archive: {e}")))?;
        if !git.status.success() || !tar.status.success() {
            let why = String::from_utf8_lossy(if git.status.success() { &tar.stderr } else { &git.stderr });
            return Err(CheckoutFailed(why.trim().to_string()));
        }
        Ok(Checkout::Export(dir))
    }

    pub fn root(&self) -> &Path {
        match self {
            Checkout::WorkTree(p) => p,
            Checkout::Export(d) => d.path(),
        }
    }
}

/// Runs `root/script root/project_dir` from `root`, and returns its standard output.
pub fn run(root: &Path, script: &str, project_dir: &str, timeout: Duration) -> Result<String, ScriptFailure> {
    let mut child = Command::new(root.join(script))
        .arg(root.join(project_dir))
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout also ends what it started.
        .process_group(0)
        .spawn()
        .map_err(ScriptFailure::Spawn)?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let readers = (
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        }),
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        }),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        // SAFETY: kill(2) on the process group of the child started above.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        return Err(ScriptFailure::Timeout(timeout));
    };
    // What it left running in the background would hold the pipes open: end it too.
    // SAFETY: kill(2) on the process group of the child started above.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let stdout = readers.0.join().unwrap_or_default();
    let stderr = readers.1.join().unwrap_or_default();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        let last: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(ScriptFailure::Exit {
            status: status.to_string(),
            stderr: last.into_iter().rev().collect::<Vec<_>>().join(" / "),
        });
    }
    String::from_utf8(stdout).map_err(|_| ScriptFailure::NotUtf8)
}
