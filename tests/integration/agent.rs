//! Agent mode on the real Docker engine and a real registry: builds with the registry cache,
//! failures, interruption notices, the event stream under load, replay, secrets, deadlines.
//! Base images cannot be pulled here, so test images are `FROM scratch` with a static busybox.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::imds::FakeImds;
use crate::support::repo::TestRepo;
use crate::support::services::Registry;
use crate::support::docker::{docker_required, unique, Images, BUSYBOX};
use crate::support::{spotbuild, Run};

/// `a` (busybox + a file) and `b` built FROM `a`, with a named stage of its own and a test.
fn chain_repo() -> TestRepo {
    let repo = TestRepo::new();
    let nonce = unique();
    std::fs::create_dir_all(repo.path().join("a")).unwrap();
    std::fs::copy(BUSYBOX, repo.path().join("a/busybox")).unwrap();
    repo.write("a/Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY motd /motd\n");
    repo.write("a/motd", &format!("a v1 {nonce}\n"));
    repo.write(
        "b/Dockerfile",
        "FROM scratch AS assets\nCOPY asset.txt /asset.txt\n\
         FROM a\nCOPY --from=assets /asset.txt /asset.txt\nCOPY b.txt /b.txt\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"cat /motd /b.txt > /out\"]\n",
    );
    repo.write("b/asset.txt", &format!("asset {nonce}\n"));
    repo.write("b/b.txt", "b v1\n");
    repo.manifest(json!({
        "a": {"buildDir": "a"},
        "b": {"buildDir": "b", "dependencies": ["a"],
              "tests": {"unit": {"command": ["/bin/busybox", "grep", "-q", "b v", "/out"]}}}
    }));
    repo.commit("chain");
    repo
}

/// Runs `build --local --json` and returns the run and its parsed events.
fn build(repo: &TestRepo, registry: &Registry, extra: &[&str]) -> (Run, Vec<Value>) {
    let url = format!("{}/t", registry.host());
    let workdir = tempfile::tempdir().unwrap();
    let run = Run::of(
        spotbuild(repo.path())
            .args(["build", "--local", "--json", "--registry", &url])
            .arg("--workdir")
            .arg(workdir.path())
            .args(extra),
    );
    let events = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an event ({e}): {l}")))
        .collect();
    (run, events)
}

fn step_end<'a>(events: &'a [Value], step: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["type"] == "step_end" && e["step"] == step)
}

fn layers(events: &[Value], step: &str) -> (u64, u64) {
    let e = step_end(events, step).unwrap_or_else(|| panic!("no step_end for {step}"));
    (e["cached_layers"].as_u64().unwrap(), e["total_layers"].as_u64().unwrap())
}

/// Asserts the build succeeded, showing its events if not.
fn assert_ok(run: &Run) {
    assert_eq!(run.code, 0, "build failed:\n{}\n{}", run.stdout, run.stderr);
}

fn result(events: &[Value]) -> &Value {
    let r = events.last().expect("events");
    assert_eq!(r["type"], "result", "the last event is the result: {r}");
    r
}

fn tags(registry: &Registry, repository: &str) -> Vec<String> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{}/v2/{repository}/tags/list", registry.host())])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut t: Vec<String> = v["tags"].as_array().map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect()).unwrap_or_default();
    t.sort();
    t
}

