//! The controller: rents an instance, ships the commit, runs the agent there, follows its
//! events, and always tears the instance down. One build is a series of attempts; each
//! attempt is the pure state machine in [`attempt`] driven by one loop here.
//!
//! Guarantees: every instance launched is recorded in the [`Teardown`] before anything else
//! happens to it, and terminated (verified) when its attempt ends; whatever escapes (a
//! signal, a panic) is terminated by the caller through the same [`Teardown`]. Every wait
//! is bounded by a setting, and the whole build by an overall deadline.
//! Assumptions: the instance runs the same spotbuild version as the agent (`[remote] agent`),
//! and its sshd uses the host key that user data installs.
//! Caveats: a controller killed with SIGKILL leaves its instance to the on-instance TTL and
//! `spotbuild reap`.

pub mod attempt;
pub mod instance;
pub mod spread;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::LocalBoxFuture;
use futures::StreamExt;
use sha2::Digest;

use crate::cloud::breaker::{self, Breaker, BreakerSettings};
use crate::cloud::launch::{self, ThrottleRetry, WaitError};
use crate::cloud::userdata::UserData;
use crate::cloud::{Cloud, LaunchSpec, Market, MarketPolicy};
use crate::settings::Config;
use crate::protocol::{Envelope, Event, Job, Source};
use crate::settings::TransportKind;
use crate::objects::ObjectStore;
use crate::transport::ssh::{SshTarget, SshTransport};
use crate::transport::ssm::{Commands, SsmTarget, SsmTransport};
use crate::transport::{keys, Cidr, Transport};
use attempt::{Action, AttemptOutcome, Observation, Phase};

/// What the controller tells its reporters; the only interface between them.
#[derive(Debug, Clone)]
pub enum FarmEvent {
    /// An attempt moved to a new phase; `detail` says what happened.
    Phase { attempt: u32, phase: Phase, detail: String },
    /// One of the agent's events, as it sent it.
    Agent { attempt: u32, envelope: Envelope },
    /// An attempt ended.
    AttemptEnded(AttemptRecord),
}

/// One attempt, as the ledger and the final table need it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub market: Option<Market>,
    /// USD per hour: the spot price at launch, or the on-demand list price.
    pub hourly_price: Option<f64>,
    /// The on-demand list price of the same type (what spot is compared with).
    pub on_demand_hourly: Option<f64>,
    /// For on-demand: the spot price of the same pool at launch (the fallback's premium).
    pub spot_reference_hourly: Option<f64>,
    /// RFC 3339.
    pub started_at: String,
    pub ended_at: String,
    #[serde(flatten)]
    pub outcome: AttemptOutcome,
    /// Seconds spent in each phase, in order.
    pub phases: Vec<(Phase, f64)>,
    /// Why this market (e.g. spot failed in every pool).
    pub market_reason: Option<String>,
    /// Bytes of the git bundle shipped, and whether it relied on the baked mirror.
    pub shipped_bytes: Option<u64>,
    pub thin_bundle: Option<bool>,
    /// Seconds the agent spent in build (and push) steps, and in test steps.
    pub building_seconds: f64,
    pub testing_seconds: f64,
}

impl AttemptRecord {
    /// The ledger's form of this attempt.
    pub fn to_entry(&self) -> crate::ledger::AttemptEntry {
        let (outcome, reason) = match &self.outcome {
            AttemptOutcome::Success => ("success", None),
            AttemptOutcome::Failed => ("failed", None),
            AttemptOutcome::Interrupted => ("interrupted", None),
            AttemptOutcome::Lost(r) => ("lost", Some(r.clone())),
            AttemptOutcome::Error(r) => ("error", Some(r.clone())),
        };
        let mut seconds = std::collections::BTreeMap::new();
        for (phase, secs) in &self.phases {
            *seconds.entry(phase_name(*phase).to_string()).or_insert(0.0) += secs;
        }
        seconds.insert("building".into(), self.building_seconds);
        seconds.insert("testing".into(), self.testing_seconds);
        crate::ledger::AttemptEntry {
            attempt: self.attempt,
            instance_id: self.instance_id.clone(),
            instance_type: self.instance_type.clone(),
            availability_zone: self.availability_zone.clone(),
            market: self.market,
            hourly_price: self.hourly_price,
            on_demand_hourly: self.on_demand_hourly,
            spot_reference_hourly: self.spot_reference_hourly,
            started_at: self.started_at.clone(),
            ended_at: self.ended_at.clone(),
            outcome: outcome.into(),
            reason,
            market_reason: self.market_reason.clone(),
            seconds,
        }
    }

