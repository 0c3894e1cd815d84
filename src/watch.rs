//! What `spotbuild watch` decides, as pure functions: the tag a working-tree build gets,
//! which file events matter, and which projects a new working-tree hash rebuilds.
//!
//! # Guarantees
//! - A working-tree build is never tagged `cache-<hash>`: its tag is `dev-<hash'>`, where
//!   `hash'` is derived from the content hash with a marker, so it differs from every
//!   commit's hash (a clean tree included) and the registry's `cache-*` tags stay the
//!   record of commits.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The hash a working-tree build of content `hash` is tagged by.
pub fn dev_hash(hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"spotbuild-working-tree\0");
    h.update(hash.as_bytes());
    let mut hex = hex::encode(h.finalize());
    hex.truncate(crate::plan::HASH_HEX_LEN);
    hex
}

/// `dev-<dev hash>`.
pub fn dev_tag(hash: &str) -> String {
    format!("dev-{}", dev_hash(hash))
}

/// Whether a changed path (relative to the working tree) may change a hash: not git's own
/// files, not ignored ones. (A path no pattern matches still changes no hash; the new plan
/// says so without a build.)
pub fn relevant(path: &Path, ignored: impl Fn(&Path) -> bool) -> bool {
    !path.as_os_str().is_empty() && !path.starts_with(".git") && !ignored(path)
}

/// Turns a plan of a working-tree commit into a working-tree build's: every project under
/// its `dev-<hash>` tag, built when the registry lacks that tag, and no tests (a pass
/// tag is a commit's record).
pub async fn as_dev_plan(plan: &mut crate::plan::Plan, store: &dyn crate::registry::ImageStore) {
    for p in &mut plan.projects {
        p.tag = dev_tag(&p.hash);
        let there = store.tag_exists(&p.name, &p.tag).await.unwrap_or(false);
        p.needs_build = Some(!there);
        p.reason = if there { format!("{} exists", p.tag) } else { format!("no {} in the registry", p.tag) };
        p.image = None;
        p.tests.clear();
    }
}

/// The branch whose cache tag working-tree builds move: this user's, never a real branch.
pub fn dev_branch() -> String {
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "local".into());
    format!("dev-{user}")
}

/// The projects whose hash differs from the one last built, successfully or not (all, the
/// first time).
pub fn changed(hashes: &BTreeMap<String, String>, built: &BTreeMap<String, String>) -> Vec<String> {
    hashes.iter().filter(|(p, h)| built.get(*p) != Some(*h)).map(|(p, _)| p.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_tree_tag_is_never_a_commits() {
        let h = "0123456789abcdef0123456789abcdef01234567";
        assert_ne!(dev_hash(h), h);
        assert!(dev_tag(h).starts_with("dev-") && dev_tag(h).len() == 4 + crate::plan::HASH_HEX_LEN);
        assert_eq!(dev_tag(h), dev_tag(h), "the same tree, the same tag");
    }

    #[test]
    fn only_changed_hashes_rebuild_and_gits_and_ignored_files_do_not_count() {
        let now: BTreeMap<String, String> = [("a", "1"), ("b", "2")].map(|(p, h)| (p.to_string(), h.to_string())).into();
        assert_eq!(changed(&now, &BTreeMap::new()), ["a", "b"]);
        let built: BTreeMap<String, String> = [("a", "1"), ("b", "0")].map(|(p, h)| (p.to_string(), h.to_string())).into();
        assert_eq!(changed(&now, &built), ["b"]);
        assert!(!relevant(Path::new(".git/index"), |_| false));
        assert!(!relevant(Path::new("target/x"), |p| p.starts_with("target")));
        assert!(relevant(Path::new("api/src/main.rs"), |_| false));
    }
}
