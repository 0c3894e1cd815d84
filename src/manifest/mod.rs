//! The build manifest (`build_manifest.json` or `build_manifest.yml`, compatible with the
//! Aztec build-system): parsing, validation with actionable errors, dependency order, and
//! the canonical form of each entry that feeds the content hash.
//!
//! # Guarantees
//! - One broken entry fails alone: an entry that cannot be read, or that depends (directly
//!   or not) on one that cannot, is listed in [`Manifest::broken`] with its own error, and
//!   every other entry is usable.
//! - The same entries written in JSON or in YAML give the same [`Project`]s.
//! - Nothing is silently resolved: a key repeated with another value breaks its entry, and
//!   what is ignored (a repeat with the same value, an empty dependency name) is a warning.

mod document;
mod pattern;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

pub use document::{Format, SyntaxError};
pub use pattern::{Pattern, PatternError};

/// Where the manifest may live, relative to the repository root. Exactly one may exist.
pub const MANIFEST_FILES: [&str; 2] = ["build_manifest.json", "build_manifest.yml"];

/// Keys a project entry may carry. Aztec's own keys first, then spotbuild's.
const KNOWN_KEYS: &[&str] = &[
    "buildDir",
    "projectDir",
    "dockerfile",
    "rebuildPatterns",
    "dependencies",
    "runDependencies",
    "multiarch",
    "submodulePath",
    "tests",
    "cpus",
    "buildArgs",
    "deploy",
];

const KNOWN_JOB_KEYS: &[&str] = &["command", "cpus", "host"];
const KNOWN_DEPLOY_KEYS: &[&str] = &["command", "env", "timeout"];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("failed to parse {file}: {message} at line {line}, column {column}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("failed to read {file}: the top level must be an object keyed by project name")]
    NotAnObject { file: String },
    #[error("project `{project}`: unknown key `{key}`")]
    UnknownKey {
        project: String,
        key: String,
        suggestion: Option<String>,
    },
    #[error("project `{project}`: `{key}` must be {expected}, found {found}")]
    WrongType {
        project: String,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("project `{project}`: {message}")]
    Invalid { project: String, message: String },
    #[error("project `{project}`: `{key}` {error}")]
    InvalidDir {
        project: String,
        key: &'static str,
        #[source]
        error: DirError,
    },
    #[error("project `{project}`: {file}:{line} sets `{key}` again, to a different value than line {first_line}")]
    RepeatedKey {
        project: String,
        file: String,
        key: String,
        first_line: usize,
        line: usize,
    },
    #[error("project `{project}` depends on unknown project `{dependency}`")]
    UnknownDependency {
        project: String,
        dependency: String,
        suggestion: Option<String>,
    },
    #[error("project `{project}` depends on `{dependency}`, whose entry is invalid")]
    BrokenDependency {
        project: String,
        dependency: String,
        #[source]
        cause: Arc<ManifestError>,
    },
    #[error("dependency cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("project `{project}`: invalid rebuild pattern `{pattern}`{}: {error}", origin.as_deref().map(|o| format!(" ({o})")).unwrap_or_default())]
    InvalidPattern {
        project: String,
        pattern: String,
        /// Where a pattern from a patterns file came from (`file:line`).
        origin: Option<String>,
        error: PatternError,
    },
    #[error("project `{project}`: rebuild patterns file `{path}` does not exist at this commit")]
    MissingPatternsFile { project: String, path: String },
    #[error("project `{project}`: Dockerfile `{path}` does not exist at this commit")]
    MissingDockerfile { project: String, path: String },
    #[error("project `{project}`: dependencies script `{script}` failed")]
    DependencyScript {
        project: String,
        script: String,
        #[source]
        failure: ScriptFailure,
    },
}

/// Why a `buildDir` or `projectDir` cannot name a directory of the repository.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("`{0}` must be relative to the repository root")]
    Absolute(String),
    #[error("`{0}` must stay inside the repository")]
    Escapes(String),
}

/// Why a `dependencies` script gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ScriptFailure {
    #[error("it does not exist at this commit")]
    Missing,
    #[error("failed to start it")]
    Spawn(#[source] std::io::Error),
    #[error("it did not finish within {}", humantime::format_duration(*.0))]
    Timeout(std::time::Duration),
    #[error("it exited with {status}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Exit { status: String, stderr: String },
    #[error("failed to check out commit {commit} to run it: {detail}")]
    Checkout { commit: String, detail: String },
    #[error("its output is not UTF-8")]
    NotUtf8,
}

impl ManifestError {
    /// The project whose entry this error is about, if it is about one.
    pub fn project(&self) -> Option<&str> {
        match self {
            ManifestError::UnknownKey { project, .. }
            | ManifestError::WrongType { project, .. }
            | ManifestError::Invalid { project, .. }
            | ManifestError::InvalidDir { project, .. }
            | ManifestError::RepeatedKey { project, .. }
            | ManifestError::UnknownDependency { project, .. }
            | ManifestError::BrokenDependency { project, .. }
            | ManifestError::InvalidPattern { project, .. }
            | ManifestError::MissingPatternsFile { project, .. }
            | ManifestError::MissingDockerfile { project, .. }
            | ManifestError::DependencyScript { project, .. } => Some(project),
            ManifestError::Cycle { cycle } => cycle.first().map(String::as_str),
            ManifestError::Syntax { .. } | ManifestError::NotAnObject { .. } => None,
        }
    }

