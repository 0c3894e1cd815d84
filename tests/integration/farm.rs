//! End to end on the local farm: `spotbuild build`, `test` and the CI scripts against the
//! emulated EC2 API, real hosts (network namespaces with sshd and the agent), a loopback
//! registry and this machine's Docker engine. Each test runs its own farm and ends by
//! checking that no instance and no host is left.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::docker::{docker_out, docker_required, unique, BUSYBOX};
use crate::support::farm::LocalFarm;
use crate::support::fault_proxy::Fault;
use crate::support::repo::TestRepo;
use crate::support::Run;

/// `base` (busybox) <- `api` (with a test job) and `web`, with content unique to this run.
/// `web_run` adds a RUN step to web (exec form: the image has no /bin/sh).
pub(crate) fn farm_repo(web_run: Option<&str>, test_script: &str) -> TestRepo {
    let repo = TestRepo::new();
    let id = unique();
    repo.write("base/Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY motd /etc/motd\n");
    std::fs::copy(BUSYBOX, repo.path().join("base/busybox")).unwrap();
    repo.write("base/motd", &format!("base {id}\n"));
    repo.write("api/Dockerfile", "FROM base\nCOPY src /app\n");
    repo.write("api/src/test.sh", test_script);
    repo.write("api/src/main.txt", &format!("api {id}\n"));
    let run = web_run.map(|r| format!("RUN {r}\n")).unwrap_or_default();
    repo.write("web/Dockerfile", &format!("FROM base\n{run}COPY src /site\n"));
    repo.write("web/src/index.html", &format!("<p>{id}</p>\n"));
    repo.manifest(json!({
        "base": {"buildDir": "base"},
        "api": {"buildDir": "api", "dependencies": ["base"],
                "tests": {"unit": {"command": ["/bin/busybox", "sh", "/app/test.sh"]}}},
        "web": {"buildDir": "web", "dependencies": ["base"]}
    }));
    repo.commit("initial");
    repo
}

pub(crate) const PASSING_TEST: &str = "echo api unit tests: 3 passed\n";

pub(crate) fn tags(registry: &str, repo: &str) -> Vec<String> {
    let url = format!("http://{registry}/v2/farm/{repo}/tags/list");
    crate::support::services::runtime().block_on(async {
        let r = reqwest::get(&url).await.unwrap();
        if !r.status().is_success() {
            return Vec::new();
        }
        let v: Value = r.json().await.unwrap();
        v["tags"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect()).unwrap_or_default()
    })
}

