//! Bad input: each case gets a clear message, a hint where one helps, and its documented
//! exit code — never a panic.

use serde_json::json;

use crate::support::repo::TestRepo;
use crate::support::Run;

/// A repository whose only commit has `manifest` (raw text) and Dockerfiles for a, b, c.
fn repo_with(manifest: &str) -> TestRepo {
    let repo = TestRepo::new();
    for p in ["a", "b", "c"] {
        repo.write(format!("{p}/Dockerfile"), "FROM scratch\n");
    }
    repo.write("build_manifest.json", manifest);
    repo.commit("init");
    repo
}

fn plan_fails(repo: &TestRepo, code: i32) -> Run {
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, code, "{run:?}");
    // A file that cannot be read prints nothing; entries that cannot be planned are listed.
    assert!(
        run.stdout.is_empty() || run.stdout.contains("could not be planned"),
        "nothing on stdout but the plan of what could be planned: {}",
        run.stdout
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

#[test]
fn malformed_json_gives_line_and_column() {
    let repo = repo_with("{\n  \"a\": {\"buildDir\": \"a\"},\n  \"b\": {\"buildDir\": \"b\",}\n}\n");
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("failed to parse build_manifest.json"), "{}", run.stderr);
    assert!(run.stderr.contains("at line 3, column 25"), "{}", run.stderr);
}

#[test]
fn unknown_keys_get_a_did_you_mean() {
    let repo = repo_with(r#"{"a": {"buildDir": "a", "dependecies": []}}"#);
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("project `a`: unknown key `dependecies`"), "{}", run.stderr);
    assert!(run.stderr.contains("(hint: did you mean `dependencies`?)"), "{}", run.stderr);
}

#[test]
fn aztec_keys_are_accepted() {
    let repo = repo_with(
        &json!({
            "a": {"buildDir": "a", "projectDir": "a", "dockerfile": "Dockerfile", "rebuildPatterns": null,
                  "dependencies": null, "runDependencies": ["b"], "multiarch": "buildx", "submodulePath": "x"},
            "b": {"buildDir": "b", "cpus": 16, "buildArgs": {"ARCH": "x86_64"},
                  "tests": {"e2e": {"command": ["yarn", "test"], "cpus": 32}}}
        })
        .to_string(),
    );
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn unknown_dependencies_name_the_closest_project() {
    let repo = repo_with(r#"{"alpha": {"buildDir": "a"}, "b": {"buildDir": "b", "dependencies": ["aplha"]}}"#);
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("project `b` depends on unknown project `aplha`"), "{}", run.stderr);
    assert!(run.stderr.contains("did you mean `alpha`?"), "{}", run.stderr);
}

#[test]
fn cycles_are_printed() {
    let repo = repo_with(
        r#"{"a": {"buildDir": "a", "dependencies": ["b"]}, "b": {"buildDir": "b", "dependencies": ["a"]}}"#,
    );
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("dependency cycle: a -> b -> a"), "{}", run.stderr);
}

#[test]
fn invalid_regexes_give_the_pattern_and_position() {
    let repo = repo_with(r#"{"a": {"buildDir": "a", "rebuildPatterns": ["^a/", "^a/(src"]}}"#);
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("invalid rebuild pattern `^a/(src`"), "{}", run.stderr);
    assert!(run.stderr.contains("at column 4"), "{}", run.stderr);
}

#[test]
fn patterns_files_are_read_from_the_commit() {
    let repo = repo_with(r#"{"a": {"buildDir": "a", "rebuildPatterns": ".rebuild_patterns"}}"#);
    let run = plan_fails(&repo, 3);
    assert!(
        run.stderr.contains("rebuild patterns file `a/.rebuild_patterns` does not exist"),
        "{}",
        run.stderr
    );

    repo.write("a/.rebuild_patterns", "# comment\n^a/\n\n^shared/\n");
    repo.commit("patterns");
    let before = repo.hashes();
    repo.write("shared/x", "x\n");
    repo.commit("shared");
    assert_ne!(before, repo.hashes(), "a path matched by the file's pattern is an input");

    repo.write("a/.rebuild_patterns", "^a/\n^shared/[\n");
    repo.commit("bad pattern");
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("(a/.rebuild_patterns:2)"), "{}", run.stderr);
}

#[test]
fn a_missing_dockerfile_is_named() {
    let repo = repo_with(r#"{"a": {"buildDir": "a", "dockerfile": "Dockerfile.prod"}}"#);
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("Dockerfile `a/Dockerfile.prod` does not exist at this commit"), "{}", run.stderr);
}

#[test]
fn wrong_types_are_explained() {
    let repo = repo_with(r#"{"a": {"buildDir": "a", "cpus": "many"}}"#);
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("`cpus` must be a positive integer, found a string"), "{}", run.stderr);
}

#[test]
fn a_missing_manifest_explains_what_is_expected() {
    let repo = TestRepo::new();
    repo.write("x", "x\n");
    repo.commit("init");
    let run = plan_fails(&repo, 3);
    assert!(run.stderr.contains("failed to find build_manifest.json"), "{}", run.stderr);
    assert!(run.stderr.contains("(hint:"), "{}", run.stderr);
}

#[test]
fn unknown_projects_on_the_command_line_are_usage_errors() {
    let repo = repo_with(r#"{"alpha": {"buildDir": "a"}}"#);
    let run = repo.plan(&["--offline", "alpah"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("unknown project `alpah`"), "{}", run.stderr);
    assert!(run.stderr.contains("did you mean `alpha`?"), "{}", run.stderr);
}

#[test]
fn git_problems_exit_4() {
    let repo = repo_with(r#"{"a": {"buildDir": "a"}}"#);
    let run = repo.plan(&["--offline", "--commit", "no-such-branch"]);
    assert_eq!(run.code, 4, "{run:?}");
    assert!(run.stderr.contains("failed to resolve revision `no-such-branch`"), "{}", run.stderr);

    let empty = tempfile::tempdir().unwrap();
    let run = Run::of(crate::support::spotbuild(empty.path()).args(["plan", "--offline"]));
    assert_eq!(run.code, 4, "{run:?}");
    assert!(run.stderr.contains("-C DIR"), "{}", run.stderr);
}

#[test]
fn a_bad_config_file_is_invalid_input() {
    let repo = repo_with(r#"{"a": {"buildDir": "a"}}"#);
    std::fs::write(repo.path().join("spotbuild.toml"), "[registry]\nulr = \"x\"\n").unwrap();
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("ulr"), "{}", run.stderr);
}

#[test]
fn no_registry_is_a_usage_error_with_hints() {
    let repo = repo_with(r#"{"a": {"buildDir": "a"}}"#);
    let run = repo.plan(&[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--registry"), "{}", run.stderr);
    assert!(run.stderr.contains("--offline"), "{}", run.stderr);
    let run = repo.plan(&["--registry", "host/Bad_Prefix"]);
    assert_eq!(run.code, 2, "{run:?}");
}
