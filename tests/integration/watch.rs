//! `spotbuild watch` against a loopback registry: a saved file rebuilds only its project,
//! ignored files and files no pattern matches trigger nothing, `--then` follows each
//! successful build only, nothing lands under `cache-*`, and Ctrl-C stops it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::docker::{docker_required, unique, Images};
use crate::support::repo::TestRepo;
use crate::support::services::Registry;
use crate::support::{spotbuild, Run};

/// The `watch` lines it prints, as they come.
fn watch_lines(child: &mut Child) -> Receiver<Value> {
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["type"] == "watch" && tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn next(rx: &Receiver<Value>, within: Duration) -> Value {
    rx.recv_timeout(within).unwrap_or_else(|e| panic!("no watch line within {within:?}: {e:?}"))
}

fn tags(registry: &Registry, project: &str) -> Vec<String> {
    let url = format!("http://{}/v2/t/{project}/tags/list", registry.host());
    crate::support::services::runtime().block_on(async {
        let v: Value = reqwest::get(&url).await.unwrap().json().await.unwrap_or_default();
        v["tags"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect()).unwrap_or_default()
    })
}

#[test]
fn a_saved_file_rebuilds_only_its_project_and_then_runs_after_each_success() {
    docker_required();
    let repo = TestRepo::new();
    repo.manifest(json!({"a": {"buildDir": "a"}, "b": {"buildDir": "b"}}));
    repo.write("a/Dockerfile", "FROM scratch\nCOPY a.txt /a.txt\n");
    repo.write("a/a.txt", &format!("a {}\n", unique()));
    repo.write("b/Dockerfile", "FROM scratch\nCOPY b.txt /b.txt\n");
    repo.write("b/b.txt", &format!("b {}\n", unique()));
    repo.write(".gitignore", "scratch.log\n");
    repo.write("notes/todo.md", "nothing\n");
    repo.commit("two projects");
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let url = format!("{}/t", registry.host());
    let marker = repo.path().join("then.log");

    let mut child = spotbuild(repo.path())
        .args(["watch", "--json", "--debounce", "300ms", "--registry", &url, "--then", "sh", "-c"])
        .arg(format!("echo \"$SPOTBUILD_DEV_TAGS\" >> {}", marker.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = watch_lines(&mut child);
    // SIGINT on the way out, whatever happens.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the child this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGINT) };
        }
    }
    let _stop = Stop(child.id());

    // First: everything is built, then --then runs.
    let first = next(&rx, Duration::from_secs(120));
    assert_eq!(first["event"], "built", "{first}");
    assert_eq!(first["projects"], json!(["a", "b"]));
    assert_eq!(next(&rx, Duration::from_secs(30))["event"], "then");
    let then_lines = || std::fs::read_to_string(&marker).unwrap_or_default().lines().count();
    assert_eq!(then_lines(), 1);

    // One file of a: only a, within the debounce and its build.
    let saved = Instant::now();
    repo.write("a/a.txt", &format!("a changed {}\n", unique()));
    let second = next(&rx, Duration::from_secs(60));
    assert_eq!((second["event"].as_str(), &second["projects"]), (Some("built"), &json!(["a"])), "{second}");
    assert_eq!(next(&rx, Duration::from_secs(30))["event"], "then");
    assert!(saved.elapsed() < Duration::from_secs(60));
    assert_eq!(then_lines(), 2);

    // An ignored file, a file no pattern matches, and the --then output itself: nothing.
    repo.write("scratch.log", "noise\n");
    repo.write("notes/todo.md", "still nothing\n");
    match rx.recv_timeout(Duration::from_secs(4)) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("nothing should have happened: {other:?}"),
    }
    assert_eq!(then_lines(), 2);

    // A failing build: no --then.
    repo.write("b/Dockerfile", "FROM scratch\nCOPY missing.txt /x\n");
    let failed = next(&rx, Duration::from_secs(60));
    assert_eq!((failed["event"].as_str(), &failed["projects"]), (Some("failed"), &json!(["b"])), "{failed}");
    assert!(rx.recv_timeout(Duration::from_secs(2)).is_err(), "no --then after a failure");
    assert_eq!(then_lines(), 2);

    // A manifest saved half-edited is said, and watching goes on.
    let manifest = std::fs::read_to_string(repo.path().join("build_manifest.json")).unwrap();
    repo.write("build_manifest.json", "{\"a\": {\"buildDir\": ");
    let error = next(&rx, Duration::from_secs(30));
    assert_eq!(error["event"], "error", "{error}");
    assert!(error["message"].as_str().is_some_and(|m| m.contains("build_manifest.json")), "{error}");
    repo.write("build_manifest.json", &manifest);
    assert!(child.try_wait().unwrap().is_none(), "still watching");

    // The registry holds only dev tags, none of them a commit's hash.
    let committed = repo.hashes();
    for p in ["a", "b"] {
        let t = tags(&registry, p);
        assert!(!t.is_empty() && t.iter().all(|t| t.starts_with("dev-") || t.starts_with("branch-dev-")), "{p}: {t:?}");
        assert!(!t.iter().any(|t| t.contains(&committed[p])), "{p}: a working-tree tag is never a commit's: {t:?}");
    }
    let plan = Run::of(spotbuild(repo.path()).args(["plan", "--json", "--registry", &url]));
    assert!(plan.json()["projects"].as_array().unwrap().iter().all(|p| p["needs_build"] == true), "no cache-* tag was written");

    // Ctrl-C stops it cleanly.
    drop(_stop);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "watch did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
}

#[test]
fn watch_remote_builds_the_working_tree_on_a_rented_machine_under_dev_tags() {
    docker_required();
    let farm = crate::support::farm::LocalFarm::start();
    let repo = crate::farm::farm_repo(None, crate::farm::PASSING_TEST);
    let mut child = farm
        .spotbuild(repo.path())
        .args(["watch", "--remote", "--json", "--debounce", "300ms", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = watch_lines(&mut child);
    let pid = child.id();
    let first = next(&rx, Duration::from_secs(180));
    assert_eq!(first["event"], "built", "{first}");
    assert_eq!(first["projects"], json!(["base", "web"]), "web and what it is built from");
    repo.write("web/src/index.html", &format!("<p>saved {}</p>\n", unique()));
    let second = next(&rx, Duration::from_secs(180));
    assert_eq!((second["event"].as_str(), &second["projects"]), (Some("built"), &json!(["web"])), "{second}");
    for p in ["base", "web"] {
        let t = crate::farm::tags(&farm.registry(), p);
        assert!(!t.is_empty() && t.iter().all(|t| t.starts_with("dev-") || t.starts_with("branch-dev-")), "{p}: {t:?}");
    }
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = crate::farm::wait_child(&mut child, Duration::from_secs(60));
    assert_eq!(status, Some(130));
    farm.assert_nothing_left();
}
