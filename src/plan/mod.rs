//! The rebuild planner: content hashes of each project's inputs at a commit, and, by asking
//! the registry which `cache-<hash>` tags exist, what needs building or testing and why.
//!
//! # Guarantees
//! - The hash depends only on the commit's tree entries (path bytes, mode, object id) that
//!   match the patterns of the project or of any transitive dependency, on the canonical
//!   manifest entries of those projects, on their Dockerfiles, and on [`HASH_FORMAT`]. It
//!   never depends on history, so merges, squashes, reverts and force pushes of the same
//!   tree agree, and shallow or blobless clones give the same answer as full ones.
//! - Fail safe: a project whose tag cannot be looked up is reported as needing work.
//!
//! # Caveats
//! - File contents are not read (only object ids), except the manifest and pattern files.

pub mod explain;
pub mod matcher;
pub mod planner;

mod scripts;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::git::{CommitId, FileMode, GitError, Repo, Snapshot};
use crate::manifest::{Inputs, Manifest, ManifestError, ParseError, ScriptFailure, DEPENDENCY_SCRIPT_TIMEOUT, MANIFEST_FILES};
use crate::errors::error_chain;
use crate::manifest::Multiarch;
use crate::platform::Arch;
use crate::registry::{build_tag, test_tag, ImageStore, RegistryError};
use matcher::Matcher;

/// Changing this string changes every hash: bump it whenever what the hash covers changes.
/// v2: a project's hash combines its own inputs with its direct dependencies' hashes (a
/// Merkle form), so planning costs O(files + projects) whatever the graph's depth.
pub const HASH_FORMAT: &str = "spotbuild-hash-v2";

/// Length of the hex hash in tags (160 bits).
pub const HASH_HEX_LEN: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("failed to find build_manifest.json or build_manifest.yml at the root of commit {commit}")]
    NoManifest { commit: String },
    #[error("commit {commit} has both build_manifest.json and build_manifest.yml")]
    TwoManifests { commit: String },
    #[error("unknown project `{name}`")]
    UnknownProject {
        name: String,
        suggestion: Option<String>,
    },
    /// A project asked for (or one it depends on) has an invalid entry.
    #[error("{}", .0)]
    BrokenProject(Arc<ManifestError>),
    #[error("`{project}` builds only for x86_64, so an {arch} build cannot build it (its manifest entry has no `multiarch: host` or `multiarch: buildx`)")]
    NotForArch { project: String, arch: Arch },
}

impl From<ParseError<GitError>> for PlanError {
    fn from(e: ParseError<GitError>) -> Self {
        match e {
            ParseError::Manifest(m) => PlanError::Manifest(m),
            ParseError::Read(g) => PlanError::Git(g),
        }
    }
}

/// How a commit is hashed.
#[derive(Debug, Clone, Copy)]
pub struct HashOptions {
    /// Bound on one `dependencies` script (`[plan] dependencies_timeout`).
    pub script_timeout: std::time::Duration,
}

impl Default for HashOptions {
    fn default() -> Self {
        HashOptions {
            script_timeout: DEPENDENCY_SCRIPT_TIMEOUT,
        }
    }
}

/// Every healthy project's content hash at one commit.
pub struct Hashes {
    pub commit: CommitId,
    /// What it was hashed with, so that other commits can be hashed alike.
    pub options: HashOptions,
    pub manifest: Manifest,
    /// Hex hashes, indexed like `manifest.projects`.
    pub hashes: Vec<String>,
}

impl Hashes {
    pub fn hash_of(&self, project: &str) -> Option<&str> {
        self.manifest.position(project).map(|i| self.hashes[i].as_str())
    }

    /// Project `i` and its transitive dependencies (indices, ascending).
    pub fn closure(&self, i: usize) -> Vec<usize> {
        let mut seen = BTreeSet::from([i]);
        let mut stack = vec![i];
        while let Some(j) = stack.pop() {
            for d in &self.manifest.projects[j].dependencies {
                let k = self.manifest.position(d).expect("healthy projects depend on healthy ones");
                if seen.insert(k) {
                    stack.push(k);
                }
            }
        }
        seen.into_iter().collect()
    }
}

