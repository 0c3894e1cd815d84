//! Test steps: a project's test jobs, in its image or as host scripts (which get the image
//! to run themselves), recorded as passed by a test tag; and the job's own commands, run in
//! the checkout.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::exec::Stopped;
use super::job::CheckedJob;
use super::publish::Tools;
use super::step::{NotRun, Step, StepStatus};
use crate::errors::error_chain;
use crate::protocol::{JobProject, JobTest};

/// Runs test job `test` of project `p` on the image `cache-<hash>` points at, by its
/// digest; on success that digest (not whatever the tag points at by then) gains the test
/// tag by a manifest copy, and a tag that moved while the test ran records no pass.
pub async fn test(step: &Step, tools: &Tools, cx: &CheckedJob, p: &JobProject, test: &JobTest) -> StepStatus {
    let Some(client) = &tools.client else {
        step.say("error: no registry client to pin the tested image or record the pass").await;
        return StepStatus::Errored;
    };
    // Where the image is (an untrusted job may test one of the trusted namespace), and
    // where the pass is recorded: always the job's own namespace.
    let repository = cx.existing_repository(p);
    let own = cx.registry.repository(&p.name);
    let tested = match client.digest(&repository, &p.tag).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            step.say(format!("error: {repository}:{} is not in the registry", p.tag)).await;
            return StepStatus::Errored;
        }
        Err(e) => {
            step.say(format!("error: failed to read {repository}:{}: {}", p.tag, error_chain(&e))).await;
            return StepStatus::Errored;
        }
    };
    let image = format!("{}/{repository}@{tested}", cx.registry.host);
    let ran = if test.host {
        on_host(step, cx, p, test, &image).await
    } else {
        in_image(step, tools, cx, test, &image).await
    };
    if !ran.passed() {
        return ran;
    }
    match client.digest(&repository, &p.tag).await {
        Ok(Some(now)) if now == tested => {}
        Ok(now) => {
            let now = now.unwrap_or_else(|| "nothing".into());
            step.say(format!("error: {} moved from {tested} to {now} while its test ran: the pass is not recorded", p.tag)).await;
            return StepStatus::Errored;
        }
        Err(e) => {
            step.say(format!("error: failed to check {}: {}", p.tag, error_chain(&e))).await;
            return StepStatus::Errored;
        }
    }
    let recorded = if repository == own {
        client.copy_tag(&own, &tested, &test.tag).await
    } else {
        client.copy_across(&repository, &tested, &own, &test.tag).await
    };
    match recorded {
        Ok(()) => {
            step.say(format!("passed: tagged {} ({tested})", test.tag)).await;
            StepStatus::Passed
        }
        // Test tags are immutable where the registry enforces it: another job recorded the
        // same pass meanwhile.
        Err(_) if client.has_tag(&own, &test.tag).await.unwrap_or(false) => {
            step.say(format!("passed: {} was recorded meanwhile by another job", test.tag)).await;
            StepStatus::Passed
        }
        Err(e) => {
            step.say(format!("error: failed to record the pass as {}: {}", test.tag, error_chain(&e))).await;
            StepStatus::Errored
        }
    }
}

async fn on_host(step: &Step, cx: &CheckedJob, p: &JobProject, test: &JobTest, image: &str) -> StepStatus {
    let Some((program, args)) = test.command.split_first() else {
        return StepStatus::NotRun(NotRun::NoCommand);
    };
    let dir = cx.src.join(&p.project_dir);
    // `./scripts/run_tests` names a file of the project's folder.
    let program = if program.contains('/') { dir.join(program) } else { PathBuf::from(program) };
    let mut cmd = Command::new(program);
    // What the Aztec build-system's `run_tests` scripts expect, under their names too;
    // the image is already pulled, so `docker run "$IMAGE_URI"` needs no login.
    // SPOTBUILD_IMAGE is pinned to the digest under test; IMAGE_URI keeps the tag form
    // those scripts compute themselves.
    cmd.args(args)
        .current_dir(&dir)
        .env("SPOTBUILD_IMAGE", image)
        .env("IMAGE_URI", cx.existing(p))
        .env("CONTENT_HASH", &p.hash)
        .env("COMMIT_HASH", &cx.job.commit)
        .env("ROOT_PATH", &cx.src)
        .env("PROJECT_DIR", &dir)
        .env(CPUS_ENV, machine_cpus().to_string());
    step.run(cmd).await
}

async fn in_image(step: &Step, tools: &Tools, cx: &CheckedJob, test: &JobTest, image: &str) -> StepStatus {
    let docker = &tools.docker;
    let name = container_name(&cx.job.build_id, step.name());
    // The machine may be another size than the job was written for (`[cloud] sizes`):
    // a limit above what it has would make `docker run` refuse to start.
    let cpus = test.cpus.map(|n| n.min(machine_cpus()));
    let stopped = step.exec(docker.run(image, &name, &test.command, cpus), None).await;
    if stopped == Stopped::Killed {
        // Killing the client does not stop the container.
        let _ = docker.remove_container(&name).output().await;
    }
    StepStatus::from(&stopped)
}

/// Runs one of the job's own commands in `dir`.
pub async fn command(step: &Step, dir: &Path, command: &[String]) -> StepStatus {
    let Some((program, args)) = command.split_first() else {
        return StepStatus::NotRun(NotRun::NoCommand);
    };
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).env(CPUS_ENV, machine_cpus().to_string());
    step.run(cmd).await
}

/// What host commands and test scripts read to size their parallelism (`make -j`): the
/// CPUs of the machine the job got, which with `[cloud] sizes = "at-least"` may be more
/// than asked for.
pub const CPUS_ENV: &str = "SPOTBUILD_CPUS";

/// The CPUs this machine has (what the agent's hello reports).
pub fn machine_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

fn container_name(build_id: &str, step: &str) -> String {
    let raw = format!("spotbuild-{build_id}-{step}");
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_valid() {
        assert_eq!(container_name("b1", "api:test:unit"), "spotbuild-b1-api-test-unit");
    }
}
