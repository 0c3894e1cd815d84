//! Driver tests: a whole [`super::run`] against a fake cloud, a fake transport and a fake
//! planner, under a paused clock. No root, Docker or emulator: only `git` (the commit is
//! bundled for real) and `ssh-keygen` (the attempt's keys are made for real).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;

use super::attempt::Phase;
use super::build::{BuildOutcome, BuildRequest, Deps, Planner, StopSignal};
use super::connect::{ConnectError, Connector, Target};
use super::events::FarmEvent;
use super::job::{Scope, Work};
use super::record::BuildResult;
use super::spread::Node;
use crate::cli::error::Exit;
use crate::cloud::{tags, Cloud, CloudFailure, InstanceState, LaunchSpec, Launched, Market, Observed};
use crate::plan::planner::PlanningError;
use crate::protocol::{BuilderChoice, CacheSettings, ImdsSettings, Job, JobRegistry, Source, VERSION};
use crate::settings::{AuthMode, Config};
use crate::transport::{Lines, Transport, TransportError};

/// One instance of the fake EC2.
struct FakeInstance {
    state: InstanceState,
    reason: Option<String>,
    build_id: String,
    attempt: u32,
    /// Until when EC2 does not list it yet (eventual consistency).
    hidden_until: tokio::time::Instant,
}

/// EC2 as a map of instances; it can be told to reclaim one, to take its time launching,
/// to lose launch answers, or to list new instances only after a while.
#[derive(Default)]
struct FakeCloud {
    instances: Mutex<BTreeMap<String, FakeInstance>>,
    launched: Mutex<Vec<String>>,
    terminated: Mutex<BTreeSet<String>>,
    /// Build ids with a launch template left.
    templates: Mutex<BTreeSet<String>>,
    /// Called on each terminate call (a test stops the build in teardown with it).
    on_terminate: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// How long a launch call takes (a signal can arrive meanwhile).
    launch_takes: Mutex<Duration>,
    /// How many launches start an instance but lose their answer.
    lose_answers: Mutex<u32>,
    /// How long a new instance is not listed.
    hidden_for: Mutex<Duration>,
    /// Searches by tag fail (throttled) until the launch has settled (its template deleted).
    find_fails_while_launching: std::sync::atomic::AtomicBool,
    /// Idempotency tokens seen, and the instance each launched (as EC2 keeps them).
    tokens: Mutex<BTreeMap<String, String>>,
    /// The instance profile of each launch call.
    profiles: Mutex<Vec<Option<String>>>,
}

impl FakeCloud {
    fn reclaim(&self, id: &str) {
        if let Some(i) = self.instances.lock().unwrap().get_mut(id) {
            i.state = InstanceState::ShuttingDown;
            i.reason = Some("Server.SpotInstanceTermination: Spot instance termination".to_string());
        }
    }
    fn launched(&self) -> Vec<String> {
        self.launched.lock().unwrap().clone()
    }
    /// Launched and never terminated.
    fn leaked(&self) -> Vec<String> {
        let terminated = self.terminated.lock().unwrap();
        self.launched().into_iter().filter(|id| !terminated.contains(id)).collect()
    }
    fn observed(&self, id: &str) -> Observed {
        let instances = self.instances.lock().unwrap();
        match instances.get(id) {
            Some(i) if tokio::time::Instant::now() >= i.hidden_until => {
                let mut o = Observed {
                    state: i.state,
                    state_reason: i.reason.clone(),
                    private_ip: Some("10.0.0.1".into()),
                    availability_zone: Some("us-east-1a".into()),
                    ..Observed::not_found(id)
                };
                o.tags.insert(tags::BUILD_ID.into(), i.build_id.clone());
                o.tags.insert(tags::ATTEMPT.into(), i.attempt.to_string());
                o
            }
            _ => Observed::not_found(id),
        }
    }
}

