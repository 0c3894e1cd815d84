//! Shared fixtures: real git repositories, the real `spotbuild` binary, and local services
//! (a real docker-registry, the AWS emulator, scripted fake registries) that each test starts
//! for itself and that stop when dropped, also when the test fails.

pub mod docker;
pub mod fake_registry;
pub mod farm;
pub mod fault_proxy;
pub mod imds;
pub mod registry_proxy;
pub mod repo;
pub mod server;
pub mod services;

use std::path::Path;
use std::process::Command;

/// The binary under test, with no inherited spotbuild settings.
/// What the CI running these tests says about its own ref: a test's builds must not take
/// it for theirs (it decides a build's trust).
pub const CI_REF_VARIABLES: &[&str] = &[
    "CIRCLECI",
    "CIRCLE_BRANCH",
    "CIRCLE_TAG",
    "CIRCLE_PR_NUMBER",
    "CIRCLE_PULL_REQUEST",
    "GITHUB_ACTIONS",
    "GITHUB_EVENT_NAME",
    "GITHUB_HEAD_REF",
    "GITHUB_REF",
    "GITHUB_REF_NAME",
    "GITHUB_REF_TYPE",
    "GITLAB_CI",
    "CI_COMMIT_BRANCH",
    "CI_COMMIT_TAG",
    "CI_COMMIT_REF_NAME",
    "CI_MERGE_REQUEST_IID",
    "BUILDKITE",
    "BUILDKITE_BRANCH",
    "BUILDKITE_TAG",
    "BUILDKITE_PULL_REQUEST",
    "BRANCH_NAME",
];

/// Removes the CI's own ref from `cmd`'s environment.
pub fn outside_ci(cmd: &mut Command) -> &mut Command {
    for var in CI_REF_VARIABLES {
        cmd.env_remove(var);
    }
    cmd
}

pub fn spotbuild(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spotbuild"));
    cmd.arg("-C").arg(dir);
    outside_ci(&mut cmd);
    for var in [
        "SPOTBUILD_REGISTRY",
        "SPOTBUILD_CONFIG",
        "SPOTBUILD_LOG",
        "SPOTBUILD_REGISTRY_USERNAME",
        "SPOTBUILD_REGISTRY_PASSWORD",
        "SPOTBUILD_DEPLOY_REGISTRY",
        "SPOTBUILD_DEPLOY_REGISTRY_USERNAME",
        "SPOTBUILD_DEPLOY_REGISTRY_PASSWORD",
        "SPOTBUILD_LEDGER",
        "AWS_ENDPOINT_URL",
        "AWS_PROFILE",
        // The CI job's name keys script test tags.
        "JOB_NAME",
        "CIRCLE_JOB",
        "GITHUB_JOB",
        "BUILDKITE_STEP_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// What a finished command said.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(cmd: &mut Command) -> Run {
        let out = cmd.output().expect("failed to start spotbuild");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "spotbuild failed:\n{}\n{}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}
