//! The farm's SSM endpoint: `SendCommand` (the `AWS-RunShellScript` document),
//! `GetCommandInvocation` and `CancelCommand`, answered by running each script in the
//! host's network namespace as the farm's build user, the way the SSM agent would on an
//! instance. With it, `[remote] transport = "ssm"` runs end to end through the controller.
//!
//! Guarantees: a script runs only on a host the farm backs, never as root, in a session
//! of its own (cancelling or timing out kills its process group); like SSM, at most
//! [`OUTPUT_LIMIT`] characters of each output are kept, and the rest is read and dropped.
//! Caveats: invocations are kept for the farm's lifetime; the script's environment is the
//! instance's (`PATH`, `HOME`, the region and the host's S3 door), not the farm's.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use super::user::BuildUser;

/// SSM keeps this many characters of a command's stdout and of its stderr.
pub const OUTPUT_LIMIT: usize = 24_000;

/// Finds the network namespace of the host backing an instance, if one does.
pub type Namespaces = Arc<dyn Fn(&str) -> futures::future::BoxFuture<'static, Option<String>> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    InProgress,
    Success,
    Failed,
    Cancelled,
    TimedOut,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "InProgress",
            Status::Success => "Success",
            Status::Failed => "Failed",
            Status::Cancelled => "Cancelled",
            Status::TimedOut => "TimedOut",
        }
    }
}

struct Invocation {
    comment: String,
    /// The script's process group, while it runs.
    pgid: Option<i32>,
    cancelled: bool,
    status: Status,
    code: i32,
    stdout: String,
    stderr: String,
}

pub struct Runner {
    namespaces: Namespaces,
    user: BuildUser,
    env: Vec<(String, String)>,
    invocations: Mutex<HashMap<(String, String), Invocation>>,
}