    /// A next step for the user, when there is a useful one.
    pub fn hint(&self) -> Option<String> {
        match self {
            ManifestError::UnknownKey {
                suggestion: Some(s),
                ..
            }
            | ManifestError::UnknownDependency {
                suggestion: Some(s),
                ..
            } => Some(format!("did you mean `{s}`?")),
            ManifestError::UnknownKey { .. } => Some(format!(
                "a project entry may only have the keys {}",
                KNOWN_KEYS.join(", ")
            )),
            ManifestError::Cycle { .. } => {
                Some("remove one of these dependencies to break the cycle".into())
            }
            ManifestError::MissingDockerfile { .. } => Some(
                "set `dockerfile` (relative to `buildDir`) or commit the Dockerfile; \
                 an entry nobody builds may also be removed"
                    .into(),
            ),
            ManifestError::MissingPatternsFile { .. } => Some(
                "a string `rebuildPatterns` names a file relative to `projectDir`, one regex per line".into(),
            ),
            ManifestError::RepeatedKey { .. } => Some("keep one of the two lines".into()),
            ManifestError::BrokenDependency { cause, .. } => cause.hint(),
            ManifestError::DependencyScript { failure, .. } => match failure {
                ScriptFailure::Spawn(_) => Some("the script must be executable (`git update-index --chmod=+x`)".into()),
                ScriptFailure::Timeout(_) => Some(format!(
                    "a string `dependencies` is a script relative to `buildDir`, run with `projectDir` \
                     as its argument; it must print one project per line within {}",
                    humantime::format_duration(DEPENDENCY_SCRIPT_TIMEOUT)
                )),
                _ => Some(
                    "a string `dependencies` is a script relative to `buildDir`, run with `projectDir` \
                     as its argument, that prints one project per line"
                        .into(),
                ),
            },
            _ => None,
        }
    }
}

/// How long a `dependencies` script may run.
pub const DEPENDENCY_SCRIPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the manifest reads beyond its own text, at the commit being planned.
pub trait Inputs {
    type Error;
    /// A repo-relative file; `Ok(None)` when it does not exist.
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, Self::Error>;
    /// Runs the repo-relative `script` with `project_dir` as its only argument, from the
    /// script's folder, and returns what it printed.
    fn run_script(&mut self, script: &str, project_dir: &str) -> Result<String, ScriptFailure>;
}

/// No files and no scripts: for manifests that name neither.
pub struct NoInputs;

impl Inputs for NoInputs {
    type Error = std::convert::Infallible;
    fn read_file(&mut self, _: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        Ok(None)
    }
    fn run_script(&mut self, _: &str, _: &str) -> Result<String, ScriptFailure> {
        Err(ScriptFailure::Missing)
    }
}

/// How a project is built for more than one architecture (the `multiarch` key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Multiarch {
    /// One image, built on x86_64 (no `multiarch`, or `false`).
    #[default]
    None,
    /// `host`: built natively on each architecture's machine, each image tagged
    /// `cache-<hash>-<arch>`, joined under `cache-<hash>` by `spotbuild manifest create`.
    Host,
    /// `buildx`: every platform in one `docker buildx build`, pushed as an index under
    /// `cache-<hash>`.
    Buildx,
}

/// A named test job of a project: a command run in the project's built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestJob {
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Run on the instance itself rather than inside the image.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub host: bool,
}

/// What `spotbuild deploy` runs on the CI machine once a project's image is promoted
/// (`terraform apply`, a service restart). Not part of the project's hash: changing how a
/// project is deployed does not rebuild it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployHook {
    pub command: Vec<String>,
    /// Set for the command, besides the `SPOTBUILD_*` variables deploy sets.
    pub env: BTreeMap<String, String>,
    /// Bound on the command [default: `[deploy] hook_timeout`].
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub timeout: Option<std::time::Duration>,
}

mod opt_duration {
    pub fn serialize<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// Where a project's rebuild patterns came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternSource {
    /// `null` or absent: `^<projectDir>/`.
    Default,
    Inline,
    /// A file, repo-relative path.
    File(String),
}

#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    pub build_dir: String,
    pub project_dir: String,
    /// Relative to `build_dir`.
    pub dockerfile: String,
    pub patterns: Vec<Pattern>,
    pub pattern_source: PatternSource,
    pub dependencies: Vec<String>,
    pub run_dependencies: Vec<String>,
    /// The key as written (it is part of the hash as written).
    pub multiarch: Option<Value>,
    /// What it means.
    pub multiarch_kind: Multiarch,
    pub submodule_path: Option<String>,
    pub tests: BTreeMap<String, TestJob>,
    pub cpus: Option<u32>,
    pub build_args: BTreeMap<String, String>,
    pub deploy: Option<DeployHook>,
}

impl Project {
    /// The Dockerfile's repo-relative path.
    pub fn dockerfile_path(&self) -> String {
        join_path(&self.build_dir, &self.dockerfile)
    }

    /// The canonical, order-independent serialisation of this entry, with defaults filled in
    /// and pattern files replaced by their patterns. Two manifests that mean the same thing
    /// give the same bytes. CPU counts are left out: they size the machine, not the result,
    /// and raising them must not rebuild the project and everything that depends on it.
    pub fn canonical(&self) -> String {
        #[derive(Serialize)]
        struct Canonical<'a> {
            name: &'a str,
            build_dir: &'a str,
            project_dir: &'a str,
            /// Repo-relative, so `./Dockerfile` and no `dockerfile` key are the same entry.
            dockerfile: String,
            patterns: Vec<&'a str>,
            dependencies: Vec<&'a str>,
            run_dependencies: Vec<&'a str>,
            multiarch: &'a Option<Value>,
            submodule_path: &'a Option<String>,
            tests: BTreeMap<&'a str, (&'a [String], bool)>,
            build_args: &'a BTreeMap<String, String>,
        }
        let mut patterns: Vec<&str> = self.patterns.iter().map(|p| p.as_str()).collect();
        patterns.sort_unstable();
        patterns.dedup();
        let mut dependencies: Vec<&str> = self.dependencies.iter().map(String::as_str).collect();
        dependencies.sort_unstable();
        let mut run_dependencies: Vec<&str> =
            self.run_dependencies.iter().map(String::as_str).collect();
        run_dependencies.sort_unstable();
        serde_json::to_string(&Canonical {
            name: &self.name,
            build_dir: &self.build_dir,
            project_dir: &self.project_dir,
            dockerfile: self.dockerfile_path(),
            patterns,
            dependencies,
            run_dependencies,
            multiarch: &self.multiarch,
            submodule_path: &self.submodule_path,
            tests: self
                .tests
                .iter()
                .map(|(job, t)| (job.as_str(), (t.command.as_slice(), t.host)))
                .collect(),
            build_args: &self.build_args,
        })
        .expect("a canonical manifest entry always serialises")
    }
}

