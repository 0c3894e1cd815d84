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

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::git::{CommitId, GitError, Repo, Snapshot};
use crate::manifest::{Manifest, ManifestError, ParseError, MANIFEST_PATH};
use crate::registry::{build_tag, test_tag, ImageStore};
use matcher::Matcher;

/// Changing this string changes every hash: bump it whenever what the hash covers changes.
pub const HASH_FORMAT: &str = "spotbuild-hash-v1";

/// Length of the hex hash in tags (160 bits).
pub const HASH_HEX_LEN: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("failed to find {MANIFEST_PATH} at the root of commit {commit}")]
    NoManifest { commit: String },
    #[error("unknown project `{name}`")]
    UnknownProject {
        name: String,
        suggestion: Option<String>,
    },
}

impl From<ParseError<GitError>> for PlanError {
    fn from(e: ParseError<GitError>) -> Self {
        match e {
            ParseError::Manifest(m) => PlanError::Manifest(m),
            ParseError::Read(g) => PlanError::Git(g),
        }
    }
}

/// Every project's content hash at one commit.
pub struct Hashes {
    pub commit: CommitId,
    pub manifest: Manifest,
    /// Hex hashes, indexed like `manifest.projects`.
    pub hashes: Vec<String>,
    /// For each project, itself and its transitive dependencies (indices, ascending).
    pub closures: Vec<Vec<usize>>,
}

impl Hashes {
    pub fn hash_of(&self, project: &str) -> Option<&str> {
        self.manifest.position(project).map(|i| self.hashes[i].as_str())
    }
}

/// Reads and validates the manifest at `snap`'s commit.
pub fn load_manifest(snap: &Snapshot<'_>) -> Result<Manifest, PlanError> {
    let text = snap.read_file(MANIFEST_PATH)?.ok_or_else(|| PlanError::NoManifest {
        commit: snap.commit().to_string(),
    })?;
    Ok(Manifest::parse(&text, MANIFEST_PATH, |path| snap.read_file(path))?)
}

