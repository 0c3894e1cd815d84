//! SSH to an instance through OpenSSH's multiplexing master (the `openssh` crate in
//! native-mux mode, which keeps working after a reconnect where process-mux would not).
//!
//! The host key is pinned: the per-build known_hosts file holds only the key generated for
//! this launch, and checking is strict. The client key is this build's alone. A per-build
//! ssh_config turns off agent and X11 forwarding and ignores the user's own configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

use super::{Lines, Transport, TransportError};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// This build's private key.
    pub key: PathBuf,
    /// The per-build known_hosts file, holding the pinned host key.
    pub known_hosts: PathBuf,
    /// The build's private directory: ssh_config and the control socket live here.
    pub dir: PathBuf,
    /// Bound on getting a connection (the instance may still be booting).
    pub connect_timeout: Duration,
}

pub struct SshTransport {
    target: SshTarget,
    session: Mutex<Option<Arc<Session>>>,
}

const SSH_CONFIG: &str = "\
# Written by spotbuild for one build; the user's own ssh configuration is not read.
BatchMode yes
IdentitiesOnly yes
IdentityAgent none
ForwardAgent no
ForwardX11 no
ClearAllForwardings yes
PasswordAuthentication no
KbdInteractiveAuthentication no
ServerAliveInterval 5
ServerAliveCountMax 3
LogLevel ERROR
";

impl SshTransport {
    /// Connects, retrying with backoff until `target.connect_timeout` (sshd may not be up
    /// yet on a booting instance).
    pub async fn connect(target: SshTarget) -> Result<SshTransport, TransportError> {
        super::keys::create_private_dir(&target.dir).await?;
        let config = target.dir.join("ssh_config");
        tokio::fs::write(&config, SSH_CONFIG)
            .await
            .map_err(super::keys::write_error(&config))?;
        let t = SshTransport {
            target,
            session: Mutex::new(None),
        };
        let s = t.open().await?;
        *t.session.lock().await = Some(Arc::new(s));
        Ok(t)
    }

    fn builder(&self) -> SessionBuilder {
        let t = &self.target;
        let mut b = SessionBuilder::default();
        b.user(t.user.clone())
            .port(t.port)
            .keyfile(&t.key)
            .known_hosts_check(KnownHosts::Strict)
            .user_known_hosts_file(&t.known_hosts)
            .config_file(t.dir.join("ssh_config"))
            .control_directory(&t.dir)
            .connect_timeout(Duration::from_secs(5))
            .server_alive_interval(Duration::from_secs(5));
        b
    }

    async fn open(&self) -> Result<Session, TransportError> {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.builder().connect_mux(&self.target.host).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    let last = e.to_string();
                    // A wrong host key will not fix itself: fail at once.
                    if last.contains("HOST IDENTIFICATION HAS CHANGED") || last.contains("Host key verification failed") {
                        return Err(TransportError::HostKeyMismatch {
                            host: self.target.host.clone(),
                            message: last,
                        });
                    }
                    if started.elapsed() + delay > self.target.connect_timeout {
                        return Err(TransportError::Connect {
                            host: self.target.host.clone(),
                            waited: started.elapsed(),
                            last,
                        });
                    }
                    tracing::debug!(host = %self.target.host, error = %last, "ssh not ready; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(3));
                }
            }
        }
    }

    async fn current(&self) -> Result<Arc<Session>, TransportError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(self.open().await?);
        *guard = Some(s.clone());
        Ok(s)
    }

    fn io(&self, e: impl std::fmt::Display) -> TransportError {
        TransportError::Io {
            host: self.target.host.clone(),
            message: e.to_string(),
        }
    }

    /// Starts `argv` on the instance with stdout piped (the program and each argument are
    /// shell-quoted by `openssh`).
    async fn spawn(&self, argv: &[String], stdin: Stdio, stderr: Stdio) -> Result<openssh::Child<Arc<Session>>, TransportError> {
        let session = self.current().await?;
        let (program, args) = argv.split_first().expect("a command");
        session
            .arc_command(program.as_str())
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .await
            .map_err(|e| self.io(e))
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }
}

impl Transport for SshTransport {
    fn exec<'a>(&'a self, argv: &'a [String], stdin: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let mut child = self.spawn(argv, Stdio::piped(), Stdio::piped()).await?;
            let mut input = child.stdin().take().expect("piped");
            let write = async move {
                let r = input.write_all(&stdin).await;
                drop(input);
                r
            };
            let (written, output) = tokio::join!(write, child.wait_with_output());
            let output = output.map_err(|e| self.io(e))?;
            if !output.status.success() {
                return Err(TransportError::Command {
                    host: self.target.host.clone(),
                    command: argv.join(" "),
                    status: output.status.to_string(),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                });
            }
            written.map_err(|e| self.io(e))?;
            Ok(output.stdout)
        })
    }

    fn stream<'a>(&'a self, argv: &'a [String]) -> BoxFuture<'a, Result<Lines, TransportError>> {
        Box::pin(async move {
            let mut child = self.spawn(argv, Stdio::null(), Stdio::null()).await?;
            let stdout = child.stdout().take().expect("piped");
            // The child lives as long as the stream and is reaped when its output ends.
            let state = (BufReader::new(stdout).lines(), Some(child));
            let lines = futures::stream::unfold(state, |(mut lines, mut child)| async move {
                match lines.next_line().await {
                    Ok(Some(l)) => Some((Ok(l), (lines, child))),
                    Ok(None) => {
                        if let Some(c) = child.take() {
                            let _ = c.wait().await;
                        }
                        None
                    }
                    Err(e) => Some((Err(e), (lines, child))),
                }
            });
            Ok(Box::pin(lines) as Lines)
        })
    }

    fn reconnect(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let old = self.session.lock().await.take();
            if let Some(old) = old {
                if let Ok(s) = Arc::try_unwrap(old) {
                    let _ = s.close().await;
                }
            }
            self.current().await.map(|_| ())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(s) = self.session.lock().await.take() {
                if let Ok(s) = Arc::try_unwrap(s) {
                    let _ = s.close().await;
                }
            }
        })
    }
}

/// Whether a build directory leaves room for the control socket under it (`<dir>/a1/
/// .ssh-connectionXXXXXX/master`): Unix socket paths are limited to 108 bytes.
pub fn short_enough(dir: &Path) -> bool {
    dir.as_os_str().len() < 60
}
