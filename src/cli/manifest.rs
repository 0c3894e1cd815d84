//! `spotbuild manifest query` and `spotbuild registry exists`: the read-only questions the
//! Aztec build-system's scripts ask (`query_manifest`, `calculate_content_hash`,
//! `image_exists`), answered from spotbuild's own manifest reading and registry client.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::error::{Error, Exit};
use super::plan::{compute, open_registry};
use crate::plan::planner::PlanRequest;
use crate::settings::{AuthMode, Config};
use crate::registry::ImageStore;

const MANIFEST_AFTER_HELP: &str = "\
Examples:
  spotbuild manifest query buildDir api        the absolute build folder of api
  spotbuild manifest query dependencies api    what api depends on, transitively, sorted
  spotbuild manifest query content-hash api    api's content hash at HEAD (its tag is
                                               cache-<hash>)
  spotbuild manifest create api                join api's cache-<hash>-x86_64 and
                                               cache-<hash>-arm64 images under cache-<hash>

Answers one line per value, like the Aztec build-system's query_manifest. An entry that
cannot be read (or depends on one that cannot) is an error (exit 3); other entries do not
matter.";

#[derive(Debug, Args)]
#[command(about = "Answer questions about the build manifest; join per-arch images in one index", after_help = MANIFEST_AFTER_HELP)]
pub struct ManifestArgs {
    #[command(subcommand)]
    pub command: ManifestCommand,
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Print one field of a project's entry, resolved as the planner reads it.
    Query {
        #[arg(value_enum)]
        field: Field,
        project: String,
        /// The commit to read the manifest at.
        #[arg(long, value_name = "REV", default_value = "HEAD")]
        commit: String,
    },
    /// Join a project's per-architecture images (`cache-<hash>-<arch>`) in one OCI image
    /// index (a Docker manifest list when every image is a Docker v2 manifest) under
    /// `cache-<hash>`, through the registry API. Refused, writing nothing, when an
    /// architecture's image is missing (exit 1, naming it). Creating it again changes
    /// nothing.
    Create {
        project: String,
        /// The architectures to join [default: x86_64 and arm64].
        #[arg(long = "arch", value_name = "ARCH", value_parser = parse_arch)]
        arches: Vec<crate::platform::Arch>,
        /// The commit whose hash names the images.
        #[arg(long, value_name = "REV", default_value = "HEAD")]
        commit: String,
        /// Registry as HOST[:PORT][/PREFIX].
        #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_REGISTRY")]
        registry: Option<String>,
        #[arg(long, value_enum, value_name = "MODE")]
        registry_auth: Option<AuthMode>,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Planning one project (and its dependencies) without asking the registry.
fn one_project_offline(repo_dir: Option<PathBuf>, settings: Option<PathBuf>, project: &str, commit: String) -> PlanRequest {
    PlanRequest::offline(repo_dir, settings, vec![project.to_string()], commit)
}

fn parse_arch(s: &str) -> Result<crate::platform::Arch, String> {
    crate::platform::Arch::parse(s).ok_or_else(|| format!("`{s}` is not an architecture (x86_64 or arm64)"))
}

/// `manifest create`: the project's hash from the plan, then the index from the registry.
async fn create(repo_dir: Option<PathBuf>, config: Option<PathBuf>, command: ManifestCommand) -> Result<Exit, Error> {
    use crate::registry::index::{self, IndexError};
    let ManifestCommand::Create { project, arches, commit, registry, registry_auth, json } = command else {
        unreachable!("called for `manifest create` only")
    };
    let planned = compute(&one_project_offline(repo_dir, config, &project, commit)).await?;
    let hash = planned.hashes.hash_of(&project).expect("a planned project has a hash").to_string();
    let client = open_registry(&planned.config, registry.as_deref(), registry_auth)?;
    let client = match planned.trust.level {
        crate::trust::Level::Trusted => client,
        crate::trust::Level::Untrusted => client.within(&planned.config.trust.untrusted_prefix),
    };
    let mut arches = if arches.is_empty() { crate::platform::Arch::ALL.to_vec() } else { arches };
    arches.sort();
    arches.dedup();
    let repository = client.reference().repository(&project);
    let created = match index::create(&client, &repository, &hash, &arches).await {
        Ok(c) => c,
        Err(e @ IndexError::MissingArch { .. }) => {
            return Err(Error::new(Exit::Failed, e.to_string()).hint("build the missing architecture's image at this commit first; nothing was written"));
        }
        Err(IndexError::Registry(e)) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&created).expect("serialisable"));
    } else {
        let verb = if created.unchanged { "already is" } else { "is now" };
        println!("{}:{} {verb} {} {} of {}", created.repository, created.tag, created.media_type, created.digest, created.children.join(", "));
    }
    Ok(Exit::Success)
}

