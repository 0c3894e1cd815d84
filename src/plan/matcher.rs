//! Matching one path against every project's rebuild patterns in a single pass.
//!
//! Most real patterns are `^some/dir/`: those go into a byte trie, so a path costs one walk
//! down its own bytes whatever the number of projects. Everything else goes into one
//! `RegexSet`, which searches all remaining patterns together.

use regex::bytes::RegexSet;

use crate::manifest::Pattern;

#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    owners: Vec<u32>,
}

pub struct Matcher {
    trie: Vec<Node>,
    regexes: Option<RegexSet>,
    regex_owners: Vec<u32>,
}

impl Matcher {
    /// Builds a matcher from `(owner, pattern)` pairs. Owners are caller-defined indices.
    pub fn new<'a>(patterns: impl IntoIterator<Item = (u32, &'a Pattern)>) -> Matcher {
        let mut trie = vec![Node::default()];
        let mut regex_texts = Vec::new();
        let mut regex_owners = Vec::new();
        for (owner, pattern) in patterns {
            match pattern.literal_prefix() {
                Some(prefix) => {
                    let mut node = 0usize;
                    for &b in prefix {
                        node = match trie[node].children.iter().find(|(c, _)| *c == b) {
                            Some(&(_, next)) => next as usize,
                            None => {
                                let next = trie.len();
                                trie.push(Node::default());
                                trie[node].children.push((b, next as u32));
                                next
                            }
                        };
                    }
                    if !trie[node].owners.contains(&owner) {
                        trie[node].owners.push(owner);
                    }
                }
                None => {
                    regex_texts.push(pattern.as_str().to_string());
                    regex_owners.push(owner);
                }
            }
        }
        let regexes = (!regex_texts.is_empty()).then(|| {
            RegexSet::new(&regex_texts).expect("patterns were validated when the manifest was read")
        });
        Matcher {
            trie,
            regexes,
            regex_owners,
        }
    }

    /// Calls `found` with the owner of every pattern that matches `path`. An owner may be
    /// reported more than once when several of its patterns match.
    pub fn for_each_match(&self, path: &[u8], mut found: impl FnMut(u32)) {
        let mut node = &self.trie[0];
        node.owners.iter().for_each(|&o| found(o));
        for &b in path {
            match node.children.iter().find(|(c, _)| *c == b) {
                Some(&(_, next)) => {
                    node = &self.trie[next as usize];
                    node.owners.iter().for_each(|&o| found(o));
                }
                None => break,
            }
        }
        if let Some(set) = &self.regexes {
            for i in set.matches(path).iter() {
                found(self.regex_owners[i]);
            }
        }
    }

    pub fn is_match(&self, path: &[u8]) -> bool {
        let mut any = false;
        self.for_each_match(path, |_| any = true);
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(m: &Matcher, path: &str) -> Vec<u32> {
        let mut v = Vec::new();
        m.for_each_match(path.as_bytes(), |o| v.push(o));
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn literal_prefixes_and_regexes_agree_with_plain_regex_search() {
        let pats: Vec<(u32, Pattern)> = [
            (0, "^a/"),
            (1, "^a/b/"),
            (2, r"\.md$"),
            (3, "^ab"),
            (4, "^"),
            (5, "^c/(x|y)/"),
        ]
        .into_iter()
        .map(|(o, p)| (o, Pattern::new(p).unwrap()))
        .collect();
        let m = Matcher::new(pats.iter().map(|(o, p)| (*o, p)));
        for path in ["a/x", "a/b/c.md", "ab", "abc/d", "c/x/1", "c/z/1", "zz", "a"] {
            let expected: Vec<u32> = pats
                .iter()
                .filter(|(_, p)| regex::bytes::Regex::new(p.as_str()).unwrap().is_match(path.as_bytes()))
                .map(|(o, _)| *o)
                .collect();
            assert_eq!(owners(&m, path), expected, "{path}");
        }
    }
}