/// NDJSON lines of a `--json` run.
pub(crate) fn events(stdout: &str) -> Vec<Value> {
    stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn steps_started(ev: &[Value]) -> Vec<String> {
    ev.iter()
        .filter(|e| e["type"] == "step_start")
        .filter_map(|e| e["step"].as_str().map(String::from))
        .collect()
}

pub(crate) fn record(ev: &[Value]) -> Value {
    ev.iter().find(|e| e["type"] == "build_record").expect("a build record")["record"].clone()
}

#[test]
fn a_cold_build_then_no_change_then_one_file_changed() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(None, PASSING_TEST);

    // 1. Cold: everything is built and the test job passes, on one rented host.
    let cold = Run::of(farm.spotbuild(repo.path()).args(["build", "--all", "--json"]));
    assert_eq!(cold.code, 0, "{}\n{}", cold.stdout, cold.stderr);
    let ev = events(&cold.stdout);
    let r = record(&ev);
    assert_eq!(r["result"], "success");
    assert_eq!(r["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(r["attempts"][0]["market"], "spot");
    let plan = crate::support::repo::hashes_of(&crate::support::spotbuild(repo.path()).args(["plan", "--offline", "--json"]).output().map(|o| serde_json::from_slice(&o.stdout).unwrap()).unwrap());
    for p in ["base", "api", "web"] {
        assert!(tags(&farm.registry(), p).contains(&format!("cache-{}", plan[p])), "{p} was pushed");
    }
    assert!(tags(&farm.registry(), "api").contains(&format!("cache-{}-unit", plan["api"])), "the test tag");
    farm.assert_nothing_left();
    let launched = farm.all_instances();
    // The build's cost is in the farm's ledger.
    let report = Run::of(farm.spotbuild(repo.path()).args(["report", "--since", "1h", "--format", "json"]));
    assert_eq!(report.code, 0, "{}", report.stderr);
    let rep = report.json();
    assert_eq!(rep["totals"]["builds"], 1, "{rep:#}");
    assert_eq!(rep["builds"][0]["markets"], json!(["spot"]));
    assert_eq!(rep["builds"][0]["result"], "success");

    // 2. No change: nothing to do, no launch (not even an API call), well under 2 s.
    let proxy = farm.fault_proxy();
    let config = farm.config_with_endpoint(&proxy.endpoint());
    let started = Instant::now();
    let again = Run::of(farm.spotbuild(repo.path()).arg("--config").arg(&config).args(["build", "--all"]));
    let took = started.elapsed();
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stderr.contains("nothing to build"), "{}", again.stderr);
    assert!(took < Duration::from_secs(2), "a no-op build took {took:?}");
    assert!(proxy.actions().is_empty(), "no EC2 call at all: {:?}", proxy.actions());
    assert_eq!(farm.all_instances(), launched);

    // 3. One file of web changed: only web is built, and its base layers come from cache.
    // Its ledger is a bucket that does not exist: the build still succeeds, and says so.
    repo.write("web/src/index.html", &format!("<p>changed {}</p>\n", unique()));
    repo.commit("web: change");
    let one = Run::of(farm.spotbuild(repo.path()).args(["build", "--all", "--json", "--ledger", "s3://no-such-bucket/ledger"]));
    assert_eq!(one.code, 0, "{}\n{}", one.stdout, one.stderr);
    assert!(one.stderr.contains("cost was not recorded"), "{}", one.stderr);
    let ev = events(&one.stdout);
    let built: Vec<String> = steps_started(&ev).into_iter().filter(|s| s.ends_with(":build")).collect();
    assert_eq!(built, ["web:build"]);
    let end = ev.iter().find(|e| e["type"] == "step_end" && e["step"] == "web:build").unwrap();
    assert_eq!(end["exit_code"], 0);
    farm.assert_nothing_left();
}

#[test]
fn an_interruption_notice_then_a_reclaim_gets_a_second_attempt_that_skips_what_was_pushed() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(Some(r#"["/bin/busybox", "sleep", "8"]"#), PASSING_TEST);
    let record_file = farm.dir.path().join("record.json");
    let child = farm
        .spotbuild(repo.path())
        .args(["build", "--all", "--json", "--record"])
        .arg(&record_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let instance = farm.wait_host(Duration::from_secs(60));
    farm.wait_event(Duration::from_secs(60), |e| e["type"] == "step_start" && e["step"] == "web:build");
    farm.post(&format!("/hosts/{instance}/interrupt?kill_after=5"));
    let (status, out, err) = finish(child, Duration::from_secs(180));
    assert_eq!(status, Some(0), "{out}\n{err}");
    let r: Value = serde_json::from_slice(&std::fs::read(&record_file).unwrap()).unwrap();
    let attempts = r["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{r:#}");
    assert_eq!(attempts[0]["outcome"], "interrupted");
    assert_eq!(attempts[0]["instance_id"], instance.as_str());
    assert_eq!(attempts[1]["outcome"], "success");
    assert_ne!(attempts[1]["instance_id"], instance.as_str());
    // The second attempt built only what the first had not pushed.
    let second: Vec<String> = events(&out)
        .iter()
        .filter(|e| e["attempt"] == 2 && e["type"] == "step_start")
        .filter_map(|e| e["step"].as_str().map(String::from))
        .filter(|s| s.ends_with(":build"))
        .collect();
    assert_eq!(second, ["web:build"], "{out}");
    farm.assert_nothing_left();
    // The ledger has both attempts, and the interruption for other jobs' breakers.
    let rep = Run::of(farm.spotbuild(repo.path()).args(["report", "--since", "1h", "--format", "json"])).json();
    assert_eq!(rep["totals"]["attempts"], 2, "{rep:#}");
    assert_eq!(rep["totals"]["wasted_attempts"], 1);
    let ledger = spotbuild::ledger::sqlite::SqliteLedger::open(&farm.dir.path().join("ledger.sqlite")).unwrap();
    let shared = crate::support::services::runtime()
        .block_on(spotbuild::ledger::LedgerStore::interruptions(&ledger, std::time::SystemTime::now() - Duration::from_secs(3600)))
        .unwrap();
    assert_eq!(shared.len(), 1);
}

#[test]
fn interruptions_other_ci_jobs_recorded_open_the_breaker() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(None, PASSING_TEST);
    // Two other builds were interrupted minutes ago, as recorded in the shared ledger.
    let ledger = spotbuild::ledger::sqlite::SqliteLedger::open(&farm.dir.path().join("ledger.sqlite")).unwrap();
    crate::support::services::runtime().block_on(async {
        for (n, ago) in [(1u32, 300u64), (2, 120)] {
            let at = std::time::SystemTime::now() - Duration::from_secs(ago);
            let i = spotbuild::ledger::Interruption {
                at: humantime::format_rfc3339_millis(at).to_string(),
                build_id: format!("other-job-{n}"),
                attempt: 1,
                instance_type: Some("m7a.16xlarge".into()),
                availability_zone: None,
            };
            spotbuild::ledger::LedgerStore::record_interruption(&ledger, &i).await.unwrap();
        }
    });
    let run = Run::of(farm.spotbuild(repo.path()).args(["build", "--all", "--json"]));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("spot breaker open"), "{}", run.stdout);
    let r = record(&events(&run.stdout));
    assert_eq!(r["attempts"][0]["market"], "on-demand", "{r:#}");
    farm.assert_nothing_left();
}

#[test]
fn when_every_spot_pool_fails_the_build_runs_on_demand() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(None, PASSING_TEST);
    let proxy = farm.fault_proxy();
    proxy.inject("CreateFleet", Some("DefaultTargetCapacityType=spot"), 1, Fault::FleetErrors { code: "InsufficientInstanceCapacity" });
    let config = farm.config_with_endpoint(&proxy.endpoint());
    let run = Run::of(farm.spotbuild(repo.path()).arg("--config").arg(&config).args(["build", "--all", "--json"]));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let r = record(&events(&run.stdout));
    assert_eq!(r["attempts"][0]["market"], "on-demand");
    assert!(r["attempts"][0]["market_reason"].as_str().unwrap().contains("InsufficientInstanceCapacity"), "{r:#}");
    farm.assert_nothing_left();
}

