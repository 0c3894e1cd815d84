//! The image registry, which holds spotbuild's state: `cache-<hash>` tags say a project was
//! built, `cache-<hash>-<job>` tags say a test job passed.
//!
//! [`ImageStore`] is the narrow interface the planner uses; [`client::Client`] implements it
//! over the OCI distribution v2 API with anonymous, basic, bearer-token and ECR auth.

pub mod auth;
pub mod client;
pub mod copy;
pub mod credentials;
pub mod index;
mod ecr;

use std::fmt;

use futures::future::BoxFuture;

pub use client::Client;

/// The tag that says `hash` was built.
pub fn build_tag(hash: &str) -> String {
    format!("cache-{hash}")
}

/// The tag that says test `job` passed on the image built at `hash`.
pub fn test_tag(hash: &str, job: &str) -> String {
    format!("cache-{hash}-{job}")
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid registry `{input}`: {reason}")]
    InvalidReference { input: String, reason: String },
    #[error("failed to reach registry {host}: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("registry {host} refused {what}: HTTP {status}{}", body_suffix(body))]
    Status {
        host: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("registry {host} requires credentials for {what}")]
    Unauthorized { host: String, what: String },
    #[error("failed to get a registry token from {realm}: {detail}")]
    Token { realm: String, detail: String },
    #[error("failed to get an ECR authorization token")]
    EcrToken(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("failed to use the ECR authorization token: {0}")]
    EcrAnswer(String),
    #[error("{what}: the content's digest is {actual}, not {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} is not an image manifest or index: {detail}")]
    NotAManifest { what: String, detail: String },
    #[error("`{mode}` registry auth needs {needs}")]
    MissingCredentials { mode: &'static str, needs: String },
}

fn body_suffix(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        String::new()
    } else {
        let short: String = body.chars().take(200).collect();
        format!(" ({short})")
    }
}

impl RegistryError {
    pub fn hint(&self) -> Option<String> {
        match self {
            RegistryError::EcrToken(_) => Some(
                "check the AWS credentials and region (AWS_PROFILE, AWS_REGION, or `[registry] region`)".into(),
            ),
            RegistryError::Unauthorized { .. } => Some(
                "set SPOTBUILD_REGISTRY_USERNAME and SPOTBUILD_REGISTRY_PASSWORD, or `[registry] auth = \"ecr\"` in spotbuild.toml".into(),
            ),
            RegistryError::Unreachable { .. } => {
                Some("check --registry / SPOTBUILD_REGISTRY, or plan with --offline".into())
            }
            RegistryError::InvalidReference { .. } => {
                Some("expected HOST[:PORT][/PREFIX], e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/team".into())
            }
            _ => None,
        }
    }
}

/// What the planner needs from a registry. Implemented by [`Client`] and by test fakes.
pub trait ImageStore: Send + Sync {
    /// Whether `project`'s repository has `tag`. A missing repository is `Ok(false)`.
    fn tag_exists<'a>(&'a self, project: &'a str, tag: &'a str)
        -> BoxFuture<'a, Result<bool, RegistryError>>;

    /// How many lookups may run at once.
    fn concurrency(&self) -> usize {
        16
    }

    /// `HOST/PREFIX/project:tag`, for messages.
    fn image_ref(&self, project: &str, tag: &str) -> String;
}

/// Where Docker Hub's registry API is (`docker.io/ORG` names it).
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed `--registry` value: where the registry is and the repository prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// `https` or `http`.
    pub scheme: &'static str,
    /// `host` or `host:port`.
    pub host: String,
    /// Repository prefix without slashes at either end; may be empty.
    pub prefix: String,
}

