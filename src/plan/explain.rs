//! `plan --explain`: which changed paths put a project in the build set.
//!
//! History is used here only to *explain* a decision, never to make it. The base is `--since`
//! when given; otherwise the newest of the last [`SEARCH_LIMIT`] ancestors at which the
//! project's hash was built (its `cache-<hash>` tag exists); offline, the first parent.

use std::collections::{BTreeMap, HashMap};

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::matcher::Matcher;
use super::{hash_commit, Hashes, PlanError};
use crate::git::{display_path, Change, CommitId, Repo};
use crate::manifest::Manifest;
use crate::registry::{build_tag, ImageStore};

/// How many ancestors are searched for a built hash.
pub const SEARCH_LIMIT: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct PathChange {
    /// `A` added, `D` deleted, `M` modified, `T` mode or type changed.
    pub status: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The commit compared against, if one was found.
    pub base: Option<String>,
    /// How the base was chosen, or why there is none.
    pub base_reason: String,
    pub changes: Vec<PathChange>,
    /// Changes to the manifest entries of the project or its dependencies.
    pub manifest_changes: Vec<String>,
}

/// Explains each project in `which` (indices into `current.manifest.projects`).
pub async fn explain(
    repo: &Repo,
    current: &Hashes,
    which: &[usize],
    since: Option<CommitId>,
    store: Option<&dyn ImageStore>,
) -> Result<BTreeMap<usize, Explanation>, PlanError> {
    let mut bases: BTreeMap<usize, (Option<CommitId>, String)> = BTreeMap::new();
    // Each base's snapshot is hashed and diffed once, however many projects share it; the
    // ancestor search hands over the hashes it already computed.
    let mut at_base: HashMap<CommitId, Option<Hashes>> = HashMap::new();
    match (since, store) {
        (Some(since), _) => {
            for &i in which {
                bases.insert(i, (Some(since), format!("compared with --since {since}")));
            }
        }
        (None, None) => {
            let parent = repo.first_parent(current.commit)?;
            let reason = match parent {
                Some(p) => format!("offline: compared with the first parent {p}"),
                None => "offline, and the commit has no parent in this clone".to_string(),
            };
            for &i in which {
                bases.insert(i, (parent, reason.clone()));
            }
        }
        (None, Some(store)) => {
            let (found, hashed) = search_built_ancestors(repo, current, which, store).await?;
            bases = found;
            at_base.extend(hashed.into_iter().map(|(c, h)| (c, Some(h))));
        }
    }

    let mut diffs: HashMap<CommitId, Vec<Change>> = HashMap::new();
    let mut out = BTreeMap::new();
    for (i, (base, base_reason)) in bases {
        let Some(base) = base else {
            out.insert(
                i,
                Explanation {
                    base: None,
                    base_reason,
                    changes: Vec::new(),
                    manifest_changes: Vec::new(),
                },
            );
            continue;
        };
        let old = at_base
            .entry(base)
            .or_insert_with(|| hash_commit(repo, base, current.options).ok())
            .as_ref();
        if let std::collections::hash_map::Entry::Vacant(slot) = diffs.entry(base) {
            slot.insert(repo.changed_paths(base, current.commit)?);
        }
        let name = &current.manifest.projects[i].name;
        let closure = current.closure(i);
        let mut patterns: Vec<_> = closure
            .iter()
            .flat_map(|&m| current.manifest.projects[m].patterns.iter())
            .collect();
        if let Some(old) = old {
            if let Some(j) = old.manifest.position(name) {
                patterns.extend(old.closure(j).into_iter().flat_map(|m| old.manifest.projects[m].patterns.iter()));
            }
        }
        let matcher = Matcher::new(patterns.into_iter().map(|p| (0, p)));
        let changes = diffs[&base]
            .iter()
            .filter(|c| matcher.is_match(&c.path))
            .map(|c| PathChange {
                status: c.status.to_string(),
                path: display_path(&c.path),
            })
            .collect();
        let manifest_changes = match old {
            Some(old) => manifest_changes(&current.manifest, &closure, &old.manifest, name),
            None => vec!["the manifest could not be read at the base commit".to_string()],
        };
        out.insert(
            i,
            Explanation {
                base: Some(base.to_string()),
                base_reason,
                changes,
                manifest_changes,
            },
        );
    }
    Ok(out)
}

/// The base chosen for each project, and the hashes of the ancestors chosen as bases.
type Search = (BTreeMap<usize, (Option<CommitId>, String)>, HashMap<CommitId, Hashes>);

/// Walks back through history until each project's hash at some ancestor is found built.
async fn search_built_ancestors(repo: &Repo, current: &Hashes, which: &[usize], store: &dyn ImageStore) -> Result<Search, PlanError> {
    let mut pending: Vec<usize> = which.to_vec();
    let mut found = BTreeMap::new();
    let mut bases = HashMap::new();
    let ancestors = repo.ancestors(current.commit, SEARCH_LIMIT)?;
    for (depth, &anc) in ancestors.iter().enumerate() {
        if pending.is_empty() {
            break;
        }
        // An ancestor with a broken or missing manifest cannot have been built by us.
        let Ok(old) = hash_commit(repo, anc, current.options) else { continue };
        let checks: Vec<(usize, String, String)> = pending
            .iter()
            .filter_map(|&i| {
                let name = &current.manifest.projects[i].name;
                old.hash_of(name).map(|h| (i, name.clone(), build_tag(h)))
            })
            .collect();
        let built: Vec<usize> = stream::iter(checks)
            .map(|(i, name, tag)| async move {
                matches!(store.tag_exists(&name, &tag).await, Ok(true)).then_some(i)
            })
            .buffer_unordered(store.concurrency())
            .filter_map(|x| async move { x })
            .collect()
            .await;
        for i in built {
            let back = depth + 1;
            found.insert(
                i,
                (
                    Some(anc),
                    format!("last built at {anc}, {back} commit{} back", if back == 1 { "" } else { "s" }),
                ),
            );
            pending.retain(|&p| p != i);
        }
        if found.values().any(|(b, _)| *b == Some(anc)) {
            bases.insert(anc, old);
        }
    }
    let searched = ancestors.len();
    for i in pending {
        found.insert(
            i,
            (
                None,
                format!(
                    "never built in the {searched} ancestor{} searched (limit {SEARCH_LIMIT}); every input is new",
                    if searched == 1 { "" } else { "s" }
                ),
            ),
        );
    }
    Ok((found, bases))
}

fn manifest_changes(now: &Manifest, closure: &[usize], then: &Manifest, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for &m in closure {
        let p = &now.projects[m];
        match then.get(&p.name) {
            None if p.name == name => out.push(format!("`{}` is new in the manifest", p.name)),
            None => out.push(format!("dependency `{}` is new in the manifest", p.name)),
            Some(old) if old.canonical() != p.canonical() => {
                out.push(format!("the manifest entry of `{}` changed", p.name))
            }
            Some(_) => {}
        }
    }
    if let Some(old) = then.get(name) {
        for d in &old.dependencies {
            if !now.get(name).is_some_and(|p| p.dependencies.contains(d)) {
                out.push(format!("`{d}` is no longer a dependency"));
            }
        }
    }
    out
}
