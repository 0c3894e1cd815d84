//! A whole remote build as one call: [`run`] spreads the work over instance groups, runs
//! attempts (re-planning before each retry, so what an interrupted attempt pushed is not
//! built twice), feeds the spot breaker, tears everything down, and writes the ledger.
//!
//! # Guarantees
//! - Every instance launched is terminated (verified) before `run` returns, whether the
//!   build succeeded, failed, was stopped by `shutdown`, or panicked in one group (the
//!   other groups' instances are torn down too). Teardown searches by the build's tag as
//!   well as by the ids it saw, after every launch still in flight has settled: a launch is
//!   never dropped mid-call.
//! - Every build is in the ledger, whatever its end: an entry (result `running`) and a
//!   heartbeat are written before anything is rented and every `[ledger] heartbeat` after,
//!   with the cost so far; the last write says `success`, `failed`, `gave-up`, `error`,
//!   `timed-out`, `cancelled` or `panicked`.
//! - Recording never fails a build: each ledger write is bounded by
//!   [`LEDGER_WRITE_TIMEOUT`], and a failure is a [`FarmEvent::Note`].
//!
//! # Assumptions
//! - The instance runs the same spotbuild version as the controller (checked when
//!   shipping), and its sshd uses the host key that user data installs.
//!
//! # Caveats
//! - A controller killed with SIGKILL leaves its instances to `spotbuild reap` (their
//!   heartbeat stops) and to their on-instance TTL.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;

use super::connect::Connector;
use super::driver::{self, Group};
use super::events::FarmEvent;
use super::job::{JobOptions, Scope, Work};
use super::record::{now_rfc3339, BuildRecord, BuildResult, EntryContext, Progress, CANCELLED, PANICKED, RUNNING};
use super::retry::{self, Decision};
use super::shared;
use super::spread;
use super::teardown::Teardown;
use crate::cloud::{Cloud, MarketPolicy};
use crate::errors::error_chain;
use crate::ledger::{Beat, BuildEntry, Interruption, LedgerStore};
use crate::plan::planner::{PlanRequest, PlanningError};
use crate::settings::{Config, SettingsConflict};

/// Bound on writing one build's entry to the ledger.
pub const LEDGER_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to build, with what the first plan found.
pub struct BuildRequest {
    pub build_id: String,
    /// The first plan's work (the caller planned to decide whether to rent at all).
    pub work: Work,
    pub settings: Config,
    /// How far the build is trusted: an untrusted one runs with the untrusted instance
    /// profile.
    pub trust: crate::trust::Decision,
    /// The repository's git dir, to bundle the commit from.
    pub git_dir: PathBuf,
    /// The machines' architecture (the AMI and the instance types follow it).
    pub arch: crate::platform::Arch,
    /// How many vCPUs (with `[cloud] sizes`, which sizes the fleet may consider).
    pub cpus: crate::settings::CpuWant,
    /// Spread over up to this many instances [default: `[remote] max_instances`].
    pub max_instances: Option<u32>,
    /// [default: `[cloud] market`]
    pub market: Option<MarketPolicy>,
    /// The whole build's bound.
    pub timeout: Duration,
    /// The CI job's URL, for the instance's `spotbuild:owner` tag and the ledger.
    pub owner: Option<String>,
    /// The branch, for the ledger.
    pub branch: Option<String>,
    /// Where the build's log is archived (the ledger's record says where).
    pub archive: Option<Arc<dyn crate::ledger::archive::LogArchive>>,
}

/// A unique build id that sorts by time: milliseconds since the epoch in base 36, then 64
/// random bits from the OS (CI containers share pids and clocks; two builds never share an
/// id, and so never a ledger entry, a tag or a transport prefix). The launch's
/// idempotency token is made from it.
pub fn new_build_id() -> String {
    let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    // Without OS randomness (not seen on Linux) the id still differs per process and call.
    let random = getrandom::u64().unwrap_or_else(|_| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(ms);
        h.write_u32(std::process::id());
        h.finish()
    });
    format!("{}-{random:016x}", radix36(ms as u64))
}

