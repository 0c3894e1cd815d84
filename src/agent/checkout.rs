//! The checkout step: the commit's files under the job's `src/`, from a repository on this
//! machine or from a bundle on top of the baked mirror (or an empty repository).

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::job::CheckedJob;
use super::step::{Step, StepStatus};
use crate::protocol::Source;

pub async fn checkout(step: &Step, cx: &CheckedJob) -> StepStatus {
    let job = &cx.job;
    let git_dir = match &job.source {
        Source::Repository(path) => path.clone(),
        Source::Bundle { path, mirror } => match unbundle(step, &job.workdir, path, mirror.as_deref()).await {
            Ok(repo) => repo,
            Err(status) => return status,
        },
    };
    let src = &cx.src;
    let _ = tokio::fs::remove_dir_all(src).await;
    if let Err(e) = tokio::fs::create_dir_all(src).await {
        step.say(format!("error: failed to create {}: {e}", src.display())).await;
        return StepStatus::Errored;
    }
    let tar = job.workdir.join("src.tar");
    let mut archive = git();
    archive
        .arg("-C")
        .arg(&git_dir)
        .args(["archive", "--format=tar", "-o"])
        .arg(&tar)
        .arg(format!("{}^{{commit}}", job.commit));
    let archived = step.run(archive).await;
    if !archived.passed() {
        step.say(format!("error: commit {} is not in {}", job.commit, git_dir.display())).await;
        return archived;
    }
    let mut untar = Command::new("tar");
    // Fresh mtimes (-m): git archive stamps every file with the commit time, so a reused
    // workdir could see a changed file of the same size with the same stat, which
    // BuildKit's incremental context sync takes as unchanged. Layer cache keys are
    // content hashes, so fresh mtimes cost no cache hits.
    untar.arg("-xmf").arg(&tar).arg("-C").arg(src);
    let untarred = step.run(untar).await;
    let _ = tokio::fs::remove_file(&tar).await;
    if untarred.passed() {
        step.say(format!("checked out {}", job.commit)).await;
    }
    untarred
}

/// Fetches `bundle` into the workdir's repository (made first: a shared clone of `mirror`,
/// or empty) and returns that repository.
async fn unbundle(step: &Step, workdir: &Path, bundle: &Path, mirror: Option<&Path>) -> Result<PathBuf, StepStatus> {
    let repo = workdir.join("repo.git");
    if !tokio::fs::try_exists(&repo).await.unwrap_or(false) {
        let mut init = git();
        match mirror {
            Some(m) => init.arg("clone").arg("--bare").arg("--shared").arg(m).arg(&repo),
            None => init.args(["init", "--bare", "-q"]).arg(&repo),
        };
        passed(step.run(init).await)?;
    }
    let mut verify = git();
    verify.arg("-C").arg(&repo).arg("bundle").arg("verify").arg(bundle);
    let verified = step.run(verify).await;
    if !verified.passed() {
        step.say("error: the bundle does not apply to this repository").await;
        return Err(verified);
    }
    let mut fetch = git();
    fetch.arg("-C").arg(&repo).args(["fetch", "-q", "--no-tags"]).arg(bundle).arg("+refs/*:refs/spotbuild/*");
    passed(step.run(fetch).await)?;
    Ok(repo)
}

fn git() -> Command {
    Command::new("git")
}

fn passed(status: StepStatus) -> Result<(), StepStatus> {
    match status {
        StepStatus::Passed => Ok(()),
        failed => Err(failed),
    }
}
