//! The user data every instance boots with: a self-destruct at its TTL, the host key
//! generated for this launch (so the controller pins it instead of trusting the first key
//! it sees), and this build's authorized key. Nothing long-lived.

use std::time::Duration;

/// What a launch puts on the instance.
pub struct UserData<'a> {
    /// After this long the instance powers itself off (and, with shutdown behaviour
    /// `terminate`, is terminated), whatever happened to the controller.
    pub ttl: Duration,
    /// The login that the controller uses.
    pub user: &'a str,
    /// One `ssh-ed25519 AAAA… comment` line: this build's key.
    pub authorized_key: &'a str,
    /// The OpenSSH private host key generated for this launch.
    pub host_private_key: &'a str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserDataError {
    #[error("the {0} would break the user data script (it contains a quote, newline or the heredoc marker)")]
    Unsafe(&'static str),
}

const HEREDOC: &str = "SPOTBUILD_HOST_KEY";

impl UserData<'_> {
    /// A POSIX shell script (cloud-init runs `#!` user data as root).
    pub fn render(&self) -> Result<String, UserDataError> {
        let plain = |s: &str| !s.contains(['\'', '\n', '\\']) && !s.is_empty();
        if !plain(self.authorized_key) {
            return Err(UserDataError::Unsafe("authorized key"));
        }
        if !self.user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') || self.user.is_empty() {
            return Err(UserDataError::Unsafe("user name"));
        }
        if self.host_private_key.contains(HEREDOC) || self.host_private_key.contains('\'') {
            return Err(UserDataError::Unsafe("host key"));
        }
        // `shutdown` takes whole minutes; round up so the TTL is never cut short.
        let minutes = self.ttl.as_secs().div_ceil(60).max(1);
        let key = self.host_private_key.trim_end();
        let (user, authorized) = (self.user, self.authorized_key);
        Ok(format!(
            r#"#!/bin/sh
# spotbuild: a deadline for this instance, this launch's host key, this build's SSH key.
set -eu

# 1. End at the TTL whatever happens to the controller (shutdown behaviour: terminate).
shutdown -h +{minutes} 'spotbuild: TTL reached' 2>/dev/null || (sleep {secs} && poweroff) &

# 2. The host key generated for this launch; the controller pins it.
umask 077
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
cat > /etc/ssh/ssh_host_ed25519_key <<'{HEREDOC}'
{key}
{HEREDOC}
ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key > /etc/ssh/ssh_host_ed25519_key.pub

# 3. This build's key, for {user} only.
home=$(getent passwd {user} | cut -d: -f6)
install -d -m 700 -o {user} -g {user} "$home/.ssh"
printf '%s\n' '{authorized}' > "$home/.ssh/authorized_keys"
chown {user}:{user} "$home/.ssh/authorized_keys"
chmod 600 "$home/.ssh/authorized_keys"

systemctl restart ssh 2>/dev/null || systemctl restart sshd 2>/dev/null || service ssh restart
"#,
            secs = self.ttl.as_secs(),
        ))
    }
}

/// What a user data script rendered by [`UserData::render`] installs, read back: the local
/// farm boots its hosts from it, as cloud-init would boot an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub ttl: Duration,
    pub user: String,
    pub authorized_key: String,
    pub host_private_key: String,
}

/// Reads back a script that [`UserData::render`] wrote; `None` for anything else.
pub fn parse(script: &str) -> Option<Parsed> {
    let secs = script.split("(sleep ").nth(1)?.split(' ').next()?.parse().ok()?;
    let start = format!("<<'{HEREDOC}'\n");
    let key = script.split(&start).nth(1)?.split(&format!("\n{HEREDOC}\n")).next()?;
    let user = script.split("getent passwd ").nth(1)?.split(' ').next()?;
    let authorized = script.split("printf '%s\\n' '").nth(1)?.split('\'').next()?;
    Some(Parsed {
        ttl: Duration::from_secs(secs),
        user: user.to_string(),
        authorized_key: authorized.to_string(),
        host_private_key: format!("{key}\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data<'a>(key: &'a str, host: &'a str) -> UserData<'a> {
        UserData {
            ttl: Duration::from_secs(3601),
            user: "spotbuild",
            authorized_key: key,
            host_private_key: host,
        }
    }

    #[test]
    fn arms_the_ttl_and_installs_both_keys() {
        let host = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n";
        let s = data("ssh-ed25519 AAAAC3 build-b1", host).render().unwrap();
        assert!(s.contains("shutdown -h +61 "), "rounded up to whole minutes: {s}");
        assert!(s.contains("sleep 3601"));
        assert!(s.contains("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\nSPOTBUILD_HOST_KEY\n"));
        assert!(s.contains("printf '%s\\n' 'ssh-ed25519 AAAAC3 build-b1'"));
        assert!(s.starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn what_is_rendered_reads_back() {
        let host = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n";
        let s = data("ssh-ed25519 AAAAC3 build-b1", host).render().unwrap();
        let p = parse(&s).expect("parses");
        assert_eq!(p.ttl, Duration::from_secs(3601));
        assert_eq!(p.user, "spotbuild");
        assert_eq!(p.authorized_key, "ssh-ed25519 AAAAC3 build-b1");
        assert_eq!(p.host_private_key, host);
        assert_eq!(parse("#!/bin/sh\necho hi\n"), None);
    }

    #[test]
    fn refuses_input_that_would_break_the_script() {
        assert!(data("ssh-ed25519 AAAA' ; rm -rf /", "k").render().is_err());
        assert!(data("ssh-ed25519 AAAA\nmore", "k").render().is_err());
        assert!(data("ssh-ed25519 AAAA", "x\nSPOTBUILD_HOST_KEY\ny").render().is_err());
    }
}
