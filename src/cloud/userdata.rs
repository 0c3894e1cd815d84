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
    #[error("`{0}` is not a login spotbuild uses: a lowercase user name other than root ([remote] user)")]
    User(String),
    #[error("the authorized key is not one `TYPE BASE64 [COMMENT]` line of an SSH public key")]
    AuthorizedKey,
    #[error("the host key is not one OpenSSH private key")]
    HostKey,
}

const HEREDOC: &str = "SPOTBUILD_HOST_KEY";

/// Checks every value that goes into (or comes out of) user data: a user name that is a
/// plain, non-root login; one SSH public key line; one OpenSSH private key. The local farm
/// checks what it reads back too: it runs as root and trusts nothing the emulator holds.
pub fn validate(user: &str, authorized_key: &str, host_private_key: &str) -> Result<(), UserDataError> {
    validate_user(user)?;
    let mut parts = authorized_key.splitn(3, ' ');
    let (kind, key, comment) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let key_ok = ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"].contains(&kind)
        && !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
        && comment.bytes().all(|b| b.is_ascii_alphanumeric() || b"@._:+-".contains(&b));
    if !key_ok {
        return Err(UserDataError::AuthorizedKey);
    }
    let body = host_private_key.trim_end();
    let lines: Vec<&str> = body.lines().collect();
    let host_ok = lines.len() >= 3
        && lines.first() == Some(&"-----BEGIN OPENSSH PRIVATE KEY-----")
        && lines.last() == Some(&"-----END OPENSSH PRIVATE KEY-----")
        && lines[1..lines.len() - 1].iter().all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='));
    if !host_ok {
        return Err(UserDataError::HostKey);
    }
    Ok(())
}

/// A plain login name (lowercase, at most 32 characters, as `useradd` takes), never root.
pub fn validate_user(user: &str) -> Result<(), UserDataError> {
    let plain = !user.is_empty()
        && user.len() <= 32
        && user.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !plain || user == "root" {
        return Err(UserDataError::User(user.to_string()));
    }
    Ok(())
}

impl UserData<'_> {
    /// A POSIX shell script (cloud-init runs `#!` user data as root).
    pub fn render(&self) -> Result<String, UserDataError> {
        let plain = |s: &str| !s.contains(['\'', '\n', '\\']) && !s.is_empty();
        if !plain(self.authorized_key) {
            return Err(UserDataError::Unsafe("authorized key"));
        }
        if self.host_private_key.contains(HEREDOC) || self.host_private_key.contains('\'') {
            return Err(UserDataError::Unsafe("host key"));
        }
        validate(self.user, self.authorized_key, self.host_private_key)?;
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

/// Reads back a script that [`UserData::render`] wrote; `None` for anything else, and for
/// values [`validate`] refuses (a root login, a second key line, …).
pub fn parse(script: &str) -> Option<Parsed> {
    let secs = script.split("(sleep ").nth(1)?.split(' ').next()?.parse().ok()?;
    let start = format!("<<'{HEREDOC}'\n");
    let key = script.split(&start).nth(1)?.split(&format!("\n{HEREDOC}\n")).next()?;
    let user = script.split("getent passwd ").nth(1)?.split(' ').next()?;
    let authorized = script.split("printf '%s\\n' '").nth(1)?.split('\'').next()?;
    let host_private_key = format!("{key}\n");
    validate(user, authorized, &host_private_key).ok()?;
    Some(Parsed {
        ttl: Duration::from_secs(secs),
        user: user.to_string(),
        authorized_key: authorized.to_string(),
        host_private_key,
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

    #[test]
    fn only_plain_values_go_in_or_come_out() {
        let host = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc+/=\n-----END OPENSSH PRIVATE KEY-----\n";
        let key = "ssh-ed25519 AAAAC3Nza build-b1";
        assert_eq!(validate("spotbuild", key, host), Ok(()));
        for user in ["root", "Root", "", "a b", "x;y", "-dash", &"u".repeat(33)] {
            assert!(matches!(validate(user, key, host), Err(UserDataError::User(_))), "{user:?}");
        }
        for bad in ["ssh-ed25519", "ssh-dss AAAA", "ssh-ed25519 AAAA comment;rm", "ssh-ed25519 AA$AA", "ssh-ed25519 AAAA a b"] {
            assert_eq!(validate("spotbuild", bad, host), Err(UserDataError::AuthorizedKey), "{bad:?}");
        }
        assert_eq!(validate("spotbuild", key, "not a key"), Err(UserDataError::HostKey));
        assert_eq!(validate("spotbuild", key, "-----BEGIN OPENSSH PRIVATE KEY-----\nab c\n-----END OPENSSH PRIVATE KEY-----\n"), Err(UserDataError::HostKey));
        // A root login written by hand is read back as nothing: the farm backs no host.
        let mut script = data(key, host).render().unwrap();
        script = script.replace("getent passwd spotbuild", "getent passwd root");
        assert_eq!(parse(&script), None);
        let root = UserData { user: "root", ..data(key, host) };
        assert!(matches!(root.render(), Err(UserDataError::User(_))));
    }
}
