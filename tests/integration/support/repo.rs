//! Real git repositories, built step by step by the tests.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;

use super::{spotbuild, Run};

pub struct TestRepo {
    dir: TempDir,
}

impl TestRepo {
    pub fn new() -> TestRepo {
        let dir = tempfile::Builder::new().prefix("spotbuild-repo").tempdir().unwrap();
        let repo = TestRepo { dir };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs git in the repository; panics with its output when it fails.
    pub fn git(&self, args: &[&str]) -> String {
        git_in(self.path(), args)
    }

    /// Writes a file (creating folders). The path is raw bytes, so names need not be UTF-8.
    pub fn write(&self, path: impl AsRef<[u8]>, contents: &str) {
        let full = self.full(path.as_ref());
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, contents).unwrap();
    }

    /// Writes an executable file (a script).
    pub fn write_executable(&self, path: &str, contents: &str) {
        use std::os::unix::fs::PermissionsExt;
        self.write(path, contents);
        std::fs::set_permissions(self.full(path.as_bytes()), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn remove(&self, path: &str) {
        std::fs::remove_file(self.full(path.as_bytes())).unwrap();
    }

    pub fn rename(&self, from: &str, to: &str) {
        let to_full = self.full(to.as_bytes());
        std::fs::create_dir_all(to_full.parent().unwrap()).unwrap();
        std::fs::rename(self.full(from.as_bytes()), to_full).unwrap();
    }

    pub fn manifest(&self, manifest: Value) {
        self.write("build_manifest.json", &serde_json::to_string_pretty(&manifest).unwrap());
    }

    fn full(&self, path: &[u8]) -> PathBuf {
        self.path().join(OsStr::from_bytes(path))
    }

    /// Stages everything and commits; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    /// `spotbuild -C <repo> plan ARGS…`
    pub fn plan(&self, args: &[&str]) -> Run {
        Run::of(spotbuild(self.path()).arg("plan").args(args))
    }

    /// Every project's hash at `rev`, computed offline.
    pub fn hashes_at(&self, rev: &str) -> BTreeMap<String, String> {
        hashes_of(&self.plan(&["--offline", "--json", "--commit", rev]).json())
    }

    pub fn hashes(&self) -> BTreeMap<String, String> {
        self.hashes_at("HEAD")
    }
}

/// The hash of every project that could be planned.
pub fn hashes_of(plan: &Value) -> BTreeMap<String, String> {
    plan["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p.get("error").is_none())
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["hash"].as_str().unwrap().to_string()))
        .collect()
}

pub fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=spotbuild-test", "-c", "user.email=test@spotbuild.invalid"])
        .args(["-c", "commit.gpgsign=false", "-c", "protocol.file.allow=always"])
        .args(args)
        .output()
        .expect("git is installed");
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A small monorepo: `base` <- `lib` <- `app`, and an independent `tool`, each with a
/// Dockerfile and a couple of files; `app` has a test job.
pub fn standard() -> TestRepo {
    let repo = TestRepo::new();
    for p in ["base", "lib", "app", "tool"] {
        repo.write(format!("{p}/Dockerfile"), "FROM scratch\n");
        repo.write(format!("{p}/src/main.txt"), &format!("{p} main\n"));
        repo.write(format!("{p}/README"), &format!("{p}\n"));
    }
    repo.write("README.md", "the monorepo\n");
    repo.manifest(standard_manifest());
    repo.commit("initial");
    repo
}

pub fn standard_manifest() -> Value {
    serde_json::json!({
        "base": {"buildDir": "base", "rebuildPatterns": ["^base/"]},
        "lib": {"buildDir": "lib", "dependencies": ["base"]},
        "app": {"buildDir": "app", "dependencies": ["lib"],
                "tests": {"unit": {"command": ["./test.sh"]}}},
        "tool": {"buildDir": "tool"}
    })
}

/// Names of the projects whose hash differs between two hash maps.
pub fn changed(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let names: std::collections::BTreeSet<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect();
    names.into_iter().collect()
}