    /// Seconds from launch to the end of teardown: what the instance is billed for.
    pub fn instance_seconds(&self) -> Option<f64> {
        let start = humantime::parse_rfc3339(&self.started_at).ok()?;
        let end = humantime::parse_rfc3339(&self.ended_at).ok()?;
        Some(end.duration_since(start).ok()?.as_secs_f64())
    }
}

/// Instances launched and not yet known to be terminated. Shared with the caller, who
/// terminates whatever is left on every way out (signal, panic, error).
#[derive(Clone, Default)]
pub struct Teardown {
    ids: Arc<Mutex<BTreeSet<String>>>,
}

impl Teardown {
    pub fn add(&self, id: &str) {
        self.ids.lock().expect("not poisoned").insert(id.to_string());
    }
    pub fn done(&self, id: &str) {
        self.ids.lock().expect("not poisoned").remove(id);
    }
    pub fn pending(&self) -> Vec<String> {
        self.ids.lock().expect("not poisoned").iter().cloned().collect()
    }
    /// Terminates (and verifies) everything still listed.
    pub async fn all(&self, cloud: &dyn Cloud) -> Result<Vec<String>, String> {
        let ids = self.pending();
        if !ids.is_empty() {
            terminate_verified(cloud, &ids).await?;
            for id in &ids {
                self.done(id);
            }
        }
        Ok(ids)
    }
}

/// Terminates `ids` and sees them ending, trying up to three times, each bounded.
async fn terminate_verified(cloud: &dyn Cloud, ids: &[String]) -> Result<(), String> {
    let mut last = String::new();
    for round in 0..3u32 {
        match tokio::time::timeout(Duration::from_secs(60), cloud.terminate(ids)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 60s".into(),
        }
        tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(round))).await;
    }
    Err(format!("failed to terminate {}: {last}", ids.join(", ")))
}

/// Gives the job for the next attempt: the plan is made again each time so that what an
/// interrupted attempt pushed is not built twice. `None`: nothing is left to do.
pub trait Jobs {
    fn next_job(&mut self, attempt: u32) -> LocalBoxFuture<'_, Result<Option<Job>, String>>;
}

/// What the controller needs besides the job.
pub struct Controller {
    pub cloud: Arc<dyn Cloud>,
    pub config: Config,
    pub build_id: String,
    pub project: String,
    pub commit: String,
    pub owner: Option<String>,
    /// The repository's git dir, to bundle the commit from.
    pub git_dir: PathBuf,
    /// This build's private directory on this machine (keys, known_hosts, bundle).
    pub local_dir: PathBuf,
    pub teardown: Teardown,
    pub deadline: tokio::time::Instant,
    /// Interruptions seen recently (for the breaker); this build's are added.
    pub interruptions: Vec<SystemTime>,
    pub breaker: BreakerSettings,
    pub market: MarketPolicy,
    /// The SSM API and the bucket, when `[remote] transport = "ssm"`.
    pub ssm: Option<SsmClients>,
    /// Where interruptions are shared with other CI jobs' breakers.
    pub ledger: Option<Arc<dyn crate::ledger::LedgerStore>>,
    pub on_event: Box<dyn Fn(FarmEvent) + Send + Sync>,
}

/// What the SSM transport talks to.
#[derive(Clone)]
pub struct SsmClients {
    pub commands: Arc<dyn Commands>,
    pub objects: Arc<dyn ObjectStore>,
}

/// How a whole build ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildRecord {
    pub build_id: String,
    pub commit: String,
    pub attempts: Vec<AttemptRecord>,
    pub result: BuildResult,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildResult {
    Success,
    Failed,
    /// Every attempt was interrupted or lost.
    GaveUp,
    Error,
}

