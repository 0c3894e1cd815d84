//! `spotbuild deploy`: promote a commit's images to an environment, only when the whole
//! graph at that commit is green, and only the projects that changed since the
//! environment's last deploy. The engine talks to its reporter only through
//! [`DeployEvent`]s.
//!
//! # Guarantees
//! - The gate comes first and touches nothing: every project of the manifest (or of the
//!   named projects' closures) must have `cache-<hash>` and every test job's
//!   `cache-<hash>-<job>` in the trusted namespace, each test tag on the same image as the
//!   build tag. A `multiarch: host` project's `cache-<hash>` is the index of its
//!   architectures, and its tests passed per arch (`cache-<hash>-<arch>-<job>`, on
//!   `cache-<hash>-<arch>`). Otherwise [`DeployError::NotGreen`] lists what is missing.
//! - "Unchanged" means the destination's `deployed-<env>` already points at the manifest
//!   `cache-<hash>` points at: the very image this hash built.
//! - Promotion copies byte for byte ([`crate::registry::copy`]): digests are equal in both
//!   registries, and only missing blobs move, so a rerun after any failure finishes the
//!   job without sending anything twice.
//! - `deployed-<env>` moves only after the project's hook succeeded (at once without a
//!   hook). A failed copy or hook skips the hooks of the projects that depend on it
//!   (transitively), never of independent ones. Hooks run in dependency order.
//! - A dry run reads the registries and changes nothing.
//!
//! # Assumptions
//! - Deploy runs on a trusted ref (an untrusted one is refused): it reads only the trusted
//!   namespace, whose `cache-*` tags only trusted builds write.
//! - Hooks run in the current checkout, which is the commit deployed.
//!
//! # Caveats
//! - `<env>` and the commit and git tags are set when the image is promoted, before its
//!   hook runs (a hook such as `terraform apply` may read them); `deployed-<env>` is the
//!   record of a finished deploy.

pub mod hook;
pub mod version;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::ledger::{DeployEntry, LedgerStore};
use crate::plan::planner::{self, PlanRequest, PlanningError};
use crate::registry::auth::Authenticator;
use crate::registry::copy::{self, CopyPlan, CopyProgress, CopyStats, Endpoint};
use crate::registry::credentials::{DEPLOY_PASSWORD_ENV, DEPLOY_USERNAME_ENV};
use crate::manifest::Multiarch;
use crate::platform::Arch;
use crate::registry::{build_tag, test_tag, Client, ImageStore, RegistryError, RegistryRef};

/// A test job's success tag as the gate found it.
struct TestTag {
    job: String,
    arch: Option<Arch>,
    digest: Option<String>,
}

/// What one tag of the gate stands for.
enum Check {
    /// `cache-<hash>`: the image deployed (an index for `multiarch: host`).
    Image,
    /// `cache-<hash>-<arch>` of a `multiarch: host` project.
    ArchImage(Arch),
    /// A test job's success tag, on the image (of that arch, for `multiarch: host`).
    Test(String, Option<Arch>),
}
use crate::settings::AuthMode;
pub use hook::HookOutcome;

/// An environment's name, fit to be an image tag and to prefix one (`deployed-<env>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvName(String);

impl EnvName {
    pub fn parse(s: &str) -> Result<EnvName, String> {
        let ok = !s.is_empty()
            && s.len() <= 40
            && s.as_bytes()[0].is_ascii_lowercase()
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if !ok {
            return Err(format!(
                "`{s}` is not an environment name: 1-40 characters of a-z, 0-9, `_`, `.` or `-`, starting with a letter (it becomes an image tag)"
            ));
        }
        for reserved in ["cache-", "deployed-", "branch-", "buildcache-"] {
            if s.starts_with(reserved) || s == reserved.trim_end_matches('-') {
                return Err(format!("`{s}` is not an environment name: tags starting with `{reserved}` have another meaning"));
            }
        }
        Ok(EnvName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tag recording what was last deployed here.
    pub fn deployed_tag(&self) -> String {
        format!("deployed-{}", self.0)
    }
}

/// Which projects are promoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Named(Vec<String>),
}

/// What to deploy, and where.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// Repository, settings, commit and build registry, as planning takes them.
    pub plan: PlanRequest,
    pub selection: Selection,
    /// Gate only the named projects' closures, instead of the whole manifest.
    pub closure_only: bool,
    pub env: EnvName,
    /// The deploy registry, overriding `[deploy] registry`; the build registry without both.
    pub to: Option<String>,
    pub to_auth: Option<AuthMode>,
    pub dry_run: bool,
    /// Copy and tag only: no hook runs and `deployed-<env>` stays (the Aztec-shaped
    /// `deploy_ecr`). "Unchanged" then means `<env>` already points at the image.
    pub promote_only: bool,
    /// For the ledger.
    pub ci_job_url: Option<String>,
}