/// A validated manifest: `projects` are the healthy entries in dependency order (every
/// project after all of its dependencies; ties by name), each of whose dependencies is
/// healthy too; `broken` holds every other entry with the reason.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file it was read from (`build_manifest.json` or `build_manifest.yml`).
    pub file: String,
    pub projects: Vec<Project>,
    pub broken: BTreeMap<String, Arc<ManifestError>>,
    /// What was ignored, for the user to tidy up.
    pub warnings: Vec<String>,
    index: HashMap<String, usize>,
}

impl Manifest {
    /// Parses and validates manifest text. Only a file that cannot be read as a whole is an
    /// error; a bad entry goes to [`Manifest::broken`]. `inputs` reads files at the commit
    /// being planned (rebuild-pattern files) and runs `dependencies` scripts.
    pub fn parse<I: Inputs>(text: &[u8], file: &str, inputs: &mut I) -> Result<Manifest, ParseError<I::Error>> {
        let doc = document::parse(text, Format::of(file)).map_err(|e| ManifestError::Syntax {
            file: file.to_string(),
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        let Value::Object(root) = &doc.root else {
            return Err(ManifestError::NotAnObject {
                file: file.to_string(),
            }
            .into());
        };
        let mut warnings = Vec::new();
        let mut broken: BTreeMap<String, Arc<ManifestError>> = BTreeMap::new();
        for r in &doc.repeats {
            let project = r.path[0].clone();
            let key = if r.path.len() == 1 { "(the whole entry)".to_string() } else { r.path[1..].join(".") };
            if r.same {
                warnings.push(format!(
                    "{file}:{}: project `{project}` sets `{key}` again, to the same value as line {} (ignored)",
                    r.line, r.first_line
                ));
            } else {
                broken.entry(project.clone()).or_insert_with(|| {
                    Arc::new(ManifestError::RepeatedKey {
                        project,
                        file: file.to_string(),
                        key,
                        first_line: r.first_line,
                        line: r.line,
                    })
                });
            }
        }
        let mut projects = Vec::with_capacity(root.len());
        for (name, entry) in root {
            if broken.contains_key(name) {
                continue;
            }
            match parse_project(name, entry, inputs, &mut warnings) {
                Ok(p) => projects.push(p),
                Err(ParseError::Manifest(e)) => {
                    broken.insert(name.clone(), Arc::new(e));
                }
                Err(read) => return Err(read),
            }
        }
        let mut manifest = Manifest::from_projects(projects, broken);
        manifest.file = file.to_string();
        manifest.warnings = warnings;
        Ok(manifest)
    }

    /// Validates dependencies and orders projects. A project with an unknown dependency, in
    /// a cycle, or depending on a broken one, joins `broken`.
    pub fn from_projects(projects: Vec<Project>, mut broken: BTreeMap<String, Arc<ManifestError>>) -> Manifest {
        let mut healthy: BTreeMap<String, Project> = BTreeMap::new();
        let names: BTreeSet<String> = projects.iter().map(|p| p.name.clone()).chain(broken.keys().cloned()).collect();
        for p in projects {
            let unknown = p.dependencies.iter().chain(&p.run_dependencies).find(|d| !names.contains(*d));
            match unknown {
                Some(dep) => {
                    let e = ManifestError::UnknownDependency {
                        project: p.name.clone(),
                        dependency: dep.clone(),
                        suggestion: closest(dep, names.iter().map(String::as_str)),
                    };
                    broken.insert(p.name.clone(), Arc::new(e));
                }
                None => {
                    healthy.insert(p.name.clone(), p);
                }
            }
        }
        let order = loop {
            spread_breakage(&mut healthy, &mut broken);
            let by_name: BTreeMap<&str, &Project> = healthy.iter().map(|(n, p)| (n.as_str(), p)).collect();
            match dependency_order(&by_name) {
                Ok(order) => break order,
                Err(cycle) => {
                    let e = Arc::new(ManifestError::Cycle { cycle: cycle.clone() });
                    for member in &cycle {
                        if let Some(p) = healthy.remove(member) {
                            broken.insert(p.name, e.clone());
                        }
                    }
                }
            }
        };
        let projects: Vec<Project> = order
            .iter()
            .map(|n| healthy.remove(n).expect("ordered names come from the healthy projects"))
            .collect();
        let index = projects
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Manifest {
            file: MANIFEST_FILES[0].to_string(),
            projects,
            broken,
            warnings: Vec::new(),
            index,
        }
    }

    /// Moves `name` (and what depends on it) to `broken`, e.g. when its Dockerfile is not
    /// at the commit.
    pub fn mark_broken(&mut self, errors: Vec<ManifestError>) {
        if errors.is_empty() {
            return;
        }
        let mut broken = std::mem::take(&mut self.broken);
        let mut projects: Vec<Project> = std::mem::take(&mut self.projects);
        for e in errors {
            let name = e.project().expect("entry errors name their project").to_string();
            projects.retain(|p| p.name != name);
            broken.insert(name, Arc::new(e));
        }
        let rebuilt = Manifest::from_projects(projects, broken);
        self.projects = rebuilt.projects;
        self.broken = rebuilt.broken;
        self.index = rebuilt.index;
    }

    pub fn get(&self, name: &str) -> Option<&Project> {
        self.index.get(name).map(|&i| &self.projects[i])
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The closest project name to `name`, for did-you-mean hints.
    pub fn suggest(&self, name: &str) -> Option<String> {
        closest(name, self.projects.iter().map(|p| p.name.as_str()).chain(self.broken.keys().map(String::as_str)))
    }
}

/// Moves every healthy project that depends on a broken one to `broken`, until none is left.
fn spread_breakage(healthy: &mut BTreeMap<String, Project>, broken: &mut BTreeMap<String, Arc<ManifestError>>) {
    loop {
        let newly: Vec<(String, String)> = healthy
            .values()
            .filter_map(|p| {
                p.dependencies
                    .iter()
                    .chain(&p.run_dependencies)
                    .find(|d| broken.contains_key(*d))
                    .map(|d| (p.name.clone(), d.clone()))
            })
            .collect();
        if newly.is_empty() {
            return;
        }
        for (name, dep) in newly {
            healthy.remove(&name);
            let cause = broken[&dep].clone();
            broken.insert(
                name.clone(),
                Arc::new(ManifestError::BrokenDependency {
                    project: name,
                    dependency: dep,
                    cause,
                }),
            );
        }
    }
}

/// A manifest error, or a failure of the caller's file reader.
#[derive(Debug, thiserror::Error)]
pub enum ParseError<E> {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Read(E),
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_project<I: Inputs>(
    name: &str,
    entry: &Value,
    inputs: &mut I,
    warnings: &mut Vec<String>,
) -> Result<Project, ParseError<I::Error>> {
    let wrong = |key: &str, expected: &'static str, v: &Value| ManifestError::WrongType {
        project: name.to_string(),
        key: key.to_string(),
        expected,
        found: type_name(v),
    };
    let invalid = |message: String| ManifestError::Invalid {
        project: name.to_string(),
        message,
    };
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(invalid(format!(
            "`{name}` is not a valid project name (no slashes, spaces, or empty names)"
        ))
        .into());
    }
    let Value::Object(obj) = entry else {
        return Err(ManifestError::WrongType {
            project: name.to_string(),
            key: "(entry)".into(),
            expected: "an object",
            found: type_name(entry),
        }
        .into());
    };
    for key in obj.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(ManifestError::UnknownKey {
                project: name.to_string(),
                key: key.clone(),
                suggestion: closest(key, KNOWN_KEYS.iter().copied()),
            }
            .into());
        }
    }
    let string = |key: &str| -> Result<Option<String>, ManifestError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(wrong(key, "a string", v)),
        }
    };
    let build_dir = string("buildDir")?
        .ok_or_else(|| invalid("`buildDir` is required".into()))?;
    let bad_dir = |key: &'static str| {
        move |error| ManifestError::InvalidDir {
            project: name.to_string(),
            key,
            error,
        }
    };
    let build_dir = normalize_dir(&build_dir).map_err(bad_dir("buildDir"))?;
    let project_dir = match string("projectDir")? {
        Some(d) => normalize_dir(&d).map_err(bad_dir("projectDir"))?,
        None => build_dir.clone(),
    };
    let dockerfile = string("dockerfile")?.unwrap_or_else(|| "Dockerfile".to_string());
    // It may climb out of `buildDir` (Aztec manifests do), but not out of the repository.
    if dockerfile.starts_with('/') || join_path(&build_dir, &dockerfile).starts_with("..") {
        return Err(invalid(format!("`dockerfile` `{dockerfile}` must stay inside the repository")).into());
    }
    let submodule_path = string("submodulePath")?;
    let mut names = |key: &str, list: Vec<String>| -> Vec<String> {
        let (empty, names): (Vec<String>, Vec<String>) = list.into_iter().partition(|d| d.trim().is_empty());
        if !empty.is_empty() {
            warnings.push(format!("project `{name}`: an empty name in `{key}` is ignored"));
        }
        names
    };
    let list = |key: &str, v: Option<&Value>| -> Result<Vec<String>, ManifestError> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong(key, "an array of project names", other)),
                })
                .collect(),
            Some(v) => Err(wrong(key, "an array of project names, a script, or null", v)),
        }
    };
    let dependencies = match obj.get("dependencies") {
        // A script relative to `buildDir`, given `projectDir`, printing one name per line.
        Some(Value::String(script)) => {
            let path = join_path(&build_dir, script);
            let out = inputs.run_script(&path, &project_dir).map_err(|failure| ManifestError::DependencyScript {
                project: name.to_string(),
                script: path.clone(),
                failure,
            })?;
            out.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
        }
        other => names("dependencies", list("dependencies", other)?),
    };
    let run_dependencies = names("runDependencies", list("runDependencies", obj.get("runDependencies"))?);
    let cpus = match obj.get("cpus") {
        None | Some(Value::Null) => None,
        Some(v) => Some(positive_u32(v).ok_or_else(|| wrong("cpus", "a positive integer", v))?),
    };
    let multiarch_kind = match obj.get("multiarch") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Multiarch::None,
        Some(Value::String(s)) if s == "host" => Multiarch::Host,
        Some(Value::String(s)) if s == "buildx" => Multiarch::Buildx,
        // Read as the native build, the Aztec build-system's meaning of a bare flag.
        Some(Value::Bool(true)) => Multiarch::Host,
        Some(Value::String(s)) => return Err(invalid(format!("`multiarch` must be `host` or `buildx`, not `{s}`")).into()),
        Some(v) => return Err(wrong("multiarch", "`host`, `buildx` or false", v).into()),
    };
    let build_args = match obj.get("buildArgs") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(wrong("buildArgs", "an object of strings", other)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => Err(wrong("buildArgs", "an object of strings", v))?,
    };
    let tests = match obj.get("tests") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => parse_tests(name, m)?,
        Some(v) => Err(wrong("tests", "an object of named test jobs", v))?,
    };
    let deploy = match obj.get("deploy") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(parse_deploy(name, m)?),
        Some(v) => Err(wrong("deploy", "an object with a `command`", v))?,
    };

    let (patterns, pattern_source) = match obj.get("rebuildPatterns") {
        None | Some(Value::Null) => {
            // A project at the repository root owns every path.
            let text = if project_dir.is_empty() {
                "^".to_string()
            } else {
                format!("^{}/", regex_syntax::escape(&project_dir))
            };
            let p = Pattern::new(&text).map_err(|error| ManifestError::InvalidPattern {
                project: name.to_string(),
                pattern: text.clone(),
                origin: None,
                error,
            })?;
            (vec![p], PatternSource::Default)
        }
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for v in items {
                let Value::String(text) = v else {
                    return Err(wrong("rebuildPatterns", "an array of regex strings", v).into());
                };
                out.push(Pattern::new(text).map_err(|error| {
                    ManifestError::InvalidPattern {
                        project: name.to_string(),
                        pattern: text.clone(),
                        origin: None,
                        error,
                    }
                })?);
            }
            (out, PatternSource::Inline)
        }
        Some(Value::String(file)) => {
            let path = join_path(&project_dir, file);
            let bytes = inputs
                .read_file(&path)
                .map_err(ParseError::Read)?
                .ok_or_else(|| ManifestError::MissingPatternsFile {
                    project: name.to_string(),
                    path: path.clone(),
                })?;
            let text = String::from_utf8_lossy(&bytes);
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                out.push(
                    Pattern::new(line).map_err(|error| ManifestError::InvalidPattern {
                        project: name.to_string(),
                        pattern: line.to_string(),
                        origin: Some(format!("{path}:{}", i + 1)),
                        error,
                    })?,
                );
            }
            (out, PatternSource::File(path))
        }
        Some(v) => {
            return Err(wrong(
                "rebuildPatterns",
                "an array of regexes, a patterns file name, or null",
                v,
            )
            .into())
        }
    };

    Ok(Project {
        name: name.to_string(),
        build_dir,
        project_dir,
        dockerfile,
        patterns,
        pattern_source,
        dependencies,
        run_dependencies,
        multiarch: obj.get("multiarch").cloned().filter(|v| !v.is_null()),
        multiarch_kind,
        submodule_path,
        tests,
        cpus,
        build_args,
        deploy,
    })
}