impl Controller {
    pub async fn run(&mut self, jobs: &mut dyn Jobs) -> BuildRecord {
        let mut attempts = Vec::new();
        let max = self.config.remote.max_attempts.max(1);
        let mut result = BuildResult::GaveUp;
        for n in 1..=max {
            let job = match jobs.next_job(n).await {
                Ok(Some(job)) => job,
                Ok(None) => {
                    result = BuildResult::Success;
                    break;
                }
                Err(e) => {
                    (self.on_event)(FarmEvent::Phase { attempt: n, phase: Phase::Done, detail: format!("error: {e}") });
                    result = BuildResult::Error;
                    break;
                }
            };
            // Only an attempt that will launch needs the breaker's history.
            self.shared_interruptions(n).await;
            let record = self.attempt(n, job).await;
            (self.on_event)(FarmEvent::AttemptEnded(record.clone()));
            let outcome = record.outcome.clone();
            attempts.push(record);
            match outcome {
                AttemptOutcome::Success => {
                    result = BuildResult::Success;
                    break;
                }
                AttemptOutcome::Failed => {
                    result = BuildResult::Failed;
                    break;
                }
                AttemptOutcome::Error(_) => {
                    result = BuildResult::Error;
                    break;
                }
                AttemptOutcome::Interrupted => {
                    // At the ledger's precision, so reading it back does not count it twice.
                    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                    let at = humantime::parse_rfc3339(&now).unwrap_or_else(|_| SystemTime::now());
                    self.interruptions.push(at);
                    self.share_interruption(at, attempts.last().expect("just pushed")).await;
                }
                AttemptOutcome::Lost(_) => {}
            }
            if tokio::time::Instant::now() >= self.deadline {
                result = BuildResult::Error;
                break;
            }
        }
        BuildRecord {
            build_id: self.build_id.clone(),
            commit: self.commit.clone(),
            attempts,
            result,
        }
    }

    async fn attempt(&self, n: u32, job: Job) -> AttemptRecord {
        let mut run = Run {
            c: self,
            n,
            job,
            launched: None,
            address: None,
            host_public: None,
            client_key: None,
            transport: None,
            last_seq: 0,
            notice: false,
            record: AttemptRecord {
                attempt: n,
                instance_id: None,
                instance_type: None,
                availability_zone: None,
                market: None,
                hourly_price: None,
                on_demand_hourly: None,
                spot_reference_hourly: None,
                started_at: now_rfc3339(),
                ended_at: String::new(),
                outcome: AttemptOutcome::Error("unfinished".into()),
                phases: Vec::new(),
                market_reason: None,
                shipped_bytes: None,
                thin_bundle: None,
                building_seconds: 0.0,
                testing_seconds: 0.0,
            },
            step_kinds: Default::default(),
        };
        let mut state = attempt::State::new(self.config.remote.max_reconnects);
        let mut action = attempt::start();
        let mut phase_started = tokio::time::Instant::now();
        loop {
            if let Action::Finish(outcome) = action {
                run.record.phases.push((state.phase, phase_started.elapsed().as_secs_f64()));
                run.record.outcome = outcome;
                run.record.ended_at = now_rfc3339();
                return run.record;
            }
            let before = state.phase;
            let phase = state.phase;
            let quiet = matches!(action, Action::StartAndFollow | Action::Resume);
            let observation = if matches!(action, Action::Terminate) {
                // Teardown is not bounded by the build's deadline: it must happen.
                self.progress(n, phase, quiet, run.act(&action)).await
            } else {
                match tokio::time::timeout_at(self.deadline, self.progress(n, phase, quiet, run.act(&action))).await {
                    Ok(o) => o,
                    Err(_) => Observation::Deadline,
                }
            };
            let (next_state, next_action) = attempt::next(&state, observation);
            if next_state.phase != before {
                run.record.phases.push((before, phase_started.elapsed().as_secs_f64()));
                phase_started = tokio::time::Instant::now();
            }
            state = next_state;
            action = next_action;
        }
    }

    /// Adds the interruptions other builds recorded in the ledger (bounded: a slow ledger
    /// must not hold up a build; without it, only this build's own count).
    async fn shared_interruptions(&mut self, n: u32) {
        let Some(ledger) = self.ledger.clone() else { return };
        let since = SystemTime::now() - (self.breaker.window + self.breaker.cooldown);
        match tokio::time::timeout(Duration::from_secs(10), ledger.interruptions(since)).await {
            Ok(Ok(times)) => {
                for t in times {
                    if !self.interruptions.contains(&t) {
                        self.interruptions.push(t);
                    }
                }
            }
            Ok(Err(e)) => self.say(n, Phase::Launching, format!("warning: could not read shared interruptions: {e}")),
            Err(_) => self.say(n, Phase::Launching, format!("warning: {} did not answer within 10s; breaker uses this build's interruptions only", ledger.place())),
        }
    }

