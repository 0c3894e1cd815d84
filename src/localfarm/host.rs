//! One emulated instance: a network namespace at the instance's private address, running a
//! real sshd configured from the instance's user data (its pinned host key and the build's
//! authorized key), an IMDS endpoint at 169.254.169.254 that the farm controls, and a
//! forwarder so that the host's 127.0.0.1:<registry port> reaches the farm's registry, and
//! the host's door to S3 at 127.0.0.1:<the emulator's port> (see [`super::front`]). Logins
//! and commands run as the farm's build user, never root.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::netns;
use super::user::BuildUser;
use crate::cloud::userdata::Parsed;

/// The role name the host's metadata service hands credentials out for.
pub const INSTANCE_ROLE: &str = "spotbuild-farm-instance";

pub struct HostSpec<'a> {
    pub instance_id: &'a str,
    pub ns: String,
    pub veth: (String, String),
    pub bridge: &'a str,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub dir: PathBuf,
    pub sshd: &'a Path,
    pub registry_port: u16,
    pub boot: Option<Parsed>,
    pub user: &'a BuildUser,
    /// The host's door to S3: served at 127.0.0.1:PORT inside the host.
    pub s3_door: (u16, axum::Router),
    /// The instance role's credentials (access key id, secret), from the metadata service.
    pub credentials: (String, String),
}

/// A running host. Dropping it does not stop it: call [`Host::destroy`].
pub struct Host {
    pub instance_id: String,
    pub ns: String,
    pub outer_veth: String,
    pub address: Ipv4Addr,
    pub dir: PathBuf,
    pub sshd_pid: Option<u32>,
    pub expires_at: Option<SystemTime>,
    /// Seconds since the epoch of the announced termination; 0: none.
    pub notice: Arc<AtomicU64>,
    /// When set, the farm reclaims the host at this time (an interruption played out).
    pub reclaim_at: Option<SystemTime>,
    sshd: Option<tokio::process::Child>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Net(#[from] netns::NetError),
    #[error("failed to {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostError {
    let what = what.into();
    move |source| HostError::Io { what, source }
}

impl Host {
    pub async fn start(spec: HostSpec<'_>) -> Result<Host, HostError> {
        netns::create_host(&spec.ns, spec.bridge, (&spec.veth.0, &spec.veth.1), spec.address, spec.prefix).await?;
        let mut host = Host {
            instance_id: spec.instance_id.to_string(),
            ns: spec.ns.clone(),
            outer_veth: spec.veth.0.clone(),
            address: spec.address,
            dir: spec.dir.clone(),
            sshd_pid: None,
            expires_at: spec.boot.as_ref().map(|b| SystemTime::now() + b.ttl),
            notice: Arc::new(AtomicU64::new(0)),
            reclaim_at: None,
            sshd: None,
            tasks: Vec::new(),
        };
        if let Err(e) = host.boot(&spec).await {
            host.destroy().await;
            return Err(e);
        }
        Ok(host)
    }

