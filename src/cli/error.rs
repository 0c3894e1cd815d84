//! The user-facing error: what happened, the documented exit code, and what to do next.
//!
//! Expected failures (bad input, an unreachable service) become an [`Error`] with an
//! [`Exit`] code and hints. Bugs are panics, which exit with 101.

use std::fmt::Write as _;

use crate::git::GitError;
use crate::settings::ConfigError;
use crate::manifest::ManifestError;
use crate::errors::error_chain;
use crate::farm::{BuildError, BuildRecord, BuildResult, StopSignal};
use crate::plan::planner::PlanningError;
use crate::plan::PlanError;
use crate::registry::RegistryError;

/// Documented exit codes: [`EXIT_TABLE`] says what each means, and the README's table and
/// `EXIT_CODES_HELP` are tested against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success,
    /// A build or test failed (the work ran and said no).
    Failed,
    /// The command line was wrong: unknown flag or project, missing setting.
    Usage,
    /// `build_manifest.json`, a patterns file, or `spotbuild.toml` is invalid.
    InvalidInput,
    /// The repository, a revision, or an object could not be read.
    Git,
    /// The registry was needed and could not be used.
    Registry,
    /// The work was interrupted (a spot reclaim) and may be retried.
    Interrupted,
    /// The cloud API refused or failed a request that has no safe fallback.
    Cloud,
    /// `deploy` refused: the graph at the commit is not green (nothing was touched).
    NotGreen,
    /// Stopped by SIGINT (instances were terminated first).
    Sigint,
    /// Stopped by SIGTERM, e.g. a cancelled CI job (instances were terminated first).
    Sigterm,
    /// A command run on the user's behalf ended with this code, passed on as it is
    /// (`agent fetch -- CMD`).
    Command(u8),
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::InvalidInput => 3,
            Exit::Git => 4,
            Exit::Registry => 5,
            Exit::Interrupted => 6,
            Exit::Cloud => 7,
            Exit::NotGreen => 8,
            Exit::Sigint => 130,
            Exit::Sigterm => 143,
            Exit::Command(code) => code,
        }
    }
}

/// Every documented exit code and what it means (Markdown), in the README's order: the
/// README's "Exit codes" table is exactly this (a test checks it).
pub const EXIT_TABLE: &[(&str, &str)] = &[
    ("0", "success"),
    ("1", "a build or test failed"),
    ("2", "usage error (bad arguments, unknown project, missing setting)"),
    ("3", "invalid `build_manifest.json`/`.yml`, patterns file or `spotbuild.toml`; or, planning everything, some entries could not be planned (the others were)"),
    ("4", "git error (not a repository, unknown revision, object missing from the clone), wherever it happens, also when re-planning between attempts"),
    ("5", "registry error where no safe fallback exists, wherever it happens, also when re-planning between attempts"),
    ("6", "interrupted by a spot interruption notice (remote: on every attempt); retrying is safe"),
    ("7", "cloud API error (permissions, configuration, unreachable), or a remote build ended by an error another attempt would not fix"),
    ("8", "`deploy` refused: a `cache-<hash>` or test success tag is missing at the commit (each is listed); nothing was touched"),
    ("101", "internal error (a bug: please report it)"),
    ("130, 143", "stopped by SIGINT, SIGTERM (the build's instances were terminated first)"),
];

/// The README's exit-code table, as [`EXIT_TABLE`] renders it.
pub fn exit_table_markdown() -> String {
    let mut s = String::from("| code | meaning |\n|---|---|\n");
    for (code, meaning) in EXIT_TABLE {
        let _ = writeln!(s, "| {code} | {meaning} |");
    }
    s
}

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    a build or test failed
  2    usage error (bad arguments, unknown project, missing setting)
  3    invalid build_manifest.json/.yml, patterns file or spotbuild.toml (also: some
       entries could not be planned while the others were)
  4    git error (not a repository, unknown revision, object missing from the clone),
       also when re-planning between attempts
  5    registry error where no safe fallback exists, also when re-planning
  6    interrupted (spot interruption notice); retrying is safe
  7    cloud API error (permissions, configuration, unreachable), or a remote build
       that could not finish for a reason another attempt would not fix
  8    deploy refused: the graph is not green (what is missing is listed;
       nothing was touched)
  130  stopped by SIGINT; 143 stopped by SIGTERM (instances terminated first)
  101  internal error (a bug: please report it)";

#[derive(Debug)]
pub struct Error {
    pub exit: Exit,
    pub message: String,
    pub hints: Vec<String>,
    /// The library error this came from, kept for `SPOTBUILD_LOG=debug` and for callers.
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    pub fn new(exit: Exit, message: impl Into<String>) -> Error {
        Error {
            exit,
            message: message.into(),
            hints: Vec::new(),
            source: None,
        }
    }