#[test]
fn a_chain_builds_cold_then_reuses_its_cache() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let repo = chain_repo();

    // Cold: both built and pushed, the test passes and is tagged.
    let (run, events) = build(&repo, &registry, &[]);
    assert_ok(&run);
    assert_eq!(events[0]["type"], "hello");
    assert_eq!(result(&events)["outcome"], "success");
    let plan = repo.plan(&["--offline", "--json"]).json();
    let (ta, tb) = (plan["projects"][0]["tag"].as_str().unwrap(), plan["projects"][1]["tag"].as_str().unwrap());
    assert!(tags(&registry, "t/a").contains(&ta.to_string()));
    assert!(tags(&registry, "t/b").contains(&format!("{tb}-unit")));
    assert!(tags(&registry, "t/b").contains(&"branch-main".to_string()));
    let (_, total_b) = layers(&events, "b:build");
    assert_eq!(total_b, 4, "assets stage + 3 layers of b");
    // B's FROM a was pinned to a's exact image.
    assert!(events.iter().any(|e| e["type"] == "log" && e["line"].as_str().unwrap().contains(&format!("pinned to {}/t/a:{ta}", registry.host()))));

    // Unchanged, forced rerun: every layer comes from cache.
    repo.commit("again [ci rebuild]");
    let (run, events) = build(&repo, &registry, &[]);
    assert_ok(&run);
    assert_eq!(layers(&events, "a:build"), (2, 2));
    assert_eq!(layers(&events, "b:build"), (4, 4));

    // A change to B rebuilds B only, its unchanged layers cached.
    repo.write("b/b.txt", &format!("b v2 {}\n", unique()));
    repo.commit("b v2");
    let (run, events) = build(&repo, &registry, &[]);
    assert_ok(&run);
    assert!(step_end(&events, "a:build").is_none(), "a is not rebuilt");
    assert_eq!(layers(&events, "b:build"), (2, 4), "the assets stage and its copy are cached");

    // A change to A rebuilds both; B's own stage stays cached.
    repo.write("a/motd", &format!("a v2 {}\n", unique()));
    repo.commit("a v2");
    let (run, events) = build(&repo, &registry, &[]);
    assert_ok(&run);
    assert_eq!(layers(&events, "a:build"), (1, 2));
    assert_eq!(layers(&events, "b:build"), (1, 4), "only the assets stage is reused");
    assert_eq!(result(&events)["outcome"], "success");

    // And now nothing is left to do.
    let (run, events) = build(&repo, &registry, &[]);
    assert_eq!(run.code, 0);
    assert!(events.is_empty());
    assert!(run.stderr.contains("nothing to build"), "{}", run.stderr);
}

#[test]
fn a_failing_build_fails_its_step_and_skips_its_dependents() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let repo = chain_repo();
    repo.write("b/Dockerfile", "FROM a\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo broken >&2; exit 3\"]\n");
    repo.write("c/Dockerfile", "FROM b\n");
    repo.manifest(json!({
        "a": {"buildDir": "a"},
        "b": {"buildDir": "b", "dependencies": ["a"]},
        "c": {"buildDir": "c", "dependencies": ["b"]}
    }));
    repo.commit("broken b");
    let (run, events) = build(&repo, &registry, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let r = result(&events);
    assert_eq!(r["outcome"], "failed");
    assert_eq!(r["failed_steps"], json!(["b:build"]));
    assert_ne!(step_end(&events, "b:build").unwrap()["exit_code"], 0);
    assert!(events.iter().any(|e| e["type"] == "log" && e["line"].as_str().unwrap().contains("broken")));
    assert!(step_end(&events, "c:build").is_none(), "c depends on the broken b");
    assert!(step_end(&events, "a:push").is_some(), "a was still built and pushed");

    // The table for people says the same.
    let url = format!("{}/t", registry.host());
    let workdir = tempfile::tempdir().unwrap();
    let run = Run::of(spotbuild(repo.path()).args(["build", "--local", "--registry", &url]).arg("--workdir").arg(workdir.path()));
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("b:build ✘ failed with exit code"), "{}", run.stdout);
    assert!(run.stdout.contains("result: failed (1 step failed: b:build)"), "{}", run.stdout);
}

#[test]
fn a_failing_test_job_fails_and_is_not_tagged() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let repo = chain_repo();
    repo.manifest(json!({
        "a": {"buildDir": "a", "tests": {"unit": {"command": ["/bin/busybox", "sh", "-c", "echo 2 tests failed; exit 5"]}}}
    }));
    repo.commit("failing test");
    let (run, events) = build(&repo, &registry, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(result(&events)["failed_steps"], json!(["a:test:unit"]));
    assert_eq!(step_end(&events, "a:test:unit").unwrap()["exit_code"], 5);
    assert!(events.iter().any(|e| e["line"] == "2 tests failed"));
    assert!(!tags(&registry, "t/a").iter().any(|t| t.ends_with("-unit")));
}

