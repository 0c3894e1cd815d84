//! The versioned wire formats between controller and agent: the job spec the agent is
//! given, and the NDJSON events it reports. Both carry `"v": 1`; a reader refuses a version
//! it does not know instead of guessing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::settings::AuthMode;

/// The version of both the job spec and the event stream.
pub const VERSION: u32 = 1;

/// Exit code of an agent whose job was interrupted (spot reclaim): retry elsewhere.
pub const EXIT_INTERRUPTED: u8 = 6;

// ---------------------------------------------------------------------------------------
// The job
// ---------------------------------------------------------------------------------------

/// Everything the agent needs to turn a commit into pushed images and passed test tags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub v: u32,
    pub build_id: String,
    /// The full commit id to build.
    pub commit: String,
    pub source: Source,
    /// Scratch space: the checkout, pinned Dockerfiles, the events file by default.
    pub workdir: PathBuf,
    /// Where every event is appended [default: `<workdir>/events.ndjson`].
    #[serde(default)]
    pub events_file: Option<PathBuf>,
    pub registry: JobRegistry,
    /// The branch being built; its tag is a cache source and is updated after a build.
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default = "default_main_branch")]
    pub main_branch: String,
    /// Projects in dependency order. Those with `build: false` are already built; they are
    /// listed so that `FROM <project>` can be pinned and their tests run.
    pub projects: Vec<JobProject>,
    /// One-off commands run on the host after the projects (`spotbuild run`).
    #[serde(default)]
    pub run: Vec<JobCommand>,
    #[serde(default)]
    pub cache: CacheSettings,
    /// RFC 3339. Past it, work stops and `shutdown_command` runs.
    #[serde(default)]
    pub deadline: Option<String>,
    /// Run when the deadline passes. Absent: `shutdown -h now`. Empty: nothing.
    #[serde(default)]
    pub shutdown_command: Option<Vec<String>>,
    #[serde(default)]
    pub imds: ImdsSettings,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
}

fn default_main_branch() -> String {
    "main".into()
}
fn default_heartbeat() -> u64 {
    5
}

/// Where the commit's objects come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A repository on this machine that has the commit.
    Repository(PathBuf),
    /// A git bundle, applied on top of `mirror` (a repository baked into the image) if given.
    Bundle {
        path: PathBuf,
        #[serde(default)]
        mirror: Option<PathBuf>,
    },
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRegistry {
    /// `HOST[:PORT][/PREFIX]`.
    pub url: String,
    #[serde(default)]
    pub auth: AuthMode,
    #[serde(default)]
    pub username: Option<String>,
    /// Never logged, never written to a file by the agent.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// For an untrusted job (which writes `url`, its own namespace): the trusted namespace,
    /// `HOST[:PORT][/PREFIX]`, read for the main branch's cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted: Option<String>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRegistry")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobProject {
    pub name: String,
    pub hash: String,
    /// `cache-<hash>`.
    pub tag: String,
    /// Whether to build it (false: it exists in the registry already).
    pub build: bool,
    /// Where its image is when it exists outside the job's own namespace (an untrusted job
    /// takes it from the trusted one): `HOST/REPOSITORY:TAG`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Repo-relative build context.
    pub build_dir: String,
    /// Repo-relative Dockerfile.
    pub dockerfile: String,
    /// Repo-relative project folder (where host test jobs run).
    pub project_dir: String,
    /// Projects this one is built from: if one of them fails, this one is skipped.
    #[serde(default)]
    pub dependencies: Vec<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    #[serde(default)]
    pub tests: Vec<JobTest>,
    /// The architecture its image is built for (`--platform linux/<arch>` when the machine
    /// is another): the build's, for `multiarch: host`. Absent: the machine's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<crate::platform::Arch>,
    /// `host`: its tags carry the architecture (`cache-<hash>-<arch>`, branch tags too);
    /// `buildx`: one `buildx` invocation builds and pushes every platform as an index.
    #[serde(default)]
    pub multiarch: crate::manifest::Multiarch,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTest {
    pub job: String,
    /// `cache-<hash>-<job>`.
    pub tag: String,
    pub command: Vec<String>,
    /// Run on the host (in the project folder) instead of in the image.
    #[serde(default)]
    pub host: bool,
    #[serde(default)]
    pub cpus: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCommand {
    pub name: String,
    pub command: Vec<String>,
}

/// Which builder to use. `auto` detects: buildx with a registry-cache-capable builder,
/// else BuildKit with inline cache, else the classic builder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BuilderChoice {
    #[default]
    Auto,
    Buildx,
    Buildkit,
    Classic,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    #[serde(default)]
    pub builder: BuilderChoice,
    /// The docker client to use [default: detected].
    #[serde(default)]
    pub docker: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImdsSettings {
    pub enabled: bool,
    /// [default: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else `http://169.254.169.254`]
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Treat a rebalance recommendation like an interruption notice.
    #[serde(default)]
    pub stop_on_rebalance: bool,
}

fn default_poll_ms() -> u64 {
    2000
}

impl Default for ImdsSettings {
    fn default() -> Self {
        ImdsSettings {
            enabled: true,
            endpoint: None,
            poll_interval_ms: default_poll_ms(),
            stop_on_rebalance: false,
        }
    }
}

/// What `spotbuild agent info` answers: what this machine offers a controller before it
/// ships anything. A malformed answer is an error, never "no mirror".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's spotbuild version.
    pub version: String,
    /// The commit of the git mirror baked into the image, if it has one: only what it
    /// lacks is shipped.
    pub mirror_commit: Option<String>,
}

/// What `spotbuild agent start` answers: the started agent's process id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStarted {
    pub pid: u32,
}