impl Cloud for FakeCloud {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec, market: Market) -> BoxFuture<'a, Result<Launched, Vec<CloudFailure>>> {
        Box::pin(async move {
            let takes = *self.launch_takes.lock().unwrap();
            tokio::time::sleep(takes).await;
            self.profiles.lock().unwrap().push(spec.instance_profile.clone());
            let token = spec.client_token(market);
            let known = self.tokens.lock().unwrap().get(&token).cloned();
            let id = match known {
                Some(id) => id,
                None => {
                    let mut launched = self.launched.lock().unwrap();
                    let id = format!("i-{}", launched.len() + 1);
                    launched.push(id.clone());
                    self.tokens.lock().unwrap().insert(token, id.clone());
                    let hidden_until = tokio::time::Instant::now() + *self.hidden_for.lock().unwrap();
                    self.instances.lock().unwrap().insert(
                        id.clone(),
                        FakeInstance {
                            state: InstanceState::Running,
                            reason: None,
                            build_id: spec.build_id.clone(),
                            attempt: spec.attempt,
                            hidden_until,
                        },
                    );
                    id
                }
            };
            self.templates.lock().unwrap().insert(spec.build_id.clone());
            {
                let mut lose = self.lose_answers.lock().unwrap();
                if *lose > 0 {
                    *lose -= 1;
                    return Err(vec![CloudFailure::ambiguous("no answer was read: the connection dropped")]);
                }
            }
            Ok(Launched {
                instance_id: id,
                pool: spec.pools[0].clone(),
                market,
                pool_failures: Vec::new(),
            })
        })
    }

    fn describe<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
        let seen = ids.iter().map(|id| self.observed(id)).collect();
        Box::pin(async move { Ok(seen) })
    }

    fn find<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
        if self.find_fails_while_launching.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(CloudFailure::new("RequestLimitExceeded", "throttled", None)) });
        }
        let ids: Vec<String> = self
            .instances
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, i)| build_ids.contains(&i.build_id) && i.state != InstanceState::Terminated)
            .map(|(id, _)| id.clone())
            .collect();
        let found = ids.iter().map(|id| self.observed(id)).filter(|o| o.state != InstanceState::NotFound).collect();
        Box::pin(async move { Ok(found) })
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>> {
        if let Some(f) = &*self.on_terminate.lock().unwrap() {
            f();
        }
        Box::pin(async move {
            // EC2 takes a moment: a stop can arrive while it is terminating.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for id in ids {
                // As the adapter does: an id EC2 does not list yet is waited for, never
                // taken as terminated.
                while self.observed(id).state == InstanceState::NotFound {
                    if !self.instances.lock().unwrap().contains_key(id) {
                        return Err(CloudFailure::new(crate::cloud::NOT_FOUND, format!("{id} never existed"), None));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if let Some(i) = self.instances.lock().unwrap().get_mut(id) {
                    i.state = InstanceState::Terminated;
                }
                self.terminated.lock().unwrap().insert(id.clone());
            }
            Ok(())
        })
    }

    fn delete_templates<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, CloudFailure>> {
        self.find_fails_while_launching.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut templates = self.templates.lock().unwrap();
        let deleted: Vec<String> = build_ids.iter().filter(|b| templates.remove(*b)).map(|b| format!("spotbuild-{b}")).collect();
        Box::pin(async move { Ok(deleted) })
    }
}

/// What the agent on one instance does, in connection order.
#[derive(Clone, Copy, Debug)]
enum Agent {
    /// Builds and reports success.
    Succeeds,
    /// Reports an interruption notice, then EC2 reclaims the instance.
    Interrupted,
    /// Never reports a result.
    Hangs,
    /// The connection panics (a bug), once another group has launched.
    Panics,
    /// Starts, then dies without a word (killed, out of memory).
    Dies,
    /// Starts, then the whole host stops answering (frozen).
    Freezes,
}

