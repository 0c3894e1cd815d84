//! Running the agent: start it detached on the instance, stream its events back (after the
//! last `seq` seen, so a drop loses nothing), reconnect after a drop, and check on an agent
//! that has gone quiet.
//!
//! Liveness: the agent sends a heartbeat every `[remote] agent_heartbeat`. When nothing at
//! all arrives for `[remote] agent_silence`, its process is checked over the transport
//! (bounded by [`AGENT_CHECK_TIMEOUT`]): a dead agent fails the attempt with the end of its
//! log (an agent that never wrote an event never started: an error, not an interruption);
//! a host that does not answer the check is lost; a live agent is followed again.

use std::time::Duration;

use futures::StreamExt;

use super::attempt::{Observation, Phase};
use super::driver::{Attempt, Shipped};
use super::events::{FarmEvent, Origin};
use crate::errors::error_chain;
use crate::protocol::{AgentStarted, AgentStatus, Envelope, Event, NoticeKind, StepKind};
use crate::transport::TransportError;

/// Bound on checking a quiet agent's process over the transport.
pub const AGENT_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

impl Attempt<'_, '_> {
    pub(super) async fn start_and_follow(&mut self, s: &mut Shipped) -> Observation {
        let t = &*s.connected.transport;
        let argv = self.g.agent_argv(&["start", "--job", &s.job_file.to_string_lossy()]);
        match t.exec(&argv, Vec::new()).await {
            Ok(out) => match serde_json::from_slice::<AgentStarted>(&out) {
                Ok(started) => s.agent_pid = Some(started.pid),
                Err(e) => return Observation::Fatal(format!("the agent's start answer is not what this controller speaks: {e}")),
            },
            // It ran and refused: another instance of the same image would refuse too.
            Err(e @ TransportError::Command { .. }) => {
                return Observation::Fatal(format!("the agent failed to start: {e} (hint: the image's spotbuild must match this controller's)"))
            }
            Err(e) => return self.lost_or(&s.connected.instance_id, format!("failed to start the agent: {e}")).await,
        }
        self.say(Phase::Running, format!("agent started (pid {})", s.agent_pid.unwrap_or_default()));
        self.follow(s).await
    }

    /// Streams the agent's events after the last one seen, until its result, a drop, or a
    /// silence that a check of the agent explains.
    pub(super) async fn follow(&mut self, s: &Shipped) -> Observation {
        let t = &*s.connected.transport;
        let after = self.followed.last_seq.to_string();
        let argv = self.g.agent_argv(&["replay", "--events", &s.events_file.to_string_lossy(), "--after", &after, "--follow"]);
        let mut lines = match t.stream(&argv).await {
            Ok(l) => l,
            Err(_) => return Observation::StreamDropped { notice: self.followed.notice },
        };
        let silence = self.g.settings.remote.agent_silence;
        loop {
            let line = match tokio::time::timeout(silence, lines.next()).await {
                Ok(Some(Ok(line))) => line,
                Ok(Some(Err(_)) | None) => return Observation::StreamDropped { notice: self.followed.notice },
                Err(_) => return self.check_agent(s, silence).await,
            };
            let Ok(env) = serde_json::from_str::<Envelope>(&line) else { continue };
            if let Some(outcome) = self.seen(env) {
                return Observation::Result(outcome);
            }
        }
    }

    /// Nothing came for `silence`: is the agent still there?
    async fn check_agent(&mut self, s: &Shipped, silence: Duration) -> Observation {
        let id = &s.connected.instance_id;
        let Some(pid) = s.agent_pid else {
            return Observation::StreamDropped { notice: self.followed.notice };
        };
        self.say(Phase::Running, format!("nothing from the agent for {}s; checking its process {pid}", silence.as_secs()));
        let workdir = s.job_file.parent().map(|d| d.to_string_lossy().to_string()).unwrap_or_default();
        let argv = self.g.agent_argv(&["status", "--pid", &pid.to_string(), "--workdir", &workdir]);
        let answer = tokio::time::timeout(AGENT_CHECK_TIMEOUT, s.connected.transport.exec(&argv, Vec::new())).await;
        let status = match answer {
            Ok(Ok(out)) => match serde_json::from_slice::<AgentStatus>(&out) {
                Ok(status) => status,
                Err(e) => return Observation::Fatal(format!("the agent's status answer is not what this controller speaks: {e}")),
            },
            Ok(Err(e)) => return self.lost_or(id, format!("the host did not answer a check of the agent: {}", error_chain(&e))).await,
            Err(_) => {
                let why = format!("the host did not answer a check of the agent within {}s", AGENT_CHECK_TIMEOUT.as_secs());
                return self.lost_or(id, why).await;
            }
        };
        if status.alive {
            // Alive but quiet (a stalled stream): follow again, from the last event seen.
            return Observation::StreamDropped { notice: self.followed.notice };
        }
        let tail = match status.log_tail.as_slice() {
            [] => "its log is empty".to_string(),
            lines => format!("the end of its log:\n    {}", lines.join("\n    ")),
        };
        let why = if self.followed.last_seq == 0 {
            format!("the agent (pid {pid}) exited before its first event; {tail}")
        } else {
            format!("the agent (pid {pid}) died without a result after event {}; {tail}", self.followed.last_seq)
        };
        Observation::AgentDied(why)
    }

    /// Takes in one event; returns the agent's result if this was it.
    fn seen(&mut self, env: Envelope) -> Option<crate::protocol::Outcome> {
        let f = &mut self.followed;
        // Replays overlap what was seen when a drop cut a line short: skip by seq.
        if env.seq <= f.last_seq {
            return None;
        }
        f.last_seq = env.seq;
        let mut result = None;
        match &env.event {
            Event::Notice { kind: NoticeKind::Interruption, .. } => f.notice = true,
            Event::StepStart { step, kind, .. } => {
                f.step_kinds.insert(step.clone(), *kind);
            }
            Event::StepEnd { step, duration_ms, .. } => {
                let secs = *duration_ms as f64 / 1000.0;
                match f.step_kinds.get(step) {
                    Some(StepKind::Build | StepKind::Push | StepKind::Pull) => self.record.building_seconds += secs,
                    Some(StepKind::Test | StepKind::Run) => self.record.testing_seconds += secs,
                    _ => {}
                }
            }
            Event::Result { outcome, .. } => result = Some(*outcome),
            _ => {}
        }
        (self.g.on_event)(FarmEvent::Agent {
            origin: Origin { group: self.g.group, attempt: self.n },
            envelope: env,
        });
        result
    }

    pub(super) async fn reconnect(&mut self, s: &Shipped) -> Observation {
        let id = &s.connected.instance_id;
        self.say(Phase::Running, format!("event stream dropped after seq {}; reconnecting", self.followed.last_seq));
        // A host that is gone will not come back: ask EC2 before waiting on SSH.
        if let Observation::InstanceEnded { interrupted } = self.lost_or(id, String::new()).await {
            return Observation::InstanceEnded { interrupted };
        }
        match s.connected.transport.reconnect().await {
            Ok(()) => {
                self.say(Phase::Running, format!("reconnected; resuming after seq {}", self.followed.last_seq));
                Observation::Reconnected
            }
            Err(e) => self.lost_or(id, e.to_string()).await,
        }
    }
}
