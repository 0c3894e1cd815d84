//! ECR credentials: a token from `GetAuthorizationToken`, cached until shortly before it
//! expires. The endpoint follows the standard AWS configuration, `AWS_ENDPOINT_URL`
//! included, so emulators work unchanged.

use std::time::{Duration, SystemTime};

use base64::Engine;
use tokio::sync::Mutex;

use super::credentials::Basic;
use super::RegistryError;

/// Refresh this long before the token's stated expiry (ECR tokens last 12 hours).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const MIN_REUSE: Duration = Duration::from_secs(60);

pub struct EcrTokens {
    region: Option<String>,
    cached: Mutex<Cached>,
}

enum Cached {
    Empty,
    Token(Basic, SystemTime),
    /// The first failure, kept for the rest of the process so that many concurrent lookups
    /// do not each ask AWS again (and each wait out the SDK's retries).
    Failed(String),
}

impl EcrTokens {
    pub fn new(region: Option<String>) -> EcrTokens {
        EcrTokens {
            region,
            cached: Mutex::new(Cached::Empty),
        }
    }

    pub async fn credentials(&self) -> Result<Basic, RegistryError> {
        let mut cached = self.cached.lock().await;
        match &*cached {
            Cached::Token(basic, until) if SystemTime::now() < *until => return Ok(basic.clone()),
            Cached::Failed(first) => {
                return Err(RegistryError::EcrAnswer(format!(
                    "an earlier request for a token failed: {first}"
                )))
            }
            _ => {}
        }
        let (basic, expires) = match self.fetch().await {
            Ok(answer) => answer,
            Err(e) => {
                *cached = Cached::Failed(crate::errors::error_chain(&e));
                return Err(e);
            }
        };
        // Never refetch more often than MIN_REUSE, even for a token that claims to be
        // expired already (emulators do that); a really stale token fails with a 401.
        let floor = SystemTime::now() + MIN_REUSE;
        let until = expires.checked_sub(REFRESH_MARGIN).map_or(floor, |t| t.max(floor));
        *cached = Cached::Token(basic.clone(), until);
        Ok(basic)
    }

    async fn fetch(&self) -> Result<(Basic, SystemTime), RegistryError> {
        let config = crate::cloud::aws::sdk_config(self.region.clone(), None).await;
        let client = aws_sdk_ecr::Client::new(&config);
        let out = client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| RegistryError::EcrToken(Box::new(e)))?;
        let data = out
            .authorization_data()
            .first()
            .ok_or_else(|| RegistryError::EcrAnswer("no authorization data".into()))?;
        let token = data
            .authorization_token()
            .ok_or_else(|| RegistryError::EcrAnswer("no authorization token".into()))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| RegistryError::EcrAnswer("the token is not base64".into()))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| RegistryError::EcrAnswer("the token is not UTF-8".into()))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| RegistryError::EcrAnswer("the token is not `user:password`".into()))?;
        let expires = data
            .expires_at()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
        Ok((
            Basic {
                username: username.to_string(),
                password: password.to_string(),
            },
            expires,
        ))
    }
}
