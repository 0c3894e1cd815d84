//! Running the agent: start it detached on the instance, stream its events back (after the
//! last `seq` seen, so a drop loses nothing), and reconnect after a drop.

use futures::StreamExt;

use super::attempt::{Observation, Phase};
use super::driver::{Attempt, Shipped};
use super::events::{FarmEvent, Origin};
use crate::protocol::{Envelope, Event, NoticeKind, StepKind};

impl Attempt<'_, '_> {
    pub(super) async fn start_and_follow(&mut self, s: &Shipped) -> Observation {
        let t = &*s.connected.transport;
        let argv = self.g.agent_argv(&["start", "--job", &s.job_file.to_string_lossy()]);
        if let Err(e) = t.exec(&argv, Vec::new()).await {
            return self.lost_or(&s.connected.instance_id, format!("failed to start the agent: {e}")).await;
        }
        self.say(Phase::Running, "agent started");
        self.follow(s).await
    }

    /// Streams the agent's events after the last one seen, until its result or a drop.
    pub(super) async fn follow(&mut self, s: &Shipped) -> Observation {
        let t = &*s.connected.transport;
        let after = self.followed.last_seq.to_string();
        let argv = self.g.agent_argv(&["replay", "--events", &s.events_file.to_string_lossy(), "--after", &after, "--follow"]);
        let mut lines = match t.stream(&argv).await {
            Ok(l) => l,
            Err(_) => return Observation::StreamDropped { notice: self.followed.notice },
        };
        while let Some(line) = lines.next().await {
            let Ok(line) = line else { break };
            let Ok(env) = serde_json::from_str::<Envelope>(&line) else { continue };
            if let Some(outcome) = self.seen(env) {
                return Observation::Result(outcome);
            }
        }
        Observation::StreamDropped { notice: self.followed.notice }
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
