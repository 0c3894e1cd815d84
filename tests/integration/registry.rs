//! Planning against a real registry (docker-registry on loopback): built, not built,
//! test passed, registry down, overrides, selection and --explain.

use serde_json::Value;

use crate::support::repo::{standard, TestRepo};
use crate::support::services::{runtime, Registry};

fn plan_json(repo: &TestRepo, registry: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json", "--registry", registry];
    all.extend_from_slice(args);
    repo.plan(&all).json()
}

/// Stores every project's build tag from `plan`, as builds would (repository = project name).
fn push_built(registry: &Registry, plan: &Value) {
    for p in plan["projects"].as_array().unwrap() {
        registry.push(p["name"].as_str().unwrap(), p["tag"].as_str().unwrap());
    }
}

fn project<'a>(plan: &'a Value, name: &str) -> &'a Value {
    plan["projects"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()
}

#[test]
fn built_not_built_and_test_passed() {
    let registry = Registry::start();
    let repo = standard();
    let url = format!("{}/team", registry.host());

    let plan = plan_json(&repo, &url, &[]);
    for name in ["base", "lib", "app", "tool"] {
        let p = project(&plan, name);
        assert_eq!(p["needs_build"], true, "{p}");
        assert!(p["reason"].as_str().unwrap().starts_with("no "), "{p}");
    }
    assert_eq!(project(&plan, "app")["tests"][0]["needs_run"], true);

    // Push what the plan asked for, as a build would.
    for name in ["base", "lib", "app"] {
        registry.push(&format!("team/{name}"), project(&plan, name)["tag"].as_str().unwrap());
    }
    let plan = plan_json(&repo, &url, &[]);
    assert_eq!(project(&plan, "base")["needs_build"], false);
    assert_eq!(project(&plan, "tool")["needs_build"], true);
    let app = project(&plan, "app");
    assert_eq!(app["needs_build"], false);
    assert_eq!(app["tests"][0]["needs_run"], true, "{app}");

    registry.push("team/app", app["tests"][0]["tag"].as_str().unwrap());
    let plan = plan_json(&repo, &url, &[]);
    let app = project(&plan, "app");
    assert_eq!(app["tests"][0]["needs_run"], false, "{app}");
    assert!(app["tests"][0]["reason"].as_str().unwrap().starts_with("passed"), "{app}");

    // The table says the same for people.
    let run = repo.plan(&["--registry", &url]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("1 of 4 projects to build, 0 of 1 test job to run"), "{}", run.stdout);
}

#[test]
fn json_contract_and_dependency_order() {
    let registry = Registry::start();
    let repo = standard();
    let plan = plan_json(&repo, &registry.host(), &[]);
    assert_eq!(plan["commit"], repo.head());
    let names: Vec<&str> = plan["projects"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "lib", "app", "tool"]);
    let app = project(&plan, "app");
    let hash = app["hash"].as_str().unwrap();
    assert_eq!(hash.len(), 40);
    assert_eq!(app["tag"], format!("cache-{hash}"));
    assert_eq!(app["dependencies"], serde_json::json!(["lib"]));
    assert_eq!(app["tests"][0]["job"], "unit");
    assert_eq!(app["tests"][0]["tag"], format!("cache-{hash}-unit"));

    // Offline: the same hashes, nothing decided, no registry needed.
    let offline = repo.plan(&["--offline", "--json"]).json();
    assert_eq!(project(&offline, "app")["hash"], app["hash"]);
    assert_eq!(project(&offline, "app")["needs_build"], Value::Null);
    assert_eq!(project(&offline, "app")["tests"][0]["needs_run"], Value::Null);
}

#[test]
fn naming_projects_plans_them_and_their_dependencies() {
    let registry = Registry::start();
    let repo = standard();
    let plan = plan_json(&repo, &registry.host(), &["lib"]);
    let names: Vec<&str> = plan["projects"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "lib"]);
}

#[test]
fn a_registry_that_is_down_means_work_to_do() {
    let repo = standard();
    let port = crate::support::services::free_port();
    let run = repo.plan(&["--json", "--registry", &format!("127.0.0.1:{port}")]);
    let plan = run.json();
    for p in plan["projects"].as_array().unwrap() {
        assert_eq!(p["needs_build"], true, "{p}");
        assert!(p["reason"].as_str().unwrap().contains("registry could not be asked"), "{p}");
    }
    assert!(run.stderr.contains("warning: the registry could not be asked about 4 projects"), "{}", run.stderr);
}