    async fn share_interruption(&self, at: SystemTime, record: &AttemptRecord) {
        let Some(ledger) = &self.ledger else { return };
        let i = crate::ledger::Interruption {
            at: humantime::format_rfc3339_millis(at).to_string(),
            build_id: self.build_id.clone(),
            attempt: record.attempt,
            instance_type: record.instance_type.clone(),
            availability_zone: record.availability_zone.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(10), ledger.record_interruption(&i)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.say(record.attempt, Phase::Done, format!("warning: could not share the interruption: {e}")),
            Err(_) => self.say(record.attempt, Phase::Done, format!("warning: {} did not answer within 10s", ledger.place())),
        }
    }

    /// Runs one action; a long wait says every 10 s that it is still waiting (the agent's
    /// own events and heartbeats do that while it runs, hence `quiet`).
    async fn progress(&self, n: u32, phase: Phase, quiet: bool, act: impl std::future::Future<Output = Observation>) -> Observation {
        tokio::pin!(act);
        let every = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let mut tick = tokio::time::interval_at(started + every, every);
        loop {
            tokio::select! {
                o = &mut act => return o,
                _ = tick.tick(), if !quiet => {
                    self.say(n, phase, format!("… still {} after {}s", phase_name(phase), started.elapsed().as_secs()));
                }
            }
        }
    }

    fn say(&self, attempt: u32, phase: Phase, detail: impl Into<String>) {
        (self.on_event)(FarmEvent::Phase {
            attempt,
            phase,
            detail: detail.into(),
        });
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// One attempt's working state.
struct Run<'c> {
    c: &'c Controller,
    n: u32,
    job: Job,
    launched: Option<crate::cloud::Launched>,
    address: Option<String>,
    host_public: Option<String>,
    client_key: Option<keys::KeyPair>,
    transport: Option<Box<dyn Transport>>,
    last_seq: u64,
    notice: bool,
    record: AttemptRecord,
    /// What kind each started step is, to add its time to building or testing.
    step_kinds: std::collections::HashMap<String, crate::protocol::StepKind>,
}

impl Run<'_> {
    fn instance_id(&self) -> Option<String> {
        self.launched.as_ref().map(|l| l.instance_id.clone())
    }

    fn remote(&self) -> &crate::settings::RemoteConfig {
        &self.c.config.remote
    }

    fn agent_argv(&self, args: &[&str]) -> Vec<String> {
        std::iter::once(self.remote().agent.to_string_lossy().to_string())
            .chain(std::iter::once("agent".to_string()))
            .chain(args.iter().map(|s| s.to_string()))
            .collect()
    }

    async fn act(&mut self, action: &Action) -> Observation {
        match action {
            Action::Launch => self.launch().await,
            Action::WaitRunning => self.wait_running().await,
            Action::Connect => self.connect().await,
            Action::Ship => self.ship().await,
            Action::StartAndFollow => self.start_and_follow().await,
            Action::Reconnect => self.reconnect().await,
            Action::Resume => self.follow().await,
            Action::Collect => {
                if let Some(t) = &self.transport {
                    t.close().await;
                }
                Observation::Collected
            }
            Action::Terminate => self.terminate().await,
            Action::Finish(_) => unreachable!("handled by the driver"),
        }
    }

