//! The lifecycle chaos matrix: for a phase of a build (launching … terminating) and a fault
//! (the controller killed or stopped, the agent killed, the host frozen, the connection
//! cut, a launch that succeeds at AWS but times out at the client, instances EC2 does not
//! list for a while, every call throttled), run a build on the local farm, inject the fault
//! when the controller says it entered the phase, and count what is left: instances
//! running, launch templates, builds missing from the ledger. Every count must be 0.
//!
//! `make test` runs a sample (each fault twice, at phases spread over the lifecycle);
//! `make chaos` (SPOTBUILD_CHAOS=full) runs every pair. Both print the table.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::docker::{docker_required, unique, BUSYBOX};
use crate::support::farm::LocalFarm;
use crate::support::fault_proxy::{Fault as ProxyFault, FaultProxy};
use crate::support::repo::TestRepo;
use crate::support::services::runtime;
use crate::support::Run;

const PHASES: [&str; 7] = ["launching", "booting", "connecting", "shipping", "running", "collecting", "terminating"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    SigkillController,
    SigtermController,
    KillAgent,
    FreezeHost,
    CutConnection,
    FleetAnswerLost,
    NotFoundAfterLaunch,
    Throttled,
}

const FAULTS: [Fault; 8] = [
    Fault::SigkillController,
    Fault::SigtermController,
    Fault::KillAgent,
    Fault::FreezeHost,
    Fault::CutConnection,
    Fault::FleetAnswerLost,
    Fault::NotFoundAfterLaunch,
    Fault::Throttled,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::SigkillController => "SIGKILL controller, then reap",
            Fault::SigtermController => "SIGTERM controller",
            Fault::KillAgent => "agent killed",
            Fault::FreezeHost => "host frozen (SIGSTOP)",
            Fault::CutConnection => "SSH connection cut",
            Fault::FleetAnswerLost => "CreateFleet answer lost",
            Fault::NotFoundAfterLaunch => "NotFound 10 s after launch",
            Fault::Throttled => "every call throttled 5 s",
        }
    }
}

/// The controller's bounds, short enough for a matrix (see the module's notes): a lost
/// launch answer after 3 s, a silent agent checked after 5 s, heartbeats every second.
const LAUNCH_CALL_TIMEOUT: &str = "3s";
const HEARTBEAT_WINDOW: Duration = Duration::from_secs(5);
/// Bound on one case's build.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

/// One row of the table.
struct Row {
    phase: &'static str,
    fault: Fault,
    /// Where the fault was injected (the phase the controller said last), if it was.
    injected_in: Option<String>,
    exit: Option<i32>,
    instances_left: usize,
    templates_left: usize,
    builds_missing: usize,
    secs: f64,
}

impl Fault {
    /// The phase where this fault does the most harm (a lost launch answer only matters
    /// while launching; a killed agent while it runs).
    fn worst_phase(self) -> &'static str {
        match self {
            Fault::SigtermController | Fault::FleetAnswerLost | Fault::NotFoundAfterLaunch | Fault::Throttled => "launching",
            Fault::SigkillController | Fault::KillAgent | Fault::FreezeHost | Fault::CutConnection => "running",
        }
    }
}

/// The pairs to run: all of them (`full`); each fault at its worst phase and at another
/// spread over the lifecycle, so that every phase is hit too (the default); or those
/// named in `SPOTBUILD_CHAOS` as `phase:Fault,…` (to run one again).
fn cases(full: bool) -> Vec<(&'static str, Fault)> {
    if full {
        return PHASES.iter().flat_map(|p| FAULTS.iter().map(move |f| (*p, *f))).collect();
    }
    if let Ok(named) = std::env::var("SPOTBUILD_CHAOS") {
        let picked: Vec<(&'static str, Fault)> = named
            .split(',')
            .filter_map(|pair| {
                let (phase, fault) = pair.split_once(':')?;
                let phase = PHASES.iter().find(|p| **p == phase)?;
                let fault = FAULTS.iter().find(|f| format!("{f:?}") == fault)?;
                Some((*phase, *fault))
            })
            .collect();
        if !picked.is_empty() {
            return picked;
        }
    }
    FAULTS
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            let spread = PHASES[(i * 3 + 5) % PHASES.len()];
            let other = if spread == f.worst_phase() { PHASES[(i * 3 + 1) % PHASES.len()] } else { spread };
            [(f.worst_phase(), *f), (other, *f)]
        })
        .collect()
}

