//! The repository as the planner sees it: commits, trees and the few blobs it must read.
//!
//! Everything here reads *trees*, never file contents, except for the handful of files the
//! manifest names (the manifest itself and rebuild-pattern files). That is what lets the
//! planner run on `--depth 1` and `--filter=blob:none` clones with no network.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use git2::{ObjectType, Oid, Repository, Tree, TreeEntry};

/// A commit id, as the planner and its callers pass it around.
pub type CommitId = Oid;

/// Mode bits git records for a tree entry (e.g. `0o100644`, `0o100755`, `0o160000`).
pub type FileMode = u32;

/// The git mode of a submodule (gitlink) entry.
pub const MODE_GITLINK: FileMode = 0o160000;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("failed to open a git repository at or above {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("failed to resolve revision `{rev}` to a commit")]
    Revision {
        rev: String,
        #[source]
        source: git2::Error,
    },
    #[error("failed to read {what}")]
    Read {
        what: String,
        #[source]
        source: git2::Error,
    },
    #[error("failed to read `{path}` at commit {commit}: its contents are not in this clone")]
    MissingBlob { path: String, commit: String },
}

/// One non-tree entry of a commit's tree, as handed to a [`Repo::walk_files`] visitor.
pub struct FileEntry<'a> {
    /// Repo-relative path, as raw bytes (git paths need not be UTF-8).
    pub path: &'a [u8],
    pub mode: FileMode,
    /// Blob id, or the submodule commit id for a gitlink.
    pub id: &'a [u8],
}

/// How one path differs between two trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `A` added, `D` deleted, `M` contents changed, `T` mode/type changed.
    pub status: char,
    pub path: Vec<u8>,
}

pub struct Repo {
    inner: Repository,
}

/// Process-wide libgit2 settings, applied once before the first repository is opened.
fn configure_libgit2() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // libgit2 refuses repositories that use extensions it does not know. A partial clone
        // (`--filter=blob:none`) records `extensions.partialclone`; we only read objects that
        // are present locally, so it is safe to accept it.
        // SAFETY: called once, before any repository is opened by this process.
        let _ = unsafe { git2::opts::set_extensions(&["partialclone"]) };
        // A plan reads each tree object exactly once. Re-hashing every object on read (SHA-1
        // with collision detection) and caching objects that are never read again were half
        // of the planner's time; git itself does neither when reading.
        git2::opts::strict_hash_verification(false);
        git2::opts::enable_caching(false);
    });
}

impl Repo {
    /// Opens the repository containing `path` (searching upwards, like `git` does).
    pub fn discover(path: &Path) -> Result<Repo, GitError> {
        configure_libgit2();
        let inner = Repository::discover(path).map_err(|source| GitError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Repo { inner })
    }