    async fn launch(&mut self) -> Observation {
        let c = self.c;
        let cfg = &c.config.cloud;
        let dir = c.local_dir.join(format!("a{}", self.n));
        let client = match keys::generate(&dir, "id_ed25519", &format!("spotbuild-{}", c.build_id)).await {
            Ok(k) => k,
            Err(e) => return Observation::Fatal(e.to_string()),
        };
        let host = match keys::generate(&dir, "host_ed25519", &format!("host-{}-{}", c.build_id, self.n)).await {
            Ok(k) => k,
            Err(e) => return Observation::Fatal(e.to_string()),
        };
        let host_private = match host.private_pem() {
            Ok(k) => k,
            Err(e) => return Observation::Fatal(format!("failed to read the host key: {e}")),
        };
        let user_data = UserData {
            ttl: cfg.ttl,
            user: &self.c.config.remote.user,
            authorized_key: &client.public,
            host_private_key: &host_private,
        }
        .render();
        let user_data = match user_data {
            Ok(u) => u,
            Err(e) => return Observation::Fatal(e.to_string()),
        };
        // The private host key is only needed inside the user data.
        let _ = std::fs::remove_file(&host.private_path);
        self.host_public = Some(host.public.clone());
        self.client_key = Some(client);
        let Some(image) = cfg.image() else {
            return Observation::Fatal("no [cloud] ami is set".into());
        };
        let spec = LaunchSpec {
            build_id: c.build_id.clone(),
            project: c.project.clone(),
            commit: c.commit.clone(),
            owner: c.owner.clone(),
            expires_at: SystemTime::now() + cfg.ttl,
            image,
            instance_profile: cfg.instance_profile.clone(),
            security_groups: cfg.security_groups.clone(),
            root_volume_gb: cfg.root_volume_gb,
            pools: cfg.pools(),
            max_spot_price_per_vcpu_hour: cfg.max_spot_price_per_vcpu_hour,
            user_data,
            extra_tags: cfg.tags.clone(),
        };
        let breaker = breaker::state(&c.interruptions, SystemTime::now(), c.breaker);
        if let Breaker::Open { until, .. } = breaker {
            c.say(self.n, Phase::Launching, format!("spot breaker open until {}: on-demand only", humantime::format_rfc3339_seconds(until)));
        }
        c.say(self.n, Phase::Launching, format!("requesting one instance from {} pools ({})", spec.pools.len(), c.market_label()));
        match launch::launch(&*c.cloud, &spec, c.market, breaker, ThrottleRetry::default()).await {
            Ok(report) => {
                let l = report.launched.clone();
                // Recorded before anything else can fail.
                c.teardown.add(&l.instance_id);
                let region = cfg.region.clone().unwrap_or_else(|| "us-east-1".into());
                let on_demand = crate::cloud::prices::on_demand_hourly(&region, &l.pool.instance_type);
                // The pool's spot price at launch: what a spot attempt pays, and what an
                // on-demand fallback is compared with.
                let spot = match &l.availability_zone {
                    Some(az) => c.cloud.spot_price(&l.pool.instance_type, az).await.ok().flatten(),
                    None => None,
                };
                let price = match l.market {
                    Market::OnDemand => on_demand,
                    Market::Spot => spot,
                };
                self.record.on_demand_hourly = on_demand;
                self.record.spot_reference_hourly = if l.market == Market::OnDemand { spot } else { None };
                self.record.instance_id = Some(l.instance_id.clone());
                self.record.instance_type = Some(l.pool.instance_type.clone());
                self.record.availability_zone = l.availability_zone.clone();
                self.record.market = Some(l.market);
                self.record.hourly_price = price;
                self.record.market_reason = report.why.clone();
                let mut detail = format!(
                    "fulfilled {} · {} {} · after {:.1}s",
                    l.instance_id,
                    l.pool,
                    l.market,
                    report.fulfilled_after.as_secs_f64()
                );
                if let Some(why) = &report.why {
                    detail.push_str(&format!(" ({why})"));
                }
                c.say(self.n, Phase::Launching, detail);
                for f in &l.pool_failures {
                    c.say(self.n, Phase::Launching, format!("pool failed: {f}"));
                }
                self.launched = Some(l);
                Observation::Launched
            }
            Err(e) => {
                let mut msg = e.to_string();
                if let Some(h) = e.hint() {
                    msg.push_str(&format!(" (hint: {h})"));
                }
                Observation::LaunchFailed(msg)
            }
        }
    }