/// Computes every project's hash at `commit`: one walk over the tree, matching each path
/// against all projects' patterns at once.
pub fn hash_commit(repo: &Repo, commit: CommitId) -> Result<Hashes, PlanError> {
    let snap = repo.snapshot(commit)?;
    let manifest = load_manifest(&snap)?;
    let n = manifest.projects.len();

    // Dockerfiles always count, even when no pattern covers them.
    let mut dockerfiles = Vec::with_capacity(n);
    for p in &manifest.projects {
        let path = p.dockerfile_path();
        match snap.file_entry(&path)? {
            Some((mode, id)) => dockerfiles.push((mode, id)),
            None => {
                return Err(ManifestError::MissingDockerfile {
                    project: p.name.clone(),
                    path,
                }
                .into())
            }
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
    snap.walk_files(|e| {
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
    let own: Vec<[u8; 32]> = digests.into_iter().map(|d| d.finalize().into()).collect();

    let closures = closures(&manifest);
    let canonical: Vec<String> = manifest.projects.iter().map(|p| p.canonical()).collect();
    let hashes = closures
        .iter()
        .map(|members| {
            // Members in name order, so the hash does not depend on manifest order.
            let mut members: Vec<usize> = members.clone();
            members.sort_by(|&a, &b| manifest.projects[a].name.cmp(&manifest.projects[b].name));
            let mut h = Sha256::new();
            h.update(HASH_FORMAT.as_bytes());
            h.update([0]);
            for m in members {
                let p = &manifest.projects[m];
                h.update(p.name.as_bytes());
                h.update([0]);
                h.update(canonical[m].as_bytes());
                h.update([0]);
                let (mode, id) = &dockerfiles[m];
                h.update(mode.to_be_bytes());
                h.update(id.as_bytes());
                h.update(own[m]);
            }
            let mut hex = hex::encode(h.finalize());
            hex.truncate(HASH_HEX_LEN);
            hex
        })
        .collect();
    Ok(Hashes {
        commit,
        manifest,
        hashes,
        closures,
    })
}

/// Each project with its transitive dependencies, computed in dependency order.
fn closures(manifest: &Manifest) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::with_capacity(manifest.projects.len());
    for (i, p) in manifest.projects.iter().enumerate() {
        let mut set: BTreeSet<usize> = BTreeSet::from([i]);
        for d in &p.dependencies {
            let j = manifest.position(d).expect("dependencies were validated");
            set.extend(out[j].iter().copied());
        }
        out.push(set.into_iter().collect());
    }
    out
}

/// The projects to plan: the named ones and their dependencies, or all, in dependency order.
pub fn select(hashes: &Hashes, names: &[String]) -> Result<Vec<usize>, PlanError> {
    if names.is_empty() {
        return Ok((0..hashes.manifest.projects.len()).collect());
    }
    let mut set = BTreeSet::new();
    for name in names {
        let i = hashes
            .manifest
            .position(name)
            .ok_or_else(|| PlanError::UnknownProject {
                name: name.clone(),
                suggestion: hashes.manifest.suggest(name),
            })?;
        set.extend(hashes.closures[i].iter().copied());
    }
    Ok(set.into_iter().collect())
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

#[derive(Debug, Clone, Serialize)]
pub struct TestPlan {
    pub job: String,
    pub tag: String,
    pub needs_run: Option<bool>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectPlan {
    pub name: String,
    pub hash: String,
    pub tag: String,
    pub needs_build: Option<bool>,
    pub reason: String,
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

/// Decides what the selected projects need. With no store (offline), nothing is decided.
pub async fn decide(
    hashes: &Hashes,
    selection: &[usize],
    forced: &Forced,
    store: Option<&dyn ImageStore>,
) -> Plan {
    // Every tag we might need, looked up concurrently in one wave.
    let mut lookups: Vec<(String, String)> = Vec::new();
    for &i in selection {
        let p = &hashes.manifest.projects[i];
        let hash = &hashes.hashes[i];
        lookups.push((p.name.clone(), build_tag(hash)));
        for job in p.tests.keys() {
            lookups.push((p.name.clone(), test_tag(hash, job)));
        }
    }
    let found: BTreeMap<(String, String), Result<bool, String>> = match store {
        None => BTreeMap::new(),
        Some(store) => {
            stream::iter(lookups)
                .map(|(project, tag)| async move {
                    let r = store.tag_exists(&project, &tag).await.map_err(|e| error_chain(&e));
                    ((project, tag), r)
                })
                .buffer_unordered(store.concurrency())
                .collect()
                .await
        }
    };

    let projects = selection
        .iter()
        .map(|&i| {
            let p = &hashes.manifest.projects[i];
            let hash = hashes.hashes[i].clone();
            let tag = build_tag(&hash);
            let forced_reason = forced.reason(&p.name);
            let image = |t: &str| store.map_or_else(|| t.to_string(), |s| s.image_ref(&p.name, t));
            let (needs_build, reason) = match (store, &forced_reason) {
                (None, _) => (None, "offline: registry not asked".to_string()),
                (Some(_), Some(why)) => (Some(true), why.clone()),
                (Some(_), None) => match &found[&(p.name.clone(), tag.clone())] {
                    Ok(true) => (Some(false), format!("{} exists", image(&tag))),
                    Ok(false) => (Some(true), format!("no {} in the registry", image(&tag))),
                    Err(e) => (
                        Some(true),
                        format!("registry could not be asked ({e}); assuming not built"),
                    ),
                },
            };
            let tests = p
                .tests
                .keys()
                .map(|job| {
                    let ttag = test_tag(&hash, job);
                    let (needs_run, reason) = match (store, needs_build) {
                        (None, _) => (None, "offline: registry not asked".to_string()),
                        (Some(_), Some(true)) => (
                            Some(true),
                            match &forced_reason {
                                Some(why) => format!("the image is rebuilt ({why})"),
                                None => "the image is not built at this hash yet".to_string(),
                            },
                        ),
                        _ => match &found[&(p.name.clone(), ttag.clone())] {
                            Ok(true) => (Some(false), format!("passed: {} exists", image(&ttag))),
                            Ok(false) => (Some(true), format!("no {} in the registry", image(&ttag))),
                            Err(e) => (
                                Some(true),
                                format!("registry could not be asked ({e}); assuming not run"),
                            ),
                        },
                    };
                    TestPlan {
                        job: job.clone(),
                        tag: ttag,
                        needs_run,
                        reason,
                    }
                })
                .collect();
            ProjectPlan {
                name: p.name.clone(),
                hash,
                tag,
                needs_build,
                reason,
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

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
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
}
