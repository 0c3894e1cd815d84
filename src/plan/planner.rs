//! The whole of planning as one call: open the repository, read the settings, hash the
//! commit and ask the registry. `plan`, `build`, `test` and the controller's re-plans all
//! go through [`plan`]; it prints nothing (warnings are returned).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::{Forced, Hashes, Plan, PlanError, TestRun};
use crate::git::{GitError, Repo};
use crate::manifest::ManifestError;
use crate::registry::auth::Authenticator;
use crate::registry::{Client, ImageStore, RegistryError, RegistryRef};
use crate::settings::{AuthMode, Config, ConfigError};

/// What to plan. Owned, so that a controller can plan the same request again.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Any directory inside the repository [default: the current one].
    pub repo_dir: Option<PathBuf>,
    /// The settings file [default: spotbuild.toml at the root, if present].
    pub settings: Option<PathBuf>,
    /// Projects asked for (with their dependencies); empty: all.
    pub projects: Vec<String>,
    /// Any revision.
    pub commit: String,
    /// Hash only: the registry is not asked.
    pub offline: bool,
    /// The registry, overriding `[registry] url`.
    pub registry: Option<String>,
    pub registry_auth: Option<AuthMode>,
    /// One test invocation to plan instead of the manifest's jobs.
    pub test: Option<TestRun>,
    /// Plan as an untrusted build whatever the ref (`--untrusted`).
    pub force_untrusted: bool,
    /// The architecture of the machine that builds: which projects it covers and which
    /// tags they have (see [`super::for_arch`]).
    pub arch: crate::platform::Arch,
}

impl PlanRequest {
    /// Hashes only (the registry is not asked), for x86_64, as a trusted build would.
    pub fn offline(repo_dir: Option<PathBuf>, settings: Option<PathBuf>, projects: Vec<String>, commit: String) -> PlanRequest {
        PlanRequest {
            repo_dir,
            settings,
            projects,
            commit,
            offline: true,
            registry: None,
            registry_auth: None,
            test: None,
            force_untrusted: false,
            arch: crate::platform::Arch::X86_64,
        }
    }
}

/// A computed plan and what it was computed from.
pub struct Planned {
    pub repo: Repo,
    pub config: Config,
    pub hashes: Hashes,
    pub plan: Plan,
    /// The registry of the namespace this build writes: the project repositories when it
    /// is trusted, the untrusted prefix's when it is not.
    pub client: Option<Client>,
    /// Whether the build is trusted, and why.
    pub trust: crate::trust::Decision,
    /// For an untrusted build: the trusted namespace it reads (`HOST[:PORT][/PREFIX]`).
    pub trusted_namespace: Option<String>,
    /// When every project was asked for: the entries that could not be planned. (A named
    /// project that is broken, or depends on one that is, is an error instead.)
    pub broken: Vec<Arc<ManifestError>>,
    /// What the user should know but that did not stop planning.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    #[error("failed to read the current directory")]
    CurrentDir(#[source] std::io::Error),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Settings(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("no registry is configured")]
    NoRegistry,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("failed to hash the commit: the hashing task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
}

/// Plans `request`. Tree walks and `dependencies` scripts block, so they run off the
/// async workers.
pub async fn plan(request: &PlanRequest) -> Result<Planned, PlanningError> {
    let started = Instant::now();
    let cwd = match &request.repo_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().map_err(PlanningError::CurrentDir)?,
    };
    let request_blocking = request.clone();
    // Everything up to asking the registry reads the repository: off the async workers.
    let (repo, config, hashes, selection, forced, trust, arch_warnings) = tokio::task::spawn_blocking(move || -> Result<_, PlanningError> {
        let request = request_blocking;
        let repo = Repo::discover(&cwd)?;
        let config = Config::load(request.settings.as_deref(), repo.workdir())?;
        let commit = repo.resolve_commit(&request.commit)?;
        let options = super::HashOptions {
            script_timeout: config.plan.dependencies_timeout,
        };
        let hashes = super::hash_commit(&repo, commit, options)?;
        let selection = super::select(&hashes, &request.projects)?;
        let (selection, arch_warnings) = super::for_arch(&hashes, &selection, &request.projects, request.arch)?;
        let forced = Forced::from_message(&repo.commit_message(commit)?);
        let ci = crate::trust::CiRef::from_env(repo.current_branch());
        let trust = crate::trust::decide(&config.trust, &ci, request.force_untrusted);
        Ok((repo, config, hashes, selection, forced, trust, arch_warnings))
    })
    .await
    .map_err(PlanningError::Task)??;
    tracing::debug!(elapsed = ?started.elapsed(), projects = hashes.manifest.projects.len(), "hashed");
    let mut warnings: Vec<String> = hashes.manifest.warnings.iter().map(|w| w.to_string()).collect();
    warnings.extend(arch_warnings);
    let broken = if request.projects.is_empty() {
        hashes.manifest.broken.values().cloned().collect()
    } else {
        Vec::new()
    };
    for name in &forced.projects {
        if hashes.manifest.get(name).is_none() {
            warnings.push(format!("the commit message forces a rebuild of `{name}`, which is not in the manifest"));
        }
    }
    // A trusted build reads and writes the project repositories. An untrusted one reads
    // them and its own namespace, and writes only its own: nothing it writes is read by a
    // trusted build.
    let (trusted, own) = if request.offline {
        (None, None)
    } else {
        let trusted = open_registry(&config, request.registry.as_deref(), request.registry_auth)?;
        let own = match trust.level {
            crate::trust::Level::Trusted => None,
            crate::trust::Level::Untrusted => Some(trusted.within(&config.trust.untrusted_prefix)),
        };
        (Some(trusted), own)
    };
    let read: Vec<&dyn ImageStore> = trusted.iter().chain(own.iter()).map(|c| c as &dyn ImageStore).collect();
    let plan = super::decide(&hashes, &selection, &forced, &read, request.test.as_ref(), request.arch).await;
    let trusted_namespace = own.as_ref().and(trusted.as_ref()).map(|c| c.reference().to_string());
    let client = own.or(trusted);
    let unasked = plan.projects.iter().filter(|p| p.reason.starts_with("registry could not be asked")).count();
    if unasked > 0 {
        warnings.push(format!(
            "the registry could not be asked about {unasked} project{}; they are treated as needing a build",
            if unasked == 1 { "" } else { "s" }
        ));
    }
    tracing::debug!(elapsed = ?started.elapsed(), "planned");
    Ok(Planned {
        repo,
        config,
        hashes,
        plan,
        client,
        trust,
        trusted_namespace,
        broken,
        warnings,
    })
}

/// The registry client for these settings: `flag` (e.g. `--registry`), else `[registry] url`.
pub fn open_registry(config: &Config, flag: Option<&str>, auth: Option<AuthMode>) -> Result<Client, PlanningError> {
    let url = flag.or(config.registry.url.as_deref()).ok_or(PlanningError::NoRegistry)?;
    let reference = RegistryRef::parse(url)?;
    let mode = auth.unwrap_or(config.registry.auth);
    let region = reference.ecr_region().or_else(|| config.registry.region.clone());
    let auth = Authenticator::new(mode, region)?;
    Ok(Client::new(reference, &config.registry, auth)?)
}