    async fn wait_running(&mut self) -> Observation {
        let id = self.instance_id().expect("launched");
        let limit = self.c.config.cloud.running_timeout;
        self.c.say(self.n, Phase::Booting, format!("waiting for {id} to run (up to {})", humantime::format_duration(limit)));
        match launch::wait_running(&*self.c.cloud, &id, limit, Duration::from_millis(500)).await {
            Ok((seen, after)) => {
                self.address = seen.private_ip.clone().or_else(|| self.launched.as_ref().and_then(|l| l.private_ip.clone()));
                match &self.address {
                    Some(a) => {
                        self.c.say(self.n, Phase::Booting, format!("{id} running at {a} after {:.1}s", after.as_secs_f64()));
                        Observation::Running
                    }
                    None => Observation::StepFailed(format!("{id} has no private address")),
                }
            }
            Err(WaitError::Ended { reason, .. }) => Observation::InstanceEnded {
                interrupted: reason.as_deref().is_some_and(|r| r.starts_with("Server.SpotInstance")),
            },
            Err(e) => Observation::StepFailed(e.to_string()),
        }
    }

    async fn connect(&mut self) -> Observation {
        match self.remote().transport {
            TransportKind::Ssh => self.connect_ssh().await,
            TransportKind::Ssm => self.connect_ssm().await,
        }
    }

    async fn connect_ssh(&mut self) -> Observation {
        let remote = self.remote().clone();
        let address = self.address.clone().expect("running");
        let allowed: Result<Vec<Cidr>, String> = remote.allow_cidrs.iter().map(|c| c.parse()).collect();
        let allowed = match allowed {
            Ok(a) => a,
            Err(e) => return Observation::Fatal(format!("bad [remote] allow_cidrs: {e}")),
        };
        if let Err(e) = crate::transport::check_allowed(&address, &allowed) {
            return Observation::Fatal(e.to_string());
        }
        let dir = self.c.local_dir.join(format!("a{}", self.n));
        let known_hosts = dir.join("known_hosts");
        if let Err(e) = keys::write_known_hosts(&known_hosts, &address, remote.ssh_port, self.host_public.as_deref().unwrap_or_default()) {
            return Observation::Fatal(e.to_string());
        }
        self.c.say(self.n, Phase::Connecting, format!("ssh {}@{address} (host key pinned; up to {})", remote.user, humantime::format_duration(remote.connect_timeout)));
        let started = tokio::time::Instant::now();
        let target = SshTarget {
            host: address.clone(),
            port: remote.ssh_port,
            user: remote.user.clone(),
            key: self.client_key.as_ref().expect("generated at launch").private_path.clone(),
            known_hosts,
            dir,
            connect_timeout: remote.connect_timeout,
        };
        match SshTransport::connect(target).await {
            Ok(t) => {
                self.transport = Some(Box::new(t));
                self.c.say(self.n, Phase::Connecting, format!("connected after {:.1}s", started.elapsed().as_secs_f64()));
                Observation::Connected
            }
            Err(e) => self.lost_or(e.to_string()).await,
        }
    }

    /// SSM needs no address and no inbound port: the instance's SSM agent polls for
    /// commands, and bytes go through the bucket.
    async fn connect_ssm(&mut self) -> Observation {
        let remote = self.remote().clone();
        let Some(clients) = self.c.ssm.clone() else {
            return Observation::Fatal("[remote] transport = \"ssm\" but no SSM client was set up".into());
        };
        let id = self.instance_id().expect("launched");
        self.c.say(
            self.n,
            Phase::Connecting,
            format!("ssm {id} via s3://{}/{} (up to {})", clients.objects.bucket(), remote.ssm.prefix, humantime::format_duration(remote.connect_timeout)),
        );
        let started = tokio::time::Instant::now();
        let target = SsmTarget {
            instance_id: id,
            prefix: format!("{}/{}/a{}", remote.ssm.prefix.trim_end_matches('/'), self.c.build_id, self.n),
            agent: remote.agent.clone(),
            region: self.c.config.cloud.region.clone(),
            connect_timeout: remote.connect_timeout,
            command_timeout: remote.ssm.command_timeout,
            stream_timeout: self.c.config.cloud.ttl,
            follow: Default::default(),
        };
        match SsmTransport::connect(target, clients.commands, clients.objects).await {
            Ok(t) => {
                self.transport = Some(Box::new(t));
                self.c.say(self.n, Phase::Connecting, format!("the instance answered after {:.1}s", started.elapsed().as_secs_f64()));
                Observation::Connected
            }
            Err(e) => self.lost_or(e.to_string()).await,
        }
    }

