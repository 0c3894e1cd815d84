//! Running one command of a step: its stdout and stderr become `log` events line by line,
//! and it can be stopped from outside (interruption, deadline).
//!
//! Each command runs in a process group of its own. Stopping it kills the whole group, and
//! so does its end: what it left running in the background would otherwise hold its output
//! pipes open and keep the step from ever ending. The wait for its last output is bounded
//! by [`DRAIN_TIMEOUT`], for a process that left the group and still holds them.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::watch;

use super::events::Events;
use super::lines::LineSplitter;
use crate::protocol::Stream;

/// Why a command did not finish by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The process exited with this code (signals map to 128 + signal).
    Exited(i32),
    /// It could not be started.
    NotStarted(String),
    /// It was stopped because `stop` fired.
    Killed,
}

impl Stopped {
    pub fn ok(&self) -> bool {
        *self == Stopped::Exited(0)
    }
}

/// Something that watches a step's output lines (e.g. to count cached layers).
pub type Observer = Arc<Mutex<dyn FnMut(&str) + Send>>;

/// How long a step's output is still read after its process group ended.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Kills process group `pgid` (a step's), if anything is left in it.
fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
        // SAFETY: kill(2) with a negative pid signals the process group this module made
        // for the step; ESRCH (nothing left) is ignored.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Runs `cmd`, streaming its output as `step`'s log lines, until it exits or `stop` becomes
/// true (then it is killed). Output lines are all emitted before this returns.
pub async fn run(
    mut cmd: Command,
    step: &str,
    events: &Events,
    mut stop: watch::Receiver<bool>,
    observer: Option<Observer>,
) -> Stopped {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let program = format!("{:?}", cmd.as_std().get_program());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Stopped::NotStarted(format!("failed to start {program}: {e}")),
    };
    // The group's id is the leader's pid, known until it is reaped.
    let pgid = child.id();
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let mut pump_out = tokio::spawn(pump(out, step.to_string(), Stream::Stdout, events.clone(), observer.clone()));
    let mut pump_err = tokio::spawn(pump(err, step.to_string(), Stream::Stderr, events.clone(), observer));

    let status = if *stop.borrow() {
        None
    } else {
        tokio::select! {
            s = child.wait() => Some(s),
            _ = stop.wait_for(|s| *s) => None,
        }
    };
    let result = match status {
        Some(Ok(s)) => Stopped::Exited(exit_code(s)),
        Some(Err(e)) => Stopped::NotStarted(format!("failed to wait for {program}: {e}")),
        None => {
            kill_group(pgid);
            let _ = child.wait().await;
            Stopped::Killed
        }
    };
    // What the step left behind in its group would hold the pipes open: it ends too.
    kill_group(pgid);
    let pumps = async {
        let _ = (&mut pump_out).await;
        let _ = (&mut pump_err).await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, pumps).await.is_err() {
        pump_out.abort();
        pump_err.abort();
        events
            .say(step, format!("warning: stopped reading output {}s after the step ended: a process it started left its group and holds the output open", DRAIN_TIMEOUT.as_secs()))
            .await;
    }
    result
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

async fn pump(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    step: String,
    stream: Stream,
    events: Events,
    observer: Option<Observer>,
) {
    let mut splitter = LineSplitter::redacting(events.redactor());
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        splitter.push(&buf[..n], &mut |l| lines.push(l));
        flush(&mut lines, &step, stream, &events, &observer).await;
    }
    splitter.finish(&mut |l| lines.push(l));
    flush(&mut lines, &step, stream, &events, &observer).await;
}

async fn flush(lines: &mut Vec<String>, step: &str, stream: Stream, events: &Events, observer: &Option<Observer>) {
    for line in lines.drain(..) {
        if let Some(o) = observer {
            (o.lock().expect("observer not poisoned"))(&line);
        }
        events.log(step, stream, line).await;
    }
}
