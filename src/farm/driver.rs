//! Drives one attempt: performs the action [`super::attempt::next`] chose, and feeds back
//! what it observed. What the attempt holds is typed by phase (a launched instance has
//! its keys, a connected one its transport), so an action can only use what its phase has.
//!
//! Guarantees: the instance is listed in the build's [`Teardown`] by the launch task itself
//! as soon as EC2 names it; neither `Launch` (it runs to completion) nor `Terminate` (it
//! must happen) is cut short by the build's deadline; the attempt's record is published to
//! the group's [`Progress`] after every action, so the ledger has it whatever happens
//! next; a long wait says every 10 s that it is still waiting.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::attempt::{self, Action, Observation, Phase};
use super::connect::{Connector, Target};
use super::events::{FarmEvent, Origin};
use super::record::{now_rfc3339, AttemptRecord, Progress};
use super::teardown::{terminate_verified, Teardown};
use crate::cloud::{Cloud, MarketPolicy};
use crate::protocol::{Job, StepKind};
use crate::settings::Config;
use crate::transport::{keys, Transport};

/// How often a long wait says it is still waiting.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Bound on closing a connection once its instance is terminated (SSM deletes its objects).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// What every attempt of one instance group shares.
pub struct Group<'a> {
    /// Shared with the launch tasks, which outlive a dropped attempt.
    pub cloud: Arc<dyn Cloud>,
    pub connector: &'a dyn Connector,
    pub settings: &'a Config,
    /// The image and pools every launch of this group asks for (one architecture).
    pub machines: &'a crate::settings::Machines,
    pub build_id: String,
    pub group: Option<u32>,
    /// What this group builds, for the instance's `spotbuild:project` tag.
    pub projects: Vec<String>,
    pub commit: String,
    pub owner: Option<String>,
    /// The repository's git dir, to bundle the commit from.
    pub git_dir: PathBuf,
    /// This group's private directory on this machine (keys, known_hosts, bundle).
    pub local_dir: PathBuf,
    pub teardown: Teardown,
    pub deadline: tokio::time::Instant,
    pub market: MarketPolicy,
    /// How far the build is trusted: its launches say so in their tags.
    pub trust: crate::trust::Level,
    /// What this group has done so far, for the ledger.
    pub progress: Progress,
    pub on_event: &'a (dyn Fn(FarmEvent) + Send + Sync),
}

impl Group<'_> {
    pub fn say(&self, attempt: u32, phase: Phase, detail: impl Into<String>) {
        (self.on_event)(FarmEvent::Phase {
            origin: Origin { group: self.group, attempt },
            phase,
            detail: detail.into(),
        });
    }

    /// The spotbuild binary on the instance, with `agent` and `args`.
    pub fn agent_argv(&self, args: &[&str]) -> Vec<String> {
        std::iter::once(self.settings.remote.agent.to_string_lossy().to_string())
            .chain(std::iter::once("agent".to_string()))
            .chain(args.iter().map(|s| s.to_string()))
            .collect()
    }

    /// The directory of attempt `n` on this machine.
    pub fn attempt_dir(&self, n: u32) -> PathBuf {
        self.local_dir.join(format!("a{n}"))
    }
}

/// The keys an instance is launched with: the client key it authorises, and the public
/// half of the host key it presents (its private half went into the user data).
pub struct AccessKeys {
    pub client: keys::KeyPair,
    pub host_public: String,
}

/// An instance EC2 accepted.
pub struct Launched {
    pub instance: crate::cloud::Launched,
    pub keys: AccessKeys,
}

/// An instance EC2 reports running, at the address it reported.
pub struct Running {
    pub launched: Launched,
    pub address: String,
}

/// An instance the controller can run commands on.
pub struct Connected {
    pub instance_id: String,
    pub transport: Box<dyn Transport>,
}

/// Where the commit and the job landed on the instance, and (once started) the agent.
pub struct Shipped {
    pub connected: Connected,
    pub job_file: PathBuf,
    pub events_file: PathBuf,
    /// The agent's process id on the instance, once `agent start` said it.
    pub agent_pid: Option<u32>,
}

/// What an attempt holds, phase by phase.
pub enum Held {
    Nothing,
    Launched(Launched),
    Running(Running),
    Connected(Connected),
    Shipped(Shipped),
}