    /// After a transport failure: the instance ending explains it; otherwise the step failed.
    async fn lost_or(&self, why: String) -> Observation {
        let Some(id) = self.instance_id() else { return Observation::StepFailed(why) };
        match self.c.cloud.describe(std::slice::from_ref(&id)).await {
            Ok(seen) => match seen.into_iter().find(|o| o.instance_id == id) {
                Some(o) if !o.ending() => Observation::StepFailed(why),
                Some(o) => Observation::InstanceEnded { interrupted: o.interrupted() },
                None => Observation::InstanceEnded { interrupted: false },
            },
            Err(_) => Observation::StepFailed(why),
        }
    }

    async fn ship(&mut self) -> Observation {
        let t = self.transport.as_ref().expect("connected");
        let remote = self.c.config.remote.clone();
        let started = tokio::time::Instant::now();
        let info = t.exec(&self.agent_argv(&["info", "--mirror", &remote.mirror.to_string_lossy()]), Vec::new()).await;
        let info: serde_json::Value = match info {
            Ok(out) => serde_json::from_slice(&out).unwrap_or_default(),
            Err(e) => return self.lost_or(format!("the agent did not answer: {e}")).await,
        };
        let mirror_commit = info["mirror_commit"].as_str().map(String::from);
        let bundle = self.c.local_dir.join(format!("a{}", self.n)).join("commit.bundle");
        let (git_dir, commit) = (self.c.git_dir.clone(), self.job.commit.clone());
        let (have, out) = (mirror_commit.clone(), bundle.clone());
        let thin = tokio::task::spawn_blocking(move || crate::git::create_bundle(&git_dir, &commit, have.as_deref(), &out)).await;
        let thin = match thin {
            Ok(Ok(thin)) => thin,
            Ok(Err(e)) => return Observation::Fatal(crate::errors::error_chain(&e)),
            Err(e) => return Observation::Fatal(format!("bundling panicked: {e}")),
        };
        let bytes = match std::fs::read(&bundle) {
            Ok(b) => b,
            Err(e) => return Observation::Fatal(format!("failed to read the bundle: {e}")),
        };
        let _ = std::fs::remove_file(&bundle);
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let workdir = remote.workdir.join(&self.c.build_id).join(format!("a{}", self.n));
        let remote_bundle = workdir.join("commit.bundle");
        let size = bytes.len() as u64;
        let argv = self.agent_argv(&["receive", "--to", &remote_bundle.to_string_lossy(), "--sha256", &sha]);
        if let Err(e) = t.exec(&argv, bytes).await {
            return self.lost_or(format!("failed to ship the commit: {e}")).await;
        }
        self.record.shipped_bytes = Some(size);
        self.record.thin_bundle = Some(thin);
        // The job names where things are on the instance; its secrets travel on stdin.
        self.job.source = Source::Bundle {
            path: remote_bundle,
            mirror: thin.then(|| remote.mirror.clone()),
        };
        self.job.events_file = Some(workdir.join("events.ndjson"));
        self.job.workdir = workdir.clone();
        if let Some(cmd) = &remote.shutdown_command {
            self.job.shutdown_command = Some(cmd.clone());
        }
        let spec = serde_json::to_vec(&self.job).expect("a job always serialises");
        let argv = self.agent_argv(&["receive", "--to", &workdir.join("job.json").to_string_lossy()]);
        if let Err(e) = t.exec(&argv, spec).await {
            return self.lost_or(format!("failed to ship the job: {e}")).await;
        }
        self.c.say(
            self.n,
            Phase::Shipping,
            format!(
                "shipped {} ({}) in {:.1}s",
                human_bytes(size),
                if thin { format!("only what the mirror at {} lacks", short(mirror_commit.as_deref().unwrap_or(""))) } else { "full history".into() },
                started.elapsed().as_secs_f64()
            ),
        );
        Observation::Shipped
    }

    async fn start_and_follow(&mut self) -> Observation {
        let t = self.transport.as_ref().expect("connected");
        let job = self.job.workdir.join("job.json");
        if let Err(e) = t.exec(&self.agent_argv(&["start", "--job", &job.to_string_lossy()]), Vec::new()).await {
            return self.lost_or(format!("failed to start the agent: {e}")).await;
        }
        self.c.say(self.n, Phase::Running, "agent started");
        self.follow().await
    }

