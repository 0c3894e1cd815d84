//! The one place a [`Job`] is made: from a plan, for this machine (`build --local`) or for
//! a rented instance, and completed with where things landed once shipped.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::spread::Node;
use crate::plan::planner::Planned;
use crate::plan::{Plan, ProjectPlan, TestRun};
use crate::protocol::{BuilderChoice, CacheSettings, ImdsSettings, Job, JobCommand, JobProject, JobRegistry, JobTest, Source, VERSION};
use crate::registry::auth::Basic;
use crate::settings::{AuthMode, RemoteConfig};

/// What a remote command asks of the instance.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Build (and test) what the plan says.
    Build,
    /// One test invocation of one project (building what it needs first).
    Test(TestRun),
    /// A one-off command at the commit, after no builds.
    Run { command: Vec<String> },
}

impl Scope {
    /// The ledger's word for it.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Build => "build",
            Scope::Test(_) => "test",
            Scope::Run { .. } => "run",
        }
    }

    /// Whether one planned project has work in this scope.
    pub fn work_for(&self, p: &ProjectPlan) -> bool {
        match self {
            Scope::Build => p.needs_build == Some(true) || p.tests.iter().any(|t| t.needs_run == Some(true)),
            Scope::Test(run) => p.name == run.project && p.tests.iter().any(|t| t.needs_run == Some(true)),
            Scope::Run { .. } => true,
        }
    }
}

/// How jobs are made, beyond the plan.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub build_id: String,
    pub registry_auth: Option<AuthMode>,
    /// The branch whose cache tag is used and updated [default: CI's, else checked out].
    pub branch: Option<String>,
    pub builder: BuilderChoice,
    /// The job's deadline, from now.
    pub timeout: Duration,
}

/// What one plan leaves to do in a scope: the controller's input for spreading and for
/// each attempt.
#[derive(Debug, Clone)]
pub struct Work {
    pub scope: Scope,
    pub commit: String,
    /// Every planned project, in dependency order, with whether it has work.
    pub nodes: Vec<Node>,
    /// The projects that need building.
    pub builds: Vec<String>,
    /// The job for the whole scope; an instance group gets its share.
    pub job: Job,
    /// What planning warned about.
    pub warnings: Vec<String>,
}

impl Work {
    /// Whether anything is left for the group covering `only` (all: `None`).
    pub fn any_left(&self, only: Option<&[String]>) -> bool {
        matches!(self.scope, Scope::Run { .. }) || self.nodes.iter().any(|n| n.work && only.is_none_or(|o| o.contains(&n.name)))
    }

    /// The job for the group covering `only`, whose build id is `build_id`.
    pub fn job_for(&self, only: Option<&[String]>, build_id: &str) -> Job {
        let mut job = self.job.clone();
        job.build_id = build_id.to_string();
        if let Some(only) = only {
            job.projects.retain(|p| only.contains(&p.name));
        }
        job
    }

    /// The projects the group covering `only` works on, for the ledger and instance tags.
    pub fn projects_for(&self, only: Option<&[String]>) -> Vec<String> {
        match &self.scope {
            Scope::Test(run) => vec![run.project.clone()],
            Scope::Run { .. } => Vec::new(),
            Scope::Build => self.builds_for(only),
        }
    }

    /// The projects the group covering `only` builds (its instance's `spotbuild:project`).
    pub fn builds_for(&self, only: Option<&[String]>) -> Vec<String> {
        self.builds.iter().filter(|b| only.is_none_or(|o| o.contains(b))).cloned().collect()
    }
}

/// What `planned` leaves to do in `scope`, with the job a rented instance runs.
pub fn work(planned: &Planned, scope: &Scope, options: &JobOptions) -> Work {
    let mut job = job(planned, options, Path::new("/"));
    if let Scope::Run { command } = scope {
        job.projects.clear();
        job.run = vec![JobCommand {
            name: "command".into(),
            command: command.clone(),
        }];
    }
    // On a rented instance: its own metadata service, and its deadline powers it off
    // (unless the settings say otherwise, as the local farm's do).
    job.imds = ImdsSettings::default();
    job.shutdown_command = planned.config.remote.shutdown_command.clone();
    Work {
        scope: scope.clone(),
        commit: planned.plan.commit.clone(),
        nodes: planned
            .plan
            .projects
            .iter()
            .map(|p| Node {
                name: p.name.clone(),
                dependencies: p.dependencies.clone(),
                work: scope.work_for(p),
            })
            .collect(),
        builds: planned.plan.projects.iter().filter(|p| p.needs_build == Some(true)).map(|p| p.name.clone()).collect(),
        job,
        warnings: planned.warnings.clone(),
    }
}

