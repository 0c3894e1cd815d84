//! Property test of the content hash (the Aztec rule, with the manifest added): for random
//! manifests and random commits, a project's hash changes exactly when a file matching its
//! closure's patterns, its closure's Dockerfiles, or its closure's manifest entries (CPU
//! counts aside) changed.
//!
//! Each case writes a small monorepo with real git, hashes it through the library, applies one
//! to three random changes (a commit each), and checks every project's hash at each step
//! against an oracle computed here, from the generated manifest and `git ls-tree`, without
//! the planner's code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;
use regex::Regex;
use serde_json::{json, Map, Value};

use spotbuild::git::Repo;
use spotbuild::plan::{hash_commit, HashOptions};

/// Project `i` is named `NAMES[i]` and lives in `DIRS[i]`. Folders of projects a case does
/// not have still get files: they are then just unrelated folders.
const NAMES: [&str; 6] = ["alpha", "beta", "gamma", "delta", "eps", "zeta"];
const DIRS: [&str; 6] = ["alpha", "beta", "svc/gamma", "d.e", "eps", "zeta"];
/// Folders that no project owns by default, named to catch prefix and escaping mistakes:
/// `alphabet` starts like `alpha`, `dxe` matches an unescaped `^d.e/`, and `svc/gammaray`
/// starts like `svc/gamma`.
const OTHER_DIRS: [&str; 4] = ["alphabet", "dxe", "svc/gammaray", "docs"];
const SHARED: &str = "shared";
const SUBDIRS: [&str; 4] = ["", "src/", "docs/", "src/deep/"];
const FILE_NAMES: [&str; 6] = ["a.txt", "b.rs", "notes.md", "README", "c.txt", "X.MD"];
/// Few contents, so that different paths often share a blob (and one shares the Dockerfiles').
const CONTENTS: [&str; 5] = ["1\n", "2\n", "hello\n", "", "FROM scratch\n"];
const DOCKERFILES: [&str; 3] = ["FROM scratch\n", "FROM scratch\nRUN true\n", "FROM alpine\n"];
const MANIFEST: &str = "build_manifest.json";

/// Patterns a project may list besides its own folder's: anchored literals (the planner's
/// trie), and regexes (its `RegexSet`), some unanchored.
fn extra_patterns() -> Vec<String> {
    let mut v: Vec<String> = DIRS.iter().map(|d| format!("^{}/", regex::escape(d))).collect();
    v.extend(
        ["^shared/", r"\.md$", r"^shared/.*\.txt$", "(^|/)README$", r"(?i)\.md$", "^svc/", "docs/", "^svc/gamma"]
            .map(String::from),
    );
    v
}

// ---------------------------------------------------------------------------------------
// What proptest generates. Indices are resolved against the state when they are used, so
// every generated change applies to whatever the case's repository holds by then.

#[derive(Debug, Clone)]
struct PatternsSpec {
    /// 0: key absent, 1: `null` (both mean `^<dir>/`), otherwise a list.
    kind: u8,
    /// 0: `^<dir>/`, 1: `^<dir>/src/` (leaves the Dockerfile to the Dockerfile rule), 2: both, 3: neither.
    own: u8,
    extras: Vec<Index>,
}

#[derive(Debug, Clone)]
struct FileSpec {
    folder: Index,
    sub: Index,
    name: Index,
    content: Index,
    exec: bool,
}

#[derive(Debug, Clone)]
struct ProjectSpec {
    patterns: PatternsSpec,
    /// Resolved to earlier projects only, so the graph is acyclic.
    deps: Vec<Index>,
    /// 0: absent, 1: `"Dockerfile"` (same meaning), 2: `../docker/<name>.Dockerfile`.
    dockerfile: u8,
    dockerfile_content: Index,
    cpus: Option<u32>,
    /// A test job `unit`, with its own CPU count or none.
    test: Option<Option<u32>>,
}