    /// A commit of the working tree as it is now: tracked files as they are on disk (deleted
    /// ones gone) and untracked files that are not ignored, on top of HEAD. Nothing points
    /// at it (no branch, no reflog, the real index untouched); its blobs join the object
    /// database, as `git stash create` does. Plans and bundles take it like any commit.
    pub fn worktree_commit(&self) -> Result<CommitId, GitError> {
        let read = |what: &str| {
            let what = what.to_string();
            move |source| GitError::Read { what: what.clone(), source }
        };
        // A handle of its own, so the index swapped in below is nobody else's.
        let repo = Repository::open(self.inner.path()).map_err(read("the repository"))?;
        let scratch = tempfile::NamedTempFile::new().map_err(|e| GitError::Read {
            what: "a scratch index".into(),
            source: git2::Error::from_str(&e.to_string()),
        })?;
        let real = self.inner.path().join("index");
        if real.is_file() {
            std::fs::copy(&real, scratch.path()).map_err(|e| GitError::Read {
                what: "the index".into(),
                source: git2::Error::from_str(&e.to_string()),
            })?;
        } else {
            // No index yet: an empty one.
            let _ = std::fs::remove_file(scratch.path());
        }
        let mut index = git2::Index::open(scratch.path()).map_err(read("the scratch index"))?;
        repo.set_index(&mut index).map_err(read("the scratch index"))?;
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).map_err(read("the working tree"))?;
        index.update_all(["*"], None).map_err(read("the working tree"))?;
        let tree_id = index.write_tree_to(&repo).map_err(read("the working tree"))?;
        let tree = repo.find_tree(tree_id).map_err(read("the working tree"))?;
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let sig = git2::Signature::now("spotbuild watch", "spotbuild@localhost").map_err(read("a signature"))?;
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        repo.commit(None, &sig, &sig, "spotbuild watch: the working tree", &tree, &parents).map_err(read("the working tree's commit"))
    }

    /// Whether a path (relative to the working tree) is ignored by the repository's rules.
    pub fn is_ignored(&self, path: &Path) -> bool {
        self.inner.is_path_ignored(path).unwrap_or(false)
    }

    /// The `.git` directory (or the repository itself, when bare).
    pub fn git_dir(&self) -> &Path {
        self.inner.path()
    }

    /// The working tree root, if the repository has one.
    pub fn workdir(&self) -> Option<&Path> {
        self.inner.workdir()
    }

    /// The checked-out branch's short name; `None` on a detached HEAD or an unborn branch.
    pub fn current_branch(&self) -> Option<String> {
        let head = self.inner.head().ok()?;
        if !head.is_branch() {
            return None;
        }
        head.shorthand().map(String::from)
    }

    /// Resolves any revision expression (`HEAD`, a branch, a short sha, `HEAD~3`) to a commit.
    pub fn resolve_commit(&self, rev: &str) -> Result<CommitId, GitError> {
        let obj = self
            .inner
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map_err(|source| GitError::Revision {
                rev: rev.to_string(),
                source,
            })?;
        Ok(obj.id())
    }

    /// The names of the tags (lightweight or annotated) that point at `commit`, sorted.
    pub fn tags_at(&self, commit: CommitId) -> Result<Vec<String>, GitError> {
        let read = |source| GitError::Read {
            what: "the repository's tags".into(),
            source,
        };
        let mut tags = Vec::new();
        for r in self.inner.references_glob("refs/tags/*").map_err(read)? {
            let r = r.map_err(read)?;
            let points_here = r.peel_to_commit().map(|c| c.id() == commit).unwrap_or(false);
            if let (true, Some(name)) = (points_here, r.shorthand()) {
                tags.push(name.to_string());
            }
        }
        tags.sort();
        Ok(tags)
    }

    pub fn commit_message(&self, commit: CommitId) -> Result<String, GitError> {
        let c = self.find_commit(commit)?;
        Ok(String::from_utf8_lossy(c.message_bytes()).into_owned())
    }

    fn find_commit(&self, commit: CommitId) -> Result<git2::Commit<'_>, GitError> {
        self.inner.find_commit(commit).map_err(|source| GitError::Read {
            what: format!("commit {commit}"),
            source,
        })
    }

    pub fn tree(&self, commit: CommitId) -> Result<Tree<'_>, GitError> {
        self.find_commit(commit)?
            .tree()
            .map_err(|source| GitError::Read {
                what: format!("the tree of commit {commit}"),
                source,
            })
    }

    /// The tree of `commit`, ready to be read.
    pub fn snapshot(&self, commit: CommitId) -> Result<Snapshot<'_>, GitError> {
        Ok(Snapshot {
            repo: self,
            commit,
            tree: self.tree(commit)?,
            dirs: RefCell::new(HashMap::new()),
        })
    }

    /// Up to `limit` ancestors of `commit` (not including it), newest first.
    /// A shallow clone simply has fewer.
    pub fn ancestors(&self, commit: CommitId, limit: usize) -> Result<Vec<CommitId>, GitError> {
        let mut walk = self.inner.revwalk().map_err(|source| GitError::Read {
            what: "history".into(),
            source,
        })?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::TIME)
            .and_then(|_| walk.push(commit))
            .map_err(|source| GitError::Read {
                what: format!("the history of {commit}"),
                source,
            })?;
        let mut out = Vec::new();
        for id in walk.skip(1) {
            // A shallow boundary or a missing parent ends the available history.
            let Ok(id) = id else { break };
            out.push(id);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The first parent of `commit`, if the clone has it.
    pub fn first_parent(&self, commit: CommitId) -> Result<Option<CommitId>, GitError> {
        let c = self.find_commit(commit)?;
        Ok(c.parent_ids().next())
    }

    /// The paths whose entries differ between two commits' trees. Compares tree entries only
    /// (ids and modes), so no file contents are read.
    pub fn changed_paths(&self, old: CommitId, new: CommitId) -> Result<Vec<Change>, GitError> {
        let (old_tree, new_tree) = (self.tree(old)?, self.tree(new)?);
        let mut opts = git2::DiffOptions::new();
        opts.ignore_submodules(false).include_typechange(true);
        let diff = self
            .inner
            .diff_tree_to_tree(Some(&old_tree), Some(&new_tree), Some(&mut opts))
            .map_err(|source| GitError::Read {
                what: format!("the difference between {old} and {new}"),
                source,
            })?;
        let mut out = Vec::new();
        for delta in diff.deltas() {
            let status = match delta.status() {
                git2::Delta::Added => 'A',
                git2::Delta::Deleted => 'D',
                git2::Delta::Typechange => 'T',
                _ if delta.old_file().mode() != delta.new_file().mode()
                    && delta.old_file().id() == delta.new_file().id() =>
                {
                    'T'
                }
                _ => 'M',
            };
            let file = if status == 'D' { delta.old_file() } else { delta.new_file() };
            if let Some(p) = file.path_bytes() {
                out.push(Change {
                    status,
                    path: p.to_vec(),
                });
            }
        }
        Ok(out)
    }
}

