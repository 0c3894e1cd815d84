//! Spreading one build over several instances (`--max-instances N`): projects that share
//! no dependency edge can build on different machines. The unit is a connected part of
//! the dependency graph, so no image is ever needed on a machine that did not build it
//! or pull it from the registry; parts are packed into at most N groups, largest first.

use std::collections::{BTreeMap, BTreeSet};

/// One project as the spreader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub dependencies: Vec<String>,
    /// Whether it has anything to build or test.
    pub work: bool,
}

/// Groups of project names, each for one instance, in a stable order. Parts with no work
/// are left out; with `max <= 1` everything with work is one group.
pub fn groups(nodes: &[Node], max: usize) -> Vec<Vec<String>> {
    let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    // Union-find over dependency edges among the planned projects.
    let mut parent: BTreeMap<&str, &str> = names.iter().map(|n| (*n, *n)).collect();
    fn root<'a>(parent: &mut BTreeMap<&'a str, &'a str>, mut x: &'a str) -> &'a str {
        while parent[x] != x {
            let up = parent[parent[x]];
            parent.insert(x, up);
            x = up;
        }
        x
    }
    for n in nodes {
        for d in &n.dependencies {
            if names.contains(d.as_str()) {
                let (a, b) = (root(&mut parent, &n.name), root(&mut parent, d));
                if a != b {
                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                    parent.insert(hi, lo);
                }
            }
        }
    }
    let mut parts: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in nodes {
        let r = root(&mut parent, &n.name);
        parts.entry(r).or_default().push(n);
    }
    let mut parts: Vec<Vec<&Node>> = parts.into_values().filter(|p| p.iter().any(|n| n.work)).collect();
    // Largest first (by projects with work), ties by name: each goes to the lightest group.
    parts.sort_by_key(|p| (std::cmp::Reverse(p.iter().filter(|n| n.work).count()), p[0].name.clone()));
    let slots = max.max(1).min(parts.len().max(1));
    let mut out: Vec<(usize, Vec<String>)> = vec![(0, Vec::new()); slots];
    for part in parts {
        // `slots` is at least 1, so there always is a lightest group.
        if let Some(lightest) = out.iter_mut().min_by_key(|(load, _)| *load) {
            lightest.0 += part.iter().filter(|n| n.work).count();
            lightest.1.extend(part.iter().map(|n| n.name.clone()));
        }
    }
    // Keep the plan's (dependency) order inside each group.
    let order: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
    let mut out: Vec<Vec<String>> = out.into_iter().map(|(_, g)| g).filter(|g| !g.is_empty()).collect();
    for g in &mut out {
        g.sort_by_key(|n| order[n.as_str()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, deps: &[&str], work: bool) -> Node {
        Node {
            name: name.into(),
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            work,
        }
    }

    #[test]
    fn connected_parts_stay_together_and_spread_over_the_slots() {
        let nodes = vec![
            node("base", &[], true),
            node("api", &["base"], true),
            node("web", &["base"], true),
            node("lint", &[], true),
            node("docs", &[], true),
            node("idle", &[], false),
        ];
        assert_eq!(groups(&nodes, 1), vec![vec!["base", "api", "web", "lint", "docs"]]);
        assert_eq!(groups(&nodes, 2), vec![vec!["base", "api", "web"], vec!["lint", "docs"]]);
        assert_eq!(groups(&nodes, 3), vec![vec!["base", "api", "web"], vec!["docs"], vec!["lint"]]);
        assert_eq!(groups(&nodes, 10).len(), 3, "never more groups than parts with work");
    }

    #[test]
    fn a_part_with_work_brings_its_built_dependencies_and_idle_parts_stay_home() {
        let nodes = vec![node("base", &[], false), node("api", &["base"], true), node("tool", &[], false)];
        assert_eq!(groups(&nodes, 4), vec![vec!["base", "api"]]);
        assert!(groups(&[node("a", &[], false)], 2).is_empty());
    }
}