struct FakeConnector {
    cloud: Arc<FakeCloud>,
    agents: Mutex<VecDeque<Agent>>,
    /// Per group (`-<n>` build ids), for spread builds.
    by_group: BTreeMap<String, Agent>,
    /// Called on each `agent info` (the first command of shipping).
    on_ship: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Connector for FakeConnector {
    fn describe(&self, to: &Target) -> String {
        format!("fake {}", to.instance_id)
    }
    fn connect<'a>(&'a self, to: &'a Target) -> BoxFuture<'a, Result<Box<dyn Transport>, ConnectError>> {
        Box::pin(async move {
            let agent = self
                .by_group
                .iter()
                .find(|(suffix, _)| to.build_id.ends_with(suffix.as_str()))
                .map(|(_, a)| *a)
                .or_else(|| self.agents.lock().unwrap().pop_front())
                .unwrap_or(Agent::Succeeds);
            if let Agent::Panics = agent {
                // Only once the other group has an instance, so it is there to tear down.
                while self.cloud.launched().len() < 2 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("a bug while connecting to {}", to.instance_id);
            }
            let t: Box<dyn Transport> = Box::new(FakeTransport {
                cloud: self.cloud.clone(),
                instance_id: to.instance_id.clone(),
                agent,
                on_ship: self.on_ship.clone(),
            });
            Ok(t)
        })
    }
}

struct FakeTransport {
    cloud: Arc<FakeCloud>,
    instance_id: String,
    agent: Agent,
    on_ship: Option<Arc<dyn Fn() + Send + Sync>>,
}

fn line(seq: u64, event: serde_json::Value) -> std::io::Result<String> {
    let mut v = serde_json::json!({ "v": 1, "seq": seq, "ts": "2026-12-02T00:00:00.000Z" });
    if let (Some(v), Some(e)) = (v.as_object_mut(), event.as_object()) {
        v.extend(e.clone());
    }
    Ok(v.to_string())
}

impl Transport for FakeTransport {
    fn exec<'a>(&'a self, argv: &'a [String], _stdin: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            match argv.get(2).map(String::as_str) {
                Some("info") => {
                    if let Some(f) = &self.on_ship {
                        f();
                    }
                    Ok(format!(r#"{{"version":"{}","mirror_commit":null}}"#, env!("CARGO_PKG_VERSION")).into_bytes())
                }
                Some("start") => Ok(br#"{"pid":4242}"#.to_vec()),
                Some("status") => match self.agent {
                    Agent::Dies => Ok(br#"{"alive":false,"log_tail":["memory cgroup out of memory: Killed process 4242 (spotbuild)"]}"#.to_vec()),
                    Agent::Freezes => std::future::pending().await,
                    _ => Ok(br#"{"alive":true,"log_tail":[]}"#.to_vec()),
                },
                _ => Ok(Vec::new()),
            }
        })
    }

    fn stream<'a>(&'a self, _argv: &'a [String]) -> BoxFuture<'a, Result<Lines, TransportError>> {
        Box::pin(async move {
            let lines: Lines = match self.agent {
                Agent::Succeeds => Box::pin(futures::stream::iter(vec![line(
                    1,
                    serde_json::json!({ "type": "result", "outcome": "success", "failed_steps": [], "message": null }),
                )])),
                Agent::Interrupted => {
                    self.cloud.reclaim(&self.instance_id);
                    Box::pin(futures::stream::iter(vec![line(
                        1,
                        serde_json::json!({ "type": "notice", "kind": "interruption", "action": "terminate", "time": null }),
                    )]))
                }
                Agent::Dies | Agent::Freezes => Box::pin(futures::stream::iter(vec![line(
                    1,
                    serde_json::json!({ "type": "hello", "agent_version": "x", "cpus": 64, "memory_bytes": 1, "instance_id": null, "builder": null }),
                )]).chain(futures::stream::pending())),
                Agent::Hangs | Agent::Panics => Box::pin(futures::stream::pending()),
            };
            Ok(lines)
        })
    }

    fn reconnect(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A ledger that keeps every write, in order.
#[derive(Default)]
struct FakeLedger {
    puts: Mutex<Vec<crate::ledger::BuildEntry>>,
    beats: Mutex<Vec<crate::ledger::Beat>>,
}

impl FakeLedger {
    fn results(&self) -> Vec<String> {
        self.puts.lock().unwrap().iter().map(|e| e.result.clone()).collect()
    }
    fn last(&self) -> crate::ledger::BuildEntry {
        self.puts.lock().unwrap().last().cloned().expect("something was written")
    }
}

impl crate::ledger::LedgerStore for FakeLedger {
    fn place(&self) -> String {
        "fake".into()
    }
    fn put<'a>(&'a self, entry: &'a crate::ledger::BuildEntry) -> BoxFuture<'a, Result<(), crate::ledger::LedgerError>> {
        self.puts.lock().unwrap().push(entry.clone());
        Box::pin(async { Ok(()) })
    }
    fn list(&self, _: std::time::SystemTime, _: std::time::SystemTime) -> BoxFuture<'_, Result<Vec<crate::ledger::BuildEntry>, crate::ledger::LedgerError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn record_interruption<'a>(&'a self, _: &'a crate::ledger::Interruption) -> BoxFuture<'a, Result<(), crate::ledger::LedgerError>> {
        Box::pin(async { Ok(()) })
    }
    fn interruptions(&self, _: std::time::SystemTime) -> BoxFuture<'_, Result<Vec<std::time::SystemTime>, crate::ledger::LedgerError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn get<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Option<crate::ledger::BuildEntry>, crate::ledger::LedgerError>> {
        Box::pin(async { Ok(None) })
    }
    fn beat<'a>(&'a self, beat: &'a crate::ledger::Beat) -> BoxFuture<'a, Result<(), crate::ledger::LedgerError>> {
        self.beats.lock().unwrap().push(beat.clone());
        Box::pin(async { Ok(()) })
    }
    fn beats<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<Vec<crate::ledger::Beat>, crate::ledger::LedgerError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Answers re-plans from a list, counting them.
struct FakePlanner {
    answers: Mutex<VecDeque<Result<Work, PlanningError>>>,
    asked: Mutex<u32>,
}

impl Planner for FakePlanner {
    fn plan(&self) -> BoxFuture<'_, Result<Work, PlanningError>> {
        *self.asked.lock().unwrap() += 1;
        let next = self.answers.lock().unwrap().pop_front().unwrap_or_else(|| Err(PlanningError::NoRegistry));
        Box::pin(async move { next })
    }
}

/// A repository with one commit, removed when dropped.
struct Repo {
    dir: tempfile::TempDir,
    commit: String,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        git(&["init", "-q"]);
        std::fs::write(dir.path().join("README"), "hello\n").unwrap();
        git(&["add", "README"]);
        git(&["commit", "-q", "-m", "one"]);
        let commit = git(&["rev-parse", "HEAD"]);
        Repo { dir, commit }
    }
    fn git_dir(&self) -> PathBuf {
        self.dir.path().join(".git")
    }
}

fn job(commit: &str, projects: &[&str]) -> Job {
    Job {
        v: VERSION,
        build_id: "b".into(),
        commit: commit.into(),
        source: Source::Repository(PathBuf::from("/")),
        workdir: PathBuf::from("/"),
        events_file: None,
        registry: JobRegistry {
            url: "127.0.0.1:5000".into(),
            auth: AuthMode::default(),
            username: None,
            password: None,
            region: None,
            trusted: None,
        },
        branch: None,
        main_branch: "main".into(),
        projects: projects
            .iter()
            .map(|p| crate::protocol::JobProject {
                arch: None,
                multiarch: Default::default(),
                name: p.to_string(),
                hash: "h".into(),
                tag: "cache-h".into(),
                build: true,
                image: None,
                build_dir: p.to_string(),
                dockerfile: format!("{p}/Dockerfile"),
                project_dir: p.to_string(),
                dependencies: Vec::new(),
                build_args: Default::default(),
                tests: Vec::new(),
            })
            .collect(),
        run: Vec::new(),
        cache: CacheSettings {
            builder: BuilderChoice::Auto,
            docker: None,
        },
        deadline: None,
        shutdown_command: None,
        imds: ImdsSettings::default(),
        heartbeat_secs: 5,
    }
}

fn work(commit: &str, projects: &[&str]) -> Work {
    Work {
        scope: Scope::Build,
        commit: commit.into(),
        nodes: projects
            .iter()
            .map(|p| Node {
                name: p.to_string(),
                dependencies: Vec::new(),
                work: true,
            })
            .collect(),
        builds: projects.iter().map(|p| p.to_string()).collect(),
        job: job(commit, projects),
        warnings: Vec::new(),
    }
}

fn settings() -> Config {
    let text = r#"
        [cloud]
        ami = "ami-1"
        subnets = ["subnet-1"]
        instance_types = ["m7a.16xlarge"]
        ttl = "3660days"
        [remote]
        max_attempts = 3
    "#;
    Config::parse(text, Path::new("spotbuild.toml")).unwrap()
}

struct Run {
    outcome: BuildOutcome,
    events: Vec<FarmEvent>,
}

fn trusted() -> crate::trust::Decision {
    crate::trust::Decision {
        level: crate::trust::Level::Trusted,
        reason: "branch main is trusted".into(),
    }
}

/// Runs a build of `projects` with the fakes; `stop_when` sends SIGTERM at the first event
/// it accepts.
async fn build(
    repo: &Repo,
    projects: &[&str],
    max_instances: u32,
    cloud: Arc<FakeCloud>,
    connector: FakeConnector,
    planner: Arc<FakePlanner>,
    stop_when: impl Fn(&FarmEvent) -> bool + Send + Sync,
    stop: Arc<tokio::sync::Notify>,
) -> Run {
    build_recorded(repo, projects, max_instances, cloud, connector, planner, stop_when, stop, None).await
}

/// [`build`], recording in `ledger`.
#[allow(clippy::too_many_arguments)]
async fn build_recorded(
    repo: &Repo,
    projects: &[&str],
    max_instances: u32,
    cloud: Arc<FakeCloud>,
    connector: FakeConnector,
    planner: Arc<FakePlanner>,
    stop_when: impl Fn(&FarmEvent) -> bool + Send + Sync,
    stop: Arc<tokio::sync::Notify>,
    ledger: Option<Arc<FakeLedger>>,
) -> Run {
    // Unique: a build's private directory is named by its id, and tests run in parallel.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request = BuildRequest {
        build_id: format!("t{}x{n}", std::process::id()),
        work: work(&repo.commit, projects),
        settings: settings(),
        trust: trusted(),
        git_dir: repo.git_dir(),
        arch: crate::platform::Arch::X86_64,
        cpus: crate::settings::CpuWant::Configured,
        archive: None,
        max_instances: Some(max_instances),
        market: None,
        // Far away: the paused clock jumps ahead while keys and bundles are made for real
        // (the settings' TTL is set to cover it).
        timeout: Duration::from_secs(10 * 365 * 24 * 3600),
        owner: None,
        branch: None,
    };
    let deps = Deps {
        cloud: cloud.clone(),
        connector: Arc::new(connector),
        ledger: ledger.map(|l| l as Arc<dyn crate::ledger::LedgerStore>),
        planner,
    };
    let events = Mutex::new(Vec::new());
    let on_event = |e: FarmEvent| {
        if stop_when(&e) {
            stop.notify_one();
        }
        events.lock().unwrap().push(e);
    };
    let stop2 = stop.clone();
    let shutdown = async move {
        stop2.notified().await;
        StopSignal::Terminate
    };
    let outcome = super::run(request, deps, &on_event, shutdown).await.unwrap();
    Run {
        outcome,
        events: events.into_inner().unwrap(),
    }
}

