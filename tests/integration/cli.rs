//! The command-line surface: help that teaches, and documented exit codes.

use crate::support::{spotbuild, Run};

#[test]
fn help_documents_exit_codes_and_examples() {
    let dir = tempfile::tempdir().unwrap();
    let run = Run::of(spotbuild(dir.path()).arg("--help"));
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("Exit codes:"), "{}", run.stdout);
    let run = Run::of(spotbuild(dir.path()).args(["plan", "--help"]));
    assert_eq!(run.code, 0);
    for needle in ["--offline", "--explain", "--since", "[ci rebuild]", "Examples:", "SPOTBUILD_REGISTRY"] {
        assert!(run.stdout.contains(needle), "{needle} missing from:\n{}", run.stdout);
    }
}

#[test]
fn since_requires_explain() {
    let dir = tempfile::tempdir().unwrap();
    let run = Run::of(spotbuild(dir.path()).args(["plan", "--since", "HEAD"]));
    assert_eq!(run.code, 2, "{run:?}");
}

#[test]
fn the_example_monorepo_plans() {
    let repo = crate::support::repo::TestRepo::new();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/monorepo");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", example.display()))
        .arg(repo.path())
        .status()
        .unwrap();
    assert!(status.success());
    repo.commit("example");
    let plan = repo.plan(&["--offline", "--json"]).json();
    let names: Vec<&str> = plan["projects"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "api", "lint", "web"]);
}