impl Held {
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            Held::Nothing => None,
            Held::Launched(l) => Some(&l.instance.instance_id),
            Held::Running(r) => Some(&r.launched.instance.instance_id),
            Held::Connected(c) => Some(&c.instance_id),
            Held::Shipped(s) => Some(&s.connected.instance_id),
        }
    }

    fn transport(&self) -> Option<&dyn Transport> {
        match self {
            Held::Connected(c) => Some(&*c.transport),
            Held::Shipped(s) => Some(&*s.connected.transport),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Held::Nothing => "no instance",
            Held::Launched(_) => "a launched instance",
            Held::Running(_) => "a running instance",
            Held::Connected(_) => "a connection",
            Held::Shipped(_) => "a shipped job",
        }
    }
}

/// What following the agent's events has seen so far (kept across reconnects).
#[derive(Default)]
pub struct Followed {
    pub last_seq: u64,
    pub notice: bool,
    /// What kind each started step is, to add its time to building or testing.
    pub step_kinds: HashMap<String, StepKind>,
}

/// One attempt's working state.
pub struct Attempt<'g, 'a> {
    pub g: &'g Group<'a>,
    pub n: u32,
    pub job: Job,
    pub record: AttemptRecord,
    pub followed: Followed,
    /// Interruptions the breaker counts (other builds' and this one's).
    pub interruptions: &'g [SystemTime],
}

/// Runs attempt `n` of `job` to its end, instance terminated.
pub async fn run<'g>(g: &'g Group<'_>, n: u32, job: Job, interruptions: &'g [SystemTime]) -> AttemptRecord {
    let mut a = Attempt {
        g,
        n,
        job,
        record: AttemptRecord::begin(n),
        followed: Followed::default(),
        interruptions,
    };
    let mut held = Held::Nothing;
    let mut state = attempt::State::new(g.settings.remote.max_reconnects);
    let mut action = attempt::start();
    let mut phase_started = tokio::time::Instant::now();
    loop {
        if let Action::Finish(outcome) = action {
            a.record.phases.push((state.phase, phase_started.elapsed().as_secs_f64()));
            a.record.outcome = outcome;
            a.record.ended_at = now_rfc3339();
            return a.record;
        }
        let before = state.phase;
        // The agent's own events and heartbeats say it is alive while it runs.
        let quiet = matches!(action, Action::StartAndFollow | Action::Resume);
        // A launch runs to its end (its instance must be known to be torn down); a
        // termination must happen. Both are bounded on their own.
        let observation = if matches!(action, Action::Terminate | Action::Launch) {
            progress(g, n, before, quiet, a.act(&action, &mut held)).await
        } else {
            match tokio::time::timeout_at(g.deadline, progress(g, n, before, quiet, a.act(&action, &mut held))).await {
                Ok(o) => o,
                Err(_) => Observation::Deadline,
            }
        };
        let (next_state, next_action) = attempt::next(&state, observation);
        if next_state.phase != before {
            a.record.phases.push((before, phase_started.elapsed().as_secs_f64()));
            phase_started = tokio::time::Instant::now();
        }
        state = next_state;
        action = next_action;
        g.progress.update(&a.record);
    }
}

/// Runs one action; a long wait says every [`PROGRESS_EVERY`] that it is still waiting.
async fn progress(g: &Group<'_>, n: u32, phase: Phase, quiet: bool, act: impl std::future::Future<Output = Observation>) -> Observation {
    tokio::pin!(act);
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            o = &mut act => return o,
            _ = tick.tick(), if !quiet => {
                g.say(n, phase, format!("… still {} after {}s", phase.name(), started.elapsed().as_secs()));
            }
        }
    }
}

impl Attempt<'_, '_> {
    pub fn say(&self, phase: Phase, detail: impl Into<String>) {
        self.g.say(self.n, phase, detail);
    }