fn connector(cloud: &Arc<FakeCloud>, agents: &[Agent]) -> FakeConnector {
    FakeConnector {
        cloud: cloud.clone(),
        agents: Mutex::new(agents.iter().copied().collect()),
        by_group: BTreeMap::new(),
        on_ship: None,
    }
}

fn planner(answers: Vec<Result<Work, PlanningError>>) -> Arc<FakePlanner> {
    Arc::new(FakePlanner {
        answers: Mutex::new(answers.into()),
        asked: Mutex::new(0),
    })
}

fn never(_: &FarmEvent) -> bool {
    false
}

fn finished(outcome: &BuildOutcome) -> Vec<&super::BuildRecord> {
    match outcome {
        BuildOutcome::Finished { groups, .. } => groups.iter().map(|g| &g.record).collect(),
        BuildOutcome::Stopped(s) => panic!("stopped by {s:?}"),
        BuildOutcome::Panicked(_) => panic!("panicked"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_build_succeeds_on_one_instance_and_tears_it_down() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let plans = planner(Vec::new());
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Succeeds]), plans.clone(), never, stop).await;
    let records = finished(&run.outcome);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].result, BuildResult::Success);
    assert_eq!(records[0].attempts.len(), 1);
    let a = &records[0].attempts[0];
    assert_eq!(a.rental.instance_id.as_deref(), Some("i-1"));
    assert!(a.shipped_bytes.is_some_and(|b| b > 0), "the commit was bundled and shipped");
    let phases: Vec<Phase> = a.phases.iter().map(|(p, _)| *p).collect();
    assert_eq!(phases.first(), Some(&Phase::Launching));
    assert!(phases.contains(&Phase::Terminating));
    assert_eq!(cloud.launched(), ["i-1"]);
    assert!(cloud.leaked().is_empty());
    assert_eq!(*plans.asked.lock().unwrap(), 0, "the first attempt uses the first plan");
    assert_eq!(Exit::of_build(records.into_iter()), Exit::Success);
    assert!(run.events.iter().any(|e| matches!(e, FarmEvent::AttemptEnded { .. })));
}

