//! The user-facing error: what happened, the documented exit code, and what to do next.
//!
//! Expected failures (bad input, an unreachable service) become an [`Error`] with an
//! [`Exit`] code and hints. Bugs are panics, which exit with 101.

use std::fmt::Write as _;

use crate::git::GitError;
use crate::settings::ConfigError;
use crate::manifest::ManifestError;
use crate::errors::error_chain;
use crate::plan::PlanError;
use crate::registry::RegistryError;

/// Documented exit codes. Keep in sync with `EXIT_CODES_HELP` and the README.
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
            Exit::Sigint => 130,
            Exit::Sigterm => 143,
            Exit::Command(code) => code,
        }
    }
}

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    a build or test failed
  2    usage error (bad arguments, unknown project, missing setting)
  3    invalid build_manifest.json/.yml, patterns file or spotbuild.toml (also: some
       entries could not be planned while the others were)
  4    git error (not a repository, unknown revision, object missing from the clone)
  5    registry error where no safe fallback exists
  6    interrupted (spot interruption notice); retrying is safe
  7    cloud API error (permissions, configuration, unreachable), or a remote build
       that could not finish for a reason another attempt would not fix
  130  stopped by SIGINT; 143 stopped by SIGTERM (instances terminated first)
  101  internal error (a bug: please report it)";

#[derive(Debug)]
pub struct Error {
    pub exit: Exit,
    pub message: String,
    pub hints: Vec<String>,
}

impl Error {
    pub fn new(exit: Exit, message: impl Into<String>) -> Error {
        Error {
            exit,
            message: message.into(),
            hints: Vec::new(),
        }
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
        Error::new(Exit::Git, error_chain(&e)).hint_opt(hint)
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
        Error::from(&e)
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::new(Exit::InvalidInput, error_chain(&e))
    }
}

impl From<RegistryError> for Error {
    fn from(e: RegistryError) -> Error {
        let exit = match e {
            RegistryError::InvalidReference { .. } | RegistryError::MissingCredentials { .. } => Exit::Usage,
            _ => Exit::Registry,
        };
        let hint = e.hint();
        Error::new(exit, error_chain(&e)).hint_opt(hint)
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        match e {
            PlanError::Git(g) => g.into(),
            PlanError::Manifest(m) => m.into(),
            PlanError::NoManifest { .. } => Error::new(Exit::InvalidInput, e.to_string())
                .hint("spotbuild plans monorepos described by a build_manifest.json (or .yml) at the repository root; see the README"),
            PlanError::TwoManifests { .. } => Error::new(Exit::InvalidInput, e.to_string())
                .hint("keep one of the two files: spotbuild would not know which one CI meant"),
            PlanError::BrokenProject(m) => Error::from(m.as_ref()),
            PlanError::UnknownProject { ref suggestion, .. } => {
                let hint = suggestion
                    .as_ref()
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| "`spotbuild plan --offline` lists every project".into());
                Error::new(Exit::Usage, e.to_string()).hint(hint)
            }
        }
    }
}
