//! Trust levels on the local farm (the EC2 emulator, a real registry, real hosts): an
//! untrusted build (a fork's pull request) reads the trusted cache but writes only its own
//! namespace, and nothing it writes makes a trusted build skip anything.

use serde_json::{json, Value};

use crate::support::docker::{docker_required, unique, BUSYBOX};
use crate::support::farm::LocalFarm;
use crate::support::repo::TestRepo;
use crate::support::Run;

/// `base` <- `api` (with a test job), content unique to this run.
fn repo() -> TestRepo {
    let repo = TestRepo::new();
    repo.write("base/Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY motd /etc/motd\n");
    std::fs::copy(BUSYBOX, repo.path().join("base/busybox")).unwrap();
    repo.write("base/motd", &format!("base {}\n", unique()));
    repo.write("api/Dockerfile", "FROM base\nCOPY main.txt /app/main.txt\n");
    repo.write("api/main.txt", &format!("api {}\n", unique()));
    repo.manifest(json!({
        "base": {"buildDir": "base"},
        "api": {"buildDir": "api", "dependencies": ["base"],
                "tests": {"unit": {"command": ["/bin/busybox", "sh", "-c", "grep -q api /app/main.txt", "unit"]}}}
    }));
    repo.commit("initial");
    repo
}

/// A fork's pull request, as CircleCI says it.
fn as_fork_pr(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.env("CIRCLECI", "true").env("CIRCLE_BRANCH", "pull/42").env("CIRCLE_PR_NUMBER", "42")
}

fn plan(farm: &LocalFarm, repo: &TestRepo, fork: bool) -> Value {
    let mut cmd = farm.spotbuild(repo.path());
    if fork {
        as_fork_pr(&mut cmd);
    }
    let run = Run::of(cmd.args(["plan", "--json"]));
    assert_eq!(run.code, 0, "{run:?}");
    serde_json::from_str(&run.stdout).unwrap()
}

fn needs(plan: &Value) -> Vec<(String, bool, Vec<bool>)> {
    plan["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let tests = p["tests"].as_array().unwrap().iter().map(|t| t["needs_run"].as_bool().unwrap()).collect();
            (p["name"].as_str().unwrap().to_string(), p["needs_build"].as_bool().unwrap(), tests)
        })
        .collect()
}

#[test]
fn an_untrusted_build_writes_only_its_namespace_and_a_trusted_plan_skips_nothing_it_wrote() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = repo();
    let tags = |r: &str| crate::farm::tags(&farm.registry(), r);

    // A fork's pull request builds everything, into farm/pr/…
    let mut cmd = farm.spotbuild(repo.path());
    let fork = Run::of(as_fork_pr(&mut cmd).args(["build", "--all", "--json"]));
    assert_eq!(fork.code, 0, "{fork:?}");
    let start: Value = fork.stdout.lines().find_map(|l| serde_json::from_str::<Value>(l).ok().filter(|v| v["type"] == "build")).unwrap();
    assert_eq!(start["trust"]["level"], "untrusted", "{start}");
    assert_eq!(start["trust"]["reason"], "a fork's pull request (#42)");
    assert!(tags("pr/api").iter().any(|t| t.ends_with("-unit")), "its pass is in its own namespace");
    assert!(tags("api").is_empty() && tags("base").is_empty(), "nothing in the trusted namespace");

    // A trusted build of the same commit reads none of it: everything still to do.
    let trusted = plan(&farm, &repo, false);
    assert_eq!(needs(&trusted), [("base".into(), true, vec![]), ("api".into(), true, vec![true])], "{trusted:#}");
    // The fork's next plan finds its own work done.
    let again = plan(&farm, &repo, true);
    assert_eq!(needs(&again), [("base".into(), false, vec![]), ("api".into(), false, vec![false])], "{again:#}");

    // The trusted build builds into the project repositories.
    let main = Run::of(farm.spotbuild(repo.path()).args(["build", "--all"]));
    assert_eq!(main.code, 0, "{main:?}");
    assert!(tags("api").iter().any(|t| t.ends_with("-unit")));

    // The fork runs the test with arguments of its own on the trusted image: its pass is
    // recorded in the fork's namespace (the manifest copied across, blobs mounted), never
    // in the trusted one.
    let mut cmd = farm.spotbuild(repo.path());
    let shard = Run::of(as_fork_pr(&mut cmd).args(["test", "api", "unit", "--", "--shard", "1"]));
    assert_eq!(shard.code, 0, "{shard:?}");
    let sharded = |r: &str| tags(r).into_iter().filter(|t| t.contains("-unit-")).count();
    assert_eq!((sharded("pr/api"), sharded("api")), (1, 0));

    // A pull request changing api only: base comes from the trusted namespace (pinned
    // there), api is built into the fork's, and its test pass recorded there too.
    repo.write("api/main.txt", &format!("api changed {}\n", unique()));
    repo.commit("api: change");
    let pr = plan(&farm, &repo, true);
    let base = pr["projects"].as_array().unwrap().iter().find(|p| p["name"] == "base").unwrap();
    assert_eq!(base["needs_build"], false);
    assert!(base["image"].as_str().unwrap().contains("/farm/base:cache-"), "taken from the trusted namespace: {base}");
    let mut cmd = farm.spotbuild(repo.path());
    let changed = Run::of(as_fork_pr(&mut cmd).args(["build", "--all", "--json"]));
    assert_eq!(changed.code, 0, "{changed:?}");
    assert!(changed.stdout.contains("/farm/base:cache-"), "FROM base pinned to the trusted image: {}", changed.stdout);
    let api_hash = pr["projects"].as_array().unwrap().iter().find(|p| p["name"] == "api").unwrap()["hash"].as_str().unwrap().to_string();
    assert!(tags("pr/api").contains(&format!("cache-{api_hash}")));
    assert!(!tags("api").contains(&format!("cache-{api_hash}")), "never in the trusted namespace");
    assert!(needs(&plan(&farm, &repo, false))[1].1, "the trusted plan still needs api");
    farm.assert_nothing_left();
}
