//! Manifests as real Aztec build-system repositories have them: empty dependency names,
//! stale entries, YAML with repeated keys, Dockerfiles outside `buildDir`, patterns files
//! and `dependencies` scripts; and test tags that say which invocation passed.

use serde_json::json;

use crate::support::repo::{hashes_of, TestRepo};
use crate::support::Run;

/// aztec-connect's shape: `mainnet-fork` depends on `""`, and two entries whose Dockerfile
/// has gone (`coinbase-exporter`, `old-sdk`) are still in the manifest.
fn json_in_the_wild() -> TestRepo {
    let repo = TestRepo::new();
    for p in ["blockchain", "mainnet-fork", "falafel"] {
        repo.write(format!("{p}/Dockerfile"), "FROM scratch\n");
        repo.write(format!("{p}/src/main.txt"), &format!("{p}\n"));
    }
    repo.manifest(json!({
        "blockchain": {"buildDir": "blockchain", "dependencies": []},
        "mainnet-fork": {"buildDir": "mainnet-fork", "dependencies": [""]},
        "falafel": {"buildDir": "falafel", "dependencies": ["blockchain", "mainnet-fork"]},
        "coinbase-exporter": {"buildDir": "coinbase-exporter"},
        "old-sdk": {"buildDir": "sdk", "dockerfile": "Dockerfile.old", "dependencies": ["blockchain"]}
    }));
    repo.commit("wild");
    repo
}

#[test]
fn an_empty_dependency_and_stale_entries_do_not_block_a_plan_of_a_healthy_project() {
    let repo = json_in_the_wild();
    let run = repo.plan(&["falafel", "--offline", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("warning: project `mainnet-fork`: an empty name in `dependencies` is ignored"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("coinbase-exporter"), "an unrelated broken entry is not even mentioned: {}", run.stderr);
    let names: Vec<String> = hashes_of(&run.json()).into_keys().collect();
    assert_eq!(names, ["blockchain", "falafel", "mainnet-fork"]);
}

#[test]
fn planning_everything_plans_the_healthy_and_reports_each_broken_entry() {
    let repo = json_in_the_wild();
    let run = repo.plan(&["--offline", "--json"]);
    assert_eq!(run.code, 3, "{run:?}");
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let projects = plan["projects"].as_array().unwrap();
    let healthy: Vec<&str> = projects.iter().filter(|p| p.get("hash").is_some()).map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(healthy, ["blockchain", "mainnet-fork", "falafel"]);
    let broken: Vec<(&str, &str)> = projects
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p.get("error")?.as_str()?)))
        .collect();
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert_eq!(broken[0].0, "coinbase-exporter");
    assert!(broken[0].1.contains("Dockerfile `coinbase-exporter/Dockerfile` does not exist"), "{broken:?}");
    assert_eq!(broken[1].0, "old-sdk");
    assert!(broken[1].1.contains("`sdk/Dockerfile.old`"), "{broken:?}");
    // Each error on stderr with its hint, and a count.
    assert!(run.stderr.contains("error: project `coinbase-exporter`: Dockerfile"), "{}", run.stderr);
    assert!(run.stderr.contains("(hint: set `dockerfile`"), "{}", run.stderr);
    assert!(run.stderr.contains("2 projects of 5 could not be planned"), "{}", run.stderr);

    // The table says the same.
    let table = repo.plan(&["--offline"]);
    assert_eq!(table.code, 3);
    assert!(table.stdout.lines().any(|l| l.starts_with("coinbase-exporter") && l.contains("error")), "{}", table.stdout);

    // A named broken project is an error of its own, with nothing planned.
    let named = repo.plan(&["old-sdk", "--offline"]);
    assert_eq!(named.code, 3, "{named:?}");
    assert!(named.stdout.is_empty(), "{}", named.stdout);
    assert!(named.stderr.contains("project `old-sdk`: Dockerfile `sdk/Dockerfile.old` does not exist"), "{}", named.stderr);
}