fn radix36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// Plans the build again, for the attempts after the first.
pub trait Planner: Send + Sync {
    fn plan(&self) -> BoxFuture<'_, Result<Work, PlanningError>>;
}

/// The real planner: the same request as the first plan, at the same commit.
pub struct PlanAgain {
    pub request: PlanRequest,
    pub scope: Scope,
    pub options: JobOptions,
    /// A working-tree build (`watch --remote`): dev tags, no tests.
    pub dev: bool,
}

impl Planner for PlanAgain {
    fn plan(&self) -> BoxFuture<'_, Result<Work, PlanningError>> {
        Box::pin(async move {
            let mut planned = crate::plan::planner::plan(&self.request).await?;
            if self.dev {
                if let Some(client) = &planned.client {
                    crate::watch::as_dev_plan(&mut planned.plan, client).await;
                }
            }
            Ok(super::job::work(&planned, &self.scope, &self.options))
        })
    }
}

/// What a build talks to.
pub struct Deps {
    pub cloud: Arc<dyn Cloud>,
    pub connector: Arc<dyn Connector>,
    /// Where the cost is recorded and interruptions are shared, if anywhere.
    pub ledger: Option<Arc<dyn LedgerStore>>,
    pub planner: Arc<dyn Planner>,
}

/// A signal that stops a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }
}