/// What `spotbuild agent status` answers when the controller has heard nothing for a
/// while: whether the agent's process still runs, and the end of its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub alive: bool,
    /// The last lines of the agent's own log (its stderr), to say why it died.
    pub log_tail: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

/// One line of the event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    /// 1, 2, 3, … with no gaps: a reader that saw `seq` N resumes after N.
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds.
    pub ts: String,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Checkout,
    Pull,
    Build,
    Push,
    Test,
    Run,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
    /// Lines the agent itself says about a step.
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    Interruption,
    Rebalance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failed,
    Interrupted,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Failed => 1,
            Outcome::Interrupted => EXIT_INTERRUPTED,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Hello {
        agent_version: String,
        cpus: usize,
        memory_bytes: u64,
        instance_id: Option<String>,
        /// The builder detected (`buildx`, `buildkit`, `classic`), if docker is needed.
        builder: Option<String>,
    },
    StepStart {
        /// Unique within the job: `<project>:build`, `<project>:test:<job>`, `run:<name>`.
        step: String,
        project: Option<String>,
        kind: StepKind,
    },
    Log {
        step: String,
        stream: Stream,
        line: String,
    },
    StepEnd {
        step: String,
        exit_code: i32,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        cached_layers: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        total_layers: Option<u32>,
    },
    Heartbeat {},
    Notice {
        kind: NoticeKind,
        /// What EC2 will do (`terminate`, `stop`, `hibernate`), for interruptions.
        action: Option<String>,
        /// The time EC2 gave (RFC 3339).
        time: Option<String>,
    },
    Result {
        outcome: Outcome,
        failed_steps: Vec<String>,
        message: Option<String>,
    },
}

impl Event {
    pub fn is_result(&self) -> bool {
        matches!(self, Event::Result { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_flat_with_version_and_seq() {
        let e = Envelope {
            v: VERSION,
            seq: 7,
            ts: "2026-01-01T00:00:00.000Z".into(),
            event: Event::Log {
                step: "a:build".into(),
                stream: Stream::Stdout,
                line: "hi".into(),
            },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"seq":7,"ts":"2026-01-01T00:00:00.000Z","type":"log","step":"a:build","stream":"stdout","line":"hi"}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), e);
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let r = JobRegistry {
            url: "r".into(),
            auth: AuthMode::Basic,
            username: Some("u".into()),
            password: Some("hunter2".into()),
            region: None,
            trusted: None,
        };
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