#[tokio::test(start_paused = true)]
async fn an_interruption_is_retried_on_a_new_plan_and_succeeds() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let plans = planner(vec![Ok(work(&repo.commit, &["api"]))]);
    let stop = Arc::new(tokio::sync::Notify::new());
    let agents = [Agent::Interrupted, Agent::Succeeds];
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &agents), plans.clone(), never, stop).await;
    let records = finished(&run.outcome);
    let outcomes: Vec<_> = records[0].attempts.iter().map(|a| a.outcome.clone()).collect();
    assert_eq!(outcomes, [super::attempt::AttemptOutcome::Interrupted, super::attempt::AttemptOutcome::Success]);
    assert_eq!(records[0].result, BuildResult::Success);
    assert_eq!(*plans.asked.lock().unwrap(), 1, "the second attempt re-planned");
    assert_eq!(cloud.launched(), ["i-1", "i-2"]);
    assert!(cloud.leaked().is_empty());
    assert_eq!(Exit::of_build(records.into_iter()), Exit::Success);
}

#[tokio::test(start_paused = true)]
async fn a_replan_that_fails_on_git_exits_4() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let git = crate::git::GitError::Open {
        path: PathBuf::from("/nowhere"),
        source: git2::Error::from_str("not a repository"),
    };
    let plans = planner(vec![Err(PlanningError::Git(git))]);
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Interrupted]), plans, never, stop).await;
    let records = finished(&run.outcome);
    assert_eq!(records[0].result, BuildResult::Error);
    assert_eq!(records[0].attempts.len(), 1);
    assert!(cloud.leaked().is_empty());
    assert_eq!(Exit::of_build(records.into_iter()), Exit::Git);
    let said: Vec<&str> = run
        .events
        .iter()
        .filter_map(|e| match e {
            FarmEvent::Phase { detail, .. } => Some(detail.as_str()),
            _ => None,
        })
        .collect();
    assert!(said.iter().any(|d| d.contains("failed to plan again before attempt 2") && d.contains("not a repository")), "{said:?}");
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_one_group_tears_down_the_others() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let mut c = connector(&cloud, &[]);
    c.by_group.insert("-1".into(), Agent::Hangs);
    c.by_group.insert("-2".into(), Agent::Panics);
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api", "web"], 2, cloud.clone(), c, planner(Vec::new()), never, stop).await;
    assert!(matches!(run.outcome, BuildOutcome::Panicked(_)));
    assert_eq!(cloud.launched().len(), 2);
    assert!(cloud.leaked().is_empty(), "left running: {:?}", cloud.leaked());
}

