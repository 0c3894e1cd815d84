//! Shared fixtures: real git repositories, the real `spotbuild` binary, and local services
//! (a real docker-registry, the AWS emulator, scripted fake registries) that each test starts
//! for itself and that stop when dropped, also when the test fails.

pub mod docker;
pub mod fake_registry;
pub mod farm;
pub mod fault_proxy;
pub mod imds;
pub mod repo;
pub mod server;
pub mod services;

use std::path::Path;
use std::process::Command;

/// The binary under test, with no inherited spotbuild settings.
pub fn spotbuild(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spotbuild"));
    cmd.arg("-C").arg(dir);
    for var in [
        "SPOTBUILD_REGISTRY",
        "SPOTBUILD_CONFIG",
        "SPOTBUILD_LOG",
        "SPOTBUILD_REGISTRY_USERNAME",
        "SPOTBUILD_REGISTRY_PASSWORD",
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
