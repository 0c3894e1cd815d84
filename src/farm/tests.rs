//! Driver tests: a whole [`super::run`] against a fake cloud, a fake transport and a fake
//! planner, under a paused clock. No root, Docker or emulator: only `git` (the commit is
//! bundled for real) and `ssh-keygen` (the attempt's keys are made for real).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::attempt::Phase;
use super::build::{BuildOutcome, BuildRequest, Deps, Planner, StopSignal};
use super::connect::{ConnectError, Connector, Target};
use super::events::FarmEvent;
use super::job::{Scope, Work};
use super::record::BuildResult;
use super::spread::Node;
use crate::cli::error::Exit;
use crate::cloud::{Cloud, CloudFailure, InstanceState, LaunchSpec, Launched, Market, Observed};
use crate::plan::planner::PlanningError;
use crate::protocol::{BuilderChoice, CacheSettings, ImdsSettings, Job, JobRegistry, Source, VERSION};
use crate::settings::{AuthMode, Config};
use crate::transport::{Lines, Transport, TransportError};

/// EC2 as a map of instances; it can be told to reclaim one.
#[derive(Default)]
struct FakeCloud {
    instances: Mutex<BTreeMap<String, (InstanceState, Option<String>)>>,
    launched: Mutex<Vec<String>>,
    terminated: Mutex<BTreeSet<String>>,
    /// Called on each terminate call (a test stops the build in teardown with it).
    on_terminate: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl FakeCloud {
    fn reclaim(&self, id: &str) {
        let reason = Some("Server.SpotInstanceTermination: Spot instance termination".to_string());
        self.instances.lock().unwrap().insert(id.to_string(), (InstanceState::ShuttingDown, reason));
    }
    fn launched(&self) -> Vec<String> {
        self.launched.lock().unwrap().clone()
    }
    /// Launched and never terminated.
    fn leaked(&self) -> Vec<String> {
        let terminated = self.terminated.lock().unwrap();
        self.launched().into_iter().filter(|id| !terminated.contains(id)).collect()
    }
}

impl Cloud for FakeCloud {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec, market: Market) -> BoxFuture<'a, Result<Launched, Vec<CloudFailure>>> {
        let mut launched = self.launched.lock().unwrap();
        let id = format!("i-{}", launched.len() + 1);
        launched.push(id.clone());
        self.instances.lock().unwrap().insert(id.clone(), (InstanceState::Running, None));
        let l = Launched {
            instance_id: id,
            pool: spec.pools[0].clone(),
            availability_zone: Some("us-east-1a".into()),
            market,
            private_ip: Some("10.0.0.1".into()),
            spot_request_id: None,
            pool_failures: Vec::new(),
        };
        Box::pin(async move { Ok(l) })
    }

    fn describe<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
        let instances = self.instances.lock().unwrap();
        let seen = ids
            .iter()
            .map(|id| match instances.get(id) {
                Some((state, reason)) => Observed {
                    state: *state,
                    state_reason: reason.clone(),
                    private_ip: Some("10.0.0.1".into()),
                    ..Observed::gone(id)
                },
                None => Observed::gone(id),
            })
            .collect();
        Box::pin(async move { Ok(seen) })
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>> {
        if let Some(f) = &*self.on_terminate.lock().unwrap() {
            f();
        }
        Box::pin(async move {
            // EC2 takes a moment: a stop can arrive while it is terminating.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for id in ids {
                self.instances.lock().unwrap().insert(id.clone(), (InstanceState::Terminated, None));
                self.terminated.lock().unwrap().insert(id.clone());
            }
            Ok(())
        })
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
                    Ok(br#"{"version":"test","mirror_commit":null}"#.to_vec())
                }
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
        },
        branch: None,
        main_branch: "main".into(),
        projects: projects
            .iter()
            .map(|p| crate::protocol::JobProject {
                name: p.to_string(),
                hash: "h".into(),
                tag: "cache-h".into(),
                build: true,
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
        [remote]
        max_attempts = 3
    "#;
    Config::parse(text, Path::new("spotbuild.toml")).unwrap()
}

struct Run {
    outcome: BuildOutcome,
    events: Vec<FarmEvent>,
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
    // Unique: a build's private directory is named by its id, and tests run in parallel.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request = BuildRequest {
        build_id: format!("t{}x{n}", std::process::id()),
        work: work(&repo.commit, projects),
        settings: settings(),
        git_dir: repo.git_dir(),
        cpus: None,
        max_instances: Some(max_instances),
        market: None,
        // Far away: the paused clock jumps ahead while keys and bundles are made for real.
        timeout: Duration::from_secs(10 * 365 * 24 * 3600),
        owner: None,
        branch: None,
    };
    let deps = Deps {
        cloud: cloud.clone(),
        connector: Arc::new(connector),
        ledger: None,
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