    /// An error for `source`, its message the whole chain of causes.
    pub fn of(exit: Exit, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        let mut e = Error::new(exit, error_chain(&source));
        e.source = Some(Box::new(source));
        e
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Error {
        self.hints.push(hint.into());
        self
    }

    fn hint_opt(self, hint: Option<String>) -> Error {
        match hint {
            Some(h) => self.hint(h),
            None => self,
        }
    }

    /// `error: …` followed by one `(hint: …)` line per hint.
    pub fn render(&self) -> String {
        let mut s = format!("error: {}\n", self.message);
        for h in &self.hints {
            let _ = writeln!(s, "  (hint: {h})");
        }
        s
    }
}

impl From<GitError> for Error {
    fn from(e: GitError) -> Error {
        let hint = match &e {
            GitError::Open { .. } => Some("run spotbuild inside the repository, or pass -C DIR".to_string()),
            GitError::Revision { .. } => {
                Some("fetch the commit first (e.g. `git fetch origin <sha>`), or check the spelling".into())
            }
            GitError::MissingBlob { .. } => Some(
                "a blobless clone has only the checked-out commit's files; fetch the commit or plan HEAD".into(),
            ),
            GitError::Read { .. } => None,
        };
        Error::of(Exit::Git, e).hint_opt(hint)
    }
}

impl From<&ManifestError> for Error {
    fn from(e: &ManifestError) -> Error {
        let hint = e.hint();
        Error::new(Exit::InvalidInput, error_chain(e)).hint_opt(hint)
    }
}

impl From<ManifestError> for Error {
    fn from(e: ManifestError) -> Error {
        let hint = e.hint();
        Error::of(Exit::InvalidInput, e).hint_opt(hint)
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::of(Exit::InvalidInput, e)
    }
}

impl From<RegistryError> for Error {
    fn from(e: RegistryError) -> Error {
        let exit = Exit::of_registry(&e);
        let hint = e.hint();
        Error::of(exit, e).hint_opt(hint)
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        match e {
            PlanError::Git(g) => g.into(),
            PlanError::Manifest(m) => m.into(),
            PlanError::NoManifest { .. } => Error::of(Exit::InvalidInput, e)
                .hint("spotbuild plans monorepos described by a build_manifest.json (or .yml) at the repository root; see the README"),
            PlanError::TwoManifests { .. } => Error::of(Exit::InvalidInput, e)
                .hint("keep one of the two files: spotbuild would not know which one CI meant"),
            PlanError::BrokenProject(m) => Error::from(m.as_ref()),
            PlanError::UnknownProject { ref suggestion, .. } => {
                let hint = suggestion
                    .as_ref()
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| "`spotbuild plan --offline` lists every project".into());
                Error::of(Exit::Usage, e).hint(hint)
            }
            PlanError::NotForArch { .. } => Error::of(Exit::Usage, e)
                .hint("build it with --arch x86_64, or give it `multiarch: host` (built on each architecture) or `multiarch: buildx`"),
        }
    }
}

impl From<PlanningError> for Error {
    fn from(e: PlanningError) -> Error {
        match e {
            PlanningError::Git(g) => g.into(),
            PlanningError::Settings(c) => c.into(),
            PlanningError::Plan(p) => p.into(),
            PlanningError::Registry(r) => r.into(),
            PlanningError::NoRegistry => Error::of(Exit::Usage, e)
                .hint("pass --registry HOST[:PORT][/PREFIX], set SPOTBUILD_REGISTRY, or set `[registry] url` in spotbuild.toml")
                .hint("or plan with --offline to compute hashes only"),
            PlanningError::CurrentDir(_) => Error::of(Exit::Usage, e),
            PlanningError::Task(_) => Error::of(Exit::Failed, e),
        }
    }
}

impl From<BuildError> for Error {
    fn from(e: BuildError) -> Error {
        match e {
            BuildError::MissingSettings(_) => Error::of(Exit::Usage, e)
                .hint("set them (see `terraform output spotbuild_toml`), or build here with --local"),
            BuildError::NoPools(_) => Error::of(Exit::Usage, e)
                .hint("add types of that size to [cloud] instance_types ([cloud.arm64] for arm64), allow a range (--cpus 48-96), or set [cloud] sizes = \"at-least\""),
            BuildError::LocalDir(_) => Error::of(Exit::Failed, e),
            BuildError::Replan { source, .. } => source.into(),
            BuildError::NoUntrustedProfile(_) => Error::of(Exit::Usage, e)
                .hint("set [cloud] untrusted_instance_profile (`terraform output untrusted_instance_profile`), or build a trusted ref ([trust] trusted_branches)"),
            BuildError::Settings(ref c) => {
                let hint = match c {
                    crate::settings::SettingsConflict::TtlTooShort { .. } => {
                        "raise [cloud] ttl in spotbuild.toml or lower --timeout: an instance must outlive the longest build it may run"
                    }
                    crate::settings::SettingsConflict::SilenceTooShort { .. } => "raise [remote] agent_silence or lower [remote] agent_heartbeat",
                };
                Error::of(Exit::Usage, e).hint(hint)
            }
        }
    }
}

