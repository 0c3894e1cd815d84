//! Registry credentials as the registry sees them: a username and password, however they
//! were obtained. A leaf module, so that the places credentials come from (the environment,
//! ECR) and the authenticator that uses them all depend on it and not on each other.

use base64::Engine;

pub const USERNAME_ENV: &str = "SPOTBUILD_REGISTRY_USERNAME";
pub const PASSWORD_ENV: &str = "SPOTBUILD_REGISTRY_PASSWORD";
/// The deploy registry's credentials (`spotbuild deploy --to`), when it is not the build
/// registry.
pub const DEPLOY_USERNAME_ENV: &str = "SPOTBUILD_DEPLOY_REGISTRY_USERNAME";
pub const DEPLOY_PASSWORD_ENV: &str = "SPOTBUILD_DEPLOY_REGISTRY_PASSWORD";

/// A username and password; the password never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Basic {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Basic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Basic({}, <redacted>)", self.username)
    }
}

impl Basic {
    pub fn header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    /// Reads SPOTBUILD_REGISTRY_USERNAME / SPOTBUILD_REGISTRY_PASSWORD.
    pub fn from_env() -> Option<Basic> {
        Basic::from_env_named(USERNAME_ENV, PASSWORD_ENV)
    }

    /// Reads a username and a password from the two variables named.
    pub fn from_env_named(username: &str, password: &str) -> Option<Basic> {
        let username = std::env::var(username).ok().filter(|s| !s.is_empty())?;
        let password = std::env::var(password).unwrap_or_default();
        Some(Basic { username, password })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let b = Basic {
            username: "AWS".into(),
            password: "sekrit".into(),
        };
        assert!(!format!("{b:?}").contains("sekrit"));
        assert_eq!(b.header(), "Basic QVdTOnNla3JpdA==");
    }
}
