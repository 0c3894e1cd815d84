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
/// Returns soon after its `result` event, whatever the metadata service or a step does:
/// the background watches are stopped before the event stream is closed, and a step that
/// does not end when killed is abandoned one [`WIND_DOWN`] later.
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
    let (events, mut writer) = Events::start(out, &events_file, cx.secrets()).map_err(io(&events_file))?;

    let docker = match cx.needs_docker() {
        true => Some(docker::detect(job.cache.builder, job.cache.docker.as_deref()).await),
        false => None,
    };
    let imds = machine::hello(&events, &job.imds, docker.as_ref().and_then(|d| d.as_ref().ok())).await;

    // Background work, stopped by the guards before the event stream closes.
    let heartbeat = machine::heartbeat(events.clone(), Duration::from_secs(job.heartbeat_secs.max(1)));
    let (notice_tx, mut notice_rx) = watch::channel(None);
    let imds_watch = imds.map(|i| machine::watch_notices(i, &job.imds, events.clone(), notice_tx));

    let tools = match docker {
        Some(Ok(d)) => Ok(Some(publish::prepare(d, &cx, &events).await)),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    };
    let (kill_tx, kill_rx) = watch::channel(false);
    let (halt_tx, halt_rx) = watch::channel(false);
    let (salvage_tx, mut salvage_rx) = mpsc::channel::<oneshot::Sender<Option<Duration>>>(1);
    let deadline = cx.deadline;
    let shutdown_command = cx.job.shutdown_command.clone();
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
        worker.failed
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
    let mut shutdown = false;
    // The steps that failed; `None` when the worker was abandoned.
    let failed = loop {
        let armed = async {
            match timer {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // Once halted the policy ignores most signals; not polling them also keeps a
        // finished sleep from firing again. A cancel still matters during a notice's grace.
        let working = state == State::Working;
        let cancellable = working || matches!(state, State::Halted { why: Halt::Notice(_), out_of_time: false });
        let mut salvage_reply = None;
        let mut finished = None;
        let signal = tokio::select! {
            failed = &mut work => {
                finished = Some(failed);
                Signal::WorkFinished
            }
            _ = &mut deadline_sleep, if working => Signal::DeadlineReached,
            _ = &mut cancel, if cancellable => Signal::Cancel,
            Ok(()) = writer.failed.changed(), if working => {
                let Some(why) = writer.failed.borrow_and_update().clone() else { continue };
                Signal::EventsLost(why)
            }
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
        let mut abandon = false;
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
                Effect::Abandon => abandon = true,
            }
        }
        if let Some(reply) = salvage_reply {
            let _ = reply.send(salvage_window);
        }
        if let Some(failed) = finished {
            break Some(failed);
        }
        if abandon {
            break None;
        }
    };
    // The watches hold the event stream open: stop them before closing it.
    drop(heartbeat);
    drop(imds_watch);

    let (outcome, message) = result(state.halt(), failed.as_deref());
    events
        .emit(Event::Result {
            outcome,
            failed_steps: failed.unwrap_or_default(),
            message,
        })
        .await;
    events.flush().await;
    drop(events);
    let _ = writer.task.await;
    if shutdown {
        run_shutdown(shutdown_command).await;
    }
    match state.halt() {
        Some(Halt::EventsLost(why)) => Err(AgentError::EventsLost(why.clone())),
        _ => Ok(outcome),
    }
}

/// The job's outcome and what to say of it; `failed` is `None` when the steps were
/// abandoned.
fn result(halted: Option<&Halt>, failed: Option<&[String]>) -> (Outcome, Option<String>) {
    let abandoned = failed.is_none().then_some("; a step that would not stop was abandoned").unwrap_or_default();
    match (halted, failed.unwrap_or_default()) {
        (Some(Halt::Notice(n)), _) => (
            Outcome::Interrupted,
            Some(match n.kind {
                NoticeKind::Interruption => format!(
                    "spot interruption notice ({} at {}){abandoned}",
                    n.action.as_deref().unwrap_or("terminate"),
                    n.time.as_deref().unwrap_or("an unknown time")
                ),
                NoticeKind::Rebalance => format!("rebalance recommendation{abandoned}"),
            }),
        ),
        (Some(Halt::Deadline), _) => (Outcome::Failed, Some(format!("the job's deadline passed{abandoned}"))),
        (Some(Halt::Cancelled), _) => (Outcome::Failed, Some(format!("stopped by a signal{abandoned}"))),
        (Some(Halt::EventsLost(why)), _) => (Outcome::Failed, Some(format!("{why}{abandoned}"))),
        (None, []) => (Outcome::Success, None),
        (None, failed) => (
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
        assert_eq!(result(None, Some(&[])), (Outcome::Success, None));
        let failed = ["a:build".to_string(), "b:test:unit".to_string()];
        assert_eq!(
            result(None, Some(&failed)),
            (Outcome::Failed, Some("2 steps failed: a:build, b:test:unit".into()))
        );
        let notice = Notice {
            kind: NoticeKind::Interruption,
            action: None,
            time: None,
        };
        assert_eq!(
            result(Some(&Halt::Notice(notice)), Some(&failed)),
            (Outcome::Interrupted, Some("spot interruption notice (terminate at an unknown time)".into()))
        );
        assert_eq!(result(Some(&Halt::Deadline), Some(&[])), (Outcome::Failed, Some("the job's deadline passed".into())));
        assert_eq!(
            result(Some(&Halt::Deadline), None),
            (Outcome::Failed, Some("the job's deadline passed; a step that would not stop was abandoned".into()))
        );
    }
}
