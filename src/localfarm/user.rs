//! The farm's build user: the non-root login every host's sshd allows and every SSM command
//! runs as, as on an instance baked with `ami/` (`spotbuild`, in the docker group). The
//! farm runs as root; what a build runs on a host must not.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The account, as the farm uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The Docker socket's group: builds talk to the engine, as on an instance.
    pub docker_gid: u32,
    pub home: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("failed to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {what}: {stderr}")]
    Command { what: String, stderr: String },
    #[error("the Docker socket {0} belongs to group root: a non-root build user could not use it")]
    DockerGroup(PathBuf),
    #[error("`{0}` is not a build user the farm accepts: a lowercase name other than root, whose uid and gid are not 0")]
    Name(String),
}

const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The account `name`, created if missing (a system account with a home, no password and
/// `/bin/sh`), and added to the Docker socket's group if it is not in it.
pub async fn ensure(name: &str) -> Result<BuildUser, UserError> {
    crate::cloud::userdata::validate_user(name).map_err(|_| UserError::Name(name.to_string()))?;
    let socket = Path::new(DOCKER_SOCKET);
    let docker_gid = tokio::fs::metadata(socket)
        .await
        .map_err(|source| UserError::Io {
            what: format!("find the Docker socket {DOCKER_SOCKET}"),
            source,
        })?
        .gid();
    if docker_gid == 0 {
        return Err(UserError::DockerGroup(socket.to_path_buf()));
    }
    if passwd_entry(name).await?.is_none() {
        // `*`, not useradd's locked `!`: sshd (without PAM) refuses keys for a locked account.
        run(
            &["useradd", "--system", "--user-group", "--create-home", "--home-dir", &format!("/var/lib/{name}"), "--shell", "/bin/sh", "--password", "*", "--comment", "spotbuild local farm builds", name],
            &format!("create the build user {name}"),
        )
        .await?;
    }
    let entry = passwd_entry(name).await?.ok_or_else(|| UserError::Command {
        what: format!("find the build user {name}"),
        stderr: "not in the passwd database after useradd".into(),
    })?;
    if entry.0 == 0 || entry.1 == 0 {
        return Err(UserError::Name(name.to_string()));
    }
    if !groups_of(name).await?.contains(&docker_gid) {
        run(&["usermod", "--append", "--groups", &docker_gid.to_string(), name], &format!("add {name} to the Docker socket's group")).await?;
    }
    Ok(BuildUser {
        name: name.to_string(),
        uid: entry.0,
        gid: entry.1,
        docker_gid,
        home: entry.2,
    })
}

/// (uid, gid, home) from `getent passwd`.
async fn passwd_entry(name: &str) -> Result<Option<(u32, u32, PathBuf)>, UserError> {
    let out = tokio::process::Command::new("getent").args(["passwd", name]).output().await.map_err(|source| UserError::Io {
        what: "run getent".into(),
        source,
    })?;
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let fields: Vec<&str> = line.trim().split(':').collect();
    match fields.as_slice() {
        [_, _, uid, gid, _, home, ..] => match (uid.parse(), gid.parse()) {
            (Ok(u), Ok(g)) => Ok(Some((u, g, PathBuf::from(home)))),
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

async fn groups_of(name: &str) -> Result<Vec<u32>, UserError> {
    let out = tokio::process::Command::new("id").args(["-G", name]).output().await.map_err(|source| UserError::Io {
        what: "run id".into(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|g| g.parse().ok()).collect())
}

async fn run(args: &[&str], what: &str) -> Result<(), UserError> {
    let out = tokio::process::Command::new(args[0]).args(&args[1..]).output().await.map_err(|source| UserError::Io {
        what: format!("run {}", args[0]),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(UserError::Command {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Gives `path` (and, with `recursive`, everything under it) to the user.
pub async fn give(user: &BuildUser, path: &Path, recursive: bool) -> Result<(), UserError> {
    let owner = format!("{}:{}", user.uid, user.gid);
    let path_s = path.to_string_lossy().to_string();
    let mut args = vec!["chown"];
    if recursive {
        args.push("-R");
    }
    args.extend([owner.as_str(), path_s.as_str()]);
    run(&args, &format!("give {} to {}", path.display(), user.name)).await
}
