//! Content hashes on real repositories: what changes a project's hash, and what must not.

use serde_json::json;

use crate::support::repo::{changed, git_in, standard, TestRepo};

#[test]
fn a_rename_inside_a_project_changes_only_that_project_and_its_dependents() {
    let repo = standard();
    let before = repo.hashes();
    repo.rename("lib/src/main.txt", "lib/src/renamed.txt");
    repo.commit("rename");
    assert_eq!(changed(&before, &repo.hashes()), ["app", "lib"]);
}

#[test]
fn a_file_moved_between_projects_changes_both() {
    let repo = standard();
    let before = repo.hashes();
    repo.rename("tool/README", "base/TOOL_README");
    repo.commit("move");
    // base changed, so do its dependents; tool lost a file.
    assert_eq!(changed(&before, &repo.hashes()), ["app", "base", "lib", "tool"]);
}

#[test]
fn chmod_alone_changes_the_hash() {
    let repo = standard();
    let before = repo.hashes();
    repo.git(&["update-index", "--chmod=+x", "tool/src/main.txt"]);
    repo.git(&["commit", "-q", "-m", "chmod"]);
    assert_eq!(changed(&before, &repo.hashes()), ["tool"]);
}

#[test]
fn a_deleted_file_changes_the_hash() {
    let repo = standard();
    let before = repo.hashes();
    repo.remove("tool/README");
    repo.commit("delete");
    assert_eq!(changed(&before, &repo.hashes()), ["tool"]);
}

#[test]
fn a_root_file_matching_no_project_changes_nothing() {
    let repo = standard();
    let before = repo.hashes();
    repo.write("README.md", "edited\n");
    repo.write("docs/new.md", "new\n");
    repo.commit("docs");
    assert!(changed(&before, &repo.hashes()).is_empty());
}

#[test]
fn a_revert_returns_to_the_built_hash() {
    let repo = standard();
    let before = repo.hashes();
    repo.write("base/src/main.txt", "changed\n");
    repo.commit("change");
    assert_ne!(before, repo.hashes());
    repo.git(&["revert", "--no-edit", "HEAD"]);
    assert_eq!(before, repo.hashes());
}

#[test]
fn merge_and_squash_of_the_same_tree_agree() {
    let repo = standard();
    repo.git(&["checkout", "-q", "-b", "feature"]);
    repo.write("lib/src/a.txt", "a\n");
    repo.commit("feature 1");
    repo.write("tool/src/b.txt", "b\n");
    repo.commit("feature 2");
    repo.git(&["checkout", "-q", "main"]);
    repo.write("README.md", "main moved on\n");
    repo.commit("main moves");

    repo.git(&["checkout", "-q", "-b", "merged", "main"]);
    repo.git(&["merge", "-q", "--no-ff", "--no-edit", "feature"]);
    let merged = repo.hashes();
    repo.git(&["checkout", "-q", "-b", "squashed", "main"]);
    repo.git(&["merge", "-q", "--squash", "feature"]);
    repo.commit("squash");
    assert_eq!(merged, repo.hashes());
    assert_ne!(merged, repo.hashes_at("main"));
}

#[test]
fn a_dependency_change_reaches_every_dependent() {
    let repo = standard();
    let before = repo.hashes();
    repo.write("base/src/main.txt", "new base\n");
    repo.commit("base");
    assert_eq!(changed(&before, &repo.hashes()), ["app", "base", "lib"]);
}

#[test]
fn manifest_edits_change_the_affected_projects() {
    let repo = standard();
    let before = repo.hashes();

    // Widen tool's patterns: tool changes, nobody else.
    let mut m = crate::support::repo::standard_manifest();
    m["tool"]["rebuildPatterns"] = json!(["^tool/", "^README\\.md$"]);
    repo.manifest(m.clone());
    repo.commit("patterns");
    let after_patterns = repo.hashes();
    assert_eq!(changed(&before, &after_patterns), ["tool"]);

    // A new dependency changes the dependent only.
    m["tool"]["dependencies"] = json!(["base"]);
    repo.manifest(m.clone());
    repo.commit("deps");
    assert_eq!(changed(&after_patterns, &repo.hashes()), ["tool"]);

    // Reordering keys and lists means the same thing: no change.
    let reordered = json!({
        "tool": {"dependencies": ["base"], "rebuildPatterns": ["^README\\.md$", "^tool/"], "buildDir": "tool/"},
        "app": {"tests": {"unit": {"command": ["./test.sh"]}}, "dependencies": ["lib"], "buildDir": "app"},
        "lib": {"dependencies": ["base"], "buildDir": "lib"},
        "base": {"rebuildPatterns": ["^base/"], "buildDir": "base"}
    });
    let settled = repo.hashes();
    repo.manifest(reordered);
    repo.commit("reorder");
    assert_eq!(settled, repo.hashes());
}

