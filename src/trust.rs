//! Which trust level a build runs at, from the ref it builds and what the CI says about it.
//!
//! A **trusted** build (a protected branch, a release tag) reads and writes the cache state:
//! `cache-*` tags in the project repositories. An **untrusted** build (a pull request, a
//! fork's above all, or any other branch) reads the trusted cache but writes only its own
//! namespace (`PREFIX/<untrusted_prefix>/<project>`), runs with its own instance profile,
//! and records in its own part of the ledger; nothing it writes is read by a trusted build.
//!
//! # Guarantees
//! - The decision is a pure function of the settings and the CI's variables ([`decide`]).
//! - Trust can only be lowered from the command line (`--untrusted`), never raised.
//!
//! # Assumptions
//! - The boundary itself is IAM's: the CI gives untrusted jobs credentials that may only
//!   pass the untrusted instance profile and write the untrusted namespace (the Terraform
//!   module's `controller_untrusted` policy). This module picks the matching settings; it
//!   cannot stop code that ignores it.

use serde::Serialize;

/// How far a build is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Trusted,
    Untrusted,
}

/// The level and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub level: Level,
    pub reason: String,
}

/// What the CI says about the ref being built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CiRef {
    /// The branch built (for a pull request, its source branch).
    pub branch: Option<String>,
    /// A git tag, when the build is for one.
    pub tag: Option<String>,
    /// A pull (merge) request, and whether it comes from a fork.
    pub pull_request: Option<PullRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub id: String,
    pub from_fork: bool,
}

/// `[trust]`: which refs are trusted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Branches whose builds are trusted (`*` matches any run of characters but `/`; `**`
    /// also `/`). Pull requests are never trusted, whatever their branch.
    #[serde(default = "default_trusted_branches")]
    pub trusted_branches: Vec<String>,
    /// Builds of git tags are trusted (creating tags is a maintainer's act).
    #[serde(default = "default_true")]
    pub trusted_tags: bool,
    /// The repository prefix untrusted builds write under: `PREFIX/<this>/<project>`.
    #[serde(default = "default_untrusted_prefix", deserialize_with = "untrusted_prefix")]
    pub untrusted_prefix: String,
}

/// One lowercase repository path component: an empty or multi-part prefix could make the
/// untrusted namespace the trusted one, or a project's own repository.
fn untrusted_prefix<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    let ok = s.len() <= 64
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "untrusted_prefix {s:?} is not one lowercase repository path component (e.g. \"pr\"): untrusted builds must write a namespace of their own"
        )))
    }
}

fn default_trusted_branches() -> Vec<String> {
    vec!["main".into(), "master".into()]
}
fn default_true() -> bool {
    true
}
fn default_untrusted_prefix() -> String {
    "pr".into()
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            trusted_branches: default_trusted_branches(),
            trusted_tags: default_true(),
            untrusted_prefix: default_untrusted_prefix(),
        }
    }
}

/// The level of a build of `ci` under `config`. `forced_untrusted` (the `--untrusted`
/// flag) lowers it; nothing raises it.
pub fn decide(config: &TrustConfig, ci: &CiRef, forced_untrusted: bool) -> Decision {
    let untrusted = |reason: String| Decision {
        level: Level::Untrusted,
        reason,
    };
    if forced_untrusted {
        return untrusted("--untrusted".into());
    }
    if let Some(pr) = &ci.pull_request {
        let from = if pr.from_fork { "a fork's pull request" } else { "a pull request" };
        return untrusted(format!("{from} ({})", pr.id));
    }
    if let Some(tag) = &ci.tag {
        return match config.trusted_tags {
            true => Decision {
                level: Level::Trusted,
                reason: format!("tag {tag}"),
            },
            false => untrusted(format!("tag {tag} ([trust] trusted_tags = false)")),
        };
    }
    match &ci.branch {
        Some(b) if config.trusted_branches.iter().any(|g| glob(g, b)) => Decision {
            level: Level::Trusted,
            reason: format!("branch {b} is trusted"),
        },
        Some(b) => untrusted(format!("branch {b} is not in [trust] trusted_branches")),
        None => untrusted("no branch or tag is known (a detached checkout outside CI)".into()),
    }
}