fn error(code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "__type": code, "message": message.into() });
    (StatusCode::BAD_REQUEST, [("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response()
}

fn answer(body: Value) -> Response {
    ([("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response()
}

impl Runner {
    /// Scripts run as `user`, with exactly `env` (plus `HOME`, `USER` and `LOGNAME`).
    pub fn new(namespaces: Namespaces, user: BuildUser, env: Vec<(String, String)>) -> Runner {
        Runner {
            namespaces,
            user,
            env,
            invocations: Mutex::new(HashMap::new()),
        }
    }

    /// The SSM operations this endpoint answers; the rest go to the emulator.
    pub fn answers(op: &str) -> bool {
        matches!(op, "SendCommand" | "GetCommandInvocation" | "CancelCommand")
    }

    pub async fn answer(self: &Arc<Self>, op: &str, body: &[u8]) -> Response {
        let Ok(req) = serde_json::from_slice::<Value>(body) else {
            return error("ValidationException", "the request is not JSON");
        };
        match op {
            "SendCommand" => self.send(&req).await,
            "GetCommandInvocation" => self.get(&req),
            "CancelCommand" => self.cancel(&req),
            _ => error("UnknownOperationException", op),
        }
    }

    async fn send(self: &Arc<Self>, req: &Value) -> Response {
        if req["DocumentName"].as_str() != Some("AWS-RunShellScript") {
            return error("InvalidDocument", "the farm runs only AWS-RunShellScript");
        }
        let instances: Vec<String> = req["InstanceIds"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
        if instances.is_empty() {
            return error("ValidationException", "InstanceIds is empty");
        }
        let Some(lines) = req["Parameters"]["commands"].as_array().map(|a| a.iter().filter_map(|l| l.as_str().map(String::from)).collect::<Vec<_>>()) else {
            return error("InvalidParameters", "Parameters.commands is missing");
        };
        let timeout = req["Parameters"]["executionTimeout"][0].as_str().and_then(|s| s.parse::<u64>().ok()).unwrap_or(3600);
        let mut targets = Vec::new();
        for id in &instances {
            match (self.namespaces)(id).await {
                Some(ns) => targets.push((id.clone(), ns)),
                None => return error("InvalidInstanceId", format!("{id} is not registered with SSM")),
            }
        }
        let command_id = command_id();
        let comment = req["Comment"].as_str().unwrap_or_default().to_string();
        let script = lines.join("\n");
        for (instance, ns) in targets {
            self.start(command_id.clone(), instance, &ns, &script, Duration::from_secs(timeout), comment.clone());
        }
        answer(json!({ "Command": {
            "CommandId": command_id,
            "DocumentName": "AWS-RunShellScript",
            "Comment": comment,
            "InstanceIds": instances,
            "Status": "Pending",
        }}))
    }

    fn start(self: &Arc<Self>, command_id: String, instance: String, ns: &str, script: &str, timeout: Duration, comment: String) {
        let key = (command_id, instance);
        let mut inv = Invocation {
            comment,
            pgid: None,
            cancelled: false,
            status: Status::InProgress,
            code: -1,
            stdout: String::new(),
            stderr: String::new(),
        };
        let child = self.spawn(ns, script);
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                inv.status = Status::Failed;
                inv.stderr = format!("failed to run the script: {e}");
                self.invocations.lock().expect("not poisoned").insert(key, inv);
                return;
            }
        };
        inv.pgid = child.id().map(|p| p as i32);
        self.invocations.lock().expect("not poisoned").insert(key.clone(), inv);
        let runner = self.clone();
        tokio::spawn(async move {
            let (out, err) = (child.stdout.take(), child.stderr.take());
            let pgid = child.id().map(|p| p as i32);
            let waited = async {
                match tokio::time::timeout(timeout, child.wait()).await {
                    Ok(exit) => Some(exit),
                    Err(_) => {
                        if let Some(pgid) = pgid {
                            // SAFETY: kill(2) on the process group of a script this runner started.
                            unsafe { libc::kill(-pgid, libc::SIGKILL) };
                        }
                        let _ = child.wait().await;
                        None
                    }
                }
            };
            let (stdout, stderr, waited) = tokio::join!(read_capped(out), read_capped(err), waited);
            let mut map = runner.invocations.lock().expect("not poisoned");
            let Some(inv) = map.get_mut(&key) else { return };
            let (status, code) = match waited {
                None => (Status::TimedOut, -1),
                Some(_) if inv.cancelled => (Status::Cancelled, -1),
                Some(Ok(s)) if s.success() => (Status::Success, 0),
                Some(Ok(s)) => (Status::Failed, s.code().unwrap_or(-1)),
                Some(Err(_)) => (Status::Failed, -1),
            };
            inv.pgid = None;
            inv.status = status;
            inv.code = code;
            inv.stdout = stdout;
            inv.stderr = stderr;
        });
    }

    /// `sh -c SCRIPT` in namespace `ns`, as the build user, in a session of its own.
    fn spawn(&self, ns: &str, script: &str) -> std::io::Result<tokio::process::Child> {
        let netns = std::fs::File::open(format!("/run/netns/{ns}"))?;
        let fd = netns.as_raw_fd();
        let u = self.user.clone();
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name)
            .current_dir(&u.home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: only async-signal-safe calls (setns, setsid, setgroups, setgid, setuid)
        // between fork and exec; `netns` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 || libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let groups = [u.gid, u.docker_gid];
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(u.gid) != 0 || libc::setuid(u.uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        drop(netns);
        child
    }

    fn get(&self, req: &Value) -> Response {
        let (Some(cmd), Some(instance)) = (req["CommandId"].as_str(), req["InstanceId"].as_str()) else {
            return error("ValidationException", "CommandId and InstanceId are required");
        };
        let map = self.invocations.lock().expect("not poisoned");
        let Some(inv) = map.get(&(cmd.to_string(), instance.to_string())) else {
            return error("InvocationDoesNotExist", format!("no invocation of {cmd} on {instance}"));
        };
        answer(json!({
            "CommandId": cmd,
            "InstanceId": instance,
            "Comment": inv.comment,
            "DocumentName": "AWS-RunShellScript",
            "Status": inv.status.as_str(),
            "StatusDetails": inv.status.as_str(),
            "ResponseCode": inv.code,
            "StandardOutputContent": inv.stdout,
            "StandardErrorContent": inv.stderr,
        }))
    }

    fn cancel(&self, req: &Value) -> Response {
        let Some(cmd) = req["CommandId"].as_str() else {
            return error("ValidationException", "CommandId is required");
        };
        let only: Vec<&str> = req["InstanceIds"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
        let mut map = self.invocations.lock().expect("not poisoned");
        let mut found = false;
        for ((c, instance), inv) in map.iter_mut() {
            if c != cmd || !(only.is_empty() || only.contains(&instance.as_str())) {
                continue;
            }
            found = true;
            if let Some(pgid) = inv.pgid {
                inv.cancelled = true;
                // SAFETY: kill(2) on the process group of a script this runner started.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        if found {
            answer(json!({}))
        } else {
            error("InvalidCommandId", format!("no command {cmd}"))
        }
    }
}

/// Reads a pipe to its end, keeping the first [`OUTPUT_LIMIT`] characters.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else { return String::new() };
    let mut kept = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_LIMIT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// A command id shaped as SSM's (a UUID), from the OS's randomness.
fn command_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS has randomness");
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}
