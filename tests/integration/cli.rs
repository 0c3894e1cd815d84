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