/// What the manifest reads at the commit being planned: files from its tree, and
/// `dependencies` scripts run in a checkout of it.
struct CommitInputs<'s, 'r> {
    snap: &'s Snapshot<'r>,
    repo: &'r Repo,
    timeout: std::time::Duration,
    checkout: Option<Result<scripts::Checkout, scripts::CheckoutFailed>>,
}

impl Inputs for CommitInputs<'_, '_> {
    type Error = GitError;

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        self.snap.read_file(path)
    }

    fn run_script(&mut self, script: &str, project_dir: &str) -> Result<String, ScriptFailure> {
        if self.snap.file_entry(script).ok().flatten().is_none() {
            return Err(ScriptFailure::Missing);
        }
        let (repo, commit) = (self.repo, self.snap.commit());
        let checkout = self.checkout.get_or_insert_with(|| scripts::Checkout::of(repo, commit));
        match checkout {
            Ok(c) => scripts::run(c.root(), script, project_dir, self.timeout),
            Err(failed) => Err(ScriptFailure::Checkout {
                commit: commit.to_string(),
                detail: failed.0.clone(),
            }),
        }
    }
}

/// Reads and validates the manifest at `snap`'s commit.
pub fn load_manifest<'r>(repo: &'r Repo, snap: &Snapshot<'r>, options: HashOptions) -> Result<Manifest, PlanError> {
    let commit = snap.commit().to_string();
    let mut found = Vec::new();
    for file in MANIFEST_FILES {
        if let Some(text) = snap.read_file(file)? {
            found.push((file, text));
        }
    }
    let (file, text) = match found.len() {
        0 => return Err(PlanError::NoManifest { commit }),
        1 => found.pop().expect("one"),
        _ => return Err(PlanError::TwoManifests { commit }),
    };
    let mut inputs = CommitInputs {
        snap,
        repo,
        timeout: options.script_timeout,
        checkout: None,
    };
    Ok(Manifest::parse(&text, file, &mut inputs)?)
}

/// Computes every project's hash at `commit`: one walk over the tree, matching each path
/// against all projects' patterns at once. Entries that turn out broken here (a missing
/// Dockerfile) join [`Manifest::broken`].
pub fn hash_commit(repo: &Repo, commit: CommitId, options: HashOptions) -> Result<Hashes, PlanError> {
    let snap = repo.snapshot(commit)?;
    let mut manifest = load_manifest(repo, &snap, options)?;
    let n = manifest.projects.len();

    let dockerfile_paths: Vec<String> = manifest.projects.iter().map(|p| p.dockerfile_path()).collect();
    // Each folder on the way to a Dockerfile, with whether another lies below it: the walk
    // keeps them, so that looking the Dockerfiles up afterwards inflates no tree again.
    let mut keep: HashMap<String, bool> = HashMap::new();
    for path in &dockerfile_paths {
        let mut dir = path.as_str();
        let mut deeper = false;
        while let Some((parent, _)) = dir.rsplit_once('/') {
            let seen = keep.contains_key(parent);
            let slot = keep.entry(parent.to_string()).or_insert(false);
            *slot |= deeper;
            if seen && !deeper {
                break;
            }
            deeper = true;
            dir = parent;
        }
    }

    let matcher = Matcher::new(
        manifest
            .projects
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.patterns.iter().map(move |pat| (i as u32, pat))),
    );
    let mut digests = vec![Sha256::new(); n];
    // The entry number each project last saw, so two patterns matching one path count once.
    let mut last_seen = vec![u64::MAX; n];
    let mut entry_no = 0u64;
    snap.walk_files(&keep, |e| {
        matcher.for_each_match(e.path, |owner| {
            let owner = owner as usize;
            if last_seen[owner] != entry_no {
                last_seen[owner] = entry_no;
                let d = &mut digests[owner];
                d.update(e.path);
                d.update([0]);
                d.update(e.mode.to_be_bytes());
                d.update(e.id);
            }
        });
        entry_no += 1;
    })?;

    // Dockerfiles always count, even when no pattern covers them. A project whose
    // Dockerfile is not at the commit (and what depends on it) cannot be planned.
    let mut inputs: HashMap<String, ((FileMode, git2::Oid), Sha256)> = HashMap::with_capacity(n);
    let mut missing = Vec::new();
    for ((p, path), digest) in manifest.projects.iter().zip(dockerfile_paths).zip(digests) {
        match snap.file_entry(&path)? {
            Some(entry) => {
                inputs.insert(p.name.clone(), (entry, digest));
            }
            None => missing.push(ManifestError::MissingDockerfile {
                project: p.name.clone(),
                path,
            }),
        }
    }
    manifest.mark_broken(missing);
    let n = manifest.projects.len();

    // Projects are in dependency order, so each dependency's hash is ready before it is used.
    let mut hashes: Vec<String> = Vec::with_capacity(n);
    for p in &manifest.projects {
        let ((mode, id), own) = inputs.remove(&p.name).expect("healthy projects have their Dockerfile");
        let mut h = Sha256::new();
        h.update(HASH_FORMAT.as_bytes());
        h.update([0]);
        h.update(p.name.as_bytes());
        h.update([0]);
        h.update(p.canonical().as_bytes());
        h.update([0]);
        h.update(mode.to_be_bytes());
        h.update(id.as_bytes());
        h.update(own.finalize());
        // In name order, so the hash does not depend on how the manifest lists them.
        let mut deps: Vec<&String> = p.dependencies.iter().collect();
        deps.sort_unstable();
        deps.dedup();
        for d in deps {
            let j = manifest.position(d).expect("healthy projects depend on healthy ones");
            h.update(d.as_bytes());
            h.update([0]);
            h.update(hashes[j].as_bytes());
        }
        let mut hex = hex::encode(h.finalize());
        hex.truncate(HASH_HEX_LEN);
        hashes.push(hex);
    }
    Ok(Hashes {
        commit,
        options,
        manifest,
        hashes,
    })
}