#[derive(Debug, Clone)]
enum Mutation {
    Modify { file: Index, content: Index },
    Add { file: FileSpec },
    Delete { file: Index },
    Rename { file: Index, to: FileSpec },
    Chmod { file: Index },
    Patterns { project: Index, patterns: PatternsSpec },
    AddDependency { project: Index, dep: Index },
    RemoveDependency { project: Index, dep: Index },
    DockerfileKey { project: Index, choice: u8 },
    DockerfileContent { project: Index, content: Index },
    Cpus { project: Index, cpus: Option<u32>, test_cpus: Option<u32> },
    /// Rewrites the manifest in another order (projects, keys, lists), with `buildDir`s with
    /// or without a trailing slash and empty dependencies absent, `null` or `[]`.
    Reorder { seed: u64 },
}

#[derive(Debug, Clone)]
struct Scenario {
    projects: Vec<ProjectSpec>,
    files: Vec<FileSpec>,
    layout_seed: u64,
    mutations: Vec<Mutation>,
}

fn patterns_spec() -> impl Strategy<Value = PatternsSpec> {
    (prop_oneof![1 => Just(0u8), 1 => Just(1u8), 4 => Just(2u8)], 0u8..4, prop::collection::vec(any::<Index>(), 0..3))
        .prop_map(|(kind, own, extras)| PatternsSpec { kind, own, extras })
}

fn file_spec() -> impl Strategy<Value = FileSpec> {
    (any::<Index>(), any::<Index>(), any::<Index>(), any::<Index>(), prop::bool::weighted(0.15))
        .prop_map(|(folder, sub, name, content, exec)| FileSpec { folder, sub, name, content, exec })
}