/// Something the gate did not find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Missing {
    pub project: String,
    /// The image reference looked for.
    pub image: String,
    /// `build`, or `test <job>`.
    pub what: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Planning(#[from] PlanningError),
    #[error("deploy runs only on a trusted ref; this one is not: {0}")]
    Untrusted(String),
    #[error("the graph at {commit} is not green: {} missing of {checked} checked; nothing was deployed", missing.len())]
    NotGreen {
        commit: String,
        checked: usize,
        missing: Vec<Missing>,
        broken: Vec<String>,
    },
    #[error("git tag `{tag}` does not name the version in {file} (`{version}`)")]
    Version { tag: String, file: String, version: String },
    #[error("the deploy registry: {0}")]
    Destination(#[source] RegistryError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What happened to one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Promoted (and its hook succeeded); `deployed-<env>` points at it. In a dry run: would be.
    Deployed,
    /// Copied and tagged `<env>`, with no hook and no `deployed-<env>` (`--promote-only`).
    Promoted,
    /// `deployed-<env>` already pointed at this image.
    Unchanged,
    /// Its copy or its hook failed.
    Failed,
    /// A project it depends on failed, so its hook did not run.
    Skipped,
}

impl Action {
    /// The name the table, `--json` and the ledger use.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deployed => "deployed",
            Action::Promoted => "promoted",
            Action::Unchanged => "unchanged",
            Action::Failed => "failed",
            Action::Skipped => "skipped",
        }
    }
}

/// One row of the final table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub project: String,
    pub action: Action,
    pub hash: String,
    pub digest: String,
    /// `HOST/REPOSITORY` of the deploy registry.
    pub destination: String,
    /// Tags set (in a dry run: that would be set).
    pub tags: Vec<String>,
    /// Platforms of a manifest list or index.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    pub blobs_to_send: usize,
    pub bytes_to_send: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookOutcome>,
    /// The hook's command line, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole deploy.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub deploy_id: String,
    pub env: EnvName,
    pub commit: String,
    pub dry_run: bool,
    pub promote_only: bool,
    /// `HOST[/PREFIX]` of the build registry and of the deploy registry.
    pub source: String,
    pub destination: String,
    /// How many projects the gate checked (all green).
    pub gate_checked: usize,
    pub git_tags: Vec<String>,
    pub projects: Vec<Row>,
    /// Where the ledger records went, if anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger: Option<String>,
}

impl Report {
    pub fn any(&self, action: Action) -> bool {
        self.projects.iter().any(|r| r.action == action)
    }
}

/// What the engine says as it goes: the only thing reporters see.
#[derive(Debug, Clone)]
pub enum DeployEvent {
    GatePassed { checked: usize },
    /// What will happen to each project, before anything does.
    Planned { rows: Vec<Row> },
    CopyStarted { project: String, blobs: usize, bytes: u64 },
    Copy { project: String, progress: CopyProgress },
    CopyFinished { project: String, stats: CopyStats },
    HookStarted { project: String, command: Vec<String> },
    HookFinished { project: String, outcome: HookOutcome },
    Finished { row: Box<Row> },
    /// Something the user should know that does not stop the deploy.
    Warning { message: String },
    /// The ledger could not be written (the deploy itself is unaffected).
    LedgerFailed { detail: String },
}

pub type EventSink = Arc<dyn Fn(DeployEvent) + Send + Sync>;