    /// Performs `action` with what the attempt holds, leaving in `held` what it holds next.
    async fn act(&mut self, action: &Action, held: &mut Held) -> Observation {
        let current = std::mem::replace(held, Held::Nothing);
        let (next, observation) = match (action, current) {
            (Action::Launch, Held::Nothing) => match self.launch().await {
                Ok(l) => (Held::Launched(l), Observation::Launched),
                Err(o) => (Held::Nothing, o),
            },
            (Action::WaitRunning, Held::Launched(l)) => self.wait_running(l).await,
            (Action::Connect, Held::Running(r)) => self.connect(r).await,
            (Action::Ship, Held::Connected(c)) => self.ship(c).await,
            (Action::StartAndFollow, Held::Shipped(mut s)) => {
                let o = self.start_and_follow(&mut s).await;
                (Held::Shipped(s), o)
            }
            (Action::Resume, Held::Shipped(s)) => {
                let o = self.follow(&s).await;
                (Held::Shipped(s), o)
            }
            (Action::Reconnect, Held::Shipped(s)) => {
                let o = self.reconnect(&s).await;
                (Held::Shipped(s), o)
            }
            // The connection is closed after the instance is terminated (see `terminate`).
            (Action::Collect, h) => {
                self.say(Phase::Collecting, "result received");
                (h, Observation::Collected)
            }
            (Action::Terminate, h) => (Held::Nothing, self.terminate(h).await),
            (action, h) => {
                let why = format!("internal error: {action:?} with {}", h.name());
                (h, Observation::Fatal(why))
            }
        };
        *held = next;
        observation
    }

    async fn connect(&mut self, r: Running) -> (Held, Observation) {
        let id = r.launched.instance.instance_id.clone();
        let target = Target {
            build_id: self.g.build_id.clone(),
            attempt: self.n,
            instance_id: id.clone(),
            address: Some(r.address.clone()),
            client_key: r.launched.keys.client.private_path.clone(),
            host_public: r.launched.keys.host_public.clone(),
            dir: self.g.attempt_dir(self.n),
            role_id: self.g.settings.remote.ssm.role_id.clone(),
        };
        self.say(Phase::Connecting, self.g.connector.describe(&target));
        let started = tokio::time::Instant::now();
        match self.g.connector.connect(&target).await {
            Ok(transport) => {
                self.say(Phase::Connecting, format!("connected after {:.1}s", started.elapsed().as_secs_f64()));
                (Held::Connected(Connected { instance_id: id, transport }), Observation::Connected)
            }
            Err(e) if e.fatal() => (Held::Running(r), Observation::Fatal(crate::errors::error_chain(&e))),
            Err(e) => {
                let o = self.lost_or(&id, crate::errors::error_chain(&e)).await;
                (Held::Running(r), o)
            }
        }
    }

    /// After a transport failure: the instance ending explains it; otherwise the step
    /// failed. EC2 not listing it is not taken as its end (eventual consistency).
    pub async fn lost_or(&self, id: &str, why: String) -> Observation {
        let ids = [id.to_string()];
        match self.g.cloud.describe(&ids).await {
            Ok(seen) => match seen.into_iter().find(|o| o.instance_id == id) {
                Some(o) if o.ending() => Observation::InstanceEnded { interrupted: o.interrupted() },
                _ => Observation::StepFailed(why),
            },
            Err(_) => Observation::StepFailed(why),
        }
    }

    /// Terminates first, then closes the connection (bounded): cleaning up after a
    /// transport (SSM's objects) must never keep an instance billing.
    async fn terminate(&mut self, held: Held) -> Observation {
        if let Some(id) = held.instance_id().map(String::from) {
            self.say(Phase::Terminating, format!("terminating {id}"));
            let started = tokio::time::Instant::now();
            match terminate_verified(&*self.g.cloud, std::slice::from_ref(&id)).await {
                Ok(()) => {
                    self.g.teardown.done(&id);
                    self.say(Phase::Terminating, format!("{id} terminated (verified) in {:.1}s", started.elapsed().as_secs_f64()));
                }
                // Left in the build's teardown list: the caller tries again on the way out.
                Err(e) => self.say(Phase::Terminating, format!("warning: {}", crate::errors::error_chain(&e))),
            }
        }
        if let Some(t) = held.transport() {
            if tokio::time::timeout(CLOSE_TIMEOUT, t.close()).await.is_err() {
                self.say(Phase::Terminating, format!("warning: closing the connection took over {}s; left to the bucket's lifecycle rules", CLOSE_TIMEOUT.as_secs()));
            }
        }
        Observation::Terminated
    }
}