fn parse_deploy(project: &str, spec: &Map<String, Value>) -> Result<DeployHook, ManifestError> {
    let wrong = |key: &str, expected: &'static str, v: &Value| ManifestError::WrongType {
        project: project.to_string(),
        key: format!("deploy.{key}"),
        expected,
        found: type_name(v),
    };
    for k in spec.keys() {
        if !KNOWN_DEPLOY_KEYS.contains(&k.as_str()) {
            return Err(ManifestError::UnknownKey {
                project: project.to_string(),
                key: format!("deploy.{k}"),
                suggestion: closest(k, KNOWN_DEPLOY_KEYS.iter().copied()).map(|s| format!("deploy.{s}")),
            });
        }
    }
    let command = match spec.get("command") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong("command", "an array of strings", other)),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => return Err(wrong("command", "a non-empty array of strings", v)),
        None => {
            return Err(ManifestError::Invalid {
                project: project.to_string(),
                message: "`deploy` needs a `command` (an array of strings)".into(),
            })
        }
    };
    let env = match spec.get("env") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) if valid_env_name(k) => Ok((k.clone(), s.clone())),
                Value::String(_) => Err(ManifestError::Invalid {
                    project: project.to_string(),
                    message: format!("`deploy.env`: `{k}` is not a variable name (letters, digits and `_`, not starting with a digit)"),
                }),
                other => Err(wrong("env", "an object of strings", other)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong("env", "an object of strings", v)),
    };
    let timeout = match spec.get("timeout") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(humantime::parse_duration(s).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
            ManifestError::Invalid {
                project: project.to_string(),
                message: format!("`deploy.timeout` `{s}` is not a duration such as \"10m\""),
            }
        })?),
        Some(v) => return Err(wrong("timeout", "a duration such as \"10m\"", v)),
    };
    Ok(DeployHook { command, env, timeout })
}