/// One commit's tree, read through the repository it came from.
pub struct Snapshot<'r> {
    repo: &'r Repo,
    commit: CommitId,
    tree: Tree<'r>,
    /// Folders already looked up by path (`a/b`), so that looking up many paths (a
    /// Dockerfile per project) inflates each tree once: libgit2's object cache is off.
    dirs: RefCell<HashMap<String, Option<Tree<'r>>>>,
}

impl<'r> Snapshot<'r> {
    pub fn commit(&self) -> CommitId {
        self.commit
    }

    /// Reads the blob at `path` in `commit`'s tree. `Ok(None)` when no file is there.
    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        let commit = self.commit;
        let Some((_, id)) = self.file_entry(path)? else {
            return Ok(None);
        };
        match self.repo.inner.find_blob(id) {
            Ok(blob) => Ok(Some(blob.content().to_vec())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Err(GitError::MissingBlob {
                path: path.to_string(),
                commit: commit.to_string(),
            }),
            Err(source) => Err(GitError::Read {
                what: format!("`{path}` at commit {commit}"),
                source,
            }),
        }
    }

    /// The mode and id of the file (blob or symlink) at `path`, if there is one. Reads
    /// trees only, each folder at most once per snapshot.
    pub fn file_entry(&self, path: &str) -> Result<Option<(FileMode, Oid)>, GitError> {
        let path = path.trim_matches('/');
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", path),
        };
        let Some(tree) = self.dir(dir)? else { return Ok(None) };
        Ok(tree
            .get_name(name)
            .filter(|e| e.kind() == Some(ObjectType::Blob))
            .map(|e| (e.filemode() as FileMode, e.id())))
    }

    /// The tree of folder `dir` (`""` is the root), or `None` when there is no such folder.
    fn dir(&self, dir: &str) -> Result<Option<Tree<'r>>, GitError> {
        if dir.is_empty() {
            return Ok(Some(self.tree.clone()));
        }
        if let Some(t) = self.dirs.borrow().get(dir) {
            return Ok(t.clone());
        }
        let (parent, name) = match dir.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => ("", dir),
        };
        let found = match self.dir(parent)? {
            None => None,
            Some(parent) => match parent.get_name(name) {
                Some(e) if e.kind() == Some(ObjectType::Tree) => Some(self.subtree(&e, dir.as_bytes())?),
                _ => None,
            },
        };
        self.dirs.borrow_mut().insert(dir.to_string(), found.clone());
        Ok(found)
    }

    /// Visits every non-tree entry of `commit`'s tree (files, symlinks, submodules) in git
    /// tree order, which is a deterministic function of the set of paths. Submodules are not
    /// entered: they contribute their gitlink id. The folders in `keep` (`a/b`, each with
    /// whether a kept folder lies below it) are kept for later lookups
    /// ([`Snapshot::file_entry`]), which then inflate nothing again.
    pub fn walk_files(&self, keep: &HashMap<String, bool>, mut visit: impl FnMut(FileEntry<'_>)) -> Result<(), GitError> {
        let mut path = Vec::with_capacity(256);
        self.walk_tree(&self.tree, &mut path, keep, !keep.is_empty(), &mut visit)
    }

    /// `look` says whether a subfolder of this tree may be in `keep`.
    fn walk_tree(
        &self,
        tree: &Tree<'r>,
        path: &mut Vec<u8>,
        keep: &HashMap<String, bool>,
        look: bool,
        visit: &mut impl FnMut(FileEntry<'_>),
    ) -> Result<(), GitError> {
        for entry in tree.iter() {
            let base = path.len();
            path.extend_from_slice(entry.name_bytes());
            if entry.kind() == Some(ObjectType::Tree) {
                let sub = self.subtree(&entry, path)?;
                let mut below = false;
                if look {
                    if let Some((dir, &deeper)) = std::str::from_utf8(path).ok().and_then(|d| keep.get_key_value(d)) {
                        self.dirs.borrow_mut().insert(dir.clone(), Some(sub.clone()));
                        below = deeper;
                    }
                }
                path.push(b'/');
                self.walk_tree(&sub, path, keep, below, visit)?;
            } else {
                visit(FileEntry {
                    path,
                    mode: entry.filemode() as FileMode,
                    id: entry.id().as_bytes(),
                });
            }
            path.truncate(base);
        }
        Ok(())
    }

    fn subtree(&self, entry: &TreeEntry<'_>, path: &[u8]) -> Result<Tree<'r>, GitError> {
        self.repo
            .inner
            .find_tree(entry.id())
            .map_err(|source| GitError::Read {
                what: format!("tree `{}`", display_path(path)),
                source,
            })
    }
}

/// Renders path bytes for people and JSON: valid UTF-8 stays as it is, except that control
/// characters and invalid bytes are escaped (`\n`, `\t`, `\xNN`), so that every path prints on
/// one line and two different paths never print the same.
pub fn display_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::display_path;

    #[test]
    fn display_path_escapes_what_would_break_a_line_or_be_ambiguous() {
        assert_eq!(display_path(b"a b/c.txt"), "a b/c.txt");
        assert_eq!(display_path(b"new\nline"), "new\\nline");
        assert_eq!(display_path(b"bad\xffbyte"), "bad\\xffbyte");
        assert_eq!(display_path(b"back\\slash"), "back\\\\slash");
        assert_eq!(display_path("caf\u{e9}".as_bytes()), "caf\u{e9}");
    }
}

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("failed to run git")]
    Spawn(#[source] std::io::Error),
    #[error("failed to {what}: {stderr}")]
    Git { what: String, stderr: String },
}