/// The projects to plan: the named ones and their dependencies, or all, in dependency order.
pub fn select(hashes: &Hashes, names: &[String]) -> Result<Vec<usize>, PlanError> {
    if names.is_empty() {
        return Ok((0..hashes.manifest.projects.len()).collect());
    }
    let mut set = BTreeSet::new();
    for name in names {
        if let Some(e) = hashes.manifest.broken.get(name) {
            return Err(PlanError::BrokenProject(e.clone()));
        }
        let i = hashes
            .manifest
            .position(name)
            .ok_or_else(|| PlanError::UnknownProject {
                name: name.clone(),
                suggestion: hashes.manifest.suggest(name),
            })?;
        set.extend(hashes.closure(i));
    }
    Ok(set.into_iter().collect())
}

/// The part of `selection` a build on `arch` covers, and what it should warn about.
///
/// An x86_64 build covers everything, as before architectures. An arm64 build covers the
/// `multiarch: host` projects (each built natively, as `cache-<hash>-arm64`) and what they
/// depend on: `buildx` projects (their index has arm64) and single-image ones, whose x86_64
/// image a `FROM` then uses (fine for `COPY --from`; anything it runs needs emulation).
/// `named`: the user named projects, and naming one that cannot be built there is an error.
pub fn for_arch(hashes: &Hashes, selection: &[usize], names: &[String], arch: Arch) -> Result<(Vec<usize>, Vec<String>), PlanError> {
    if arch == Arch::X86_64 {
        return Ok((selection.to_vec(), Vec::new()));
    }
    let kind = |i: usize| hashes.manifest.projects[i].multiarch_kind;
    for name in names {
        if let Some(i) = hashes.manifest.position(name) {
            if kind(i) == Multiarch::None {
                return Err(PlanError::NotForArch { project: name.clone(), arch });
            }
        }
    }
    let mut keep = BTreeSet::new();
    let mut warnings = BTreeSet::new();
    for &i in selection {
        if kind(i) != Multiarch::Host {
            continue;
        }
        for j in hashes.closure(i) {
            if kind(j) == Multiarch::None {
                warnings.insert(format!(
                    "`{}` ({arch}) is built from `{}`, which builds only for x86_64: its x86_64 image is used",
                    hashes.manifest.projects[i].name, hashes.manifest.projects[j].name
                ));
            }
            keep.insert(j);
        }
    }
    // Named buildx projects are built wherever they are asked for (one build makes every
    // platform).
    for &i in selection {
        if kind(i) == Multiarch::Buildx && names.iter().any(|n| *n == hashes.manifest.projects[i].name) {
            keep.extend(hashes.closure(i));
        }
    }
    Ok((keep.into_iter().collect(), warnings.into_iter().collect()))
}