fn valid_env_name(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty() && !b[0].is_ascii_digit() && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn parse_tests(project: &str, jobs: &Map<String, Value>) -> Result<BTreeMap<String, TestJob>, ManifestError> {
    let mut out = BTreeMap::new();
    for (job, spec) in jobs {
        let key = format!("tests.{job}");
        let wrong = |key: &str, expected: &'static str, v: &Value| ManifestError::WrongType {
            project: project.to_string(),
            key: key.to_string(),
            expected,
            found: type_name(v),
        };
        if !valid_job_name(job) {
            return Err(ManifestError::Invalid {
                project: project.to_string(),
                message: format!(
                    "test job name `{job}` must be 1-40 characters of a-z, 0-9, `_`, `.` or `-` \
                     (it becomes part of an image tag)"
                ),
            });
        }
        let Value::Object(spec) = spec else {
            return Err(wrong(&key, "an object with a `command`", spec));
        };
        for k in spec.keys() {
            if !KNOWN_JOB_KEYS.contains(&k.as_str()) {
                return Err(ManifestError::UnknownKey {
                    project: project.to_string(),
                    key: format!("{key}.{k}"),
                    suggestion: closest(k, KNOWN_JOB_KEYS.iter().copied())
                        .map(|s| format!("{key}.{s}")),
                });
            }
        }
        let command = match spec.get("command") {
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong(&format!("{key}.command"), "an array of strings", other)),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => return Err(wrong(&format!("{key}.command"), "a non-empty array of strings", v)),
            None => {
                return Err(ManifestError::Invalid {
                    project: project.to_string(),
                    message: format!("`{key}` needs a `command` (an array of strings)"),
                })
            }
        };
        let cpus = match spec.get("cpus") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                positive_u32(v).ok_or_else(|| wrong(&format!("{key}.cpus"), "a positive integer", v))?,
            ),
        };
        let host = match spec.get("host") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(wrong(&format!("{key}.host"), "a boolean", v)),
        };
        out.insert(job.clone(), TestJob { command, cpus, host });
    }
    Ok(out)
}

