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

Answers one line per value, like the Aztec build-system's query_manifest. An entry that
cannot be read (or depends on one that cannot) is an error (exit 3); other entries do not
matter.";

#[derive(Debug, Args)]
#[command(about = "Answer questions about the build manifest, one line per value", after_help = MANIFEST_AFTER_HELP)]
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
    let ManifestCommand::Query { field, project, commit } = args.command;
    let planned = compute(&PlanRequest {
        repo_dir,
        settings: config,
        projects: vec![project.clone()],
        commit,
        offline: true,
        registry: None,
        registry_auth: None,
        test: None,
        force_untrusted: false,
    })
    .await?;
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