#[test]
fn a_pass_is_recorded_on_the_digest_tested_and_not_if_the_tag_moved_meanwhile() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let repo = chain_repo();
    // A host test that moves the image's tag while it runs (as a racing job could).
    repo.write(
        "a/move-tag.sh",
        "#!/bin/sh\nset -e\nrepo=${SPOTBUILD_IMAGE%@*}\n\
         printf 'FROM %s\\nLABEL moved=1\\n' \"$SPOTBUILD_IMAGE\" | docker build -q -t \"$repo:cache-$CONTENT_HASH\" - >/dev/null\n\
         docker push -q \"$repo:cache-$CONTENT_HASH\" >/dev/null\necho moved\n",
    );
    std::fs::set_permissions(repo.path().join("a/move-tag.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    repo.manifest(json!({
        "a": {"buildDir": "a", "tests": {
            "unit": {"command": ["/bin/busybox", "true"]},
            "racy": {"command": ["./move-tag.sh"], "host": true}
        }}
    }));
    repo.commit("a test that moves the tag");
    let (run, events) = build(&repo, &registry, &[]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(result(&events)["failed_steps"], json!(["a:test:racy"]), "{}", run.stdout);
    assert!(events.iter().any(|e| e["line"].as_str().is_some_and(|l| l.contains("while its test ran: the pass is not recorded"))), "{}", run.stdout);
    let t = tags(&registry, "t/a");
    assert!(t.iter().any(|t| t.ends_with("-unit")), "{t:?}");
    assert!(!t.iter().any(|t| t.ends_with("-racy")), "{t:?}");
    // The unit pass names the digest it ran on, which the tag pointed at then.
    let said = events.iter().filter_map(|e| e["line"].as_str()).find(|l| l.starts_with("passed: tagged")).unwrap().to_string();
    assert!(said.contains("sha256:"), "{said}");
}

#[test]
fn an_interruption_notice_stops_new_steps_and_keeps_finished_work() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let imds = FakeImds::start();
    let repo = chain_repo();
    // b takes a few seconds, so the notice arrives while it builds; c would come after.
    repo.write("b/Dockerfile", "FROM a\nCOPY b.txt /b.txt\nRUN [\"/bin/busybox\", \"sleep\", \"4\"]\n");
    repo.write("c/Dockerfile", "FROM a\nCOPY c.txt /c.txt\n");
    repo.write("c/c.txt", "c\n");
    repo.manifest(json!({
        "a": {"buildDir": "a"},
        "b": {"buildDir": "b", "dependencies": ["a"]},
        "c": {"buildDir": "c", "dependencies": ["a"]}
    }));
    repo.commit("slow b");

    let (code, events) = build_until_notice(&repo, &registry, &imds, "b:build", 120);
    assert_eq!(code, Some(6), "interrupted");
    assert_eq!(events[0]["instance_id"], "i-0123456789abcdef0");
    let notice = events.iter().position(|e| e["type"] == "notice").expect("a notice event");
    assert_eq!(events[notice]["kind"], "interruption");
    assert_eq!(events[notice]["action"], "terminate");
    let r = result(&events);
    assert_eq!(r["outcome"], "interrupted");
    assert!(r["message"].as_str().unwrap().contains("spot interruption"), "{r}");
    // No step started after the notice but b's push, which keeps its finished build.
    let started_after: Vec<&str> = events[notice..]
        .iter()
        .filter(|e| e["type"] == "step_start")
        .map(|e| e["step"].as_str().unwrap())
        .collect();
    assert!(started_after.iter().all(|s| *s == "b:push"), "{started_after:?}");
    assert!(step_end(&events, "c:build").is_none());
    // What was built before and during the notice is in the registry.
    assert_eq!(tags(&registry, "t/a").iter().filter(|t| t.starts_with("cache-")).count(), 1);
    assert_eq!(tags(&registry, "t/b").iter().filter(|t| t.starts_with("cache-")).count(), 1);
    assert!(tags(&registry, "t/c").is_empty());
}