fn positive_u32(v: &Value) -> Option<u32> {
    v.as_u64().filter(|&n| n > 0).and_then(|n| u32::try_from(n).ok())
}

/// Test job names become the suffix of an image tag (`cache-<hash>-<job>`), whose grammar
/// is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; the length cap leaves room for the hash.
fn valid_job_name(job: &str) -> bool {
    !job.is_empty()
        && job.len() <= 40
        && job
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Repo-relative directory without leading `./` or trailing `/`. `.` and `` mean the root.
fn normalize_dir(dir: &str) -> Result<String, DirError> {
    let d = dir.trim_start_matches("./").trim_end_matches('/');
    if d.starts_with('/') {
        return Err(DirError::Absolute(dir.to_string()));
    }
    if d.split('/').any(|c| c == "..") {
        return Err(DirError::Escapes(dir.to_string()));
    }
    Ok(if d == "." { String::new() } else { d.to_string() })
}

/// `dir/file` with `.` and `..` resolved, so `buildDir: "a", dockerfile: "../d/Dockerfile"`
/// names `d/Dockerfile`. A path that climbs out of the repository keeps its `..` and is then
/// simply not found at the commit.
fn join_path(dir: &str, file: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in dir.split('/').chain(file.split('/')) {
        match c {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The candidate nearest to `word`, if it is near enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    candidates
        .map(|c| (strsim::jaro_winkler(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// Orders projects so that each comes after its dependencies (depth-first, in name order, so
/// the order is stable). Reports the first cycle found, as `[a, b, a]`.
fn dependency_order(projects: &BTreeMap<&str, &Project>) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = projects.keys().map(|&n| (n, Mark::New)).collect();
    let mut order = Vec::with_capacity(projects.len());
    // An explicit stack instead of recursion: a long dependency chain must not overflow.
    for &root in projects.keys() {
        if marks[root] != Mark::New {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(root, 0)];
        marks.insert(root, Mark::Active);
        while let Some(&mut (name, ref mut next)) = stack.last_mut() {
            let deps = &projects[name].dependencies;
            if *next < deps.len() {
                let dep = deps[*next].as_str();
                *next += 1;
                match marks[dep] {
                    Mark::Done => {}
                    Mark::New => {
                        marks.insert(dep, Mark::Active);
                        stack.push((dep, 0));
                    }
                    Mark::Active => {
                        let start = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            stack[start..].iter().map(|(n, _)| n.to_string()).collect();
                        cycle.push(dep.to_string());
                        return Err(cycle);
                    }
                }
            } else {
                marks.insert(name, Mark::Done);
                order.push(name.to_string());
                stack.pop();
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest, or its first error (whole-file, else the first broken entry's).
    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let mut m = Manifest::parse(text.as_bytes(), MANIFEST_FILES[0], &mut NoInputs).map_err(|e| match e {
            ParseError::Manifest(m) => m,
            ParseError::Read(never) => match never {},
        })?;
        match m.broken.pop_first() {
            Some((_, e)) => Err(Arc::try_unwrap(e).unwrap_or_else(|e| rebuild(&e))),
            None => Ok(m),
        }
    }

    /// A copy of a shared error for assertions (messages and hints).
    fn rebuild(e: &ManifestError) -> ManifestError {
        match e {
            ManifestError::Cycle { cycle } => ManifestError::Cycle { cycle: cycle.clone() },
            other => ManifestError::Invalid { project: String::new(), message: other.to_string() },
        }
    }

    #[test]
    fn defaults_follow_the_aztec_build_system() {
        let m = parse(r#"{"a": {"buildDir": "a/", "rebuildPatterns": null, "dependencies": null}}"#)
            .unwrap();
        let a = m.get("a").unwrap();
        assert_eq!(a.project_dir, "a");
        assert_eq!(a.dockerfile_path(), "a/Dockerfile");
        assert_eq!(a.patterns[0].as_str(), "^a/");
        assert!(a.dependencies.is_empty());
    }

    #[test]
    fn deploy_hooks_are_read_checked_and_left_out_of_the_hash() {
        let with = parse(
            r#"{"a": {"buildDir": "a", "deploy": {"command": ["terraform", "apply"], "env": {"TF_IN_AUTOMATION": "1"}, "timeout": "15m"}}}"#,
        )
        .unwrap();
        let hook = with.get("a").unwrap().deploy.clone().unwrap();
        assert_eq!(hook.command, ["terraform", "apply"]);
        assert_eq!(hook.env["TF_IN_AUTOMATION"], "1");
        assert_eq!(hook.timeout, Some(std::time::Duration::from_secs(900)));
        let without = parse(r#"{"a": {"buildDir": "a"}}"#).unwrap();
        assert_eq!(with.get("a").unwrap().canonical(), without.get("a").unwrap().canonical());
        for bad in [
            r#"{"command": []}"#,
            r#"{"env": {}}"#,
            r#"{"command": ["x"], "env": {"1X": "y"}}"#,
            r#"{"command": ["x"], "timeout": "soon"}"#,
            r#"{"command": ["x"], "comand": ["y"]}"#,
            r#"["x"]"#,
        ] {
            let text = format!(r#"{{"a": {{"buildDir": "a", "deploy": {bad}}}}}"#);
            assert!(parse(&text).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn joined_paths_are_normalised() {
        assert_eq!(join_path("a", "../d/Dockerfile"), "d/Dockerfile");
        assert_eq!(join_path("a/b", "../d"), "a/d");
        assert_eq!(join_path("", "./Dockerfile"), "Dockerfile");
        assert_eq!(join_path("a", "../../x"), "../x");
    }

    #[test]
    fn projects_come_after_their_dependencies() {
        let m = parse(
            r#"{"c": {"buildDir": "c", "dependencies": ["b"]},
                "b": {"buildDir": "b", "dependencies": ["a"]},
                "a": {"buildDir": "a"}, "d": {"buildDir": "d"}}"#,
        )
        .unwrap();
        let names: Vec<_> = m.projects.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }

    #[test]
    fn cycles_are_printed_in_full() {
        let e = parse(
            r#"{"a": {"buildDir": "a", "dependencies": ["b"]},
                "b": {"buildDir": "b", "dependencies": ["c"]},
                "c": {"buildDir": "c", "dependencies": ["a"]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "dependency cycle: a -> b -> c -> a");
        let e = parse(r#"{"a": {"buildDir": "a", "dependencies": ["a"]}}"#).unwrap_err();
        assert_eq!(e.to_string(), "dependency cycle: a -> a");
    }

    #[test]
    fn unknown_keys_and_dependencies_suggest_the_closest_name() {
        let e = parse(r#"{"a": {"buildDir": "a", "rebuildPattern": []}}"#).unwrap_err();
        assert_eq!(e.hint().as_deref(), Some("did you mean `rebuildPatterns`?"));
        let e = parse(r#"{"alpha": {"buildDir": "a"}, "b": {"buildDir": "b", "dependencies": ["alpah"]}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown project `alpah`"), "{e}");
        assert_eq!(e.hint().as_deref(), Some("did you mean `alpha`?"));
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let e = parse("{\n  \"a\": {\"buildDir\": \"a\",}\n}").unwrap_err();
        let ManifestError::Syntax { line, column, .. } = e else { panic!("{e:?}") };
        assert_eq!((line, column), (2, 25));
    }

    #[test]
    fn canonical_form_ignores_order_but_not_meaning() {
        let a = parse(r#"{"x": {"buildDir": "x", "rebuildPatterns": ["^x/", "^y/"], "dependencies": ["p", "q"]}, "p": {"buildDir": "p"}, "q": {"buildDir": "q"}}"#).unwrap();
        let b = parse(r#"{"q": {"buildDir": "q"}, "p": {"buildDir": "p"}, "x": {"dependencies": ["q", "p"], "rebuildPatterns": ["^y/", "^x/"], "buildDir": "x/"}}"#).unwrap();
        assert_eq!(a.get("x").unwrap().canonical(), b.get("x").unwrap().canonical());
        let c = parse(r#"{"x": {"buildDir": "x", "rebuildPatterns": ["^x/"]}}"#).unwrap();
        assert_ne!(a.get("x").unwrap().canonical(), c.get("x").unwrap().canonical());
    }

    #[test]
    fn cpu_counts_size_the_machine_and_do_not_change_the_entry() {
        let a = parse(r#"{"x": {"buildDir": "x", "cpus": 16, "tests": {"t": {"command": ["a"], "cpus": 2}}}}"#).unwrap();
        let b = parse(r#"{"x": {"buildDir": "x", "cpus": 64, "tests": {"t": {"command": ["a"], "cpus": 8}}}}"#).unwrap();
        assert_eq!(a.get("x").unwrap().canonical(), b.get("x").unwrap().canonical());
        let c = parse(r#"{"x": {"buildDir": "x", "tests": {"t": {"command": ["b"]}}}}"#).unwrap();
        assert_ne!(a.get("x").unwrap().canonical(), c.get("x").unwrap().canonical());
    }

    #[test]
    fn run_dependencies_must_name_projects() {
        let e = parse(r#"{"alpha": {"buildDir": "a"}, "b": {"buildDir": "b", "runDependencies": ["alpah"]}}"#)
            .unwrap_err();
        assert_eq!(e.hint().as_deref(), Some("did you mean `alpha`?"));
    }

    #[test]
    fn test_jobs_are_validated() {
        let m = parse(r#"{"a": {"buildDir": "a", "tests": {"unit": {"command": ["make", "test"], "cpus": 4}}}}"#).unwrap();
        assert_eq!(m.get("a").unwrap().tests["unit"].command, ["make", "test"]);
        assert!(parse(r#"{"a": {"buildDir": "a", "tests": {"Unit Tests": {"command": ["x"]}}}}"#).is_err());
        assert!(parse(r#"{"a": {"buildDir": "a", "tests": {"unit": {}}}}"#).is_err());
        let e = parse(r#"{"a": {"buildDir": "a", "tests": {"unit": {"comand": ["x"]}}}}"#).unwrap_err();
        assert_eq!(e.hint().as_deref(), Some("did you mean `tests.unit.command`?"));
    }

    fn parse_all(text: &str, file: &str) -> Manifest {
        Manifest::parse(text.as_bytes(), file, &mut NoInputs).unwrap()
    }

    #[test]
    fn empty_dependency_names_are_ignored_with_a_warning() {
        let m = parse_all(r#"{"a": {"buildDir": "a", "dependencies": [""]}, "b": {"buildDir": "b", "dependencies": ["a", ""]}}"#, "build_manifest.json");
        assert!(m.broken.is_empty(), "{:?}", m.broken);
        assert_eq!(m.get("b").unwrap().dependencies, ["a"]);
        assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
        assert!(m.warnings[0].contains("project `a`: an empty name in `dependencies` is ignored"), "{:?}", m.warnings);
    }

    #[test]
    fn a_broken_entry_fails_alone_and_takes_its_dependents_with_it() {
        let m = parse_all(
            r#"{"bad": {"buildDir": "bad", "cpus": "lots"}, "uses-bad": {"buildDir": "u", "dependencies": ["bad"]},
                "typo": {"buildDir": "t", "dependencies": ["nope"]}, "c1": {"buildDir": "c1", "dependencies": ["c2"]},
                "c2": {"buildDir": "c2", "dependencies": ["c1"]}, "ok": {"buildDir": "ok"}, "ok2": {"buildDir": "ok2", "dependencies": ["ok"]}}"#,
            "build_manifest.json",
        );
        let names: Vec<_> = m.projects.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ok", "ok2"]);
        let broken: Vec<_> = m.broken.keys().map(String::as_str).collect();
        assert_eq!(broken, ["bad", "c1", "c2", "typo", "uses-bad"]);
        assert!(matches!(*m.broken["uses-bad"], ManifestError::BrokenDependency { ref dependency, .. } if dependency == "bad"));
        assert!(matches!(*m.broken["c1"], ManifestError::Cycle { .. }));
        assert!(matches!(*m.broken["typo"], ManifestError::UnknownDependency { .. }));
        let chain = crate::errors::error_chain(m.broken["uses-bad"].as_ref());
        assert!(chain.contains("`cpus` must be a positive integer"), "{chain}");
    }

    #[test]
    fn dockerfiles_may_climb_out_of_the_build_dir_but_not_the_repository() {
        let m = parse_all(r#"{"a": {"buildDir": "x/y/z", "dockerfile": "../../../d/Dockerfile"}, "b": {"buildDir": ".", "dockerfile": "../Dockerfile"}, "c": {"buildDir": "."}}"#, "build_manifest.json");
        assert_eq!(m.get("a").unwrap().dockerfile_path(), "d/Dockerfile");
        assert_eq!(m.get("c").unwrap().dockerfile_path(), "Dockerfile");
        assert_eq!(m.get("c").unwrap().build_dir, "");
        let e = m.broken["b"].to_string();
        assert!(e.contains("must stay inside the repository"), "{e}");
    }

    #[test]
    fn repeated_keys_warn_when_equal_and_break_the_entry_when_not() {
        let yaml = "a:\n  buildDir: a\n  buildDir: a\nb:\n  buildDir: b\n  dockerfile: X\n  dockerfile: Y\nc:\n  buildDir: c\n";
        let m = parse_all(yaml, "build_manifest.yml");
        assert_eq!(m.warnings, ["build_manifest.yml:3: project `a` sets `buildDir` again, to the same value as line 2 (ignored)"]);
        assert_eq!(
            m.broken["b"].to_string(),
            "project `b`: build_manifest.yml:7 sets `dockerfile` again, to a different value than line 6"
        );
        assert!(m.get("a").is_some() && m.get("c").is_some());
    }

    #[test]
    fn json_and_yaml_entries_have_the_same_canonical_form() {
        let json = r#"{"api": {"buildDir": "api", "rebuildPatterns": ["^api/", "^lib/"], "dependencies": ["base"], "cpus": 8,
                       "tests": {"unit": {"command": ["make", "test"]}}}, "base": {"buildDir": "base"}}"#;
        let yaml = "base:\n  buildDir: base\napi:\n  buildDir: api\n  rebuildPatterns: ['^api/', '^lib/']\n  dependencies: [base]\n  cpus: 8\n  tests:\n    unit:\n      command: [make, test]\n";
        let (j, y) = (parse_all(json, "build_manifest.json"), parse_all(yaml, "build_manifest.yml"));
        for name in ["api", "base"] {
            assert_eq!(j.get(name).unwrap().canonical(), y.get(name).unwrap().canonical());
        }
    }

    #[test]
    fn yaml_syntax_errors_give_line_and_column() {
        let e = Manifest::parse(b"a:\n  buildDir: a\n  - x\n", "build_manifest.yml", &mut NoInputs).unwrap_err();
        let ParseError::Manifest(ManifestError::Syntax { line, column, .. }) = e else { panic!("{e:?}") };
        // At the `x` of `  - x`: a sequence entry where a mapping key was expected.
        assert_eq!((line, column), (3, 5));
    }

    #[test]
    fn wrong_types_name_the_key_and_what_was_found() {
        let e = parse(r#"{"a": {"buildDir": "a", "dependencies": 5}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "project `a`: `dependencies` must be an array of project names, a script, or null, found a number"
        );
        assert!(parse(r#"{"a": {"buildDir": "../a"}}"#).is_err());
        assert!(parse(r#"{"a": {}}"#).is_err());
        assert!(parse("[]").is_err());
    }
}