#[test]
fn commit_message_overrides_force_builds() {
    let registry = Registry::start();
    let repo = standard();
    let plan = plan_json(&repo, &registry.host(), &[]);
    push_built(&registry, &plan);
    repo.commit("rebuild please [ci rebuild lib]");
    let plan = plan_json(&repo, &registry.host(), &[]);
    assert_eq!(project(&plan, "lib")["needs_build"], true);
    assert_eq!(project(&plan, "lib")["reason"], "commit message says [ci rebuild lib]");
    assert_eq!(project(&plan, "base")["needs_build"], false);

    repo.commit("everything [ci rebuild]");
    let plan = plan_json(&repo, &registry.host(), &[]);
    assert!(plan["projects"].as_array().unwrap().iter().all(|p| p["needs_build"] == true));
}

#[test]
fn explain_finds_the_last_built_ancestor() {
    let registry = Registry::start();
    let repo = standard();
    let first = repo.head();
    let plan = plan_json(&repo, &registry.host(), &[]);
    push_built(&registry, &plan);
    repo.write("lib/src/main.txt", "lib v2\n");
    repo.commit("lib v2");
    repo.write("README.md", "unrelated\n");
    repo.commit("docs");

    let plan = plan_json(&repo, &registry.host(), &["--explain"]);
    let lib = project(&plan, "lib");
    assert_eq!(lib["explain"]["base"], first);
    assert!(lib["explain"]["base_reason"].as_str().unwrap().contains("2 commits back"), "{lib}");
    assert_eq!(lib["explain"]["changes"], serde_json::json!([{"status": "M", "path": "lib/src/main.txt"}]));
    // app is rebuilt because of its dependency's file.
    assert_eq!(project(&plan, "app")["explain"]["changes"][0]["path"], "lib/src/main.txt");
    // Built projects are not explained.
    assert!(project(&plan, "tool").get("explain").is_none());

    let run = repo.plan(&["--registry", &registry.host(), "--explain", "lib"]);
    assert!(run.stdout.contains("M lib/src/main.txt"), "{}", run.stdout);

    // --since compares with the given commit instead.
    let plan = plan_json(&repo, &registry.host(), &["--explain", "--since", "HEAD~1"]);
    assert_eq!(project(&plan, "lib")["explain"]["changes"], serde_json::json!([]));
}

#[test]
fn explain_reports_manifest_changes_and_never_built_projects() {
    let registry = Registry::start();
    let repo = standard();
    let plan = plan_json(&repo, &registry.host(), &["--explain"]);
    assert!(project(&plan, "base")["explain"]["base_reason"].as_str().unwrap().starts_with("never built"));

    push_built(&registry, &plan);
    let mut m = crate::support::repo::standard_manifest();
    m["base"]["rebuildPatterns"] = serde_json::json!(["^base/", "^README\\.md$"]);
    repo.manifest(m);
    repo.commit("widen base");
    let plan = plan_json(&repo, &registry.host(), &["--explain"]);
    let lib = project(&plan, "lib");
    assert_eq!(lib["explain"]["manifest_changes"], serde_json::json!(["the manifest entry of `base` changed"]), "{lib}");
}

#[test]
fn the_client_lists_and_copies_tags() {
    let registry = Registry::start();
    registry.push("team/app", "cache-abc");
    let reference = spotbuild::registry::RegistryRef::parse(&registry.host()).unwrap();
    let client = spotbuild::registry::Client::new(
        reference,
        &Default::default(),
        spotbuild::registry::auth::Authenticator::with_basic(None),
    )
    .unwrap();
    runtime().block_on(async {
        client.copy_tag("team/app", "cache-abc", "cache-abc-unit").await.unwrap();
        let mut tags = client.list_tags("team/app").await.unwrap();
        tags.sort();
        assert_eq!(tags, ["cache-abc", "cache-abc-unit"]);
        assert!(client.has_tag("team/app", "cache-abc-unit").await.unwrap());
        assert!(!client.has_tag("team/none", "x").await.unwrap());
        assert!(client.list_tags("team/none").await.unwrap().is_empty());
        assert!(client.copy_tag("team/app", "missing", "x").await.is_err());
    });
}

#[test]
fn an_unreachable_registry_is_given_up_on_once() {
    // Nothing listens on this port: the first lookup retries, the rest fail at once.
    let port = crate::support::services::free_port();
    let reference = spotbuild::registry::RegistryRef::parse(&format!("127.0.0.1:{port}")).unwrap();
    let client = spotbuild::registry::Client::new(
        reference,
        &Default::default(),
        spotbuild::registry::auth::Authenticator::with_basic(None),
    )
    .unwrap()
    .with_backoff_base(std::time::Duration::from_millis(1));
    runtime().block_on(async {
        let first = client.has_tag("a", "t").await.unwrap_err().to_string();
        assert!(first.contains("failed to reach registry"), "{first}");
        assert!(!first.contains("not retried"), "{first}");
        for _ in 0..3 {
            let next = client.has_tag("b", "t").await.unwrap_err().to_string();
            assert!(next.contains("an earlier request failed this way; not retried"), "{next}");
        }
    });
}