/// Runs `build --local --json` with `imds` as the metadata service, which announces a
/// termination `lead` seconds ahead as soon as `step` starts. Returns the exit code and
/// the events.
fn build_until_notice(repo: &TestRepo, registry: &Registry, imds: &FakeImds, step: &str, lead: u64) -> (Option<i32>, Vec<Value>) {
    let url = format!("{}/t", registry.host());
    let workdir = tempfile::tempdir().unwrap();
    let mut child = spotbuild(repo.path())
        .args(["build", "--local", "--json", "--registry", &url])
        .arg("--workdir")
        .arg(workdir.path())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut events: Vec<Value> = Vec::new();
    let mut garbled = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        match serde_json::from_str::<Value>(&line) {
            Ok(e) => {
                if e["type"] == "step_start" && e["step"] == step {
                    imds.interrupt_in(lead);
                }
                events.push(e);
            }
            Err(e) => {
                garbled.get_or_insert(format!("not an event ({e}): {line}"));
            }
        }
    }
    let code = child.wait().unwrap().code();
    // Failed only once the build has ended: one still running would outlive the test's
    // image guard, and what it built would stay on the machine.
    if let Some(why) = garbled {
        panic!("{why}");
    }
    (code, events)
}

#[test]
fn a_build_cut_short_by_a_notice_keeps_its_finished_stages() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let imds = FakeImds::start();
    let repo = chain_repo();
    // The notice leaves 25 s, so the running build gets about 5 s before it is stopped: its
    // finished stage must still reach the registry; its unfinished image cannot.
    repo.write(
        "b/Dockerfile",
        &format!(
            "FROM a AS deps\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo {} > /deps\"]\n\
             FROM deps\nRUN [\"/bin/busybox\", \"sleep\", \"60\"]\n",
            unique()
        ),
    );
    repo.commit("slow final stage");
    let started = std::time::Instant::now();
    let (code, events) = build_until_notice(&repo, &registry, &imds, "b:build", 25);
    assert_eq!(code, Some(6));
    assert!(started.elapsed() < std::time::Duration::from_secs(50), "the build was stopped, not waited for");
    assert_eq!(result(&events)["outcome"], "interrupted");
    assert_ne!(step_end(&events, "b:build").unwrap()["exit_code"], 0);
    assert_eq!(step_end(&events, "b:push").unwrap()["exit_code"], 0, "the finished stage was pushed");
    let b_tags = tags(&registry, "t/b");
    assert!(b_tags.iter().any(|t| t.starts_with("stage-deps-cache-")), "{b_tags:?}");
    assert!(!b_tags.iter().any(|t| t.starts_with("cache-")), "{b_tags:?}");
}

#[test]
fn the_classic_builder_builds_and_caches_too() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let repo = chain_repo();
    let (run, events) = build(&repo, &registry, &["--builder", "classic"]);
    assert_ok(&run);
    assert_eq!(events[0]["builder"], "classic");
    assert_eq!(layers(&events, "b:build").1, 4);
    assert!(tags(&registry, "t/b").iter().any(|t| t.ends_with("-unit")));
    repo.commit("again [ci rebuild]");
    let (run, events) = build(&repo, &registry, &["--builder", "classic"]);
    assert_ok(&run);
    assert_eq!(layers(&events, "a:build"), (2, 2));
    assert_eq!(layers(&events, "b:build"), (4, 4));
}