/// The tag of project `p`'s image built at `hash` by a build on `arch`: `cache-<hash>-<arch>`
/// for `multiarch: host`, else `cache-<hash>` (an index, for `buildx`).
pub fn image_tag(kind: Multiarch, hash: &str, arch: Arch) -> String {
    match kind {
        Multiarch::Host => arch.tag(hash),
        Multiarch::None | Multiarch::Buildx => build_tag(hash),
    }
}

/// The tag that says test `key` passed on that image.
pub fn passed_tag(kind: Multiarch, hash: &str, arch: Arch, key: &str) -> String {
    match kind {
        Multiarch::Host => test_tag(&format!("{hash}-{arch}"), key),
        Multiarch::None | Multiarch::Buildx => test_tag(hash, key),
    }
}

/// `[ci rebuild]` and `[ci rebuild <project> …]` in a commit message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forced {
    pub all: bool,
    pub projects: BTreeSet<String>,
}

impl Forced {
    pub fn from_message(message: &str) -> Forced {
        let mut forced = Forced::default();
        let mut rest = message;
        while let Some(start) = rest.find("[ci rebuild") {
            let after = &rest[start + "[ci rebuild".len()..];
            let Some(end) = after.find(']') else { break };
            let inner = &after[..end];
            // `[ci rebuilding]` is not an override.
            if inner.is_empty() || inner.starts_with(char::is_whitespace) {
                let names: Vec<&str> = inner
                    .split(|c: char| c.is_whitespace() || c == ',')
                    .filter(|s| !s.is_empty())
                    .collect();
                if names.is_empty() {
                    forced.all = true;
                }
                forced.projects.extend(names.into_iter().map(String::from));
            }
            rest = &after[end..];
        }
        forced
    }

    fn reason(&self, project: &str) -> Option<String> {
        if self.all {
            Some("commit message says [ci rebuild]".into())
        } else if self.projects.contains(project) {
            Some(format!("commit message says [ci rebuild {project}]"))
        } else {
            None
        }
    }
}

/// One way of running a project's tests, and the key its success tag is named by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    pub project: String,
    pub kind: TestKind,
    /// Extra arguments: for a job, appended to its command; for a script, its arguments.
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestKind {
    /// A job of the project's `tests` in the manifest.
    Job(String),
    /// A script relative to `projectDir`, run on the instance in a checkout of the commit.
    /// `key` (the CI job's name) names its success tag; without one, a digest does.
    Script { path: String, key: Option<String> },
}

/// How many hex digits of a digest of the arguments go into a tag.
const ARGS_DIGEST_LEN: usize = 12;

impl TestRun {
    /// The tag suffix after `cache-<hash>-`. Different arguments always give different
    /// suffixes, so two shards of one job never share a success tag.
    pub fn key(&self) -> String {
        let digest = |parts: &mut dyn Iterator<Item = &str>| {
            let mut h = Sha256::new();
            for p in parts {
                h.update(p.as_bytes());
                h.update([0]);
            }
            let mut hex = hex::encode(h.finalize());
            hex.truncate(ARGS_DIGEST_LEN);
            hex
        };
        match &self.kind {
            TestKind::Job(job) if self.args.is_empty() => job.clone(),
            TestKind::Job(job) => format!("{job}-{}", digest(&mut self.args.iter().map(String::as_str))),
            TestKind::Script { path, key } => {
                let d = digest(&mut std::iter::once(path.as_str()).chain(self.args.iter().map(String::as_str)));
                match key.as_deref().map(tag_word).filter(|k| !k.is_empty()) {
                    Some(k) => format!("{k}-{d}"),
                    None => format!("script-{d}"),
                }
            }
        }
    }

    /// What the plan and the step names call it: the job, or the CI job, or the script.
    pub fn name(&self) -> String {
        match &self.kind {
            TestKind::Job(job) => job.clone(),
            TestKind::Script { key: Some(k), .. } if !tag_word(k).is_empty() => tag_word(k),
            TestKind::Script { path, .. } => path.clone(),
        }
    }
}