#[test]
fn deleting_a_dependency() {
    let repo = standard();
    let before = repo.hashes();
    // Dropping the dependency edge (and the project) changes the dependent's hash.
    let mut m = crate::support::repo::standard_manifest();
    m["lib"]["dependencies"] = json!(null);
    m.as_object_mut().unwrap().remove("base");
    repo.manifest(m);
    repo.git(&["rm", "-q", "-r", "base"]);
    repo.commit("drop base");
    let after = repo.hashes();
    assert!(!after.contains_key("base"));
    assert_eq!(changed(&before, &after), ["app", "base", "lib"]);

    // Deleting a project that is still depended on is an error that names it.
    let mut m = crate::support::repo::standard_manifest();
    m.as_object_mut().unwrap().remove("base");
    repo.manifest(m);
    repo.commit("dangling");
    let run = repo.plan(&["--offline"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("project `lib` depends on unknown project `base`"), "{}", run.stderr);
}

#[test]
fn the_dockerfile_counts_even_outside_the_patterns() {
    let repo = TestRepo::new();
    repo.write("docker/app.Dockerfile", "FROM scratch\n");
    repo.write("app/x", "x\n");
    repo.manifest(json!({"app": {"buildDir": "app", "dockerfile": "../docker/app.Dockerfile"}}));
    repo.commit("init");
    let before = repo.hashes();
    repo.write("docker/app.Dockerfile", "FROM scratch\nCOPY x /x\n");
    repo.commit("dockerfile");
    assert_eq!(changed(&before, &repo.hashes()), ["app"]);
}

#[test]
fn a_submodule_bump_changes_the_hash() {
    let sub = TestRepo::new();
    sub.write("lib.txt", "v1\n");
    sub.commit("v1");

    let repo = TestRepo::new();
    repo.write("app/Dockerfile", "FROM scratch\n");
    repo.manifest(json!({"app": {"buildDir": "app", "rebuildPatterns": ["^app/", "^vendor/sub$"], "submodulePath": "vendor/sub"}}));
    repo.git(&["submodule", "add", "-q", sub.path().to_str().unwrap(), "vendor/sub"]);
    repo.commit("add submodule");
    let before = repo.hashes();

    sub.write("lib.txt", "v2\n");
    let v2 = sub.commit("v2");
    let inner = repo.path().join("vendor/sub");
    git_in(&inner, &["fetch", "-q", "origin"]);
    git_in(&inner, &["checkout", "-q", &v2]);
    repo.commit("bump");
    assert_eq!(changed(&before, &repo.hashes()), ["app"]);
}

#[test]
fn odd_path_bytes_are_inputs_like_any_other() {
    let repo = TestRepo::new();
    repo.write("app/Dockerfile", "FROM scratch\n");
    repo.manifest(json!({"app": {"buildDir": "app"}}));
    repo.commit("init");
    let mut last = repo.hashes();
    let odd: [&[u8]; 4] = [b"app/with space.txt", b"app/new\nline.txt", b"app/caf\xc3\xa9.txt", b"app/bad\xff\xfe.bin"];
    for path in odd {
        repo.write(path, "x\n");
        repo.commit("odd");
        let now = repo.hashes();
        assert_eq!(changed(&last, &now), ["app"], "{}", String::from_utf8_lossy(path));
        last = now;
    }
    // --explain prints them escaped, one per line.
    let run = repo.plan(&["--offline", "--explain"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("A app/bad\\xff\\xfe.bin"), "{}", run.stdout);
    let run = repo.plan(&["--offline", "--explain", "--since", "HEAD~3", "--json"]);
    let changes = run.json()["projects"][0]["explain"]["changes"].clone();
    let paths: Vec<&str> = changes.as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["app/bad\\xff\\xfe.bin", "app/caf\u{e9}.txt", "app/new\\nline.txt"]);
}

#[test]
fn shallow_and_blobless_clones_without_their_origin_agree_with_the_full_clone() {
    let repo = standard();
    repo.write("base/src/more.txt", "more\n");
    // A manifest edit too, so that the older manifest blob is one a blobless clone lacks.
    let mut m = crate::support::repo::standard_manifest();
    m["tool"]["cpus"] = json!(8);
    repo.manifest(m);
    repo.commit("second");
    repo.git(&["config", "uploadpack.allowfilter", "true"]);
    let full = repo.hashes();
    let origin = format!("file://{}", repo.path().display());

    let parent = tempfile::tempdir().unwrap();
    let shallow = parent.path().join("shallow");
    let blobless = parent.path().join("blobless");
    git_in(parent.path(), &["clone", "-q", "--depth", "1", &origin, shallow.to_str().unwrap()]);
    git_in(parent.path(), &["clone", "-q", "--filter=blob:none", &origin, blobless.to_str().unwrap()]);
    // The origin is gone: nothing may be fetched.
    drop(repo);

    for clone in [&shallow, &blobless] {
        let run = crate::support::Run::of(
            crate::support::spotbuild(clone).args(["plan", "--offline", "--json"]),
        );
        assert_eq!(crate::support::repo::hashes_of(&run.json()), full, "{}", clone.display());
    }
    // Older commits of a blobless clone lack the manifest's contents: a clear git error.
    let run = crate::support::Run::of(
        crate::support::spotbuild(&blobless).args(["plan", "--offline", "--commit", "HEAD~1"]),
    );
    assert_eq!(run.code, 4, "{run:?}");
    assert!(run.stderr.contains("not in this clone"), "{}", run.stderr);
}
