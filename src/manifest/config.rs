//! `spotbuild.toml`: settings that belong to a team's deployment rather than to the code
//! (where the registry is, how to authenticate, how long to wait). Every bound on a wait is
//! a named setting here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "spotbuild.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub registry: RegistryConfig,
}

/// How registry credentials are obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// ECR for `*.dkr.ecr.*.amazonaws.com` hosts; basic auth when
    /// SPOTBUILD_REGISTRY_USERNAME/PASSWORD are set; anonymous otherwise. Bearer-token
    /// challenges are answered in every mode.
    #[default]
    Auto,
    /// No credentials (anonymous bearer tokens are still requested when challenged).
    None,
    /// SPOTBUILD_REGISTRY_USERNAME and SPOTBUILD_REGISTRY_PASSWORD.
    Basic,
    /// A token from ECR `GetAuthorizationToken`, with the standard AWS credential chain.
    Ecr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `HOST[:PORT][/PREFIX]`; `http://` or `https://` may be given explicitly.
    pub url: Option<String>,
    #[serde(default)]
    pub auth: AuthMode,
    /// AWS region for ECR tokens when it cannot be read from the registry host.
    pub region: Option<String>,
    /// How many registry requests may be in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Bound on one registry request (connect, send, and read the answer).
    #[serde(default = "default_request_timeout", with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// How many times a throttled (429) or failing (5xx) request is retried.
    #[serde(default = "default_retries")]
    pub retries: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: None,
            auth: AuthMode::Auto,
            region: None,
            concurrency: default_concurrency(),
            request_timeout: default_request_timeout(),
            retries: default_retries(),
        }
    }
}

fn default_concurrency() -> usize {
    16
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retries() -> usize {
    3
}

/// Durations are written the way people write them: `"10s"`, `"1m 30s"`.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Loads `path` if given (it must exist), else `<root>/spotbuild.toml` if it exists,
    /// else the defaults.
    pub fn load(explicit: Option<&Path>, root: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match (explicit, root) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(r)) if r.join(CONFIG_FILE).is_file() => r.join(CONFIG_FILE),
            _ => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert_eq!(c.registry.concurrency, 16);
        let c = Config::parse(
            "[registry]\nurl = \"r.example:5000/team\"\nauth = \"ecr\"\nrequest_timeout = \"3s\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.registry.auth, AuthMode::Ecr);
        assert_eq!(c.registry.request_timeout, Duration::from_secs(3));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::parse("[registry]\nulr = \"x\"\n", Path::new("spotbuild.toml")).unwrap_err();
        assert!(e.to_string().contains("ulr"), "{e}");
    }
}