/// A repository whose one project builds for a few seconds; each case changes its input.
fn chaos_repo() -> TestRepo {
    let repo = TestRepo::new();
    repo.write("app/Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sleep\", \"3\"]\nCOPY stamp /stamp\n");
    std::fs::copy(BUSYBOX, repo.path().join("app/busybox")).unwrap();
    repo.write("app/stamp", &unique());
    repo.manifest(json!({ "app": {"buildDir": "app"} }));
    repo.commit("app");
    repo
}

/// The farm's settings with the matrix's bounds, EC2 through `proxy`.
fn chaos_config(farm: &LocalFarm, proxy: &FaultProxy) -> PathBuf {
    let base = std::fs::read_to_string(farm.config_with_endpoint(&proxy.endpoint())).unwrap();
    let text = base
        .replace("[cloud]\n", &format!("[cloud]\nlaunch_call_timeout = \"{LAUNCH_CALL_TIMEOUT}\"\n"))
        .replace("connect_timeout = \"30s\"", "connect_timeout = \"10s\"\nagent_heartbeat = \"1s\"\nagent_silence = \"5s\"\nmax_attempts = 4")
        .replace("[ledger]\n", "[ledger]\nheartbeat = \"1s\"\n");
    let path = farm.dir.path().join("chaos.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a build; its stdout lines arrive on the channel.
fn start_build(farm: &LocalFarm, repo: &Path, config: &Path, log: &Path) -> (Child, Receiver<Value>) {
    let mut child = farm
        .spotbuild(repo)
        .arg("--config")
        .arg(config)
        .args(["build", "--all", "--json"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    (child, rx)
}

/// The instance id an attempt said it was fulfilled with (`fulfilled i-… · …`).
fn fulfilled(e: &Value) -> Option<String> {
    let detail = e["detail"].as_str()?;
    let rest = detail.strip_prefix("fulfilled ")?;
    rest.split_whitespace().next().map(String::from)
}

/// Waits (bounded) for the farm's host of `instance` (any host when unknown yet).
fn host_for(farm: &LocalFarm, instance: &Option<String>, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let hosts = farm.hosts();
        let found = hosts
            .iter()
            .filter_map(|h| h["instance_id"].as_str())
            .find(|id| instance.as_deref().is_none_or(|want| want == *id))
            .map(String::from);
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the controller this test started.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            return status.code().or_else(|| status.signal().map(|s| 128 + s));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Launch templates the emulator still holds.
fn templates_left(farm: &LocalFarm) -> usize {
    runtime().block_on(async {
        let ec2 = farm.ec2().await;
        ec2.describe_launch_templates().send().await.unwrap().launch_templates().len()
    })
}

/// Whether the farm's ledger has an entry for `build_id`, and its result.
fn ledger_result(farm: &LocalFarm, build_id: &str) -> Option<String> {
    let path = farm.dir.path().join("ledger.sqlite");
    runtime().block_on(async {
        let ledger = spotbuild::ledger::sqlite::SqliteLedger::open(&path).unwrap();
        let since = std::time::SystemTime::now() - Duration::from_secs(3600);
        let until = std::time::SystemTime::now() + Duration::from_secs(60);
        let entries = spotbuild::ledger::LedgerStore::list(&ledger, since, until).await.unwrap();
        entries.into_iter().find(|e| e.build_id == build_id).map(|e| e.result)
    })
}

/// One reaper pass straight at the emulator, reading the farm's ledger.
fn reap_once(farm: &LocalFarm, repo: &Path) -> Run {
    Run::of(
        farm.with_key(&mut crate::support::spotbuild(repo))
            .args(["reap", "--json", "--heartbeat-window", &format!("{}s", HEARTBEAT_WINDOW.as_secs()), "--ledger"])
            .arg(farm.dir.path().join("ledger.sqlite"))
            .env("SPOTBUILD_EC2_ENDPOINT", farm.ec2_endpoint())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    )
}

fn run_case(farm: &LocalFarm, proxy: &FaultProxy, repo: &TestRepo, config: &Path, phase: &'static str, fault: Fault) -> Row {
    repo.write("app/stamp", &unique());
    repo.commit(&format!("{phase} {}", fault.name()));
    let started = Instant::now();
    let log = farm.dir.path().join(format!("chaos-{phase}-{fault:?}.log"));
    let (mut child, events) = start_build(farm, repo.path(), config, &log);
    let mut build_id = None;
    let mut instance = None;
    let mut injected_in = None;
    let deadline = Instant::now() + CASE_TIMEOUT;
    while injected_in.is_none() && Instant::now() < deadline {
        let Ok(e) = events.recv_timeout(Duration::from_millis(200)) else {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            continue;
        };
        if e["type"] == "build" {
            build_id = e["build_id"].as_str().map(String::from);
        }
        if let Some(id) = fulfilled(&e) {
            instance = Some(id);
        }
        if e["type"] == "controller" && e["phase"] == phase {
            inject(farm, proxy, &child, &instance, fault);
            injected_in = Some(phase.to_string());
        }
    }
    let mut exit = wait_exit(&mut child, deadline.saturating_duration_since(Instant::now()));
    // Whatever it said after the injection.
    while let Ok(e) = events.try_recv() {
        if build_id.is_none() && e["type"] == "build" {
            build_id = e["build_id"].as_str().map(String::from);
        }
    }
    proxy.clear();
    if fault == Fault::SigkillController && injected_in.is_some() {
        // Nothing tore it down: one reaper pass once the heartbeat window has passed.
        std::thread::sleep(HEARTBEAT_WINDOW + Duration::from_secs(1));
        let reap = reap_once(farm, repo.path());
        assert_eq!(reap.code, 0, "reap: {reap:?}");
        exit = exit.or(Some(137));
    }
    let instances_left = farm.live_instances().len();
    let builds_missing = match &build_id {
        Some(id) => usize::from(ledger_result(farm, id).is_none()),
        None => 1,
    };
    let row = Row {
        phase,
        fault,
        injected_in,
        exit,
        instances_left,
        templates_left: templates_left(farm),
        builds_missing,
        secs: started.elapsed().as_secs_f64(),
    };
    if row.instances_left + row.templates_left + row.builds_missing > 0 || row.exit.is_none() {
        eprintln!("--- {phase} × {}: controller log\n{}", fault.name(), std::fs::read_to_string(&log).unwrap_or_default());
    }
    row
}

fn inject(farm: &LocalFarm, proxy: &FaultProxy, child: &Child, instance: &Option<String>, fault: Fault) {
    let on_host = |what: &str| {
        if let Some(id) = host_for(farm, instance, Duration::from_secs(20)) {
            let _ = farm.post(&format!("/hosts/{id}/{what}"));
        }
    };
    match fault {
        Fault::SigkillController => signal(child, libc::SIGKILL),
        Fault::SigtermController => signal(child, libc::SIGTERM),
        Fault::KillAgent => {
            // The agent runs once shipped: wait for it (bounded) when injected earlier; after
            // its result there is none left to kill.
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Some(id) = host_for(farm, instance, Duration::from_secs(1)) {
                    if farm.post(&format!("/hosts/{id}/kill-agent")).trim_start().starts_with(|c: char| c != '0') {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Fault::FreezeHost => on_host("freeze"),
        Fault::CutConnection => on_host("cut"),
        Fault::FleetAnswerLost => proxy.inject("CreateFleet", None, 1, ProxyFault::Late(Duration::from_secs(6))),
        Fault::NotFoundAfterLaunch => proxy.hide_new_instances_for(Duration::from_secs(10)),
        Fault::Throttled => proxy.throttle_all_for(Duration::from_secs(5)),
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<12} {:<32} {:<12} {:>5} {:>10} {:>10} {:>15} {:>7}\n",
        "phase", "fault", "injected in", "exit", "instances", "templates", "missing builds", "secs"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<12} {:<32} {:<12} {:>5} {:>10} {:>10} {:>15} {:>7.1}\n",
            r.phase,
            r.fault.name(),
            r.injected_in.as_deref().unwrap_or("(ended)"),
            r.exit.map(|c| c.to_string()).unwrap_or_else(|| "hung".into()),
            r.instances_left,
            r.templates_left,
            r.builds_missing,
            r.secs
        ));
    }
    out
}

#[test]
fn no_fault_in_any_phase_leaves_an_instance_a_template_or_an_unrecorded_build() {
    docker_required();
    let full = std::env::var("SPOTBUILD_CHAOS").is_ok_and(|v| v == "full");
    let farm = LocalFarm::start();
    let proxy = farm.fault_proxy();
    let config = chaos_config(&farm, &proxy);
    let repo = chaos_repo();
    let mut rows = Vec::new();
    for (phase, fault) in cases(full) {
        rows.push(run_case(&farm, &proxy, &repo, &config, phase, fault));
        // A case must not leave anything to the next: what is left is counted once.
        farm.assert_nothing_left();
    }
    let shown = table(&rows);
    let title = format!("chaos matrix ({}):", if full { "every pair" } else { "sampled; `make chaos` runs every pair" });
    println!("{title}\n{shown}");
    // make test prints it after the run (a passing test's output is not shown).
    let _ = std::fs::write(Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-matrix.txt"), format!("{title}\n{shown}"));
    let bad: Vec<&Row> = rows.iter().filter(|r| r.instances_left + r.templates_left + r.builds_missing > 0 || r.exit.is_none()).collect();
    assert!(bad.is_empty(), "something was left behind:\n{shown}");
}

#[test]
fn three_interruptions_in_a_row_then_success_on_demand() {
    docker_required();
    let farm = LocalFarm::start();
    let proxy = farm.fault_proxy();
    // The breaker opens after the third interruption.
    let text = std::fs::read_to_string(chaos_config(&farm, &proxy)).unwrap().replace("[cloud]\n", "[cloud]\nspot_breaker = { threshold = 3 }\n");
    let config = farm.dir.path().join("interrupted.toml");
    std::fs::write(&config, text).unwrap();
    let repo = chaos_repo();
    let log = farm.dir.path().join("interrupted.log");
    let (mut child, events) = start_build(&farm, repo.path(), &config, &log);
    let mut instance = None;
    let mut interrupted = 0;
    let deadline = Instant::now() + CASE_TIMEOUT;
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        let Ok(e) = events.recv_timeout(Duration::from_millis(200)) else {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            continue;
        };
        if let Some(id) = fulfilled(&e) {
            instance = Some(id);
        }
        // Each spot attempt is reclaimed once its agent runs.
        if interrupted < 3 && e["type"] == "controller" && e["detail"].as_str().is_some_and(|d| d.starts_with("agent started")) {
            let id = host_for(&farm, &instance, Duration::from_secs(10)).expect("the attempt's host");
            farm.post(&format!("/hosts/{id}/interrupt?warning=5&kill_after=1"));
            interrupted += 1;
        }
        lines.push(e);
    }
    let exit = wait_exit(&mut child, deadline.saturating_duration_since(Instant::now()));
    while let Ok(e) = events.try_recv() {
        lines.push(e);
    }
    let shown = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(exit, Some(0), "{}", shown());
    let record = lines.iter().find(|e| e["type"] == "build_record").expect("a build record")["record"].clone();
    let attempts = record["attempts"].as_array().unwrap();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["interrupted", "interrupted", "interrupted", "success"], "{record:#}");
    let markets: Vec<&str> = attempts.iter().map(|a| a["market"].as_str().unwrap()).collect();
    assert_eq!(markets, ["spot", "spot", "spot", "on-demand"], "{record:#}");
    assert!(attempts[3]["market_reason"].as_str().unwrap_or("").contains("breaker"), "{record:#}");
    farm.assert_nothing_left();
    assert_eq!(templates_left(&farm), 0);
}