/// Where SIGTERM arrives.
#[derive(Debug, Clone, Copy)]
enum At {
    Phase(Phase),
    Shipping,
    Terminating,
}

#[tokio::test(start_paused = true)]
async fn sigterm_in_every_phase_tears_down_and_exits_143() {
    let points = [
        At::Phase(Phase::Launching),
        At::Phase(Phase::Booting),
        At::Phase(Phase::Connecting),
        At::Shipping,
        At::Phase(Phase::Running),
        At::Terminating,
    ];
    for at in points {
        let repo = Repo::new();
        let cloud = Arc::new(FakeCloud::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut c = connector(&cloud, &[Agent::Hangs]);
        match at {
            At::Shipping => {
                let s = stop.clone();
                c.on_ship = Some(Arc::new(move || s.notify_one()));
            }
            At::Terminating => {
                // The agent fails fast so the attempt reaches teardown by itself.
                c.agents = Mutex::new([Agent::Interrupted].into());
                let s = stop.clone();
                *cloud.on_terminate.lock().unwrap() = Some(Box::new(move || s.notify_one()));
            }
            At::Phase(_) => {}
        }
        let when = move |e: &FarmEvent| matches!((at, e), (At::Phase(p), FarmEvent::Phase { phase, .. }) if *phase == p);
        let run = build(&repo, &["api"], 1, cloud.clone(), c, planner(Vec::new()), when, stop).await;
        match run.outcome {
            BuildOutcome::Stopped(s) => assert_eq!(Exit::of_signal(s).code(), 143, "{at:?}"),
            _ => panic!("{at:?}: the build was not stopped"),
        }
        // While launching, the stop may come before EC2 was asked: nothing to tear down then.
        if !matches!(at, At::Phase(Phase::Launching)) {
            assert!(!cloud.launched().is_empty(), "{at:?}: an instance was launched");
        }
        assert!(cloud.leaked().is_empty(), "{at:?}: left running: {:?}", cloud.leaked());
        let noted = run.events.iter().any(|e| matches!(e, FarmEvent::Note { message, .. } if message.contains("received SIGTERM")));
        assert!(noted, "{at:?}: the stop is said");
    }
}

#[tokio::test(start_paused = true)]
async fn sigterm_during_a_slow_launch_lets_it_finish_and_terminates_its_instance() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    *cloud.launch_takes.lock().unwrap() = Duration::from_secs(40);
    let stop = Arc::new(tokio::sync::Notify::new());
    let when = |e: &FarmEvent| matches!(e, FarmEvent::Phase { detail, .. } if detail.starts_with("requesting one "));
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Succeeds]), planner(Vec::new()), when, stop).await;
    assert!(matches!(run.outcome, BuildOutcome::Stopped(StopSignal::Terminate)));
    assert_eq!(cloud.launched(), ["i-1"], "the launch in flight was not dropped: it ran to its end");
    assert!(cloud.leaked().is_empty(), "left running: {:?}", cloud.leaked());
    assert!(cloud.templates.lock().unwrap().is_empty(), "the launch template (the host key) is gone");
}

