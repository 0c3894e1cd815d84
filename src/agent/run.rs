//! Running a job: checks it, starts the event stream and the background watches, runs the
//! [`Worker`] while performing what the stop policy ([`super::stop`]) decides, and ends with
//! the `result` event (and, past the deadline, the shutdown command).

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use super::docker;
use super::events::Events;
use super::job::{AgentError, CheckedJob};
use super::machine;
use super::publish;
use super::stop::{self, Effect, Halt, Signal, State, WIND_DOWN};
use super::worker::Worker;
use crate::protocol::{Event, Job, NoticeKind, Outcome};

/// Runs `job`, writing events to `out`, until done, the deadline, or `cancel` resolves.
pub async fn run<W>(job: Job, out: W, cancel: impl Future<Output = ()> + Send) -> Result<Outcome, AgentError>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let cx = CheckedJob::check(job)?;
    let job = &cx.job;
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { path, source }
    };
    tokio::fs::create_dir_all(&job.workdir).await.map_err(io(&job.workdir))?;
    let events_file = job.events_file.clone().unwrap_or_else(|| job.workdir.join("events.ndjson"));
    let (events, writer) = Events::start(out, &events_file, cx.secrets()).map_err(io(&events_file))?;

    let docker = match cx.needs_docker() {
        true => Some(docker::detect(job.cache.builder, job.cache.docker.as_deref()).await),
        false => None,
    };
    let imds = machine::hello(&events, &job.imds, docker.as_ref().and_then(|d| d.as_ref().ok())).await;

    // Background work, stopped by the guards when this function returns.
    let heartbeat = machine::heartbeat(events.clone(), Duration::from_secs(job.heartbeat_secs.max(1)));
    let (notice_tx, mut notice_rx) = watch::channel(None);
    let _imds = imds.map(|i| machine::watch_notices(i, &job.imds, events.clone(), notice_tx));

    let tools = match docker {
        Some(Ok(d)) => Ok(Some(publish::prepare(d, &cx, &events).await)),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    };
    let (kill_tx, kill_rx) = watch::channel(false);
    let (halt_tx, halt_rx) = watch::channel(false);
    let (salvage_tx, mut salvage_rx) = mpsc::channel::<oneshot::Sender<Option<Duration>>>(1);
    let deadline = cx.deadline;
    let mut worker = Worker {
        cx,
        events: events.clone(),
        kill: kill_rx,
        halt: halt_rx,
        salvage: salvage_tx,
        failed: Vec::new(),
    };
    let work = async move {
        match tools {
            Ok(tools) => worker.run(tools.as_ref()).await,
            Err(e) => {
                worker.events.say("agent", format!("error: {e}")).await;
                worker.failed.push("agent".into());
            }
        }
        worker
    };
    tokio::pin!(work);
    let deadline_sleep = async {
        match deadline {
            Some(t) => {
                let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline_sleep);
    tokio::pin!(cancel);

    // Only performs what the stop policy decides (see `stop::next`).
    let mut state = State::Working;
    let mut timer: Option<tokio::time::Instant> = None;
    let mut finished = None;
    let mut shutdown = false;
    let worker = loop {
        let armed = async {
            match timer {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // Once halted the policy ignores these; not polling them also keeps a finished
        // sleep from firing again.
        let working = state == State::Working;
        let mut salvage_reply = None;
        let signal = tokio::select! {
            w = &mut work => {
                finished = Some(w);
                Signal::WorkFinished
            }
            _ = &mut deadline_sleep, if working => Signal::DeadlineReached,
            _ = &mut cancel, if working => Signal::Cancel,
            Ok(()) = notice_rx.changed(), if working => {
                let Some(notice) = notice_rx.borrow_and_update().clone() else { continue };
                Signal::Notice { notice, now: SystemTime::now() }
            }
            _ = armed => {
                timer = None;
                Signal::TimerFired
            }
            Some(reply) = salvage_rx.recv() => {
                salvage_reply = Some(reply);
                Signal::SalvageRequested
            }
        };
        let (next_state, effects) = stop::next(state, signal);
        state = next_state;
        let mut salvage_window = None;
        for effect in effects {
            match effect {
                Effect::HaltWorker => {
                    halt_tx.send_replace(true);
                }
                Effect::Kill => {
                    kill_tx.send_replace(true);
                }
                Effect::ArmTimer(after) => timer = Some(tokio::time::Instant::now() + after),
                Effect::Rearm { within } => {
                    kill_tx.send_replace(false);
                    salvage_window = Some(within);
                }
                Effect::Shutdown => shutdown = true,
            }
        }
        if let Some(reply) = salvage_reply {
            let _ = reply.send(salvage_window);
        }
        if let Some(worker) = finished.take() {
            break worker;
        }
    };
    drop(heartbeat);

    let (outcome, message) = result(state.halt(), &worker.failed);
    events
        .emit(Event::Result {
            outcome,
            failed_steps: worker.failed.clone(),
            message,
        })
        .await;
    events.flush().await;
    let shutdown = shutdown.then(|| worker.cx.job.shutdown_command.clone());
    drop(worker);
    drop(events);
    let _ = writer.await;
    if let Some(cmd) = shutdown {
        run_shutdown(cmd).await;
    }
    Ok(outcome)
}

/// The job's outcome and what to say of it.
fn result(halted: Option<&Halt>, failed: &[String]) -> (Outcome, Option<String>) {
    match halted {
        Some(Halt::Notice(n)) => (
            Outcome::Interrupted,
            Some(match n.kind {
                NoticeKind::Interruption => format!(
                    "spot interruption notice ({} at {})",
                    n.action.as_deref().unwrap_or("terminate"),
                    n.time.as_deref().unwrap_or("an unknown time")
                ),
                NoticeKind::Rebalance => "rebalance recommendation".to_string(),
            }),
        ),
        Some(Halt::Deadline) => (Outcome::Failed, Some("the job's deadline passed".to_string())),
        Some(Halt::Cancelled) => (Outcome::Failed, Some("stopped by a signal".to_string())),
        None if failed.is_empty() => (Outcome::Success, None),
        None => (
            Outcome::Failed,
            Some(format!(
                "{} step{} failed: {}",
                failed.len(),
                if failed.len() == 1 { "" } else { "s" },
                failed.join(", ")
            )),
        ),
    }
}

/// The deadline's last resort, so that a forgotten instance ends itself.
async fn run_shutdown(cmd: Option<Vec<String>>) {
    let cmd = cmd.unwrap_or_else(|| vec!["shutdown".into(), "-h".into(), "now".into()]);
    if let Some((program, args)) = cmd.split_first() {
        let _ = tokio::time::timeout(WIND_DOWN, Command::new(program).args(args).status()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::imds::Notice;

    #[test]
    fn the_result_says_why_the_work_ended() {
        assert_eq!(result(None, &[]), (Outcome::Success, None));
        let failed = ["a:build".to_string(), "b:test:unit".to_string()];
        assert_eq!(
            result(None, &failed),
            (Outcome::Failed, Some("2 steps failed: a:build, b:test:unit".into()))
        );
        let notice = Notice {
            kind: NoticeKind::Interruption,
            action: None,
            time: None,
        };
        assert_eq!(
            result(Some(&Halt::Notice(notice)), &failed),
            (Outcome::Interrupted, Some("spot interruption notice (terminate at an unknown time)".into()))
        );
        assert_eq!(result(Some(&Halt::Deadline), &[]), (Outcome::Failed, Some("the job's deadline passed".into())));
    }
}