/// What `manifest query` can print. Paths are absolute unless the name says relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "camelCase")]
pub enum Field {
    /// The docker build context.
    BuildDir,
    /// The project's folder.
    ProjectDir,
    /// The project's folder, relative to the repository root (`.` for the root).
    RelativeProjectDir,
    /// The Dockerfile.
    Dockerfile,
    /// Every project it depends on, transitively, itself excluded, sorted.
    Dependencies,
    /// Itself and everything it depends on, dependencies first.
    AllDependencies,
    /// Itself, then its `runDependencies`.
    RunDependencies,
    /// The rebuild patterns of itself and its dependencies, sorted.
    RebuildPatterns,
    /// `submodulePath`, or nothing.
    SubmodulePath,
    /// `multiarch` (`host`, `buildx`), or `false`.
    Multiarch,
    /// The content hash at the commit.
    #[value(name = "content-hash", alias = "contentHash")]
    ContentHash,
}

pub async fn run(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: ManifestArgs) -> Result<Exit, Error> {
    let (field, project, commit) = match args.command {
        ManifestCommand::Query { field, project, commit } => (field, project, commit),
        create_command @ ManifestCommand::Create { .. } => return create(repo_dir, config, create_command).await,
    };
    let planned = compute(&one_project_offline(repo_dir, config, &project, commit)).await?;
    let m = &planned.hashes.manifest;
    let i = m.position(&project).expect("a planned project is in the manifest");
    let p = &m.projects[i];
    let root = planned.repo.workdir().map(|d| d.to_path_buf()).unwrap_or_default();
    let abs = |rel: &str| root.join(rel).display().to_string().trim_end_matches('/').to_string();
    let closure = planned.hashes.closure(i);
    let lines: Vec<String> = match field {
        Field::BuildDir => vec![abs(&p.build_dir)],
        Field::ProjectDir => vec![abs(&p.project_dir)],
        Field::RelativeProjectDir => vec![if p.project_dir.is_empty() { ".".into() } else { p.project_dir.clone() }],
        Field::Dockerfile => vec![abs(&p.dockerfile_path())],
        Field::Dependencies => {
            let names: BTreeSet<&str> = closure.iter().filter(|&&j| j != i).map(|&j| m.projects[j].name.as_str()).collect();
            names.into_iter().map(String::from).collect()
        }
        // The manifest's order puts dependencies first.
        Field::AllDependencies => closure.iter().map(|&j| m.projects[j].name.clone()).collect(),
        Field::RunDependencies => std::iter::once(p.name.clone()).chain(p.run_dependencies.iter().cloned()).collect(),
        Field::RebuildPatterns => {
            let pats: BTreeSet<&str> =
                closure.iter().flat_map(|&j| m.projects[j].patterns.iter().map(|pat| pat.as_str())).collect();
            pats.into_iter().map(String::from).collect()
        }
        Field::SubmodulePath => p.submodule_path.iter().cloned().collect(),
        Field::Multiarch => vec![match &p.multiarch {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "false".into(),
        }],
        Field::ContentHash => vec![planned.hashes.hashes[i].clone()],
    };
    for l in lines {
        println!("{l}");
    }
    Ok(Exit::Success)
}

const REGISTRY_AFTER_HELP: &str = "\
Examples:
  spotbuild registry exists api cache-0b9d3e7c41f2…   exit 0 if api's repository has the tag

Exit code: 0 the tag exists, 1 it does not, 5 the registry could not be asked.";

#[derive(Debug, Args)]
#[command(about = "Ask the registry about a project's image tags", after_help = REGISTRY_AFTER_HELP)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub command: RegistryCommand,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Whether PROJECT's image repository has TAG (exit 0) or not (exit 1).
    Exists {
        project: String,
        tag: String,
        /// Registry as HOST[:PORT][/PREFIX].
        #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_REGISTRY")]
        registry: Option<String>,
        /// How to authenticate to the registry.
        #[arg(long, value_enum, value_name = "MODE")]
        registry_auth: Option<AuthMode>,
    },
}

pub async fn registry(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: RegistryArgs) -> Result<Exit, Error> {
    let RegistryCommand::Exists {
        project,
        tag,
        registry,
        registry_auth,
    } = args.command;
    let cwd = match repo_dir {
        Some(d) => d,
        None => std::env::current_dir()
            .map_err(|e| Error::new(Exit::Usage, format!("failed to read the current directory: {e}")))?,
    };
    // Outside a repository the settings file can still be named with --config.
    let workdir = crate::git::Repo::discover(&cwd).ok().and_then(|r| r.workdir().map(|d| d.to_path_buf()));
    let config = Config::load(config.as_deref(), workdir.as_deref())?;
    let client = open_registry(&config, registry.as_deref(), registry_auth)?;
    match client.tag_exists(&project, &tag).await {
        Ok(true) => Ok(Exit::Success),
        Ok(false) => Ok(Exit::Failed),
        Err(e) => Err(e.into()),
    }
}