/// Writes a git bundle of `commit` to `out`, leaving out what `have` (a commit the receiving
/// side already holds, e.g. a baked mirror's) covers when this repository knows `have`.
/// Returns whether the bundle is thin (relies on `have`). Uses the git CLI: libgit2 has no
/// bundle support.
pub fn create_bundle(git_dir: &Path, commit: &str, have: Option<&str>, out: &Path) -> Result<bool, BundleError> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("--git-dir")
            .arg(git_dir)
            .args(args)
            .output()
            .map_err(BundleError::Spawn)
    };
    let failed = |what: String, o: &std::process::Output| BundleError::Git {
        what,
        stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
    };
    let known = |c: &str| git(&["cat-file", "-e", &format!("{c}^{{commit}}")]).is_ok_and(|o| o.status.success());
    let thin = have.filter(|h| *h != commit && known(h));
    // A bundle carries refs, so the commit gets one of its own for the moment.
    let name = format!("refs/spotbuild/ship/{commit}");
    let o = git(&["update-ref", &name, commit])?;
    if !o.status.success() {
        return Err(failed(format!("name commit {commit}"), &o));
    }
    let mut args = vec!["bundle", "create", "-q"];
    let out_str = out.to_string_lossy().to_string();
    args.push(&out_str);
    args.push(&name);
    let exclude = thin.map(|h| format!("^{h}"));
    if let Some(e) = &exclude {
        args.push(e);
    }
    let o = git(&args);
    let _ = git(&["update-ref", "-d", &name]);
    let o = o?;
    if !o.status.success() && thin.is_some() {
        // e.g. the mirror is ahead of the commit: nothing would be left to ship.
        return create_bundle(git_dir, commit, None, out);
    }
    if !o.status.success() {
        return Err(failed(format!("bundle {commit}"), &o));
    }
    Ok(thin.is_some())
}