    /// Streams the agent's events after the last one seen, until its result or a drop.
    async fn follow(&mut self) -> Observation {
        let t = self.transport.as_ref().expect("connected");
        let events = self.job.events_file.clone().expect("set when shipping");
        let after = self.last_seq.to_string();
        let argv = self.agent_argv(&["replay", "--events", &events.to_string_lossy(), "--after", &after, "--follow"]);
        let mut lines = match t.stream(&argv).await {
            Ok(l) => l,
            Err(_) => return Observation::StreamDropped { notice: self.notice },
        };
        while let Some(line) = lines.next().await {
            let Ok(line) = line else { break };
            let Ok(env) = serde_json::from_str::<Envelope>(&line) else { continue };
            // Replays overlap what was seen when a drop cut a line short: skip by seq.
            if env.seq <= self.last_seq {
                continue;
            }
            self.last_seq = env.seq;
            if matches!(env.event, Event::Notice { kind: crate::protocol::NoticeKind::Interruption, .. }) {
                self.notice = true;
            }
            match &env.event {
                Event::StepStart { step, kind, .. } => {
                    self.step_kinds.insert(step.clone(), *kind);
                }
                Event::StepEnd { step, duration_ms, .. } => {
                    use crate::protocol::StepKind;
                    let secs = *duration_ms as f64 / 1000.0;
                    match self.step_kinds.get(step) {
                        Some(StepKind::Build | StepKind::Push | StepKind::Pull) => self.record.building_seconds += secs,
                        Some(StepKind::Test | StepKind::Run) => self.record.testing_seconds += secs,
                        _ => {}
                    }
                }
                _ => {}
            }
            let result = match &env.event {
                Event::Result { outcome, .. } => Some(*outcome),
                _ => None,
            };
            (self.c.on_event)(FarmEvent::Agent { attempt: self.n, envelope: env });
            if let Some(outcome) = result {
                return Observation::Result(outcome);
            }
        }
        Observation::StreamDropped { notice: self.notice }
    }

    async fn reconnect(&mut self) -> Observation {
        self.c.say(self.n, Phase::Running, format!("event stream dropped after seq {}; reconnecting", self.last_seq));
        // A host that is gone will not come back: ask EC2 before waiting on SSH.
        if let Observation::InstanceEnded { interrupted } = self.lost_or(String::new()).await {
            return Observation::InstanceEnded { interrupted };
        }
        let t = self.transport.as_ref().expect("connected");
        match t.reconnect().await {
            Ok(()) => {
                self.c.say(self.n, Phase::Running, format!("reconnected; resuming after seq {}", self.last_seq));
                Observation::Reconnected
            }
            Err(e) => self.lost_or(e.to_string()).await,
        }
    }

    async fn terminate(&mut self) -> Observation {
        if let Some(t) = self.transport.take() {
            t.close().await;
        }
        let Some(id) = self.instance_id() else { return Observation::Terminated };
        let started = tokio::time::Instant::now();
        match terminate_verified(&*self.c.cloud, std::slice::from_ref(&id)).await {
            Ok(_) => {
                self.c.teardown.done(&id);
                self.c.say(self.n, Phase::Terminating, format!("{id} terminated (verified) in {:.1}s", started.elapsed().as_secs_f64()));
            }
            // Left in the build's teardown list: the caller tries again on the way out.
            Err(e) => self.c.say(self.n, Phase::Terminating, format!("warning: {e}")),
        }
        Observation::Terminated
    }
}

impl Controller {
    fn market_label(&self) -> &'static str {
        match self.market {
            MarketPolicy::Spot => "spot only",
            MarketPolicy::OnDemand => "on-demand only",
            MarketPolicy::SpotThenOnDemand => "spot, then on-demand",
        }
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Launching => "launching",
        Phase::Booting => "booting",
        Phase::Connecting => "connecting",
        Phase::Shipping => "shipping",
        Phase::Running => "running",
        Phase::Collecting => "collecting",
        Phase::Terminating => "terminating",
        Phase::Done => "done",
    }
}

fn short(c: &str) -> &str {
    c.get(..12).unwrap_or(c)
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