#[test]
fn checkouts_come_from_bundles_on_top_of_a_mirror() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    // The "baked" mirror has the first commit; the bundle carries only what it lacks.
    let mirror = dir.path().join("mirror.git");
    crate::support::repo::git_in(dir.path(), &["clone", "-q", "--bare", repo.path().to_str().unwrap(), mirror.to_str().unwrap()]);
    let base = repo.head();
    repo.write("README", "second\n");
    let head = repo.commit("second");
    let bundle = dir.path().join("delta.bundle");
    repo.git(&["bundle", "create", "-q", bundle.to_str().unwrap(), &format!("{base}..main")]);

    let mut j = job(&repo, &dir.path().join("w1"), json!([{"name": "show", "command": ["cat", "README"]}]));
    j["commit"] = json!(head);
    j["source"] = json!({"bundle": {"path": bundle, "mirror": mirror}});
    let run = agent(&j);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(run.stdout.contains(r#""line":"second""#), "{}", run.stdout);

    // Without the mirror the delta bundle cannot apply: the checkout fails and says why.
    let mut j = job(&repo, &dir.path().join("w2"), json!([]));
    j["commit"] = json!(head);
    j["source"] = json!({"bundle": {"path": bundle}});
    let run = agent(&j);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("the bundle does not apply"), "{}", run.stdout);
    assert!(run.stdout.contains(r#""failed_steps":["checkout"]"#), "{}", run.stdout);
}

/// A repository with one commit, for jobs that need only a checkout.
fn tiny_repo() -> TestRepo {
    let repo = TestRepo::new();
    repo.write("README", "x\n");
    repo.commit("x");
    repo
}

fn job(repo: &TestRepo, workdir: &Path, run: Value) -> Value {
    json!({
        "v": 1,
        "build_id": "t1",
        "commit": repo.head(),
        "source": {"repository": repo.path().join(".git")},
        "workdir": workdir,
        "registry": {"url": "127.0.0.1:1"},
        "projects": [],
        "run": run,
        "imds": {"enabled": false},
        "shutdown_command": []
    })
}

/// Runs `agent run` with `job` on stdin; returns the run.
fn agent(job: &Value) -> Run {
    let mut child = spotbuild(Path::new("/"))
        .args(["agent", "run", "--job", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), job).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn fifty_megabytes_of_output_arrive_intact_and_replay_from_any_seq() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    // 51,200 lines of 1 KiB (1023 bytes and a newline): 50 MiB.
    let big = dir.path().join("big.txt");
    let mut content = Vec::with_capacity(50 << 20);
    for i in 0..51_200u32 {
        let head = format!("line {i:06} ");
        content.extend_from_slice(head.as_bytes());
        content.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 1023 - head.len()));
        content.push(b'\n');
    }
    std::fs::write(&big, &content).unwrap();
    let workdir = dir.path().join("work");
    let run = agent(&job(&repo, &workdir, json!([{"name": "cat", "command": ["cat", big]}])));
    assert_ok(&run);

    let mut hasher = Sha256::new();
    let mut count = 0;
    let mut last_seq = 0;
    for line in run.stdout.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let seq = e["seq"].as_u64().unwrap();
        assert_eq!(seq, last_seq + 1, "no gaps");
        last_seq = seq;
        if e["type"] == "log" && e["step"] == "run:cat" {
            hasher.update(e["line"].as_str().unwrap().as_bytes());
            hasher.update(b"\n");
            count += 1;
        }
    }
    assert_eq!(count, 51_200);
    assert_eq!(hasher.finalize()[..], Sha256::digest(&content)[..], "every byte, in order");

    // The file holds exactly what was streamed; a replay from the middle yields the rest.
    let file = workdir.join("events.ndjson");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), run.stdout);
    let middle = last_seq / 2;
    let replay = Run::of(spotbuild(Path::new("/")).args(["agent", "replay", "--events"]).arg(&file).args(["--after", &middle.to_string()]));
    assert_eq!(replay.code, 0);
    let expected: String = run.stdout.lines().skip(middle as usize).map(|l| format!("{l}\n")).collect();
    assert!(replay.stdout == expected, "replay after {middle} differs");
}