#[test]
fn sigkill_leaves_the_instance_to_reap_and_sigterm_terminates_it_before_exiting() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(Some(r#"["/bin/busybox", "sleep", "30"]"#), PASSING_TEST);

    let mut killed = farm.spotbuild(repo.path()).args(["build", "--all", "--json"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    // Each line the build printed, and when.
    let printed = {
        let out = std::io::BufReader::new(killed.stdout.take().unwrap());
        std::thread::spawn(move || std::io::BufRead::lines(out).map_while(Result::ok).map(|l| (Instant::now(), l)).collect::<Vec<_>>())
    };
    let instance = farm.wait_host(Duration::from_secs(60));
    farm.wait_event(Duration::from_secs(60), |e| e["type"] == "step_start");
    // Long enough that lines before the last chunk are there to be lost or kept.
    std::thread::sleep(Duration::from_secs(5));
    let killed_at = Instant::now();
    killed.kill().unwrap();
    killed.wait().unwrap();
    let printed = printed.join().unwrap();
    // The archive kept every line but those of the last chunk (at most 2 s old, written
    // every half second): all that was printed 4 s before the kill is there.
    let build_id = serde_json::from_str::<Value>(&printed[0].1).unwrap()["build_id"].as_str().unwrap().to_string();
    let archived = Run::of(farm.spotbuild(repo.path()).args(["logs", &build_id, "--json"]));
    assert_eq!(archived.code, 0, "{archived:?}");
    let kept = by_attempt(&archived.stdout);
    let all: String = printed.iter().map(|(_, l)| format!("{l}\n")).collect();
    let old: String = printed.iter().filter(|(t, _)| killed_at.duration_since(*t) > Duration::from_secs(4)).map(|(_, l)| format!("{l}\n")).collect();
    for (attempt, lines) in by_attempt(&old) {
        let have = kept.get(&attempt).cloned().unwrap_or_default();
        assert!(have.len() >= lines.len() && have[..lines.len()] == lines[..], "attempt {attempt}: {} of {} old lines archived", have.len(), lines.len());
    }
    for (attempt, lines) in &kept {
        assert_eq!(lines[..], by_attempt(&all)[attempt][..lines.len()], "the archive is what was printed");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(farm.live_instances(), [instance.clone()], "SIGKILL cannot tear down: the instance is left to reap");
    let reap = Run::of(
        farm.with_key(&mut crate::support::spotbuild(repo.path()))
            .args(["reap", "--older-than", "0s", "--json", "--region", "us-east-1"])
            .env("SPOTBUILD_EC2_ENDPOINT", farm.ec2_endpoint())
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    assert_eq!(reap.code, 0, "{}\n{}", reap.stdout, reap.stderr);
    assert!(reap.stdout.contains(&instance), "{}", reap.stdout);
    farm.assert_nothing_left();

    let mut termed = farm.spotbuild(repo.path()).args(["build", "--all", "--json"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        if let Some(h) = farm.hosts().iter().find(|h| h["instance_id"] != instance.as_str()) {
            break h["instance_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no second host");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(termed.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut termed, Duration::from_secs(60));
    assert_eq!(status, Some(143));
    // Terminated before the controller exited: no wait here.
    assert!(!farm.live_instances().contains(&second), "SIGTERM must terminate {second} before exiting");
    let mut err = String::new();
    termed.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains(&format!("terminated {second}")), "{err}");
    farm.assert_nothing_left();
}

#[test]
fn a_failing_test_job_fails_the_ci_step_through_tee_with_its_logs() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(None, "echo 'api unit: expected 2, got 3'\nexit 1\n");
    let log = farm.dir.path().join("ci.log");
    let out = farm
        .env(&mut Command::new("bash"))
        .args(["-eo", "pipefail", "-c"])
        .arg(format!("{} test api unit | tee {}", env!("CARGO_BIN_EXE_spotbuild"), log.display()))
        .current_dir(repo.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = std::fs::read_to_string(&log).unwrap();
    assert!(shown.contains("api unit: expected 2, got 3"), "the job's output is in the log:\n{shown}");
    assert!(shown.contains("api:test:unit"), "{shown}");
    let plan = crate::support::repo::hashes_of(&crate::support::spotbuild(repo.path()).args(["plan", "--offline", "--json"]).output().map(|o| serde_json::from_slice(&o.stdout).unwrap()).unwrap());
    assert!(!tags(&farm.registry(), "api").contains(&format!("cache-{}-unit", plan["api"])), "no test tag for a failure");
    farm.assert_nothing_left();
}

#[test]
fn a_cut_connection_is_resumed_and_no_line_is_lost() {
    docker_required();
    let farm = LocalFarm::start();
    let slow = r#"["/bin/busybox", "sh", "-c", "for i in $(/bin/busybox seq 1 40); do echo line-$i; /bin/busybox sleep 0.1; done"]"#;
    let repo = farm_repo(Some(slow), PASSING_TEST);
    let child = farm.spotbuild(repo.path()).args(["build", "--all", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let instance = farm.wait_host(Duration::from_secs(60));
    farm.wait_event(Duration::from_secs(60), |e| e["line"].as_str().is_some_and(|l| l.ends_with("line-5")));
    let said = farm.post(&format!("/hosts/{instance}/cut"));
    assert!(!said.starts_with("0 "), "a connection was cut: {said}");
    let (status, out, err) = finish(child, Duration::from_secs(120));
    assert_eq!(status, Some(0), "{out}\n{err}");
    let ev = events(&out);
    assert!(ev.iter().any(|e| e["type"] == "controller" && e["detail"].as_str().unwrap_or("").starts_with("reconnected")), "{out}");
    // Every agent event exactly once, in order, with no gap.
    let seqs: Vec<u64> = ev.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    for i in 1..=40 {
        let n = ev.iter().filter(|e| e["line"].as_str().is_some_and(|l| l.ends_with(&format!(" line-{i}")))).count();
        assert_eq!(n, 1, "line-{i} appears once");
    }
    farm.assert_nothing_left();
}

#[test]
fn max_instances_spreads_independent_parts_over_several_hosts() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(None, PASSING_TEST);
    // A project that shares nothing with the others.
    repo.write("tool/Dockerfile", "FROM scratch\nCOPY tool.txt /tool.txt\n");
    repo.write("tool/tool.txt", &format!("tool {}\n", unique()));
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(repo.path().join("build_manifest.json")).unwrap()).unwrap();
    manifest["tool"] = json!({"buildDir": "tool"});
    repo.manifest(manifest);
    repo.commit("tool");
    let run = Run::of(farm.spotbuild(repo.path()).args(["build", "--all", "--json", "--max-instances", "2"]));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let ev = events(&run.stdout);
    let records: Vec<&Value> = ev.iter().filter(|e| e["type"] == "build_record").collect();
    assert_eq!(records.len(), 2, "{}", run.stdout);
    let instance = |g: u64| records.iter().find(|r| r["group"] == g).unwrap()["record"]["attempts"][0]["instance_id"].clone();
    assert_ne!(instance(1), instance(2), "two hosts");
    let built = |g: u64| -> Vec<String> {
        ev.iter()
            .filter(|e| e["group"] == g && e["type"] == "step_start")
            .filter_map(|e| e["step"].as_str().filter(|s| s.ends_with(":build")).map(String::from))
            .collect()
    };
    assert_eq!(built(1), ["base:build", "api:build", "web:build"]);
    assert_eq!(built(2), ["tool:build"]);
    farm.assert_nothing_left();
}

#[test]
fn with_a_baked_mirror_only_what_it_lacks_is_shipped() {
    docker_required();
    let repo = farm_repo(None, PASSING_TEST);
    // Enough history that a full bundle is clearly bigger than one commit's worth.
    for i in 0..20 {
        repo.write(&format!("docs/page{i}.md"), &format!("{}\n", unique().repeat(200)));
        repo.commit(&format!("docs {i}"));
    }
    let farm = LocalFarm::start_with(Some(repo.path()));
    repo.write("web/src/index.html", &format!("<p>after the image was baked {}</p>\n", unique()));
    repo.commit("web: change");
    let run = Run::of(farm.spotbuild(repo.path()).args(["build", "--all", "--json"]));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let r = record(&events(&run.stdout));
    assert_eq!(r["attempts"][0]["thin_bundle"], true, "{r:#}");
    let shipped = r["attempts"][0]["shipped_bytes"].as_u64().unwrap();
    let full = farm.dir.path().join("full.bundle");
    repo.git(&["bundle", "create", "-q", full.to_str().unwrap(), "HEAD"]);
    let full = std::fs::metadata(&full).unwrap().len();
    assert!(shipped * 10 < full, "shipped {shipped} bytes; a full bundle is {full}");
    farm.assert_nothing_left();
}

/// A host that goes away takes only its own processes along: the container of a test job
/// it was running keeps running, and holds its image (`docker rmi -f` cannot remove an image
/// a running container uses). Once the farm is dropped, neither is left.
#[test]
fn a_test_container_that_outlives_its_host_leaves_nothing_behind() {
    docker_required();
    let farm = LocalFarm::start();
    let registry = farm.registry();
    let repo = farm_repo(None, "/bin/busybox sleep 30\n");
    let mut build = farm.spotbuild(repo.path()).args(["build", "--all", "--json"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    farm.wait_event(Duration::from_secs(90), |e| e["type"] == "step_start" && e["step"] == "api:test:unit");
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers_of(&registry).is_empty() {
        assert!(Instant::now() < deadline, "the test job's container did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM: the controller terminates the instance, and the farm removes its host.
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(build.id() as i32, libc::SIGTERM) };
    wait_child(&mut build, Duration::from_secs(60));
    farm.assert_nothing_left();
    drop(farm);
    assert_eq!(containers_of(&registry), Vec::<String>::new());
    let images: Vec<String> = docker_out(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .lines()
        .filter(|i| i.starts_with(&format!("{registry}/")))
        .map(String::from)
        .collect();
    assert_eq!(images, Vec::<String>::new());
}

/// Containers (running or not) of an image from `registry`.
fn containers_of(registry: &str) -> Vec<String> {
    docker_out(&["ps", "-a", "--format", "{{.Names}} {{.Image}}"])
        .lines()
        .filter(|l| l.split_once(' ').is_some_and(|(_, image)| image.starts_with(&format!("{registry}/"))))
        .map(String::from)
        .collect()
}

/// Waits for a build started with piped output; its exit code and what it printed.
/// Output is drained while it runs, so a full pipe never stalls the build.
fn finish(mut child: std::process::Child, limit: Duration) -> (Option<i32>, String, String) {
    fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    }
    // A stream the caller took is its own to read.
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let status = wait_child(&mut child, limit);
    let joined = |h: Option<std::thread::JoinHandle<String>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
    (status, joined(out), joined(err))
}

pub(crate) fn wait_child(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().or_else(|| std::os::unix::process::ExitStatusExt::signal(&s).map(|s| 128 + s));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the build did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_arm64_build_rents_only_arm64_types_from_the_arm64_image() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = TestRepo::new();
    repo.manifest(json!({
        "app": {"buildDir": "app", "multiarch": "host"},
        "x86only": {"buildDir": "x86only"}
    }));
    // The farm's hosts are this x86_64 machine: the image only copies, so it builds here.
    repo.write("app/Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY stamp /stamp\n");
    std::fs::copy(crate::support::docker::arm64_busybox(), repo.path().join("app/busybox")).unwrap();
    repo.write("app/stamp", &format!("{}\n", unique()));
    repo.write("x86only/Dockerfile", "FROM scratch\nCOPY stamp /stamp\n");
    repo.write("x86only/stamp", "x86\n");
    repo.commit("arm64");
    let proxy = farm.fault_proxy();
    let config = farm.config_with_endpoint(&proxy.endpoint());
    // The build, and `logs --follow` on it from the moment its id is known.
    let mut child = farm
        .spotbuild(repo.path())
        .arg("--config")
        .arg(&config)
        .args(["build", "--arch", "arm64", "--all", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let build_id = serde_json::from_str::<Value>(&first).unwrap()["build_id"].as_str().unwrap().to_string();
    let follower = farm.spotbuild(repo.path()).args(["logs", &build_id, "--follow", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // What the reader holds beyond the first line stays with it.
    let rest = std::thread::spawn(move || {
        let mut r = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut r);
        r
    });
    let (code, _, err) = finish(child, Duration::from_secs(180));
    let rest = rest.join().unwrap();
    let live = format!("{first}{rest}");
    assert_eq!(code, Some(0), "{live}\n{err}");
    let (followed, followed_lines, follow_err) = finish(follower, Duration::from_secs(30));
    assert_eq!(followed, Some(0), "`logs --follow` ends when the build does: {follow_err}");
    // The archive is the live `--json` stream, line for line, attempt by attempt; what
    // --follow printed while the build ran is the same.
    let archived = Run::of(farm.spotbuild(repo.path()).args(["logs", &build_id, "--json"]));
    assert_eq!(archived.code, 0, "{archived:?}");
    assert_eq!(by_attempt(&archived.stdout), by_attempt(&live));
    assert_eq!(by_attempt(&followed_lines), by_attempt(&live));
    let readable = Run::of(farm.spotbuild(repo.path()).args(["logs", &build_id, "--step", "app:build"]));
    assert!(readable.stdout.contains("app:build"), "{readable:?}");
    assert!(!readable.stdout.contains("launching"), "--step keeps one step's lines: {}", readable.stdout);

    // One fleet request, of arm64 pools only, from the arm64 image.
    let fleet = proxy.params("CreateFleet");
    let types: Vec<&String> = fleet.iter().filter(|(k, _)| k.ends_with(".InstanceType")).map(|(_, v)| v).collect();
    assert!(!types.is_empty(), "{fleet:?}");
    for t in &types {
        assert_eq!(spotbuild::cloud::types::arch_of(t), spotbuild::platform::Arch::Arm64, "{t} asked for: {types:?}");
    }
    let template = proxy.params("CreateLaunchTemplate");
    let arm64_ami = farm.state["ami_arm64"].as_str().unwrap();
    assert_ne!(arm64_ami, farm.state["ami"].as_str().unwrap());
    assert_eq!(template.get("LaunchTemplateData.ImageId").map(String::as_str), Some(arm64_ami), "{template:?}");
    let arch_tag = template.iter().any(|(k, v)| k.ends_with(".Key") && v == "spotbuild:arch")
        && template.values().any(|v| v == "arm64");
    assert!(arch_tag, "the instance is tagged with its architecture: {template:?}");

    // Only the multiarch project was built, under its arm64 tag.
    let hashes = repo.hashes();
    assert!(tags(&farm.registry(), "app").contains(&format!("cache-{}-arm64", hashes["app"])));
    assert!(tags(&farm.registry(), "x86only").is_empty(), "an x86_64-only project is not an arm64 build's");

    // The ledger knows the architecture.
    let report = Run::of(farm.spotbuild(repo.path()).args(["report", "--since", "1h", "--by", "arch", "--format", "json"]));
    assert_eq!(report.code, 0, "{}", report.stderr);
    let rows = report.json()["rows"].clone();
    assert_eq!(rows.as_array().map(|r| r.len()), Some(1), "{rows:#}");
    assert_eq!(rows[0]["key"], "arm64", "{rows:#}");
    // On a terminal the build redraws one progress line; off one (above) it did not.
    assert!(!live.contains('\u{1b}') && !err.contains('\u{1b}'), "no terminal control off a terminal");
    repo.write("app/stamp", &format!("{}\n", unique()));
    repo.commit("again");
    let mut tty = Command::new("script");
    farm.env(&mut tty).current_dir(repo.path()).args([
        "-qec",
        &format!("{} build --arch arm64 app", env!("CARGO_BIN_EXE_spotbuild")),
        "/dev/null",
    ]);
    let on_tty = Run::of(&mut tty);
    assert_eq!(on_tty.code, 0, "{on_tty:?}");
    assert!(on_tty.stdout.contains("\r\u{1b}[2K") && on_tty.stdout.contains("[attempt 1] "), "a redrawn line: {:?}", on_tty.stdout);
    assert!(!on_tty.stdout.contains("… still "), "waits are redrawn, not repeated: {}", on_tty.stdout);

    // The ledger's entry says where the log is.
    let builds = Run::of(farm.spotbuild(repo.path()).args(["report", "--since", "1h", "--format", "json"])).json()["builds"].clone();
    assert!(builds[0]["log"].as_str().is_some_and(|l| l.contains(&format!("logs/")) && l.contains(&build_id)), "{builds:#}");
    farm.assert_nothing_left();
}

/// The NDJSON lines of a build, per attempt log (0: the build's own lines), in order.
fn by_attempt(text: &str) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut out: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap();
        let attempt = match &v["attempt"] {
            Value::Number(n) => n.as_u64().unwrap(),
            // `attempt_ended` carries the attempt's record.
            Value::Object(record) => record["attempt"].as_u64().unwrap(),
            _ => 0,
        };
        out.entry(attempt).or_default().push(line.to_string());
    }
    out
}