/// `*` matches any run of characters but `/`, `**` any run at all; the rest literally.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p {
            [] => t.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| go(rest, &t[i..])),
            [b'*', rest @ ..] => (0..=t.len()).take_while(|&i| i == 0 || t[i - 1] != b'/').any(|i| go(rest, &t[i..])),
            [c, rest @ ..] => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

impl CiRef {
    /// What the CI's environment says (CircleCI, GitHub Actions, GitLab CI, Buildkite),
    /// else `local_branch` (the checked-out branch).
    pub fn from_env(local_branch: Option<String>) -> CiRef {
        CiRef::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()), local_branch)
    }

    /// [`CiRef::from_env`] over any source of variables (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, local_branch: Option<String>) -> CiRef {
        // CircleCI: CIRCLE_PR_NUMBER is set for forks only; CIRCLE_PULL_REQUEST for any PR.
        if var("CIRCLECI").is_some() {
            let pull_request = match (var("CIRCLE_PR_NUMBER"), var("CIRCLE_PULL_REQUEST")) {
                (Some(n), _) => Some(PullRequest { id: format!("#{n}"), from_fork: true }),
                (None, Some(url)) => Some(PullRequest {
                    id: url.rsplit('/').next().map(|n| format!("#{n}")).unwrap_or(url),
                    from_fork: false,
                }),
                _ => None,
            };
            return CiRef {
                branch: var("CIRCLE_BRANCH"),
                tag: var("CIRCLE_TAG"),
                pull_request,
            };
        }
        // GitHub Actions: a pull_request event runs the PR's code; whether it comes from a
        // fork is in the event payload, not the environment, so every PR counts as one.
        if var("GITHUB_ACTIONS").is_some() {
            let event = var("GITHUB_EVENT_NAME").unwrap_or_default();
            if event.starts_with("pull_request") {
                let id = var("GITHUB_REF").and_then(|r| r.strip_prefix("refs/pull/").and_then(|r| r.split('/').next()).map(|n| format!("#{n}")));
                return CiRef {
                    branch: var("GITHUB_HEAD_REF"),
                    tag: None,
                    pull_request: Some(PullRequest {
                        id: id.unwrap_or_else(|| "a pull request".into()),
                        from_fork: true,
                    }),
                };
            }
            let kind = var("GITHUB_REF_TYPE").unwrap_or_default();
            let name = var("GITHUB_REF_NAME");
            return CiRef {
                branch: if kind == "branch" { name.clone() } else { None },
                tag: if kind == "tag" { name } else { None },
                pull_request: None,
            };
        }
        if var("GITLAB_CI").is_some() {
            let pull_request = var("CI_MERGE_REQUEST_IID").map(|iid| PullRequest {
                id: format!("!{iid}"),
                from_fork: var("CI_MERGE_REQUEST_SOURCE_PROJECT_ID") != var("CI_MERGE_REQUEST_PROJECT_ID"),
            });
            return CiRef {
                branch: var("CI_COMMIT_BRANCH").or_else(|| var("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME")),
                tag: var("CI_COMMIT_TAG"),
                pull_request,
            };
        }
        if var("BUILDKITE").is_some() {
            let pull_request = var("BUILDKITE_PULL_REQUEST").filter(|p| p != "false").map(|n| PullRequest {
                id: format!("#{n}"),
                from_fork: var("BUILDKITE_PULL_REQUEST_REPO").is_some_and(|r| Some(r) != var("BUILDKITE_REPO")),
            });
            return CiRef {
                branch: var("BUILDKITE_BRANCH"),
                tag: var("BUILDKITE_TAG"),
                pull_request,
            };
        }
        CiRef {
            branch: local_branch,
            tag: None,
            pull_request: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ci(vars: &[(&str, &str)]) -> CiRef {
        let map: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CiRef::from_vars(|k| map.get(k).cloned(), Some("local-work".into()))
    }

    fn level(vars: &[(&str, &str)]) -> Level {
        decide(&TrustConfig::default(), &ci(vars), false).level
    }

    #[test]
    fn protected_branches_and_tags_are_trusted_and_everything_else_is_not() {
        assert_eq!(level(&[("CIRCLECI", "true"), ("CIRCLE_BRANCH", "main")]), Level::Trusted);
        assert_eq!(level(&[("CIRCLECI", "true"), ("CIRCLE_TAG", "v1.2.0")]), Level::Trusted);
        assert_eq!(level(&[("CIRCLECI", "true"), ("CIRCLE_BRANCH", "feature/x")]), Level::Untrusted);
        assert_eq!(level(&[("GITHUB_ACTIONS", "true"), ("GITHUB_REF_TYPE", "branch"), ("GITHUB_REF_NAME", "master")]), Level::Trusted);
        assert_eq!(level(&[("GITLAB_CI", "true"), ("CI_COMMIT_BRANCH", "main")]), Level::Trusted);
        assert_eq!(level(&[("BUILDKITE", "true"), ("BUILDKITE_BRANCH", "main"), ("BUILDKITE_PULL_REQUEST", "false")]), Level::Trusted);
        // Outside CI: the checked-out branch.
        assert_eq!(level(&[]), Level::Untrusted);
        assert_eq!(decide(&TrustConfig::default(), &CiRef::from_vars(|_| None, Some("main".into())), false).level, Level::Trusted);
    }

    #[test]
    fn a_pull_request_is_untrusted_even_from_a_trusted_branch_name() {
        let fork = ci(&[("CIRCLECI", "true"), ("CIRCLE_BRANCH", "main"), ("CIRCLE_PR_NUMBER", "42")]);
        let d = decide(&TrustConfig::default(), &fork, false);
        assert_eq!(d.level, Level::Untrusted);
        assert_eq!(d.reason, "a fork's pull request (#42)");
        let gh = ci(&[("GITHUB_ACTIONS", "true"), ("GITHUB_EVENT_NAME", "pull_request"), ("GITHUB_HEAD_REF", "main"), ("GITHUB_REF", "refs/pull/7/merge")]);
        assert_eq!(decide(&TrustConfig::default(), &gh, false).reason, "a fork's pull request (#7)");
        let same_repo = ci(&[("GITLAB_CI", "true"), ("CI_MERGE_REQUEST_IID", "3"), ("CI_MERGE_REQUEST_SOURCE_PROJECT_ID", "1"), ("CI_MERGE_REQUEST_PROJECT_ID", "1")]);
        assert_eq!(decide(&TrustConfig::default(), &same_repo, false).reason, "a pull request (!3)");
    }

    #[test]
    fn trust_can_be_lowered_never_raised_and_is_configurable() {
        let main = ci(&[("CIRCLECI", "true"), ("CIRCLE_BRANCH", "main")]);
        assert_eq!(decide(&TrustConfig::default(), &main, true).level, Level::Untrusted);
        let config = TrustConfig {
            trusted_branches: vec!["release/*".into(), "hotfix/**".into()],
            trusted_tags: false,
            untrusted_prefix: "pr".into(),
        };
        let on = |branch: &str| decide(&config, &ci(&[("CIRCLECI", "true"), ("CIRCLE_BRANCH", branch)]), false).level;
        assert_eq!(on("release/2.0"), Level::Trusted);
        assert_eq!(on("release/2.0/rc"), Level::Untrusted, "* stops at /");
        assert_eq!(on("hotfix/a/b"), Level::Trusted);
        assert_eq!(on("main"), Level::Untrusted);
        assert_eq!(decide(&config, &ci(&[("CIRCLECI", "true"), ("CIRCLE_TAG", "v1")]), false).level, Level::Untrusted);
    }

    #[test]
    fn globs() {
        assert!(glob("main", "main") && !glob("main", "mainline"));
        assert!(glob("release/*", "release/1") && !glob("release/*", "release/1/2"));
        assert!(glob("**", "a/b/c") && glob("*", "") && !glob("a*c", "abd"));
    }

    #[test]
    fn the_untrusted_namespace_is_one_component_of_its_own() {
        let parse = |v: &str| toml::from_str::<TrustConfig>(&format!("untrusted_prefix = {v:?}"));
        assert_eq!(parse("pr-builds").unwrap().untrusted_prefix, "pr-builds");
        for bad in ["", "pr/x", "PR", "-pr", "../x", &"p".repeat(65)] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("namespace of their own"), "{bad:?}: {e}");
        }
    }
}