#[test]
fn secrets_appear_in_no_event_and_no_file() {
    docker_required();
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let repo = chain_repo();
    let secret = "hunter2-Sup3rSecret";
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("work");
    let plan = repo.plan(&["--offline", "--json", "a"]).json();
    let a = &plan["projects"][0];
    let job = json!({
        "v": 1,
        "build_id": "s1",
        "commit": repo.head(),
        "source": {"repository": repo.path().join(".git")},
        "workdir": workdir,
        "registry": {"url": format!("{}/t", registry.host()), "username": "ci", "password": secret},
        "projects": [{"name": "a", "hash": a["hash"], "tag": a["tag"], "build": true,
                      "build_dir": "a", "dockerfile": "a/Dockerfile", "project_dir": "a"}],
        "run": [{"name": "leak", "command": ["sh", "-c", format!("echo the password is {secret}")]}],
        "imds": {"enabled": false},
        "shutdown_command": []
    });
    let run = agent(&job);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("the password is ******"));
    assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret));
    // Docker was given the credentials (through the helper), but nothing on disk has them,
    // not even in the base64 form docker itself would store.
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("ci:{secret}"));
    for entry in walk(&workdir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(secret), "{} holds the password", entry.display());
        assert!(!text.contains(&encoded), "{} holds it in base64", entry.display());
    }
    assert!(tags(&registry, "t/a").contains(&a["tag"].as_str().unwrap().to_string()));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn past_the_deadline_work_stops_and_the_shutdown_command_runs() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("shut-down");
    let mut j = job(&repo, &dir.path().join("work"), json!([{"name": "forever", "command": ["sleep", "60"]}]));
    let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    j["deadline"] = json!(humantime::format_rfc3339_seconds(deadline).to_string());
    j["shutdown_command"] = json!(["touch", marker]);
    let started = std::time::Instant::now();
    let run = agent(&j);
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "the deadline stopped the sleep");
    assert_eq!(run.code, 1, "{}", run.stderr);
    let r: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(r["outcome"], "failed");
    assert_eq!(r["message"], "the job's deadline passed");
    assert!(marker.exists(), "the shutdown command ran");
}

#[test]
fn a_job_of_another_version_is_refused() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(&repo, dir.path(), json!([]));
    j["v"] = json!(2);
    let run = agent(&j);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("unsupported version 2"), "{}", run.stderr);
}

/// Starts `agent run` on `job`; returns the child with its stdout lines on a channel, each
/// with when it arrived.
fn start_agent(job: &Value) -> (std::process::Child, std::sync::mpsc::Receiver<(std::time::Instant, String)>) {
    let mut child = spotbuild(Path::new("/"))
        .args(["agent", "run", "--job", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), job).unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((std::time::Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for the line matching `pred`.
fn wait_line(rx: &std::sync::mpsc::Receiver<(std::time::Instant, String)>, limit: std::time::Duration, pred: impl Fn(&Value) -> bool) -> (std::time::Instant, Value) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (at, line) = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no such line within {limit:?}"));
        let v: Value = serde_json::from_str(&line).unwrap();
        if pred(&v) {
            return (at, v);
        }
    }
}

/// Waits (bounded) for the child to exit; returns when and its code.
fn wait_exit(child: &mut std::process::Child, limit: std::time::Duration) -> (std::time::Instant, Option<i32>) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (std::time::Instant::now(), status.code());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent was still running {limit:?} later");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn the_agent_exits_within_a_second_of_its_result_whatever_the_metadata_service_does() {
    let repo = tiny_repo();
    for imds in crate::support::imds::BadImds::all() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job(&repo, &dir.path().join("work"), json!([{"name": "hi", "command": ["echo", "hi"]}]));
        j["imds"] = json!({"enabled": true, "endpoint": imds.endpoint(), "poll_interval_ms": 200});
        let (mut child, lines) = start_agent(&j);
        let (result_at, result) = wait_line(&lines, std::time::Duration::from_secs(60), |v| v["type"] == "result");
        assert_eq!(result["outcome"], "success", "IMDS {}", imds.name());
        let (exited_at, code) = wait_exit(&mut child, std::time::Duration::from_secs(10));
        assert_eq!(code, Some(0), "IMDS {}", imds.name());
        let after = exited_at.saturating_duration_since(result_at);
        assert!(after < std::time::Duration::from_secs(1), "IMDS {}: exited {after:?} after its result", imds.name());
    }
}