impl RegistryRef {
    /// Parses `[http://|https://]HOST[:PORT][/PREFIX]`. Without a scheme, loopback hosts use
    /// plain HTTP (a local registry has no certificate) and every other host uses HTTPS.
    pub fn parse(input: &str) -> Result<RegistryRef, RegistryError> {
        let bad = |reason: &str| RegistryError::InvalidReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = if let Some(r) = input.strip_prefix("https://") {
            (Some("https"), r)
        } else if let Some(r) = input.strip_prefix("http://") {
            (Some("http"), r)
        } else if input.contains("://") {
            return Err(bad("only http:// and https:// are supported"));
        } else {
            (None, input)
        };
        let rest = rest.trim_end_matches('/');
        let (host, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, p),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(['@', '?', '#', ' ']) {
            return Err(bad("the host may not contain credentials, queries or spaces"));
        }
        for component in prefix.split('/').filter(|c| !c.is_empty()) {
            if !valid_repository_component(component) {
                return Err(bad(&format!(
                    "`{component}` is not a valid repository name component (lowercase letters, digits, and . _ - between them)"
                )));
            }
        }
        let scheme = scheme.unwrap_or(if is_loopback(host) { "http" } else { "https" });
        // Docker Hub is named `docker.io`, but its registry API answers elsewhere.
        let host = match host {
            "docker.io" | "index.docker.io" => DOCKER_HUB_API,
            other => other,
        };
        Ok(RegistryRef {
            scheme,
            host: host.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The same registry, under `sub` of this prefix (an untrusted build's namespace).
    pub fn within(&self, sub: &str) -> RegistryRef {
        let sub = sub.trim_matches('/');
        RegistryRef {
            scheme: self.scheme,
            host: self.host.clone(),
            prefix: match (self.prefix.is_empty(), sub.is_empty()) {
                (_, true) => self.prefix.clone(),
                (true, false) => sub.to_string(),
                (false, false) => format!("{}/{sub}", self.prefix),
            },
        }
    }

    /// The repository that holds `project`'s images.
    pub fn repository(&self, project: &str) -> String {
        if self.prefix.is_empty() {
            project.to_string()
        } else {
            format!("{}/{}", self.prefix, project)
        }
    }

    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.host)
    }

    /// The AWS region of an ECR registry host (`<account>.dkr.ecr.<region>.amazonaws.com`).
    pub fn ecr_region(&self) -> Option<String> {
        let host = self.host.split(':').next()?;
        let mut parts = host.split('.');
        let account = parts.next()?;
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if parts.next()? != "dkr" {
            return None;
        }
        let ecr = parts.next()?;
        if ecr != "ecr" && ecr != "ecr-fips" {
            return None;
        }
        let region = parts.next()?;
        let rest: Vec<&str> = parts.collect();
        (rest == ["amazonaws", "com"] || rest == ["amazonaws", "com", "cn"]).then(|| region.to_string())
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "{}", self.host)
        } else {
            write!(f, "{}/{}", self.host, self.prefix)
        }
    }
}

fn valid_repository_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    !b.is_empty()
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&x| alnum(x) || b"._-".contains(&x))
}

fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_prefixes_and_schemes() {
        let r = RegistryRef::parse("127.0.0.1:5000/team/x").unwrap();
        assert_eq!((r.scheme, r.host.as_str(), r.prefix.as_str()), ("http", "127.0.0.1:5000", "team/x"));
        assert_eq!(r.repository("app"), "team/x/app");
        let r = RegistryRef::parse("registry.example.com").unwrap();
        assert_eq!(r.scheme, "https");
        assert_eq!(r.repository("app"), "app");
        assert_eq!(RegistryRef::parse("localhost:5000").unwrap().scheme, "http");
        assert_eq!(RegistryRef::parse("[::1]:5000").unwrap().scheme, "http");
        assert_eq!(RegistryRef::parse("https://127.0.0.1:5000").unwrap().scheme, "https");
        let hub = RegistryRef::parse("docker.io/acme").unwrap();
        assert_eq!((hub.scheme, hub.host.as_str(), hub.prefix.as_str()), ("https", DOCKER_HUB_API, "acme"));
        assert!(RegistryRef::parse("ftp://x").is_err());
        assert!(RegistryRef::parse("host/Team").is_err());
        assert!(RegistryRef::parse("").is_err());
    }

    #[test]
    fn recognises_ecr_hosts() {
        let r = RegistryRef::parse("123456789012.dkr.ecr.eu-west-2.amazonaws.com/team").unwrap();
        assert_eq!(r.ecr_region().as_deref(), Some("eu-west-2"));
        assert_eq!(RegistryRef::parse("registry.example.com").unwrap().ecr_region(), None);
        assert_eq!(RegistryRef::parse("12345.dkr.ecr.x.amazonaws.com").unwrap().ecr_region(), None);
    }
}