fn project_spec() -> impl Strategy<Value = ProjectSpec> {
    (
        patterns_spec(),
        prop::collection::vec(any::<Index>(), 0..3),
        0u8..3,
        any::<Index>(),
        prop::option::of(1u32..=64),
        prop::option::of(prop::option::of(1u32..=8)),
    )
        .prop_map(|(patterns, deps, dockerfile, dockerfile_content, cpus, test)| ProjectSpec {
            patterns,
            deps,
            dockerfile,
            dockerfile_content,
            cpus,
            test,
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = || any::<Index>();
    prop_oneof![
        3 => (i(), i()).prop_map(|(file, content)| Mutation::Modify { file, content }),
        2 => file_spec().prop_map(|file| Mutation::Add { file }),
        2 => i().prop_map(|file| Mutation::Delete { file }),
        2 => (i(), file_spec()).prop_map(|(file, to)| Mutation::Rename { file, to }),
        2 => i().prop_map(|file| Mutation::Chmod { file }),
        2 => (i(), patterns_spec()).prop_map(|(project, patterns)| Mutation::Patterns { project, patterns }),
        2 => (i(), i()).prop_map(|(project, dep)| Mutation::AddDependency { project, dep }),
        1 => (i(), i()).prop_map(|(project, dep)| Mutation::RemoveDependency { project, dep }),
        1 => (i(), 0u8..3).prop_map(|(project, choice)| Mutation::DockerfileKey { project, choice }),
        1 => (i(), i()).prop_map(|(project, content)| Mutation::DockerfileContent { project, content }),
        2 => (i(), prop::option::of(1u32..=64), prop::option::of(1u32..=8))
            .prop_map(|(project, cpus, test_cpus)| Mutation::Cpus { project, cpus, test_cpus }),
        1 => any::<u64>().prop_map(|seed| Mutation::Reorder { seed }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(project_spec(), 2..=6),
        prop::collection::vec(file_spec(), 10..=40),
        any::<u64>(),
        prop::collection::vec(mutation(), 1..=3),
    )
        .prop_map(|(projects, files, layout_seed, mutations)| Scenario { projects, files, layout_seed, mutations })
}

// ---------------------------------------------------------------------------------------
// The model of the manifest, and how it is written.

#[derive(Debug, Clone)]
enum Patterns {
    Absent,
    Null,
    List(Vec<String>),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dir: String,
    patterns: Patterns,
    deps: Vec<String>,
    dockerfile: Option<String>,
    cpus: Option<u32>,
    test: Option<Option<u32>>,
}

struct Model {
    entries: Vec<Entry>,
    layout_seed: u64,
}

fn resolve_patterns(spec: &PatternsSpec, dir: &str) -> Patterns {
    match spec.kind {
        0 => Patterns::Absent,
        1 => Patterns::Null,
        _ => {
            let d = regex::escape(dir);
            let mut v = match spec.own {
                0 => vec![format!("^{d}/")],
                1 => vec![format!("^{d}/src/")],
                2 => vec![format!("^{d}/"), format!("^{d}/src/")],
                _ => vec![],
            };
            let pool = extra_patterns();
            v.extend(spec.extras.iter().map(|i| pool[i.index(pool.len())].clone()));
            Patterns::List(v)
        }
    }
}

fn dockerfile_key(choice: u8, name: &str, dir: &str) -> Option<String> {
    match choice {
        0 => None,
        1 => Some("Dockerfile".into()),
        _ => Some(format!("{}docker/{name}.Dockerfile", "../".repeat(dir.split('/').count()))),
    }
}

fn file_path(f: &FileSpec) -> String {
    let folders: Vec<&str> = DIRS.iter().chain(&OTHER_DIRS).copied().chain([SHARED]).collect();
    format!(
        "{}/{}{}",
        folders[f.folder.index(folders.len())],
        SUBDIRS[f.sub.index(SUBDIRS.len())],
        FILE_NAMES[f.name.index(FILE_NAMES.len())]
    )
}

/// A small deterministic generator for the manifest's layout (splitmix64).
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

/// The manifest as JSON, laid out by the model's seed: the order of projects, of keys and of
/// lists, trailing slashes and the spelling of "no dependencies" all vary with it.
fn manifest_json(model: &Model) -> Value {
    let mut order: Vec<usize> = (0..model.entries.len()).collect();
    Mix(model.layout_seed).shuffle(&mut order);
    let mut root = Map::new();
    for i in order {
        let e = &model.entries[i];
        // Per entry, so that one entry's change does not re-lay the others.
        let mut rng = Mix(model.layout_seed ^ (i as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut fields: Vec<(&str, Value)> = Vec::new();
        let slash = if rng.next() % 2 == 0 { "/" } else { "" };
        fields.push(("buildDir", json!(format!("{}{slash}", e.dir))));
        match &e.patterns {
            Patterns::Absent => {}
            Patterns::Null => fields.push(("rebuildPatterns", Value::Null)),
            Patterns::List(v) => {
                let mut v = v.clone();
                rng.shuffle(&mut v);
                fields.push(("rebuildPatterns", json!(v)));
            }
        }
        let spelling = rng.next() % 3;
        if !e.deps.is_empty() {
            let mut d = e.deps.clone();
            rng.shuffle(&mut d);
            fields.push(("dependencies", json!(d)));
        } else if spelling == 1 {
            fields.push(("dependencies", Value::Null));
        } else if spelling == 2 {
            fields.push(("dependencies", json!([])));
        }
        if let Some(d) = &e.dockerfile {
            fields.push(("dockerfile", json!(d)));
        }
        if let Some(c) = e.cpus {
            fields.push(("cpus", json!(c)));
        }
        if let Some(test_cpus) = e.test {
            let mut job = Map::new();
            job.insert("command".into(), json!(["make", "test"]));
            if let Some(c) = test_cpus {
                job.insert("cpus".into(), json!(c));
            }
            fields.push(("tests", json!({ "unit": Value::Object(job) })));
        }
        rng.shuffle(&mut fields);
        root.insert(e.name.clone(), Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    }
    Value::Object(root)
}

// ---------------------------------------------------------------------------------------
// The oracle: what each project's hash covers, read from the written manifest and the tree.

/// The effective patterns of an entry: its list, or `^<buildDir>/` when it has none.
fn effective_patterns(entry: &Value) -> BTreeSet<String> {
    match entry.get("rebuildPatterns") {
        None | Some(Value::Null) => {
            let dir = entry["buildDir"].as_str().unwrap().trim_end_matches('/');
            BTreeSet::from([format!("^{}/", regex::escape(dir))])
        }
        Some(Value::Array(v)) => v.iter().map(|p| p.as_str().unwrap().to_string()).collect(),
        Some(other) => panic!("generated a bad rebuildPatterns: {other}"),
    }
}

fn dependencies(entry: &Value) -> BTreeSet<String> {
    match entry.get("dependencies") {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(Value::Array(v)) => v.iter().map(|p| p.as_str().unwrap().to_string()).collect(),
        Some(other) => panic!("generated bad dependencies: {other}"),
    }
}

/// `dir/file` with `..` resolved.
fn dockerfile_path(entry: &Value) -> String {
    let dir = entry["buildDir"].as_str().unwrap();
    let file = entry.get("dockerfile").and_then(Value::as_str).unwrap_or("Dockerfile");
    let mut parts: Vec<&str> = Vec::new();
    for c in dir.split('/').chain(file.split('/')) {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop().expect("generated Dockerfiles stay inside the repository");
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// An entry with CPU counts removed and defaults filled in, in one order: equal exactly
/// when the two entries mean the same thing for what gets built.
fn normalised(entry: &Value) -> Value {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in entry.as_object().unwrap() {
        let v = match k.as_str() {
            "cpus" => continue,
            "buildDir" => json!(v.as_str().unwrap().trim_end_matches('/')),
            "rebuildPatterns" | "dependencies" | "dockerfile" => continue, // filled in below
            "tests" => {
                let mut jobs = v.clone();
                for job in jobs.as_object_mut().unwrap().values_mut() {
                    job.as_object_mut().unwrap().remove("cpus");
                }
                jobs
            }
            other => panic!("generated an unexpected key {other}"),
        };
        out.insert(k.clone(), v);
    }
    out.insert("rebuildPatterns".into(), json!(effective_patterns(entry)));
    out.insert("dependencies".into(), json!(dependencies(entry)));
    out.insert("dockerfile".into(), json!(entry.get("dockerfile").and_then(Value::as_str).unwrap_or("Dockerfile")));
    Value::Object(out.into_iter().collect())
}

/// What one commit looks like to the oracle and to the implementation.
struct CommitState {
    commit: String,
    manifest: Value,
    /// `git ls-tree -r`: path -> (mode, object id).
    tree: BTreeMap<String, (String, String)>,
    hashes: BTreeMap<String, String>,
}

impl CommitState {
    fn entry(&self, name: &str) -> &Value {
        &self.manifest[name]
    }

    /// `name` and its transitive dependencies.
    fn closure(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::from([name.to_string()]);
        let mut stack = vec![name.to_string()];
        while let Some(n) = stack.pop() {
            for d in dependencies(self.entry(&n)) {
                if seen.insert(d.clone()) {
                    stack.push(d);
                }
            }
        }
        seen
    }

    /// Everything `name`'s hash may depend on.
    fn inputs(&self, name: &str) -> Inputs {
        let closure = self.closure(name);
        let patterns: BTreeSet<String> = closure.iter().flat_map(|n| effective_patterns(self.entry(n))).collect();
        let regexes: Vec<Regex> = patterns.iter().map(|p| Regex::new(p).unwrap()).collect();
        let files = self
            .tree
            .iter()
            .filter(|(path, _)| regexes.iter().any(|r| r.is_match(path)))
            .map(|(path, (mode, id))| (path.clone(), mode.clone(), id.clone()))
            .collect();
        let dockerfiles = closure
            .iter()
            .map(|n| {
                let path = dockerfile_path(self.entry(n));
                let (mode, id) = self.tree.get(&path).unwrap_or_else(|| panic!("the oracle's Dockerfile {path} of {n} is not committed"));
                (n.clone(), (path, mode.clone(), id.clone()))
            })
            .collect();
        let entries = closure.iter().map(|n| (n.clone(), normalised(self.entry(n)))).collect();
        Inputs {
            patterns,
            files,
            dockerfiles,
            entries,
        }
    }
}

#[derive(PartialEq)]
struct Inputs {
    /// The union of the closure's patterns: follows from `entries`, kept for messages.
    patterns: BTreeSet<String>,
    files: BTreeSet<(String, String, String)>,
    dockerfiles: BTreeMap<String, (String, String, String)>,
    entries: BTreeMap<String, Value>,
}

/// What differs between two projects' inputs, for the failure message.
fn describe_difference(a: &Inputs, b: &Inputs) -> String {
    let mut s = String::new();
    for f in a.files.difference(&b.files) {
        let _ = writeln!(s, "    only before: {f:?}");
    }
    for f in b.files.difference(&a.files) {
        let _ = writeln!(s, "    only after:  {f:?}");
    }
    if a.dockerfiles != b.dockerfiles {
        let _ = writeln!(s, "    Dockerfiles: {:?} -> {:?}", a.dockerfiles, b.dockerfiles);
    }
    let names: BTreeSet<&String> = a.entries.keys().chain(b.entries.keys()).collect();
    for n in names {
        if a.entries.get(n) != b.entries.get(n) {
            let show = |v: Option<&Value>| v.map_or("(not in the closure)".to_string(), Value::to_string);
            let _ = writeln!(s, "    entry {n}: {} -> {}", show(a.entries.get(n)), show(b.entries.get(n)));
        }
    }
    if s.is_empty() {
        s.push_str("    nothing (same files, Dockerfiles and entries)\n");
    }
    let _ = writeln!(s, "    closure patterns before: {:?}", a.patterns);
    let _ = writeln!(s, "    closure patterns after:  {:?}", b.patterns);
    s
}

// ---------------------------------------------------------------------------------------
// The repository.

fn git(dir: &Path, args: &[&str]) -> Vec<u8> {
    crate::support::repo::git_in(dir, args).into_bytes()
}

fn write_file(dir: &Path, path: &str, contents: &str, exec: bool) {
    let full = dir.join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(&full, contents).unwrap();
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 })).unwrap();
}

/// Writes the manifest, commits everything, and hashes the commit. Also checks that the
/// implementation read the manifest as the oracle does (a failure there is about the
/// oracle's premises, not yet about hashes).
fn commit(dir: &Path, model: &Model) -> Result<CommitState, TestCaseError> {
    let manifest = manifest_json(model);
    std::fs::write(dir.join(MANIFEST), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "--allow-empty", "-m", "x"]);

    let repo = Repo::discover(dir).unwrap();
    let id = repo.resolve_commit("HEAD").unwrap();
    let h = hash_commit(&repo, id, HashOptions::default())
        .unwrap_or_else(|e| panic!("hash_commit failed: {}", spotbuild::errors::error_chain(&e)));
    let commit = id.to_string();

    let listing = git(dir, &["ls-tree", "-r", "-z", "--full-tree", &commit]);
    let mut tree = BTreeMap::new();
    for record in listing.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let record = std::str::from_utf8(record).unwrap();
        let (meta, path) = record.split_once('\t').unwrap();
        let meta: Vec<&str> = meta.split(' ').collect();
        tree.insert(path.to_string(), (meta[0].to_string(), meta[2].to_string()));
    }
    let state = CommitState {
        commit,
        manifest,
        tree,
        hashes: h.manifest.projects.iter().map(|p| p.name.clone()).zip(h.hashes.iter().cloned()).collect(),
    };

    prop_assert!(h.manifest.broken.is_empty(), "generated manifest has broken entries: {:?}", h.manifest.broken);
    let names: BTreeSet<String> = model.entries.iter().map(|e| e.name.clone()).collect();
    prop_assert_eq!(state.hashes.keys().cloned().collect::<BTreeSet<_>>(), names);
    for (i, p) in h.manifest.projects.iter().enumerate() {
        prop_assert_eq!(h.hash_of(&p.name), Some(h.hashes[i].as_str()));
        let closure: BTreeSet<String> = h.closure(i).into_iter().map(|j| h.manifest.projects[j].name.clone()).collect();
        prop_assert_eq!(&closure, &state.closure(&p.name), "closure of {}", p.name);
        let patterns: BTreeSet<String> = p.patterns.iter().map(|p| p.as_str().to_string()).collect();
        prop_assert_eq!(&patterns, &effective_patterns(state.entry(&p.name)), "patterns of {}", p.name);
    }
    Ok(state)
}

fn is_dockerfile(path: &str) -> bool {
    path.starts_with("docker/") || path.rsplit('/').next() == Some("Dockerfile")
}

/// Applies one change to the model and the working tree; says what it did.
fn apply(m: &Mutation, model: &mut Model, dir: &Path, prev: &CommitState) -> String {
    // Files that may be edited, and those that may also go away (not the Dockerfiles: every
    // manifest entry must stay valid).
    let editable: Vec<&String> = prev.tree.keys().filter(|p| *p != MANIFEST).collect();
    let removable: Vec<&String> = editable.iter().copied().filter(|p| !is_dockerfile(p)).collect();
    let n = model.entries.len();
    let mode_of = |path: &str| prev.tree.get(path).map(|(m, _)| m.as_str());
    match m {
        Mutation::Modify { file, content } => {
            let path = editable[file.index(editable.len())];
            let c = CONTENTS[content.index(CONTENTS.len())];
            write_file(dir, path, c, mode_of(path) == Some("100755"));
            format!("modify {path} to {c:?}")
        }
        Mutation::Add { file } => {
            let path = file_path(file);
            let c = CONTENTS[file.content.index(CONTENTS.len())];
            write_file(dir, &path, c, file.exec);
            format!("add {path} ({c:?}, exec {})", file.exec)
        }
        Mutation::Delete { file } => {
            if removable.is_empty() {
                return "delete: nothing to delete".into();
            }
            let path = removable[file.index(removable.len())];
            std::fs::remove_file(dir.join(path)).unwrap();
            format!("delete {path}")
        }
        Mutation::Rename { file, to } => {
            if removable.is_empty() {
                return "rename: nothing to rename".into();
            }
            let from = removable[file.index(removable.len())];
            let to = file_path(to);
            let full = dir.join(&to);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::rename(dir.join(from), full).unwrap();
            let over = if prev.tree.contains_key(&to) && *from != to { " (replacing it)" } else { "" };
            format!("rename {from} to {to}{over}")
        }
        Mutation::Chmod { file } => {
            let path = editable[file.index(editable.len())];
            let full = dir.join(path);
            let exec = std::fs::metadata(&full).unwrap().permissions().mode() & 0o111 != 0;
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(if exec { 0o644 } else { 0o755 })).unwrap();
            format!("chmod {} {path}", if exec { "-x" } else { "+x" })
        }
        Mutation::Patterns { project, patterns } => {
            let e = &mut model.entries[project.index(n)];
            let old = e.patterns.clone();
            e.patterns = resolve_patterns(patterns, &e.dir);
            format!("{}: rebuildPatterns {old:?} -> {:?}", e.name, e.patterns)
        }
        Mutation::AddDependency { project, dep } => {
            let j = 1 + project.index(n - 1);
            let d = NAMES[dep.index(j)].to_string();
            let e = &mut model.entries[j];
            if e.deps.contains(&d) {
                format!("{}: already depends on {d}", e.name)
            } else {
                e.deps.push(d.clone());
                format!("{}: add dependency {d} (now {:?})", e.name, e.deps)
            }
        }
        Mutation::RemoveDependency { project, dep } => {
            let e = &mut model.entries[project.index(n)];
            if e.deps.is_empty() {
                format!("{}: no dependency to remove", e.name)
            } else {
                let d = e.deps.remove(dep.index(e.deps.len()));
                format!("{}: remove dependency {d} (now {:?})", e.name, e.deps)
            }
        }
        Mutation::DockerfileKey { project, choice } => {
            let e = &mut model.entries[project.index(n)];
            let old = e.dockerfile.clone();
            e.dockerfile = dockerfile_key(*choice, &e.name, &e.dir);
            format!("{}: dockerfile {old:?} -> {:?}", e.name, e.dockerfile)
        }
        Mutation::DockerfileContent { project, content } => {
            let e = &model.entries[project.index(n)];
            let path = dockerfile_path(&manifest_json(model)[&e.name]);
            let c = DOCKERFILES[content.index(DOCKERFILES.len())];
            write_file(dir, &path, c, mode_of(&path) == Some("100755"));
            format!("{}: write its Dockerfile {path} as {c:?}", e.name)
        }
        Mutation::Cpus { project, cpus, test_cpus } => {
            let e = &mut model.entries[project.index(n)];
            e.cpus = *cpus;
            if let Some(t) = &mut e.test {
                *t = *test_cpus;
            }
            format!("{}: cpus {:?}, test job {:?}", e.name, e.cpus, e.test)
        }
        Mutation::Reorder { seed } => {
            model.layout_seed = *seed;
            format!("rewrite the manifest in another order (seed {seed})")
        }
    }
}

fn check(s: &Scenario) -> Result<(), TestCaseError> {
    let tmp = tempfile::Builder::new().prefix("spotbuild-hashprop").tempdir().unwrap();
    let dir = tmp.path();
    git(dir, &["init", "-q", "-b", "main"]);

    let mut model = Model {
        entries: Vec::new(),
        layout_seed: s.layout_seed,
    };
    for (i, p) in s.projects.iter().enumerate() {
        let (name, d) = (NAMES[i], DIRS[i]);
        let mut deps: Vec<String> = Vec::new();
        if i > 0 {
            for idx in &p.deps {
                let dep = NAMES[idx.index(i)].to_string();
                if !deps.contains(&dep) {
                    deps.push(dep);
                }
            }
        }
        // Both candidate Dockerfiles exist, so that `dockerfile` may switch between them.
        let content = DOCKERFILES[p.dockerfile_content.index(DOCKERFILES.len())];
        write_file(dir, &format!("{d}/Dockerfile"), content, false);
        write_file(dir, &format!("docker/{name}.Dockerfile"), content, false);
        model.entries.push(Entry {
            name: name.into(),
            dir: d.into(),
            patterns: resolve_patterns(&p.patterns, d),
            deps,
            dockerfile: dockerfile_key(p.dockerfile, name, d),
            cpus: p.cpus,
            test: p.test,
        });
    }
    for f in &s.files {
        write_file(dir, &file_path(f), CONTENTS[f.content.index(CONTENTS.len())], f.exec);
    }
    let mut prev = commit(dir, &model)?;

    let mut done: Vec<String> = Vec::new();
    for m in &s.mutations {
        let what = apply(m, &mut model, dir, &prev);
        done.push(what.clone());
        let next = commit(dir, &model)?;
        if matches!(m, Mutation::Cpus { .. } | Mutation::Reorder { .. }) {
            prop_assert_eq!(&prev.hashes, &next.hashes, "`{}` must change no hash", what);
        }
        for name in prev.hashes.keys() {
            let (before, after) = (prev.inputs(name), next.inputs(name));
            let expected = before != after;
            let actual = prev.hashes[name] != next.hashes[name];
            prop_assert!(
                expected == actual,
                "project `{}`: hash {} but its inputs {} after `{}` (changes so far: {:?}; commits {} -> {})\n\
                 what the oracle sees differ:\n{}manifest after: {}",
                name,
                if actual { "changed" } else { "did not change" },
                if expected { "changed" } else { "did not change" },
                what,
                done,
                prev.commit,
                next.commit,
                describe_difference(&before, &after),
                next.manifest,
            );
        }
        prev = next;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        // Nothing is written to the source tree; a failure prints its minimal case instead.
        failure_persistence: None,
        // Bounds the time a failure spends shrinking (each step is a few git commits).
        max_shrink_time: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_hash_changes_exactly_when_its_closures_files_dockerfiles_or_entries_change(s in scenario()) {
        check(&s)?;
    }
}
