//! Per-build SSH material: a fresh ed25519 client key, the host key generated for one launch
//! (installed by user data), and the known_hosts file that pins it. Nothing is reused across
//! builds, and nothing is written outside the build's own 0700 directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to run ssh-keygen")]
    Spawn(#[source] std::io::Error),
    #[error("ssh-keygen failed: {0}")]
    Failed(String),
    #[error("failed to write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An ed25519 key pair on disk.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private_path: PathBuf,
    /// `ssh-ed25519 AAAA… comment`
    pub public: String,
}

impl KeyPair {
    pub async fn private_pem(&self) -> std::io::Result<String> {
        tokio::fs::read_to_string(&self.private_path).await
    }
}

/// Creates `dir` (mode 0700) if needed, without blocking the runtime.
pub async fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    let made = async {
        tokio::fs::create_dir_all(dir).await?;
        tokio::fs::set_permissions(dir, private_mode()).await
    };
    made.await.map_err(write_error(dir))
}

fn private_mode() -> std::fs::Permissions {
    std::fs::Permissions::from_mode(0o700)
}

pub(super) fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// A new ed25519 key pair at `dir/name` (no passphrase: it lives only as long as the build).
pub async fn generate(dir: &Path, name: &str, comment: &str) -> Result<KeyPair, KeyError> {
    create_private_dir(dir).await?;
    let path = dir.join(name);
    let _ = tokio::fs::remove_file(&path).await;
    let _ = tokio::fs::remove_file(path.with_extension("pub")).await;
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(KeyError::Spawn)?;
    if !out.status.success() {
        return Err(KeyError::Failed(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let public_path = PathBuf::from(format!("{}.pub", path.display()));
    let public = tokio::fs::read_to_string(&public_path).await.map_err(write_error(&public_path))?;
    Ok(KeyPair {
        private_path: path,
        public: public.trim().to_string(),
    })
}

/// The known_hosts line that pins `public` (a host's `ssh-ed25519 AAAA…` key) for `host:port`.
pub fn known_hosts_line(host: &str, port: u16, public: &str) -> String {
    let mut fields = public.split_whitespace();
    let (kind, key) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
    let name = if port == 22 { host.to_string() } else { format!("[{host}]:{port}") };
    format!("{name} {kind} {key}\n")
}

/// Writes the per-build known_hosts file holding exactly the pinned key.
pub async fn write_known_hosts(path: &Path, host: &str, port: u16, public: &str) -> Result<(), KeyError> {
    tokio::fs::write(path, known_hosts_line(host, port, public)).await.map_err(write_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_lines_drop_the_comment_and_bracket_other_ports() {
        let key = "ssh-ed25519 AAAAC3Nza host-i-1";
        assert_eq!(known_hosts_line("10.0.0.4", 22, key), "10.0.0.4 ssh-ed25519 AAAAC3Nza\n");
        assert_eq!(known_hosts_line("10.0.0.4", 2222, key), "[10.0.0.4]:2222 ssh-ed25519 AAAAC3Nza\n");
    }
}