#[test]
fn a_project_depending_on_a_broken_one_names_the_cause() {
    let repo = json_in_the_wild();
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo.path().join("build_manifest.json")).unwrap()).unwrap();
    m["falafel"]["dependencies"] = json!(["blockchain", "coinbase-exporter"]);
    repo.manifest(m);
    repo.commit("falafel uses a stale entry");
    let run = repo.plan(&["falafel", "--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("project `falafel` depends on `coinbase-exporter`, whose entry is invalid: project `coinbase-exporter`: Dockerfile"),
        "{}",
        run.stderr
    );
    // Unknown dependencies and cycles inside the closure stay errors.
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo.path().join("build_manifest.json")).unwrap()).unwrap();
    m["falafel"]["dependencies"] = json!(["blockchain", "cli"]);
    m["blockchain"]["dependencies"] = json!(["mainnet-fork"]);
    m["mainnet-fork"]["dependencies"] = json!(["blockchain"]);
    repo.manifest(m);
    repo.commit("worse");
    let run = repo.plan(&["falafel", "--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("depends on unknown project `cli`"), "{}", run.stderr);
    let run = repo.plan(&["blockchain", "--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("dependency cycle: blockchain -> mainnet-fork -> blockchain"), "{}", run.stderr);
}

/// A later Aztec repository's YAML manifest: a key repeated with the same value,
/// `buildDir: .`, a Dockerfile three folders up, a patterns file, and a dependencies script.
fn yaml_in_the_wild(repo: &TestRepo) {
    repo.write("Dockerfile", "FROM scratch\n");
    repo.write("barretenberg/cpp/Dockerfile", "FROM scratch\n");
    repo.write("barretenberg/cpp/src/lib.cpp", "int x;\n");
    repo.write("yarn-project/foundation/package.json", "{}\n");
    repo.write("yarn-project/foundation/src/a.ts", "a\n");
    repo.write("yarn-project/foundation/.rebuild_patterns", "# what it is built from\n^yarn-project/foundation/\n^yarn-project/yarn.lock$\n");
    repo.write("yarn-project/yarn.lock", "lock\n");
    repo.write("yarn-project/acir/Dockerfile", "FROM scratch\n");
    repo.write("yarn-project/acir/src/b.ts", "b\n");
    // Prints its dependencies from what is in the project folder it is given.
    repo.write_executable(
        "yarn-project/acir/deps.sh",
        "#!/bin/sh\nset -e\ntest -d \"$1\" || { echo \"no folder $1\" >&2; exit 1; }\necho barretenberg\necho\necho foundation\n",
    );
    repo.write("docs/readme.md", "docs\n");
    repo.write("barretenberg/acir_tests/Dockerfile.noir", "FROM scratch\n");
    repo.write("noir/noir-repo/test_programs/a.nr", "fn main() {}\n");
}

const YAML_MANIFEST: &str = "\
barretenberg:
  buildDir: barretenberg/cpp
  rebuildPatterns:
    - ^barretenberg/cpp/
  buildDir: barretenberg/cpp
foundation:
  buildDir: yarn-project/foundation
  dockerfile: ../../Dockerfile
  rebuildPatterns: .rebuild_patterns
  dependencies: []
acir:
  buildDir: yarn-project/acir
  dependencies: deps.sh
root:
  buildDir: .
  rebuildPatterns:
    - ^docs/
acir-tests:
  buildDir: noir/noir-repo/test_programs
  # Three folders up, still inside the repository.
  dockerfile: ../../../barretenberg/acir_tests/Dockerfile.noir
";

#[test]
fn a_yaml_manifest_from_the_wild_is_read_with_its_quirks() {
    let repo = TestRepo::new();
    yaml_in_the_wild(&repo);
    repo.write("build_manifest.yml", YAML_MANIFEST);
    repo.commit("yaml");
    let run = repo.plan(&["--offline", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("warning: build_manifest.yml:5: project `barretenberg` sets `buildDir` again, to the same value as line 2 (ignored)"),
        "{}",
        run.stderr
    );
    let plan = run.json();
    let acir = plan["projects"].as_array().unwrap().iter().find(|p| p["name"] == "acir").unwrap();
    assert_eq!(acir["dependencies"], json!(["barretenberg", "foundation"]), "from the script, blank lines dropped");
    let hashes = hashes_of(&plan);
    assert_eq!(hashes.len(), 5);

    // The patterns file counts: yarn.lock is an input of foundation and so of acir.
    let before = hashes.clone();
    repo.write("yarn-project/yarn.lock", "lock 2\n");
    repo.commit("lock");
    let after = repo.hashes();
    assert_eq!(crate::support::repo::changed(&before, &after), ["acir", "foundation"]);
    // The Dockerfiles outside their build folders are theirs.
    repo.write("Dockerfile", "FROM scratch\nLABEL x=1\n");
    repo.write("barretenberg/acir_tests/Dockerfile.noir", "FROM scratch\nLABEL x=1\n");
    repo.commit("dockerfiles");
    let again = repo.hashes();
    assert_eq!(crate::support::repo::changed(&after, &again), ["acir", "acir-tests", "foundation", "root"]);

    // Another commit's manifest script runs in a checkout of that commit.
    let old = repo.git(&["rev-parse", "HEAD~2"]);
    let run = repo.plan(&["acir", "--offline", "--json", "--commit", &old]);
    assert_eq!(hashes_of(&run.json())["acir"], before["acir"]);
}

#[test]
fn yaml_keys_repeated_with_different_values_break_only_their_entry() {
    let repo = TestRepo::new();
    yaml_in_the_wild(&repo);
    repo.write("build_manifest.yml", &YAML_MANIFEST.replace("  buildDir: barretenberg/cpp\nfoundation", "  buildDir: barretenberg\nfoundation"));
    repo.commit("yaml");
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("project `barretenberg`: build_manifest.yml:5 sets `buildDir` again, to a different value than line 2"),
        "{}",
        run.stderr
    );
    // acir depends on it; foundation and root do not.
    let plan = repo.plan(&["foundation", "root", "--offline", "--json"]);
    assert_eq!(hashes_of(&plan.json()).len(), 2);
    let acir = repo.plan(&["acir", "--offline"]);
    assert_eq!(acir.code, 3);
    assert!(acir.stderr.contains("depends on `barretenberg`, whose entry is invalid"), "{}", acir.stderr);

    // A Dockerfile may not climb out of the repository.
    let escaping = YAML_MANIFEST.replace("dockerfile: ../../Dockerfile", "dockerfile: ../../../Dockerfile");
    repo.write("build_manifest.yml", &escaping);
    repo.commit("out of the repository");
    let run = repo.plan(&["foundation", "--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("`dockerfile` `../../../Dockerfile` must stay inside the repository"), "{}", run.stderr);
}

#[test]
fn yaml_syntax_errors_give_line_and_column() {
    let repo = TestRepo::new();
    repo.write("a/Dockerfile", "FROM scratch\n");
    repo.write("build_manifest.yml", "a:\n  buildDir: a\n  rebuildPatterns: [^a/\n");
    repo.commit("bad");
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("failed to parse build_manifest.yml:"), "{}", run.stderr);
    assert!(run.stderr.contains(" at line 4, column 1"), "{}", run.stderr);
}

#[test]
fn the_same_entries_in_json_and_yaml_give_the_same_hashes() {
    let yaml = TestRepo::new();
    yaml_in_the_wild(&yaml);
    yaml.write("build_manifest.yml", YAML_MANIFEST);
    yaml.commit("yaml");
    let json = TestRepo::new();
    yaml_in_the_wild(&json);
    json.manifest(json!({
        "root": {"rebuildPatterns": ["^docs/"], "buildDir": "."},
        "acir": {"buildDir": "yarn-project/acir", "dependencies": "deps.sh"},
        "foundation": {"buildDir": "yarn-project/foundation", "dockerfile": "../../Dockerfile",
                       "rebuildPatterns": ".rebuild_patterns", "dependencies": []},
        "acir-tests": {"buildDir": "noir/noir-repo/test_programs", "dockerfile": "../../../barretenberg/acir_tests/Dockerfile.noir"},
        "barretenberg": {"buildDir": "barretenberg/cpp", "rebuildPatterns": ["^barretenberg/cpp/"]}
    }));
    json.commit("json");
    let (a, b) = (yaml.hashes(), json.hashes());
    assert_eq!(a.len(), 5);
    assert_eq!(a, b);
}

#[test]
fn both_manifest_files_is_an_error_naming_both() {
    let repo = TestRepo::new();
    repo.write("a/Dockerfile", "FROM scratch\n");
    repo.manifest(json!({"a": {"buildDir": "a"}}));
    repo.write("build_manifest.yml", "a:\n  buildDir: a\n");
    repo.commit("both");
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("has both build_manifest.json and build_manifest.yml"), "{}", run.stderr);
    assert!(run.stderr.contains("(hint: keep one"), "{}", run.stderr);
}

#[test]
fn a_failing_or_hanging_dependencies_script_is_a_clear_error_for_its_entry_alone() {
    let repo = TestRepo::new();
    for p in ["a", "b", "c"] {
        repo.write(format!("{p}/Dockerfile"), "FROM scratch\n");
    }
    repo.write_executable("a/deps.sh", "#!/bin/sh\necho 'cannot read package.json' >&2\nexit 3\n");
    repo.write_executable("b/deps.sh", "#!/bin/sh\nsleep 30 &\nsleep 30\n");
    repo.write("spotbuild.toml", "[plan]\ndependencies_timeout = \"1s\"\n");
    repo.manifest(json!({
        "a": {"buildDir": "a", "dependencies": "deps.sh"},
        "b": {"buildDir": "b", "dependencies": "deps.sh"},
        "c": {"buildDir": "c", "dependencies": "missing.sh"},
        "ok": {"buildDir": "a", "rebuildPatterns": ["^a/"]}
    }));
    repo.commit("scripts");
    let started = std::time::Instant::now();
    let run = repo.plan(&["--offline"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "the timeout bounds it: {:?}", started.elapsed());
    assert_eq!(run.code, 3, "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(
        run.stderr.contains("project `a`: dependencies script `a/deps.sh` failed: it exited with exit status: 3: cannot read package.json"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("project `b`: dependencies script `b/deps.sh` failed: it did not finish within 1s"), "{}", run.stderr);
    assert!(run.stderr.contains("project `c`: dependencies script `c/missing.sh` failed: it does not exist at this commit"), "{}", run.stderr);
    assert!(run.stdout.lines().any(|l| l.starts_with("ok ")), "{}", run.stdout);
}

#[test]
fn test_tags_name_the_invocation_so_shards_never_share_one() {
    let repo = crate::support::repo::standard();
    repo.write_executable("app/scripts/run_tests", "#!/bin/sh\necho ok\n");
    repo.commit("a script");
    let tag = |args: &[&str]| -> String {
        let run = repo.plan(&[&["app", "--offline", "--json"], args].concat());
        let plan = run.json();
        let app = plan["projects"].as_array().unwrap().iter().find(|p| p["name"] == "app").unwrap().clone();
        assert_eq!(app["tests"].as_array().unwrap().len(), 1, "{app:#}");
        app["tests"][0]["tag"].as_str().unwrap().to_string()
    };
    let hash = repo.hashes()["app"].clone();
    assert_eq!(tag(&["--test", "unit"]), format!("cache-{hash}-unit"));
    let one = tag(&["--test", "unit", "--", "--shard", "1"]);
    let two = tag(&["--test", "unit", "--", "--shard", "2"]);
    assert!(one.starts_with(&format!("cache-{hash}-unit-")), "{one}");
    assert_ne!(one, two, "two shards, two tags");
    assert_eq!(one, tag(&["--test", "unit", "--", "--shard", "1"]), "stable");
    assert!(one.len() <= 128, "a valid tag: {one}");

    // A script is keyed by the CI job's name, else a digest of the script and arguments.
    let keyed = Run::of(crate::support::spotbuild(repo.path()).env("CIRCLE_JOB", "e2e-account").args(["plan", "app", "--offline", "--json", "--script", "scripts/run_tests", "--", "./src/e2e_account.test.ts"]));
    let keyed = keyed.json()["projects"].as_array().unwrap().iter().find(|p| p["name"] == "app").unwrap()["tests"][0].clone();
    assert!(keyed["tag"].as_str().unwrap().starts_with(&format!("cache-{hash}-e2e-account-")), "{keyed}");
    assert_eq!(keyed["script"], "scripts/run_tests");
    assert_eq!(keyed["args"], json!(["./src/e2e_account.test.ts"]));
    let anonymous = tag(&["--script", "scripts/run_tests", "--", "./src/e2e_account.test.ts"]);
    assert!(anonymous.starts_with(&format!("cache-{hash}-script-")), "{anonymous}");
    assert_ne!(anonymous, tag(&["--script", "scripts/run_tests", "--", "./src/other.test.ts"]));

    // What the project does not have is refused.
    let run = repo.plan(&["app", "--offline", "--test", "e2e"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("app has no test job `e2e`"), "{}", run.stderr);
    let run = repo.plan(&["app", "--offline", "--script", "scripts/nope"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("app has no script `app/scripts/nope`"), "{}", run.stderr);
}

#[test]
fn the_build_system_query_scripts_answer_from_the_manifest() {
    let repo = crate::support::repo::standard();
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-system/scripts");
    let sh = |cmd: &str| -> Run {
        Run::of(
            std::process::Command::new("bash")
                .args(["-eo", "pipefail", "-c", cmd])
                .current_dir(repo.path())
                .env("PATH", format!("{}:{}", scripts.display(), std::env::var("PATH").unwrap()))
                .env("SPOTBUILD", env!("CARGO_BIN_EXE_spotbuild"))
                .env_remove("COMMIT_HASH")
                .env_remove("SPOTBUILD_CONFIG"),
        )
    };
    let root = std::fs::canonicalize(repo.path()).unwrap();
    let run = sh("query_manifest dependencies app");
    assert_eq!((run.code, run.stdout.as_str()), (0, "base\nlib\n"), "{}", run.stderr);
    let run = sh("query_manifest allDependencies app");
    assert_eq!(run.stdout, "base\nlib\napp\n");
    let run = sh("query_manifest buildDir app");
    assert_eq!(run.stdout.trim(), root.join("app").display().to_string());
    let run = sh("query_manifest rebuildPatterns lib");
    assert_eq!(run.stdout, "^base/\n^lib/\n");
    let run = sh("calculate_content_hash app");
    assert_eq!(run.stdout.trim(), repo.hashes()["app"]);
    let run = sh("calculate_image_tag app");
    assert_eq!(run.stdout.trim(), format!("cache-{}", repo.hashes()["app"]));
    let run = sh("query_manifest dependencies nope");
    assert_eq!(run.code, 2, "{run:?}");
    let run = sh("query_manifest bogus app");
    assert_eq!(run.code, 2, "{run:?}");
    // setup_env writes what the others need; the tag must match VERSION.
    repo.write("VERSION", "v1.4\n");
    let env = repo.path().join("bash_env");
    let run = Run::of(
        std::process::Command::new(scripts.join("setup_env"))
            .args([&repo.head(), "v1.4.2", "e2e", "https://example.invalid/repo.git", "main"])
            .current_dir(repo.path())
            .env("BASH_ENV", &env),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let written = std::fs::read_to_string(&env).unwrap();
    for line in ["export JOB_NAME=e2e", "export BRANCH=main", "export COMMIT_TAG=v1.4.2", "export VERSION=v1.4"] {
        assert!(written.contains(line), "{line} in:\n{written}");
    }
    assert!(written.contains(&format!("export PATH=\"$PATH\":{}", scripts.display())), "{written}");
    let run = Run::of(
        std::process::Command::new(scripts.join("setup_env"))
            .args([&repo.head(), "v2.0.0", "e2e", "", "main"])
            .current_dir(repo.path())
            .env("BASH_ENV", repo.path().join("other_env")),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("does not match the repository's VERSION v1.4"), "{}", run.stderr);
}