    async fn boot(&mut self, spec: &HostSpec<'_>) -> Result<(), HostError> {
        tokio::fs::create_dir_all(&spec.dir)
            .await
            .map_err(io(format!("create {}", spec.dir.display())))?;
        // The metadata service, inside the host.
        let imds = netns::listen_in(&spec.ns, SocketAddr::from(([169, 254, 169, 254], 80)))
            .await
            .map_err(io("listen on 169.254.169.254:80 inside the host"))?;
        let imds = tokio::net::TcpListener::from_std(imds).map_err(io("serve the metadata endpoint"))?;
        let router = axum::Router::new().fallback(metadata).with_state(Metadata {
            instance_id: self.instance_id.clone(),
            notice: self.notice.clone(),
            credentials: Arc::new(spec.credentials.clone()),
        });
        self.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(imds, router).await;
        }));
        // The registry, at the same loopback address as on the farm's side.
        let fwd = netns::listen_in(&spec.ns, SocketAddr::from(([127, 0, 0, 1], spec.registry_port)))
            .await
            .map_err(io("listen for the registry inside the host"))?;
        let fwd = tokio::net::TcpListener::from_std(fwd).map_err(io("forward the registry"))?;
        let port = spec.registry_port;
        self.tasks.push(tokio::spawn(async move {
            while let Ok((mut inner, _)) = fwd.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outer) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inner, &mut outer).await;
                    }
                });
            }
        }));
        // S3, for the SSM transport's objects: only through the host's door.
        let (door_port, door) = spec.s3_door.clone();
        let s3 = netns::listen_in(&spec.ns, SocketAddr::from(([127, 0, 0, 1], door_port)))
            .await
            .map_err(io("listen for S3 inside the host"))?;
        let s3 = tokio::net::TcpListener::from_std(s3).map_err(io("serve the host's door to S3"))?;
        self.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(s3, door).await;
        }));
        // sshd, as cloud-init would have configured it from the user data: the farm's build
        // user only. Its shell reads no personal rc (SHLVL below 2 would make bash read
        // ~/.bashrc before every command).
        let Some(boot) = &spec.boot else {
            tracing::warn!(instance = %self.instance_id, "no valid spotbuild user data: the host has no sshd");
            return Ok(());
        };
        if boot.user != spec.user.name {
            tracing::warn!(instance = %self.instance_id, user = %boot.user, farm_user = %spec.user.name, "the user data asks for a login other than the farm's build user: the host has no sshd");
            return Ok(());
        }
        let key = spec.dir.join("ssh_host_ed25519_key");
        write_private(&key, &boot.host_private_key).await?;
        // sshd reads the authorized keys as the user it logs in.
        let authorized = spec.dir.join("authorized_keys");
        write_private(&authorized, &format!("{}\n", boot.authorized_key)).await?;
        std::os::unix::fs::chown(&authorized, Some(spec.user.uid), Some(spec.user.gid)).map_err(io("give the authorized keys to the build user"))?;
        let config = spec.dir.join("sshd_config");
        tokio::fs::write(
            &config,
            format!(
                "ListenAddress {addr}:22\nHostKey {key}\nAuthorizedKeysFile {authorized}\nPidFile none\n\
                 UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin no\nAllowUsers {user}\nStrictModes no\n\
                 AllowAgentForwarding no\nX11Forwarding no\nPrintMotd no\nLogLevel INFO\n\
                 SetEnv SHLVL=1\n",
                addr = spec.address,
                key = key.display(),
                authorized = authorized.display(),
                user = boot.user,
            ),
        )
        .await
        .map_err(io("write sshd_config"))?;
        tokio::fs::create_dir_all("/run/sshd").await.map_err(io("create /run/sshd"))?;
        let log = tokio::fs::File::create(spec.dir.join("sshd.log"))
            .await
            .map_err(io("create sshd.log"))?
            .into_std()
            .await;
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &spec.ns])
            .arg(spec.sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("start {}", spec.sshd.display())))?;
        self.sshd_pid = child.id();
        self.sshd = Some(child);
        Ok(())
    }

    /// Announces a spot interruption through the host's metadata service.
    pub fn interrupt(&mut self, warning: Duration, reclaim_after: Option<Duration>) {
        let at = SystemTime::now() + warning;
        let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        self.notice.store(secs, Ordering::SeqCst);
        self.reclaim_at = reclaim_after.map(|d| SystemTime::now() + d);
    }

    /// Cuts every SSH connection to the host (the listening sshd stays): a network blip.
    pub async fn cut_connections(&self) -> usize {
        let mut cut = 0;
        for pid in netns::pids_in(&self.ns).await {
            if Some(pid as u32) == self.sshd_pid {
                continue;
            }
            let comm = tokio::fs::read_to_string(format!("/proc/{pid}/comm")).await.unwrap_or_default();
            if comm.trim() == "sshd" || comm.trim().starts_with("sshd-") {
                // SAFETY: kill(2) on an sshd session process inside this host.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                cut += 1;
            }
        }
        cut
    }

    /// Freezes the host: every process in it stops (SIGSTOP), sshd and the agent with it,
    /// as a hung machine would. Returns how many were stopped.
    pub async fn freeze(&self) -> usize {
        self.signal_where(libc::SIGSTOP, |_| true).await
    }

    /// Kills the agent's processes (`spotbuild agent run`), leaving the rest of the host up:
    /// an agent killed by the kernel for memory, say. Returns how many were killed.
    pub async fn kill_agent(&self) -> usize {
        self.signal_where(libc::SIGKILL, |cmdline| {
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            words.windows(2).any(|w| w[0] == b"agent" && w[1] == b"run")
        })
        .await
    }

    async fn signal_where(&self, signal: i32, pred: impl Fn(&[u8]) -> bool) -> usize {
        let mut n = 0;
        for pid in netns::pids_in(&self.ns).await {
            let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.unwrap_or_default();
            if pred(&cmdline) {
                // SAFETY: kill(2) on a process inside this host's namespace, which the farm made.
                unsafe { libc::kill(pid, signal) };
                n += 1;
            }
        }
        n
    }

    /// Ends the host: every process in it, its namespace, its files.
    pub async fn destroy(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill().await;
        }
        netns::delete_host(&self.ns, &self.outer_veth).await;
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }
}

async fn write_private(path: &Path, text: &str) -> Result<(), HostError> {
    use tokio::io::AsyncWriteExt;
    let written = async {
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .await?;
        f.write_all(text.as_bytes()).await?;
        // tokio's File finishes writes in the background; flush so the key is on disk
        // before sshd reads it.
        f.flush().await
    };
    written.await.map_err(io(format!("write {}", path.display())))
}

#[derive(Clone)]
struct Metadata {
    instance_id: String,
    notice: Arc<AtomicU64>,
    credentials: Arc<(String, String)>,
}

const TOKEN: &str = "spotbuild-local-farm-token";

/// IMDSv2, as much of it as the agent reads.
async fn metadata(State(m): State<Metadata>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if uri.path() == "/latest/api/token" {
        return if let (true, Some(ttl)) = (method == Method::PUT, headers.get("x-aws-ec2-metadata-token-ttl-seconds")) {
            // The SDK wants the TTL it asked for echoed back.
            ([("x-aws-ec2-metadata-token-ttl-seconds", ttl.clone())], TOKEN).into_response()
        } else {
            StatusCode::BAD_REQUEST.into_response()
        };
    }
    if headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let notice = m.notice.load(Ordering::SeqCst);
    match uri.path() {
        "/latest/meta-data/instance-id" => m.instance_id.into_response(),
        "/latest/meta-data/iam/security-credentials/" => INSTANCE_ROLE.into_response(),
        p if p.strip_prefix("/latest/meta-data/iam/security-credentials/") == Some(INSTANCE_ROLE) => {
            let expires = SystemTime::now() + Duration::from_secs(6 * 3600);
            axum::Json(serde_json::json!({
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": m.credentials.0,
                "SecretAccessKey": m.credentials.1,
                "Token": "spotbuild-farm-session",
                "LastUpdated": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                "Expiration": humantime::format_rfc3339_seconds(expires).to_string(),
            }))
            .into_response()
        }
        "/latest/meta-data/spot/instance-action" if notice > 0 => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(notice);
            format!(r#"{{"action":"terminate","time":"{}"}}"#, humantime::format_rfc3339_seconds(at)).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
