//! Running a project's deploy hook on the CI machine: in its own process group, with its
//! output on our stderr (stdout stays the command's, for `--json`), bounded by a timeout,
//! and killed with everything it started if the deploy stops first.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::manifest::DeployHook;

/// How long a hook gets to exit after SIGTERM before its group is killed.
pub const HOOK_GRACE: Duration = Duration::from_secs(10);

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum HookOutcome {
    Ok { seconds: u64 },
    Failed { detail: String, seconds: u64 },
    TimedOut { after_seconds: u64 },
    /// A project it depends on failed, so it was not run.
    NotRun { because: String },
}

impl HookOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, HookOutcome::Ok { .. })
    }

    /// One line for tables and the ledger.
    pub fn summary(&self) -> String {
        match self {
            HookOutcome::Ok { seconds } => format!("ok ({seconds}s)"),
            HookOutcome::Failed { detail, .. } => format!("failed: {detail}"),
            HookOutcome::TimedOut { after_seconds } => format!("timed out after {after_seconds}s"),
            HookOutcome::NotRun { because } => format!("not run: {because}"),
        }
    }
}

/// Kills the hook's whole process group if the hook is still running when dropped (the
/// deploy was stopped, or timed the hook out).
struct GroupGuard {
    pgid: Option<i32>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: signalling a process group we created; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `hook` in `dir` with `env` (the `SPOTBUILD_*` variables) on top of its own.
pub async fn run(hook: &DeployHook, dir: &Path, env: &BTreeMap<String, String>, timeout: Duration) -> HookOutcome {
    let started = Instant::now();
    // Its stdout is our stderr: our stdout may be a `--json` report.
    let stdout = match std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::inherit(),
    };
    let mut cmd = tokio::process::Command::new(&hook.command[0]);
    cmd.args(&hook.command[1..])
        .current_dir(dir)
        .envs(&hook.env)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return HookOutcome::Failed {
                detail: format!("could not start `{}`: {e}", hook.command[0]),
                seconds: 0,
            }
        }
    };
    let guard = GroupGuard {
        pgid: child.id().map(|p| p as i32),
    };
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            if let Some(pgid) = guard.pgid {
                // SAFETY: as in GroupGuard::drop.
                unsafe {
                    libc::kill(-pgid, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(HOOK_GRACE, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
            drop(guard);
            return HookOutcome::TimedOut {
                after_seconds: timeout.as_secs(),
            };
        }
    };
    // The leader is gone; whatever it left in the group goes with it.
    drop(guard);
    let seconds = started.elapsed().as_secs();
    match status {
        Ok(s) if s.success() => HookOutcome::Ok { seconds },
        Ok(s) => HookOutcome::Failed {
            detail: match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "ended abnormally".into(),
            },
            seconds,
        },
        Err(e) => HookOutcome::Failed {
            detail: format!("could not wait for it: {e}"),
            seconds,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(cmd: &[&str]) -> DeployHook {
        DeployHook {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("FROM_MANIFEST".into(), "1".into())]),
            timeout: None,
        }
    }

    #[tokio::test]
    async fn hooks_see_their_variables_and_report_failure_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([("SPOTBUILD_ENV".to_string(), "staging".to_string())]);
        let ok = run(&hook(&["sh", "-c", "test \"$SPOTBUILD_ENV$FROM_MANIFEST\" = staging1"]), dir.path(), &env, Duration::from_secs(10)).await;
        assert!(ok.succeeded(), "{ok:?}");
        let failed = run(&hook(&["sh", "-c", "exit 3"]), dir.path(), &env, Duration::from_secs(10)).await;
        assert!(matches!(failed, HookOutcome::Failed { ref detail, .. } if detail == "exit 3"), "{failed:?}");
        let missing = run(&hook(&["/nonexistent/hook"]), dir.path(), &env, Duration::from_secs(10)).await;
        assert!(matches!(missing, HookOutcome::Failed { .. }));
        // The hook's child, in the same group, goes when the hook is timed out.
        let marker = dir.path().join("left");
        let script = format!("(sleep 3; touch {}) & sleep 30", marker.display());
        let slow = run(&hook(&["sh", "-c", &script]), dir.path(), &env, Duration::from_millis(300)).await;
        assert_eq!(slow, HookOutcome::TimedOut { after_seconds: 0 });
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!marker.exists(), "a process the hook started outlived its timeout");
    }
}
