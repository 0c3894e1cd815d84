//! Registry authentication: static basic credentials, ECR tokens, and the bearer-token
//! challenge flow of the distribution spec, with tokens cached until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

pub use super::credentials::{Basic, PASSWORD_ENV, USERNAME_ENV};
use super::ecr::EcrTokens;
use super::RegistryError;
use crate::settings::AuthMode;

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Other(String),
}

impl Challenge {
    /// Parses `Bearer realm="…",service="…",scope="…"` (quoted values may hold commas).
    pub fn parse(header: &str) -> Challenge {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Challenge::Basic;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Challenge::Other(scheme.to_string());
        }
        let params = parse_params(rest);
        match params.get("realm") {
            Some(realm) => Challenge::Bearer {
                realm: realm.clone(),
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            },
            None => Challenge::Other("Bearer without a realm".into()),
        }
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

/// Where basic credentials come from.
enum Source {
    None,
    Static(Basic),
    Ecr(EcrTokens),
}

/// Holds credentials and cached tokens for one registry. Shared by concurrent requests.
pub struct Authenticator {
    source: Source,
    /// ECR expects credentials on the first request; other registries get them only when
    /// they challenge, so anonymous-readable registries never see them.
    preemptive: bool,
    /// Set once the registry asked for basic credentials: later requests send them at
    /// once, so a streamed upload (which cannot be sent twice) is not refused first.
    basic_asked: std::sync::atomic::AtomicBool,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// How long before its stated expiry a token is considered stale.
const TOKEN_MARGIN: Duration = Duration::from_secs(15);

impl Authenticator {
    /// Credentials for the build registry: basic ones from SPOTBUILD_REGISTRY_USERNAME and
    /// SPOTBUILD_REGISTRY_PASSWORD.
    pub fn new(mode: AuthMode, ecr_region: Option<String>) -> Result<Authenticator, RegistryError> {
        Authenticator::from_env_named(mode, ecr_region, (USERNAME_ENV, PASSWORD_ENV))
    }

    /// Credentials for a registry whose basic ones are in the two variables `basic_env`
    /// names (the deploy registry's are not the build registry's).
    pub fn from_env_named(
        mode: AuthMode,
        ecr_region: Option<String>,
        basic_env: (&str, &str),
    ) -> Result<Authenticator, RegistryError> {
        let ecr = |region: Option<String>| Source::Ecr(EcrTokens::new(region));
        let basic = Basic::from_env_named(basic_env.0, basic_env.1);
        let (source, preemptive) = match mode {
            AuthMode::None => (Source::None, false),
            AuthMode::Basic => match basic {
                Some(b) => (Source::Static(b), false),
                None => {
                    return Err(RegistryError::MissingCredentials {
                        mode: "basic",
                        needs: format!("{} and {}", basic_env.0, basic_env.1),
                    })
                }
            },
            AuthMode::Ecr => (ecr(ecr_region), true),
            AuthMode::Auto => match (basic, ecr_region) {
                (Some(b), _) => (Source::Static(b), false),
                (None, Some(region)) => (ecr(Some(region)), true),
                (None, None) => (Source::None, false),
            },
        };
        Ok(Authenticator {
            source,
            preemptive,
            basic_asked: Default::default(),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn with_basic(basic: Option<Basic>) -> Authenticator {
        Authenticator {
            source: basic.map_or(Source::None, Source::Static),
            preemptive: false,
            basic_asked: Default::default(),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Basic credentials, if any (fetching an ECR token when needed).
    pub async fn basic(&self) -> Result<Option<Basic>, RegistryError> {
        match &self.source {
            Source::None => Ok(None),
            Source::Static(b) => Ok(Some(b.clone())),
            Source::Ecr(ecr) => ecr.credentials().await.map(Some),
        }
    }

    /// The header to send first for a request needing `scope`.
    pub async fn initial_header(&self, scope: &str) -> Result<Option<String>, RegistryError> {
        if let Some(token) = self.cached_token(scope).await {
            return Ok(Some(format!("Bearer {token}")));
        }
        if self.preemptive || self.basic_asked.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(self.basic().await?.map(|b| b.header()));
        }
        Ok(None)
    }

    async fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().await;
        tokens
            .get(scope)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    /// Answers a challenge with the header to retry with, or says why it cannot.
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        challenge: &Challenge,
        scope: &str,
        host: &str,
        what: &str,
    ) -> Result<String, RegistryError> {
        match challenge {
            Challenge::Basic => match self.basic().await? {
                Some(b) => {
                    self.basic_asked.store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok(b.header())
                }
                None => Err(RegistryError::Unauthorized {
                    host: host.to_string(),
                    what: what.to_string(),
                }),
            },
            Challenge::Bearer {
                realm,
                service,
                scope: asked,
            } => {
                let scope = asked.as_deref().unwrap_or(scope);
                let token = self.fetch_token(http, realm, service.as_deref(), scope).await?;
                Ok(format!("Bearer {token}"))
            }
            Challenge::Other(scheme) => Err(RegistryError::Token {
                realm: host.to_string(),
                detail: format!("unsupported authentication scheme `{scheme}`"),
            }),
        }
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let fail = |detail: String| RegistryError::Token {
            realm: realm.to_string(),
            detail,
        };
        // Several scopes (a blob mount needs two repositories) are several parameters.
        let mut query: Vec<(&str, &str)> = scope.split_whitespace().map(|s| ("scope", s)).collect();
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = http.get(realm).query(&query);
        if let Some(b) = self.basic().await? {
            req = req.header(reqwest::header::AUTHORIZATION, b.header());
        }
        let resp = req.send().await.map_err(|e| fail(e.without_url().to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(fail(format!(
                "HTTP {} (hint: check the registry credentials)",
                status.as_u16()
            )));
        }
        if !status.is_success() {
            return Err(fail(format!("HTTP {}", status.as_u16())));
        }
        let body: TokenResponse = resp.json().await.map_err(|e| fail(e.to_string()))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("the answer held no token".into()))?;
        // The spec's default lifetime is 60 s.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        let until = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN).max(Duration::from_secs(1));
        self.tokens
            .lock()
            .await
            .insert(scope.to_string(), (token.clone(), until));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges_with_commas_in_quotes() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(Challenge::parse(r#"Basic realm="basic-realm""#), Challenge::Basic);
        assert!(matches!(Challenge::parse("Negotiate"), Challenge::Other(_)));
    }
}