impl Exit {
    /// A build stopped by a signal exits as a shell reports it.
    pub fn of_signal(s: StopSignal) -> Exit {
        match s {
            StopSignal::Interrupt => Exit::Sigint,
            StopSignal::Terminate => Exit::Sigterm,
        }
    }

    /// The one table from a build's results to its exit code: the worst group decides
    /// (success < interrupted on every attempt < failed < error), and an error keeps the
    /// code of what caused it (a git failure while re-planning is 4, a registry one 5).
    pub fn of_build<'a>(records: impl Iterator<Item = &'a BuildRecord>) -> Exit {
        let exit = |r: &BuildRecord| match r.result {
            BuildResult::Success => Exit::Success,
            BuildResult::Failed => Exit::Failed,
            BuildResult::GaveUp => Exit::Interrupted,
            BuildResult::Error | BuildResult::TimedOut => Exit::of_build_error(r.error.as_deref()),
        };
        let rank = |e: Exit| match e {
            Exit::Success => 0,
            Exit::Interrupted => 1,
            Exit::Failed => 2,
            _ => 3,
        };
        records.map(exit).max_by_key(|e| rank(*e)).unwrap_or(Exit::Success)
    }

    /// The exit code a remote build error stands for: what a re-plan failed on keeps its
    /// own code (git 4, registry 5, …); anything else another attempt would not fix is 7.
    pub fn of_build_error(e: Option<&BuildError>) -> Exit {
        match e {
            Some(BuildError::Replan { source, .. }) => Exit::of_planning(source),
            _ => Exit::Cloud,
        }
    }

    /// The one table from planning errors to exit codes.
    pub fn of_planning(e: &PlanningError) -> Exit {
        match e {
            PlanningError::Git(_) => Exit::Git,
            PlanningError::Settings(_) => Exit::InvalidInput,
            PlanningError::Plan(p) => Exit::of_plan(p),
            PlanningError::Registry(r) => Exit::of_registry(r),
            PlanningError::NoRegistry | PlanningError::CurrentDir(_) => Exit::Usage,
            PlanningError::Task(_) => Exit::Failed,
        }
    }

    pub fn of_plan(e: &PlanError) -> Exit {
        match e {
            PlanError::Git(_) => Exit::Git,
            PlanError::UnknownProject { .. } | PlanError::NotForArch { .. } => Exit::Usage,
            PlanError::Manifest(_) | PlanError::NoManifest { .. } | PlanError::TwoManifests { .. } | PlanError::BrokenProject(_) => {
                Exit::InvalidInput
            }
        }
    }

    pub fn of_registry(e: &RegistryError) -> Exit {
        match e {
            RegistryError::InvalidReference { .. } | RegistryError::MissingCredentials { .. } => Exit::Usage,
            _ => Exit::Registry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_table_is_the_code_table() {
        let readme = include_str!("../../README.md");
        let section = readme.split("\n## Exit codes\n").nth(1).expect("the README has an Exit codes section");
        let table: String = section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(table, exit_table_markdown(), "the README's exit codes differ from EXIT_TABLE");
    }

    #[test]
    fn every_exit_code_is_documented_in_the_table_and_the_help() {
        let documented: Vec<u8> = EXIT_TABLE
            .iter()
            .flat_map(|(codes, _)| codes.split(", ").map(|c| c.parse::<u8>().expect("a code")))
            .collect();
        let all = [
            Exit::Success,
            Exit::Failed,
            Exit::Usage,
            Exit::InvalidInput,
            Exit::Git,
            Exit::Registry,
            Exit::Interrupted,
            Exit::Cloud,
            Exit::Sigint,
            Exit::Sigterm,
        ];
        for exit in all {
            assert!(documented.contains(&exit.code()), "{exit:?} is not in EXIT_TABLE");
            let shown = format!(" {} ", exit.code());
            assert!(EXIT_CODES_HELP.contains(&shown), "{exit:?} is not in EXIT_CODES_HELP");
        }
        assert!(documented.contains(&101), "panics exit 101");
    }
}