/// `s` made fit for a tag: lowercase `a-z0-9_.-`, other characters as `-`, at most 40.
fn tag_word(s: &str) -> String {
    let w: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c) { c } else { '-' })
        .collect();
    let w = w.trim_matches(|c| c == '-' || c == '.').to_string();
    w.chars().take(40).collect::<String>().trim_end_matches(['-', '.']).to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct TestPlan {
    pub job: String,
    pub tag: String,
    pub needs_run: Option<bool>,
    pub reason: String,
    /// The invocation's extra arguments, when it has some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// For a script run: its path relative to `projectDir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectPlan {
    pub name: String,
    pub hash: String,
    pub tag: String,
    /// How it is built for several architectures (`none`, `host`, `buildx`).
    pub multiarch: Multiarch,
    /// The architecture its image here is for: the build's, for `multiarch: host`; x86_64
    /// for a single-image project in an arm64 build; absent in an x86_64 build otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    pub needs_build: Option<bool>,
    pub reason: String,
    /// Where its image is, when it exists (an untrusted build may take it from the trusted
    /// namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub dependencies: Vec<String>,
    pub tests: Vec<TestPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<explain::Explanation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub commit: String,
    pub projects: Vec<ProjectPlan>,
}

/// The test invocations of project `i` the plan covers: the one asked for, else (when
/// none is) every job of the manifest.
fn test_runs(hashes: &Hashes, i: usize, asked: Option<&TestRun>) -> Vec<TestRun> {
    let p = &hashes.manifest.projects[i];
    match asked {
        Some(run) if run.project == p.name => vec![run.clone()],
        Some(_) => Vec::new(),
        None => p
            .tests
            .keys()
            .map(|job| TestRun {
                project: p.name.clone(),
                kind: TestKind::Job(job.clone()),
                args: Vec::new(),
            })
            .collect(),
    }
}