/// The deploy registry: `--to`, else `[deploy] registry` (with its own credentials), else
/// the build registry itself.
fn destination(request: &DeployRequest, config: &crate::settings::Config, build: &Client) -> Result<Option<Client>, DeployError> {
    let Some(url) = request.to.as_deref().or(config.deploy.registry.as_deref()) else {
        return Ok(None);
    };
    let reference = RegistryRef::parse(url).map_err(DeployError::Destination)?;
    if reference == *build.reference() {
        return Ok(None);
    }
    let mode = request.to_auth.unwrap_or(config.deploy.auth);
    let region = reference.ecr_region().or_else(|| config.deploy.region.clone());
    let auth = Authenticator::from_env_named(mode, region, (DEPLOY_USERNAME_ENV, DEPLOY_PASSWORD_ENV)).map_err(DeployError::Destination)?;
    Client::new(reference, &config.registry, auth).map(Some).map_err(DeployError::Destination)
}

/// One project promoted or not, as decided before anything moves.
struct Intent {
    index: usize,
    row: Row,
    plan: Option<CopyPlan>,
}

/// Runs a deploy. Nothing is written before the gate passes; with `dry_run`, nothing at
/// all. The ledger, when given, gets one record per project.
pub async fn run(request: &DeployRequest, ledger: Option<Arc<dyn LedgerStore>>, events: EventSink) -> Result<Report, DeployError> {
    let named: Vec<String> = match &request.selection {
        Selection::All => Vec::new(),
        Selection::Named(n) => n.clone(),
    };
    let mut plan_request = request.plan.clone();
    plan_request.offline = true;
    plan_request.test = None;
    plan_request.projects = if request.closure_only { named.clone() } else { Vec::new() };
    let planned = planner::plan(&plan_request).await?;
    if planned.trust.level != crate::trust::Level::Trusted {
        return Err(DeployError::Untrusted(planned.trust.reason.clone()));
    }
    // Named projects must exist even when the gate covers everything.
    crate::plan::select(&planned.hashes, &named).map_err(PlanningError::Plan)?;
    let hashes = &planned.hashes;
    let manifest = &hashes.manifest;
    let commit = hashes.commit.to_string();
    let build = planner::open_registry(&planned.config, request.plan.registry.as_deref(), request.plan.registry_auth)?;

    // The gate.
    let gate: Vec<usize> = planned.plan.projects.iter().filter_map(|p| manifest.position(&p.name)).collect();
    let broken: Vec<String> = planned.broken.iter().map(|e| e.to_string()).collect();
    let mut missing = Vec::new();
    let mut digests: BTreeMap<usize, String> = BTreeMap::new();
    {
        use futures::stream::{self, StreamExt};
        // A `multiarch: host` project is deployed as its index (`cache-<hash>`, written by
        // `manifest create` once every arch is built); its tests passed per arch, each on
        // that arch's image.
        let lookups: Vec<(usize, String, Check)> = gate
            .iter()
            .flat_map(|&i| {
                let p = &manifest.projects[i];
                let hash = &hashes.hashes[i];
                let arches: Vec<Option<Arch>> = match p.multiarch_kind {
                    Multiarch::Host => Arch::ALL.iter().copied().map(Some).collect(),
                    Multiarch::None | Multiarch::Buildx => vec![None],
                };
                let mut checks = vec![(i, build_tag(hash), Check::Image)];
                for arch in arches {
                    if let Some(a) = arch {
                        checks.push((i, a.tag(hash), Check::ArchImage(a)));
                    }
                    for job in p.tests.keys() {
                        let tag = match arch {
                            Some(a) => crate::plan::passed_tag(p.multiarch_kind, hash, a, job),
                            None => test_tag(hash, job),
                        };
                        checks.push((i, tag, Check::Test(job.clone(), arch)));
                    }
                }
                checks
            })
            .collect();
        let build_ref = &build;
        let found: Vec<_> = stream::iter(lookups)
            .map(|(i, tag, check)| async move {
                let repo = build_ref.reference().repository(&manifest.projects[i].name);
                let d = build_ref.digest(&repo, &tag).await;
                (i, tag, check, d)
            })
            .buffered(build.concurrency())
            .collect()
            .await;
        let mut tests: Vec<(usize, String, TestTag)> = Vec::new();
        let mut arch_digests: BTreeMap<(usize, Arch), String> = BTreeMap::new();
        for (i, tag, check, d) in found {
            let d = d?;
            let name = &manifest.projects[i].name;
            match (check, d) {
                (Check::Image, Some(d)) => {
                    digests.insert(i, d);
                }
                (Check::ArchImage(a), Some(d)) => {
                    arch_digests.insert((i, a), d);
                }
                (Check::Image, None) => missing.push(Missing {
                    project: name.clone(),
                    image: build.image_ref(name, &tag),
                    what: "build".into(),
                    reason: match manifest.projects[i].multiarch_kind {
                        Multiarch::Host => format!("no index of its architectures: `spotbuild manifest create {name}` joins them once each is built"),
                        Multiarch::None | Multiarch::Buildx => "not built at this hash".into(),
                    },
                }),
                (Check::ArchImage(a), None) => missing.push(Missing {
                    project: name.clone(),
                    image: build.image_ref(name, &tag),
                    what: format!("build ({a})"),
                    reason: format!("not built for {a} at this hash"),
                }),
                (Check::Test(job, arch), digest) => tests.push((i, tag, TestTag { job, arch, digest })),
            }
        }
        for (i, tag, TestTag { job, arch, digest: d }) in tests {
            let name = &manifest.projects[i].name;
            let image = match arch {
                Some(a) => arch_digests.get(&(i, a)),
                None => digests.get(&i),
            };
            let reason = match (d, image) {
                (None, _) => Some("no success tag: the job has not passed at this hash".to_string()),
                (Some(t), Some(b)) if t != *b => Some(format!("passed on another image ({t}), not on {b}")),
                _ => None,
            };
            if let Some(reason) = reason {
                missing.push(Missing {
                    project: name.clone(),
                    image: build.image_ref(name, &tag),
                    what: match arch {
                        Some(a) => format!("test {job} ({a})"),
                        None => format!("test {job}"),
                    },
                    reason,
                });
            }
        }
    }
    if !missing.is_empty() || !broken.is_empty() {
        return Err(DeployError::NotGreen {
            commit,
            checked: gate.len(),
            missing,
            broken,
        });
    }
    events(DeployEvent::GatePassed { checked: gate.len() });

    // Git tags of the commit, checked against VERSION files.
    let ci = crate::trust::CiRef::from_env(planned.repo.current_branch());
    let mut git_tags: BTreeSet<String> = planned.repo.tags_at(hashes.commit).map_err(PlanningError::Git)?.into_iter().collect();
    // The CI's tag counts when it names this commit, or when the clone did not fetch it
    // and HEAD (what the CI checked out for it) is deployed.
    if let Some(t) = &ci.tag {
        let here = match planned.repo.resolve_commit(t) {
            Ok(c) => c == hashes.commit,
            Err(_) => request.plan.commit == "HEAD",
        };
        if here {
            git_tags.insert(t.rsplit('/').next().unwrap_or(t).to_string());
        }
    }
    let (git_tags, unusable): (Vec<String>, Vec<String>) = git_tags.into_iter().partition(|t| version::valid_image_tag(t));
    for t in unusable {
        events(DeployEvent::Warning {
            message: format!("git tag `{t}` is not a valid image tag; the image is not tagged with it"),
        });
    }
    let snap = planned.repo.snapshot(hashes.commit).map_err(PlanningError::Git)?;
    let read_version = |path: &str| -> Result<Option<String>, DeployError> {
        let text = snap.read_file(path).map_err(PlanningError::Git)?;
        Ok(text.map(|t| String::from_utf8_lossy(&t).split_whitespace().next().unwrap_or("").to_string()).filter(|v| !v.is_empty()))
    };

    let to = destination(request, &planned.config, &build)?;
    let dst_client = to.as_ref().unwrap_or(&build);
    let promote: Vec<usize> = match &request.selection {
        Selection::All => gate.clone(),
        Selection::Named(names) => {
            let set: BTreeSet<usize> = names.iter().filter_map(|n| manifest.position(n)).collect();
            set.into_iter().collect()
        }
    };
    let root_version = read_version("VERSION")?;
    let env = &request.env;
    let mut intents = Vec::new();
    for &i in &promote {
        let p = &manifest.projects[i];
        let version_file = if p.project_dir.is_empty() { "VERSION".to_string() } else { format!("{}/VERSION", p.project_dir) };
        let version = match read_version(&version_file)? {
            Some(v) => Some((version_file, v)),
            None => root_version.clone().map(|v| ("VERSION".to_string(), v)),
        };
        if let Some((file, v)) = &version {
            if let Some(tag) = git_tags.iter().find(|t| !version::tag_names_version(t, v)) {
                return Err(DeployError::Version {
                    tag: tag.clone(),
                    file: file.clone(),
                    version: v.clone(),
                });
            }
        }
        let digest = digests[&i].clone();
        let src_repo = build.reference().repository(&p.name);
        let dst_repo = dst_client.reference().repository(&p.name);
        let src = Endpoint { client: &build, repository: &src_repo };
        let dst = Endpoint { client: dst_client, repository: &dst_repo };
        let marker = if request.promote_only { env.as_str().to_string() } else { env.deployed_tag() };
        let deployed = copy::resolve(dst, &marker).await.map_err(DeployError::Destination)?;
        let mut tags = vec![commit.clone(), env.as_str().to_string()];
        tags.extend(git_tags.iter().cloned());
        let (action, plan) = if deployed.as_deref() == Some(digest.as_str()) {
            (Action::Unchanged, None)
        } else {
            (Action::Deployed, Some(copy::plan(src, dst, &digest).await?))
        };
        let row = Row {
            project: p.name.clone(),
            action,
            hash: hashes.hashes[i].clone(),
            digest,
            destination: format!("{}/{}", dst_client.reference().host, dst_repo),
            tags: if action == Action::Unchanged { Vec::new() } else { tags },
            platforms: plan.as_ref().map(|p| p.platforms()).unwrap_or_default(),
            blobs_to_send: plan.as_ref().map_or(0, |p| p.missing.len()),
            bytes_to_send: plan.as_ref().map_or(0, |p| p.missing_bytes()),
            copy: None,
            hook: None,
            hook_command: if action == Action::Unchanged || request.promote_only { None } else { p.deploy.as_ref().map(|h| h.command.clone()) },
            error: None,
        };
        intents.push(Intent { index: i, row, plan });
    }
    events(DeployEvent::Planned {
        rows: intents.iter().map(|i| i.row.clone()).collect(),
    });
    let mut report = Report {
        deploy_id: crate::farm::build::new_build_id(),
        env: env.clone(),
        commit: commit.clone(),
        dry_run: request.dry_run,
        promote_only: request.promote_only,
        source: build.reference().to_string(),
        destination: dst_client.reference().to_string(),
        gate_checked: gate.len(),
        git_tags: git_tags.clone(),
        projects: Vec::new(),
        ledger: None,
    };
    if request.dry_run {
        report.projects = intents.into_iter().map(|i| i.row).collect();
        return Ok(report);
    }

    // Promotion: every changed image, with its tags but `deployed-<env>`.
    let mut failed: BTreeSet<usize> = BTreeSet::new();
    for intent in intents.iter_mut() {
        let Some(plan) = &intent.plan else { continue };
        let name = intent.row.project.clone();
        let src_repo = build.reference().repository(&name);
        let dst_repo = dst_client.reference().repository(&name);
        let src = Endpoint { client: &build, repository: &src_repo };
        let dst = Endpoint { client: dst_client, repository: &dst_repo };
        events(DeployEvent::CopyStarted {
            project: name.clone(),
            blobs: plan.missing.len(),
            bytes: plan.missing_bytes(),
        });
        let sink = events.clone();
        let project = name.clone();
        let progress: copy::ProgressSink = Arc::new(move |p| {
            sink(DeployEvent::Copy {
                project: project.clone(),
                progress: p,
            })
        });
        match copy::copy(src, dst, plan, &intent.row.tags, progress).await {
            Ok(stats) => {
                events(DeployEvent::CopyFinished {
                    project: name,
                    stats: stats.clone(),
                });
                intent.row.copy = Some(stats);
            }
            Err(e) => {
                intent.row.action = Action::Failed;
                intent.row.error = Some(format!("copy failed: {}", crate::errors::error_chain(&e)));
                failed.insert(intent.index);
            }
        }
    }

    // Hooks, in dependency order (the manifest's), then `deployed-<env>`.
    let repo_root = planned.repo.workdir().map(|p| p.to_path_buf());
    let hooks_to_run = intents.iter().any(|i| i.row.action == Action::Deployed && manifest.projects[i.index].deploy.is_some());
    if hooks_to_run && !request.promote_only {
        if let Ok(head) = planned.repo.resolve_commit("HEAD") {
            if head != hashes.commit {
                events(DeployEvent::Warning {
                    message: format!("hooks run in the checkout, which is at {head}, not at the deployed commit {commit}"),
                });
            }
        }
    }
    for intent in intents.iter_mut() {
        if intent.row.action != Action::Deployed {
            continue;
        }
        if request.promote_only {
            intent.row.action = Action::Promoted;
            continue;
        }
        let i = intent.index;
        let p = &manifest.projects[i];
        let closure = hashes.closure(i);
        if let Some(&dep) = closure.iter().find(|&&d| d != i && failed.contains(&d)) {
            let because = format!("{} failed", manifest.projects[dep].name);
            intent.row.action = Action::Skipped;
            if p.deploy.is_some() {
                intent.row.hook = Some(HookOutcome::NotRun { because: because.clone() });
            }
            intent.row.error = Some(format!("not deployed: {because}"));
            failed.insert(i);
            continue;
        }
        if let Some(h) = &p.deploy {
            let image = format!("{}@{}", intent.row.destination, intent.row.digest);
            let dir = match &repo_root {
                Some(root) => root.join(&p.project_dir),
                None => std::env::current_dir().unwrap_or_default(),
            };
            let vars = BTreeMap::from([
                ("SPOTBUILD_IMAGE".to_string(), image),
                ("SPOTBUILD_ENV".to_string(), env.as_str().to_string()),
                ("SPOTBUILD_COMMIT".to_string(), commit.clone()),
                ("SPOTBUILD_PROJECT".to_string(), p.name.clone()),
                ("SPOTBUILD_PROJECT_DIR".to_string(), dir.display().to_string()),
                ("SPOTBUILD_HASH".to_string(), intent.row.hash.clone()),
                ("SPOTBUILD_DIGEST".to_string(), intent.row.digest.clone()),
            ]);
            events(DeployEvent::HookStarted {
                project: p.name.clone(),
                command: h.command.clone(),
            });
            let timeout = h.timeout.unwrap_or(planned.config.deploy.hook_timeout);
            let outcome = hook::run(h, &dir, &vars, timeout).await;
            events(DeployEvent::HookFinished {
                project: p.name.clone(),
                outcome: outcome.clone(),
            });
            let ok = outcome.succeeded();
            intent.row.hook = Some(outcome);
            if !ok {
                intent.row.action = Action::Failed;
                intent.row.error = Some("hook failed; deployed-".to_string() + env.as_str() + " left where it was");
                failed.insert(i);
                continue;
            }
        }
        let dst_repo = dst_client.reference().repository(&p.name);
        let dst = Endpoint { client: dst_client, repository: &dst_repo };
        let root = intent.plan.as_ref().expect("a deployed project has a copy plan").root().clone();
        let deployed_tag = env.deployed_tag();
        if let Err(e) = copy::tag(dst, &root, std::slice::from_ref(&deployed_tag)).await {
            intent.row.action = Action::Failed;
            intent.row.error = Some(format!("could not move {deployed_tag}: {}", crate::errors::error_chain(&e)));
            failed.insert(i);
            continue;
        }
        intent.row.tags.push(deployed_tag);
    }

    report.projects = intents.into_iter().map(|i| i.row).collect();
    for row in &report.projects {
        events(DeployEvent::Finished { row: Box::new(row.clone()) });
    }
    if let Some(ledger) = ledger {
        let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        for row in &report.projects {
            let entry = DeployEntry {
                schema: crate::ledger::SCHEMA,
                deploy_id: report.deploy_id.clone(),
                env: env.as_str().to_string(),
                project: row.project.clone(),
                commit: commit.clone(),
                hash: row.hash.clone(),
                digest: row.digest.clone(),
                destination: row.destination.clone(),
                action: row.action.as_str().to_string(),
                tags: row.tags.clone(),
                hook: row.hook.as_ref().map(|h| h.summary()),
                ci_job_url: request.ci_job_url.clone(),
                at: at.clone(),
            };
            if let Err(e) = ledger.record_deploy(&entry).await {
                events(DeployEvent::LedgerFailed {
                    detail: crate::errors::error_chain(&e),
                });
                break;
            }
        }
        report.ledger = Some(ledger.place());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_names_are_tags_and_stay_out_of_reserved_prefixes() {
        assert_eq!(EnvName::parse("production").unwrap().deployed_tag(), "deployed-production");
        assert!(EnvName::parse("eu-west.2_a").is_ok());
        for bad in ["", "Prod", "1st", "a/b", "cache-x", "deployed-prod", "cache", "branch-main", &"x".repeat(41)] {
            assert!(EnvName::parse(bad).is_err(), "{bad}");
        }
    }
}