/// The job for this machine, in `workdir`: nobody's disposable instance, so it never
/// shuts down, and only a metadata endpoint someone set up explicitly is watched.
pub fn local(planned: &Planned, options: &JobOptions, workdir: &Path) -> Job {
    let mut job = job(planned, options, workdir);
    let imds_endpoint = std::env::var(crate::agent::imds::ENDPOINT_ENV).ok().filter(|s| !s.is_empty());
    job.shutdown_command = Some(Vec::new());
    job.imds = ImdsSettings {
        enabled: imds_endpoint.is_some(),
        endpoint: imds_endpoint,
        ..ImdsSettings::default()
    };
    job
}

/// Completes a job with where it landed on the instance: its bundle (and the baked mirror
/// it is thin against), its directory and events file, and the remote settings it obeys.
pub fn place_on_instance(job: &mut Job, workdir: &Path, bundle: PathBuf, mirror: Option<PathBuf>, remote: &RemoteConfig) {
    job.source = Source::Bundle { path: bundle, mirror };
    job.events_file = Some(workdir.join("events.ndjson"));
    job.workdir = workdir.to_path_buf();
    if remote.shutdown_command.is_some() {
        job.shutdown_command = remote.shutdown_command.clone();
    }
    // The controller's silence bound is set against this interval (`[remote] agent_silence`).
    job.heartbeat_secs = remote.agent_heartbeat.as_secs().max(1);
}

fn job(planned: &Planned, options: &JobOptions, workdir: &Path) -> Job {
    // Only `spotbuild run` plans without a registry: it builds and pushes nothing.
    let registry = planned.client.as_ref().map(|c| c.reference().to_string()).unwrap_or_default();
    let basic = Basic::from_env();
    let deadline = SystemTime::now() + options.timeout;
    Job {
        v: VERSION,
        build_id: options.build_id.clone(),
        commit: planned.plan.commit.clone(),
        source: Source::Repository(planned.repo.git_dir().to_path_buf()),
        workdir: workdir.to_path_buf(),
        events_file: Some(workdir.join("events.ndjson")),
        registry: JobRegistry {
            url: registry,
            auth: options.registry_auth.unwrap_or(planned.config.registry.auth),
            username: basic.as_ref().map(|b| b.username.clone()),
            password: basic.map(|b| b.password),
            region: planned.config.registry.region.clone(),
            trusted: planned.trusted_namespace.clone(),
        },
        branch: options.branch.clone().or_else(|| branch(planned)),
        main_branch: "main".into(),
        projects: projects(&planned.plan, &planned.hashes),
        run: Vec::new(),
        cache: CacheSettings {
            builder: options.builder,
            docker: None,
        },
        deadline: Some(humantime::format_rfc3339_seconds(deadline).to_string()),
        shutdown_command: None,
        imds: ImdsSettings::default(),
        heartbeat_secs: 5,
    }
}

/// Environment variables naming the branch a CI job builds, in the order consulted.
pub const CI_BRANCH_VARIABLES: [&str; 5] = ["CIRCLE_BRANCH", "GITHUB_HEAD_REF", "GITHUB_REF_NAME", "CI_COMMIT_REF_NAME", "BRANCH_NAME"];

/// The CI's branch, else the checked-out one.
pub fn branch(planned: &Planned) -> Option<String> {
    CI_BRANCH_VARIABLES
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| planned.repo.current_branch())
}

/// Every planned project (so `FROM` can be pinned), whether it needs building, and the
/// test jobs that need running.
fn projects(plan: &Plan, hashes: &crate::plan::Hashes) -> Vec<JobProject> {
    plan.projects
        .iter()
        .filter_map(|p| {
            // Planned projects are healthy manifest entries; a plan is made from them.
            let m = hashes.manifest.get(&p.name)?;
            Some(JobProject {
                name: p.name.clone(),
                hash: p.hash.clone(),
                tag: p.tag.clone(),
                build: p.needs_build == Some(true),
                image: p.image.clone(),
                build_dir: m.build_dir.clone(),
                dockerfile: m.dockerfile_path(),
                project_dir: m.project_dir.clone(),
                dependencies: m.dependencies.clone(),
                build_args: m.build_args.clone(),
                arch: p.arch,
                multiarch: p.multiarch,
                tests: p
                    .tests
                    .iter()
                    .filter(|t| t.needs_run == Some(true))
                    .filter_map(|t| match &t.script {
                        // Run from the project's folder on the instance.
                        Some(script) => Some(JobTest {
                            job: t.job.clone(),
                            tag: t.tag.clone(),
                            command: std::iter::once(format!("./{script}")).chain(t.args.iter().cloned()).collect(),
                            host: true,
                            cpus: None,
                        }),
                        None => {
                            let spec = m.tests.get(&t.job)?;
                            Some(JobTest {
                                job: t.job.clone(),
                                tag: t.tag.clone(),
                                command: spec.command.iter().chain(&t.args).cloned().collect(),
                                host: spec.host,
                                cpus: spec.cpus,
                            })
                        }
                    })
                    .collect(),
            })
        })
        .collect()
}