/// Decides what the selected projects need, from what the namespaces in `read` hold (in
/// order: a trusted build reads only the project repositories; an untrusted one, those and
/// then its own). A tag found in any counts; the first that has a project's image is where
/// it is taken from. With no namespace (offline), nothing is decided. With `asked`, the
/// plan covers that one test invocation instead of the manifest's jobs.
pub async fn decide(
    hashes: &Hashes,
    selection: &[usize],
    forced: &Forced,
    read: &[&dyn ImageStore],
    asked: Option<&TestRun>,
    arch: Arch,
) -> Plan {
    // Every tag we might need, in every namespace, looked up concurrently in one wave.
    let mut lookups: Vec<(usize, String, String)> = Vec::new();
    for &i in selection {
        let p = &hashes.manifest.projects[i];
        let hash = &hashes.hashes[i];
        for ns in 0..read.len() {
            lookups.push((ns, p.name.clone(), image_tag(p.multiarch_kind, hash, arch)));
            for run in test_runs(hashes, i, asked) {
                lookups.push((ns, p.name.clone(), passed_tag(p.multiarch_kind, hash, arch, &run.key())));
            }
        }
    }
    let concurrency = read.first().map(|s| s.concurrency()).unwrap_or(1);
    let found: BTreeMap<(usize, String, String), Result<bool, RegistryError>> = stream::iter(lookups)
        .map(|(ns, project, tag)| async move {
            let r = read[ns].tag_exists(&project, &tag).await;
            ((ns, project, tag), r)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    // Where `tag` of `project` is: the first namespace that has it; else whether every
    // namespace could be asked (the first error otherwise).
    let lookup = |project: &str, tag: &str| -> Result<Option<usize>, &RegistryError> {
        let mut error = None;
        for ns in 0..read.len() {
            match &found[&(ns, project.to_string(), tag.to_string())] {
                Ok(true) => return Ok(Some(ns)),
                Ok(false) => {}
                Err(e) => error = error.or(Some(e)),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    };
    let store = read.last().copied();

    let projects = selection
        .iter()
        .map(|&i| {
            let p = &hashes.manifest.projects[i];
            let hash = hashes.hashes[i].clone();
            let tag = image_tag(p.multiarch_kind, &hash, arch);
            let forced_reason = forced.reason(&p.name);
            let image = |ns: usize, t: &str| read[ns].image_ref(&p.name, t);
            let own = |t: &str| store.map_or_else(|| t.to_string(), |s| s.image_ref(&p.name, t));
            let mut source = None;
            let (needs_build, reason) = match (store, &forced_reason) {
                (None, _) => (None, "offline: registry not asked".to_string()),
                (Some(_), Some(why)) => (Some(true), why.clone()),
                (Some(_), None) => match lookup(&p.name, &tag) {
                    Ok(Some(ns)) => {
                        source = Some(read[ns].image_ref(&p.name, &tag));
                        (Some(false), format!("{} exists", image(ns, &tag)))
                    }
                    Ok(None) => (Some(true), format!("no {} in the registry", own(&tag))),
                    Err(e) => (
                        Some(true),
                        format!("registry could not be asked ({}); assuming not built", error_chain(e)),
                    ),
                },
            };
            let tests = test_runs(hashes, i, asked)
                .into_iter()
                .map(|run| {
                    let ttag = passed_tag(p.multiarch_kind, &hash, arch, &run.key());
                    let (needs_run, reason) = match (store, needs_build) {
                        (None, _) => (None, "offline: registry not asked".to_string()),
                        (Some(_), Some(true)) => (
                            Some(true),
                            match &forced_reason {
                                Some(why) => format!("the image is rebuilt ({why})"),
                                None => "the image is not built at this hash yet".to_string(),
                            },
                        ),
                        _ => match lookup(&p.name, &ttag) {
                            Ok(Some(ns)) => (Some(false), format!("passed: {} exists", image(ns, &ttag))),
                            Ok(None) => (Some(true), format!("no {} in the registry", own(&ttag))),
                            Err(e) => (
                                Some(true),
                                format!("registry could not be asked ({}); assuming not run", error_chain(e)),
                            ),
                        },
                    };
                    TestPlan {
                        job: run.name(),
                        tag: ttag,
                        needs_run,
                        reason,
                        script: match &run.kind {
                            TestKind::Script { path, .. } => Some(path.clone()),
                            TestKind::Job(_) => None,
                        },
                        args: run.args,
                    }
                })
                .collect();
            ProjectPlan {
                name: p.name.clone(),
                hash,
                tag,
                multiarch: p.multiarch_kind,
                arch: match (p.multiarch_kind, arch) {
                    (Multiarch::Host, a) => Some(a),
                    (Multiarch::None, Arch::Arm64) => Some(Arch::X86_64),
                    _ => None,
                },
                needs_build,
                reason,
                image: source,
                dependencies: p.dependencies.clone(),
                tests,
                explain: None,
            }
        })
        .collect();
    Plan {
        commit: hashes.commit.to_string(),
        projects,
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_message_overrides() {
        assert!(Forced::from_message("fix [ci rebuild]").all);
        let f = Forced::from_message("x [ci rebuild a] y [ci rebuild b, c]");
        assert!(!f.all);
        assert_eq!(f.projects, BTreeSet::from(["a".into(), "b".into(), "c".into()]));
        assert_eq!(Forced::from_message("[ci rebuilding]"), Forced::default());
        assert_eq!(Forced::from_message("[ci rebuild"), Forced::default());
    }

    #[test]
    fn tags_per_arch() {
        let h = "ab12";
        assert_eq!(image_tag(Multiarch::Host, h, Arch::Arm64), "cache-ab12-arm64");
        assert_eq!(image_tag(Multiarch::Host, h, Arch::X86_64), "cache-ab12-x86_64");
        assert_eq!(image_tag(Multiarch::None, h, Arch::X86_64), "cache-ab12", "single images keep their tag");
        assert_eq!(image_tag(Multiarch::Buildx, h, Arch::Arm64), "cache-ab12", "a buildx index holds every platform");
        assert_eq!(passed_tag(Multiarch::Host, h, Arch::Arm64, "unit"), "cache-ab12-arm64-unit");
        assert_eq!(passed_tag(Multiarch::None, h, Arch::X86_64, "unit"), "cache-ab12-unit");
        // An arch's image tag is never another project kind's test tag of the same hash.
        assert_ne!(image_tag(Multiarch::Host, h, Arch::Arm64), passed_tag(Multiarch::Host, h, Arch::X86_64, "arm64"));
    }
}