/// Why a build could not start, or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot rent an instance: [cloud] {} not set in spotbuild.toml", .0.join(", "))]
    MissingSettings(Vec<&'static str>),
    #[error(transparent)]
    NoPools(#[from] crate::settings::NoPools),
    #[error(transparent)]
    LocalDir(#[from] crate::transport::keys::KeyError),
    #[error("failed to plan again before attempt {attempt}")]
    Replan {
        attempt: u32,
        #[source]
        source: PlanningError,
    },
    #[error(transparent)]
    Settings(#[from] SettingsConflict),
    #[error("this build is untrusted ({0}), and no [cloud] untrusted_instance_profile is set: it would run with the trusted instance profile")]
    NoUntrustedProfile(String),
}

/// One instance group's share of the build, and its ledger entry.
#[derive(Debug)]
pub struct GroupOutcome {
    pub record: BuildRecord,
    pub entry: BuildEntry,
}

/// How a build ended. Every instance is torn down by then, whichever it is.
pub enum BuildOutcome {
    Finished {
        groups: Vec<GroupOutcome>,
        /// Where the ledger recorded it, if it did.
        recorded: Option<String>,
    },
    Stopped(StopSignal),
    /// A group panicked (a bug); the caller resumes the panic.
    Panicked(Box<dyn Any + Send>),
}

/// Runs the build. `shutdown` resolving stops it (after teardown).
pub async fn run(
    request: BuildRequest,
    deps: Deps,
    on_event: &(dyn Fn(FarmEvent) + Send + Sync),
    shutdown: impl Future<Output = StopSignal>,
) -> Result<BuildOutcome, BuildError> {
    let mut settings = request.settings.clone();
    let missing = settings.cloud.missing_for_launch();
    if !missing.is_empty() {
        return Err(BuildError::MissingSettings(missing));
    }
    settings.check_remote(request.timeout)?;
    // An untrusted build's instance gets the untrusted profile, which may write only the
    // untrusted namespace. With no profile at all, instances carry no credentials.
    if request.trust.level == crate::trust::Level::Untrusted {
        match (&settings.cloud.instance_profile, &settings.cloud.untrusted_instance_profile) {
            (_, Some(untrusted)) => settings.cloud.instance_profile = Some(untrusted.clone()),
            (Some(_), None) => return Err(BuildError::NoUntrustedProfile(request.trust.reason.clone())),
            (None, None) => {}
        }
        settings.remote.ssm.role_id = settings.remote.ssm.untrusted_role_id.clone();
    }
    let machines = settings.cloud.machines(request.arch, request.cpus)?;
    let work = &request.work;
    // Independent parts of the graph may go to separate instances.
    let max_instances = request.max_instances.unwrap_or(settings.remote.max_instances).max(1) as usize;
    let groups: Vec<Option<Vec<String>>> = match (&work.scope, spread::groups(&work.nodes, max_instances)) {
        (Scope::Build, g) if g.len() > 1 => g.into_iter().map(Some).collect(),
        _ => vec![None],
    };
    let started_at = now_rfc3339();
    let teardown = Teardown::default();
    let deadline = tokio::time::Instant::now() + request.timeout;
    let market = request.market.unwrap_or(settings.cloud.market);
    on_event(FarmEvent::Started {
        build_id: request.build_id.clone(),
        commit: work.commit.clone(),
        trust: request.trust.clone(),
        groups: if groups.len() > 1 { groups.iter().flatten().cloned().collect() } else { Vec::new() },
    });
    let mut plans = Vec::new();
    for (i, only) in groups.iter().enumerate() {
        let group = (groups.len() > 1).then_some(i as u32 + 1);
        let id = match group {
            Some(g) => format!("{}-{g}", request.build_id),
            None => request.build_id.clone(),
        };
        // Before any launch call: whatever carries this id's tag is torn down.
        teardown.watch(&id);
        let local_dir = private_dir(&id).await?;
        plans.push(Group {
            cloud: deps.cloud.clone(),
            connector: &*deps.connector,
            settings: &settings,
            machines: &machines,
            build_id: id,
            group,
            projects: work.builds_for(only.as_deref()),
            commit: work.commit.clone(),
            owner: request.owner.clone(),
            git_dir: request.git_dir.clone(),
            local_dir,
            teardown: teardown.clone(),
            deadline,
            market,
            trust: request.trust.level,
            progress: Progress::default(),
            on_event,
        });
    }
    let book = Book {
        ledger: deps.ledger.as_deref(),
        entries: plans
            .iter()
            .zip(&groups)
            .map(|(g, only)| {
                let cx = EntryContext {
                    kind: work.scope.kind(),
                    projects: work.projects_for(only.as_deref()),
                    branch: request.branch.clone(),
                    ci_job_url: request.owner.clone(),
                    started_at: started_at.clone(),
                    region: settings.cloud.region.clone(),
                    volume_gb: settings.cloud.root_volume_gb,
                    arch: request.arch,
                    log: request.archive.as_ref().map(|a| {
                        let place = a.place(&crate::ledger::archive::LogKey { build_id: g.build_id.clone(), attempt: 0 });
                        place.rsplit_once('/').map(|(dir, _)| format!("{dir}/")).unwrap_or(place)
                    }),
                };
                (g.build_id.clone(), g.progress.clone(), cx)
            })
            .collect(),
        commit: work.commit.clone(),
        warned: AtomicBool::new(false),
        on_event,
    };
    // In the ledger before anything is rented: a build killed at any point is there.
    book.write_progress(RUNNING, false).await;
    let runs = plans.iter().zip(&groups).map(|(g, only)| run_group(g, &deps, work, only.as_deref()));
    let all = std::panic::AssertUnwindSafe(futures::future::join_all(runs)).catch_unwind();
    let ended = tokio::select! {
        r = all => Ended::Done(r),
        signal = shutdown => Ended::Signal(signal),
        never = book.beat(settings.ledger.heartbeat) => match never {},
    };
    // Whatever happened, nothing launched stays up.
    if let Ended::Signal(s) = &ended {
        on_event(FarmEvent::Note {
            group: None,
            message: format!("received {}: terminating this build's instances", s.name()),
        });
    }
    let message = match teardown.all(&*deps.cloud).await {
        Ok(swept) => {
            let mut said = Vec::new();
            if !swept.terminated.is_empty() {
                said.push(format!("terminated {}", swept.terminated.join(", ")));
            }
            if !swept.templates.is_empty() {
                said.push(format!("deleted launch template {}", swept.templates.join(", ")));
            }
            if swept.unsettled > 0 {
                said.push(format!("warning: {} launch(es) had not settled; `spotbuild reap` sweeps what they leave", swept.unsettled));
            }
            (!said.is_empty()).then(|| said.join("; "))
        }
        Err(e) => Some(format!("error: {} (hint: run `spotbuild reap`; the instances also end at their TTL)", error_chain(&e))),
    };
    if let Some(message) = message {
        on_event(FarmEvent::Note { group: None, message });
    }
    for g in &plans {
        let _ = tokio::fs::remove_dir_all(&g.local_dir).await;
    }
    let records = match ended {
        Ended::Signal(s) => {
            book.write_progress(CANCELLED, true).await;
            return Ok(BuildOutcome::Stopped(s));
        }
        Ended::Done(Err(panic)) => {
            book.write_progress(PANICKED, true).await;
            return Ok(BuildOutcome::Panicked(panic));
        }
        Ended::Done(Ok(records)) => records,
    };
    let outcomes: Vec<GroupOutcome> = records
        .into_iter()
        .zip(&book.entries)
        .map(|(record, (_, _, cx))| {
            let entry = record.to_entry(cx);
            GroupOutcome { record, entry }
        })
        .collect();
    let recorded = book.write_final(&outcomes).await;
    Ok(BuildOutcome::Finished { groups: outcomes, recorded })
}

enum Ended {
    Done(std::thread::Result<Vec<BuildRecord>>),
    Signal(StopSignal),
}

/// This group's private directory on this machine. The SSH control socket lives in it,
/// and a Unix socket path must stay short.
async fn private_dir(id: &str) -> Result<PathBuf, BuildError> {
    let mut dir = std::env::temp_dir().join(format!("spotbuild-{id}"));
    if !crate::transport::ssh::short_enough(&dir) {
        dir = PathBuf::from("/tmp").join(format!("spotbuild-{id}"));
    }
    crate::transport::keys::create_private_dir(&dir).await?;
    Ok(dir)
}

/// Where a build is recorded: each group's entry (the cost so far, rewritten as the build
/// goes) and heartbeat.
struct Book<'a> {
    ledger: Option<&'a dyn LedgerStore>,
    /// Per group: its build id, what it has done, and the rest of its entry.
    entries: Vec<(String, Progress, EntryContext)>,
    commit: String,
    /// A failing ledger is said once, not every heartbeat.
    warned: AtomicBool,
    on_event: &'a (dyn Fn(FarmEvent) + Send + Sync),
}

impl Book<'_> {
    /// Every group's entry as it stands, with `result` (an attempt under way is shown
    /// with it too), and a heartbeat (`ended`: the build is over).
    async fn write_progress(&self, result: &str, ended: bool) {
        for (build_id, progress, cx) in &self.entries {
            let entry = cx.entry(build_id, &self.commit, progress.attempt_entries(result), result);
            self.write(&entry, ended).await;
        }
    }

    /// The final entries; returns the ledger's place if all were written.
    async fn write_final(&self, outcomes: &[GroupOutcome]) -> Option<String> {
        let ledger = self.ledger?;
        let mut ok = true;
        for o in outcomes {
            ok &= self.write(&o.entry, true).await;
        }
        ok.then(|| ledger.place())
    }

    /// Every `every`, the entries and heartbeats of a build still running. Never returns.
    async fn beat(&self, every: Duration) -> Infallible {
        if self.ledger.is_none() {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.write_progress(RUNNING, false).await;
        }
    }

    async fn write(&self, entry: &BuildEntry, ended: bool) -> bool {
        let Some(ledger) = self.ledger else { return false };
        let beat = Beat {
            build_id: entry.build_id.clone(),
            at: now_rfc3339(),
            started_at: entry.started_at.clone(),
            ended,
        };
        let write = async {
            ledger.put(entry).await?;
            ledger.beat(&beat).await
        };
        let why = match tokio::time::timeout(LEDGER_WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => error_chain(&e),
            Err(_) => format!("{} did not answer within {}s", ledger.place(), LEDGER_WRITE_TIMEOUT.as_secs()),
        };
        // The last write is always said; a heartbeat's only the first time.
        if ended || !self.warned.swap(true, Ordering::Relaxed) {
            (self.on_event)(FarmEvent::Note {
                group: None,
                message: format!("warning: the build's cost was not recorded: {why}"),
            });
        }
        false
    }
}

/// One group's attempts, until [`retry::after_attempt`] says the build is done.
async fn run_group(g: &Group<'_>, deps: &Deps, work: &Work, only: Option<&[String]>) -> BuildRecord {
    let mut attempts = Vec::new();
    let mut interruptions: Vec<SystemTime> = Vec::new();
    let max = g.settings.remote.max_attempts.max(1);
    let mut error = None;
    let mut n = 1;
    let result = loop {
        let job = if n == 1 {
            work.job_for(only, &g.build_id)
        } else {
            match deps.planner.plan().await {
                Ok(again) => {
                    for w in &again.warnings {
                        (g.on_event)(FarmEvent::Note { group: g.group, message: format!("warning: {w}") });
                    }
                    if !again.any_left(only) {
                        (g.on_event)(FarmEvent::Note {
                            group: g.group,
                            message: "nothing left to do: earlier attempts pushed everything".into(),
                        });
                        break BuildResult::Success;
                    }
                    again.job_for(only, &g.build_id)
                }
                Err(source) => {
                    let e = BuildError::Replan { attempt: n, source };
                    g.say(n, super::attempt::Phase::Done, format!("error: {}", error_chain(&e)));
                    error = Some(Arc::new(e));
                    break BuildResult::Error;
                }
            }
        };
        // Only an attempt that will launch needs the breaker's history.
        if let Some(ledger) = &deps.ledger {
            match shared::recent(&**ledger, g.settings.cloud.spot_breaker.settings()).await {
                Ok(times) => {
                    for t in times {
                        if !interruptions.contains(&t) {
                            interruptions.push(t);
                        }
                    }
                }
                Err(e) => g.say(n, super::attempt::Phase::Launching, format!("warning: could not read shared interruptions: {}", error_chain(&e))),
            }
        }
        let record = driver::run(g, n, job, &interruptions).await;
        g.progress.finish(&record);
        (g.on_event)(FarmEvent::AttemptEnded { group: g.group, record: record.clone() });
        if record.outcome == super::attempt::AttemptOutcome::Interrupted {
            // At the ledger's precision, so reading it back does not count it twice.
            let at = now_rfc3339();
            interruptions.push(humantime::parse_rfc3339(&at).unwrap_or_else(|_| SystemTime::now()));
            if let Some(ledger) = &deps.ledger {
                let i = Interruption {
                    at,
                    build_id: g.build_id.clone(),
                    attempt: record.attempt,
                    instance_type: record.rental.instance_type.clone(),
                    availability_zone: record.rental.availability_zone.clone(),
                };
                if let Err(e) = shared::record(&**ledger, &i).await {
                    g.say(n, super::attempt::Phase::Done, format!("warning: could not share the interruption: {}", error_chain(&e)));
                }
            }
        }
        let decision = retry::after_attempt(&record.outcome, n, max, tokio::time::Instant::now() >= g.deadline);
        attempts.push(record);
        match decision {
            Decision::Retry => n += 1,
            Decision::Finish(result) => break result,
        }
    };
    BuildRecord {
        build_id: g.build_id.clone(),
        commit: g.commit.clone(),
        attempts,
        result,
        error,
    }
}