#[test]
fn sigterm_stops_the_steps_writes_a_result_and_exits_whatever_the_metadata_service_does() {
    let repo = tiny_repo();
    for imds in crate::support::imds::BadImds::all() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job(&repo, &dir.path().join("work"), json!([{"name": "forever", "command": ["sleep", "300"]}]));
        j["imds"] = json!({"enabled": true, "endpoint": imds.endpoint(), "poll_interval_ms": 200});
        let (mut child, lines) = start_agent(&j);
        wait_line(&lines, std::time::Duration::from_secs(60), |v| v["type"] == "step_start" && v["step"] == "run:forever");
        let sent = std::time::Instant::now();
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let (_, result) = wait_line(&lines, std::time::Duration::from_secs(20), |v| v["type"] == "result");
        assert_eq!(result["message"], "stopped by a signal", "IMDS {}", imds.name());
        let (exited_at, code) = wait_exit(&mut child, std::time::Duration::from_secs(10));
        assert_eq!(code, Some(1), "IMDS {}", imds.name());
        assert!(exited_at - sent < std::time::Duration::from_secs(5), "IMDS {}: {:?} from SIGTERM to exit", imds.name(), exited_at - sent);
    }
}

#[test]
fn a_step_whose_children_keep_its_output_open_still_ends() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("background-pid");
    // The command exits at once; what it left in the background holds stdout and stderr.
    let script = format!("sleep 300 & echo $! > {}; echo started", marker.display());
    let started = std::time::Instant::now();
    let run = agent(&job(&repo, &dir.path().join("work"), json!([{"name": "leaves", "command": ["sh", "-c", script]}])));
    assert_ok(&run);
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "ended in {:?}", started.elapsed());
    assert!(run.stdout.contains("started"));
    let pid: i32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("gone").to_string();
    assert!(state == "gone" || state == "Z", "the step's background process {pid} was ended with its group (state {state})");
}

#[test]
fn a_step_that_left_its_group_holding_the_output_is_cut_off_not_waited_for() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("escaped-pid");
    // setsid: a new session and group, out of reach of the step's group kill.
    let script = format!("setsid sh -c 'echo $$ > {}; exec sleep 300' & sleep 0.5; echo started", marker.display());
    let started = std::time::Instant::now();
    let run = agent(&job(&repo, &dir.path().join("work"), json!([{"name": "escapes", "command": ["sh", "-c", script]}])));
    let pid: Option<i32> = std::fs::read_to_string(&marker).ok().and_then(|p| p.trim().parse().ok());
    if let Some(pid) = pid {
        // SAFETY: kill(2) on the process this test's job started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert_ok(&run);
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "ended in {:?}", started.elapsed());
    assert!(run.stdout.contains("stopped reading output"), "{}", run.stdout);
}

#[test]
fn an_events_file_that_cannot_be_written_stops_the_agent_loudly() {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(&repo, &dir.path().join("work"), json!([{"name": "forever", "command": ["sleep", "300"]}]));
    // A full disk: every write fails with ENOSPC.
    j["events_file"] = json!("/dev/full");
    let started = std::time::Instant::now();
    let run = agent(&j);
    assert!(started.elapsed() < std::time::Duration::from_secs(90), "stopped in {:?}", started.elapsed());
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("failed to write the events file /dev/full") && run.stderr.contains("No space left"), "{}", run.stderr);
    assert!(run.stderr.contains("the job was stopped"), "{}", run.stderr);
}