#[tokio::test(start_paused = true)]
async fn a_launch_whose_answer_was_lost_is_found_by_its_tag_and_used() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    *cloud.lose_answers.lock().unwrap() = 1;
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Succeeds]), planner(Vec::new()), never, stop).await;
    let records = finished(&run.outcome);
    assert_eq!(records[0].result, BuildResult::Success);
    assert_eq!(cloud.launched(), ["i-1"], "adopted, not launched again or on another market");
    assert_eq!(records[0].attempts[0].rental.instance_id.as_deref(), Some("i-1"));
    assert!(cloud.leaked().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_launch_that_never_learns_its_instance_still_has_it_torn_down() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    // The answer is lost every time, and searches by tag fail while the launch looks.
    *cloud.lose_answers.lock().unwrap() = 100;
    cloud.find_fails_while_launching.store(true, std::sync::atomic::Ordering::SeqCst);
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[]), planner(Vec::new()), never, stop).await;
    let records = finished(&run.outcome);
    assert_eq!(records[0].result, BuildResult::Error);
    assert_eq!(cloud.launched(), ["i-1", "i-2"], "one per market: the resend with the same token launched nothing more");
    assert!(cloud.leaked().is_empty(), "found by tag at teardown: {:?}", cloud.leaked());
}

#[tokio::test(start_paused = true)]
async fn an_instance_ec2_does_not_list_yet_is_waited_for_and_terminated() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    *cloud.hidden_for.lock().unwrap() = Duration::from_secs(10);
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Succeeds]), planner(Vec::new()), never, stop).await;
    assert_eq!(finished(&run.outcome)[0].result, BuildResult::Success);
    assert!(cloud.leaked().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_dead_agent_fails_the_build_at_once_with_the_end_of_its_log() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Dies]), planner(Vec::new()), never, stop).await;
    let records = finished(&run.outcome);
    assert_eq!(records[0].result, BuildResult::Error);
    assert_eq!(records[0].attempts.len(), 1, "not retried: the same image would die the same way");
    match &records[0].attempts[0].outcome {
        super::attempt::AttemptOutcome::Error(why) => {
            assert!(why.contains("pid 4242") && why.contains("out of memory"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(cloud.leaked().is_empty());
    assert_eq!(Exit::of_build(records.into_iter()), Exit::Cloud);
}

#[tokio::test(start_paused = true)]
async fn a_frozen_host_is_lost_and_the_next_attempt_succeeds() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let plans = planner(vec![Ok(work(&repo.commit, &["api"]))]);
    let run = build(&repo, &["api"], 1, cloud.clone(), connector(&cloud, &[Agent::Freezes, Agent::Succeeds]), plans, never, stop).await;
    let records = finished(&run.outcome);
    assert!(matches!(records[0].attempts[0].outcome, super::attempt::AttemptOutcome::Lost(_)), "{:?}", records[0].attempts[0].outcome);
    assert_eq!(records[0].result, BuildResult::Success);
    assert_eq!(cloud.launched(), ["i-1", "i-2"]);
    assert!(cloud.leaked().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_build_is_in_the_ledger_with_what_it_rented() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let ledger = Arc::new(FakeLedger::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let when = |e: &FarmEvent| matches!(e, FarmEvent::Phase { phase: Phase::Running, .. });
    let c = connector(&cloud, &[Agent::Hangs]);
    let run = build_recorded(&repo, &["api"], 1, cloud.clone(), c, planner(Vec::new()), when, stop, Some(ledger.clone())).await;
    assert!(matches!(run.outcome, BuildOutcome::Stopped(_)));
    let results = ledger.results();
    assert_eq!(results.first().map(String::as_str), Some("running"), "written before anything was rented");
    assert_eq!(ledger.puts.lock().unwrap()[0].attempts.len(), 0);
    let last = ledger.last();
    assert_eq!(last.result, "cancelled");
    assert_eq!(last.attempts.len(), 1);
    assert_eq!(last.attempts[0].rental.instance_id.as_deref(), Some("i-1"));
    assert_eq!(last.attempts[0].outcome, "cancelled");
    assert!(last.attempts[0].instance_seconds() >= 0.0);
    let beats = ledger.beats.lock().unwrap();
    assert!(!beats[0].ended && beats.last().unwrap().ended, "the heartbeat says the build is over");
}

#[tokio::test(start_paused = true)]
async fn a_running_build_rewrites_its_entry_every_heartbeat() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let ledger = Arc::new(FakeLedger::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    // The agent hangs: the build runs until its attempts are used up (silence checks).
    let c = connector(&cloud, &[Agent::Hangs, Agent::Hangs, Agent::Hangs]);
    let plans = planner(vec![Ok(work(&repo.commit, &["api"])), Ok(work(&repo.commit, &["api"]))]);
    let run = build_recorded(&repo, &["api"], 1, cloud.clone(), c, plans, never, stop, Some(ledger.clone())).await;
    let records = finished(&run.outcome);
    assert_eq!(records[0].result, BuildResult::GaveUp);
    let running = ledger.results().iter().filter(|r| *r == "running").count();
    assert!(running >= 3, "a heartbeat each minute while it ran: {:?}", ledger.results());
    assert_eq!(ledger.last().result, "gave-up");
    assert_eq!(ledger.last().attempts.len(), 3);
    assert!(cloud.leaked().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_panicked_build_is_in_the_ledger() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let ledger = Arc::new(FakeLedger::default());
    let mut c = connector(&cloud, &[]);
    c.by_group.insert("-1".into(), Agent::Hangs);
    c.by_group.insert("-2".into(), Agent::Panics);
    let stop = Arc::new(tokio::sync::Notify::new());
    let run = build_recorded(&repo, &["api", "web"], 2, cloud.clone(), c, planner(Vec::new()), never, stop, Some(ledger.clone())).await;
    assert!(matches!(run.outcome, BuildOutcome::Panicked(_)));
    let puts = ledger.puts.lock().unwrap();
    let last_of = |suffix: &str| puts.iter().rev().find(|e| e.build_id.ends_with(suffix)).cloned().unwrap();
    for g in ["-1", "-2"] {
        assert_eq!(last_of(g).result, "panicked", "group {g}");
        assert_eq!(last_of(g).attempts.len(), 1, "group {g} rented one instance");
    }
    assert!(cloud.leaked().is_empty());
}

#[test]
fn build_ids_are_unique_and_sort_by_time() {
    let ids: BTreeSet<String> = (0..1000).map(|_| super::build::new_build_id()).collect();
    assert_eq!(ids.len(), 1000);
    let id = super::build::new_build_id();
    let (time, random) = id.split_once('-').unwrap();
    assert_eq!(random.len(), 16, "64 random bits: {id}");
    assert!(time.len() >= 8, "{id}");
}

#[tokio::test(start_paused = true)]
async fn an_untrusted_build_never_runs_with_the_trusted_instance_profile() {
    let repo = Repo::new();
    let cloud = Arc::new(FakeCloud::default());
    let mut settings = settings();
    settings.cloud.instance_profile = Some("spotbuild-trusted".into());
    let request = |settings: Config| BuildRequest {
        build_id: format!("u{}", std::process::id()),
        work: work(&repo.commit, &["api"]),
        settings,
        trust: crate::trust::Decision {
            level: crate::trust::Level::Untrusted,
            reason: "a fork's pull request (#42)".into(),
        },
        git_dir: repo.git_dir(),
        arch: crate::platform::Arch::X86_64,
        cpus: crate::settings::CpuWant::Configured,
        archive: None,
        max_instances: None,
        market: None,
        timeout: Duration::from_secs(3600),
        owner: None,
        branch: None,
    };
    let deps = || Deps {
        cloud: cloud.clone(),
        connector: Arc::new(connector(&cloud, &[Agent::Succeeds])),
        ledger: None,
        planner: planner(Vec::new()),
    };
    let refused = super::run(request(settings.clone()), deps(), &|_| {}, std::future::pending()).await;
    assert!(matches!(refused, Err(super::BuildError::NoUntrustedProfile(_))), "{:?}", refused.err());
    assert!(cloud.launched().is_empty(), "refused before renting anything");
    assert_eq!(crate::cli::error::Error::from(refused.err().unwrap()).exit, Exit::Usage);

    settings.cloud.untrusted_instance_profile = Some("spotbuild-untrusted".into());
    let outcome = super::run(request(settings), deps(), &|_| {}, std::future::pending()).await.unwrap();
    assert!(matches!(outcome, BuildOutcome::Finished { .. }));
    assert_eq!(*cloud.profiles.lock().unwrap(), [Some("spotbuild-untrusted".to_string())]);
    assert!(cloud.leaked().is_empty());
}
