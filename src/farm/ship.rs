//! Shipping: ask the instance what its baked mirror has, bundle only what it lacks, send
//! the bundle and then the job (its secrets on stdin, never on a command line).

use std::path::PathBuf;

use sha2::Digest;

use super::attempt::{Observation, Phase};
use super::driver::{Attempt, Connected, Held, Shipped};
use crate::errors::error_chain;
use crate::protocol::AgentInfo;
use crate::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("the agent's info answer is not what this controller speaks")]
    Info(#[source] serde_json::Error),
    #[error("the instance runs spotbuild {agent}, this controller is {controller} (hint: bake an image with this version: `make ami`)")]
    Version { agent: String, controller: String },
    /// A command ran on the instance and refused: another instance of the image would too.
    #[error("{what}")]
    Refused {
        what: &'static str,
        #[source]
        source: crate::transport::TransportError,
    },
    #[error(transparent)]
    Bundle(#[from] crate::git::BundleError),
    #[error("failed to bundle the commit: the bundling task ended abnormally")]
    BundleTask(#[source] tokio::task::JoinError),
    #[error("failed to read the bundle {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to serialise the job")]
    Job(#[source] serde_json::Error),
}

/// How far shipping got over the transport.
enum Sent {
    All { job_file: PathBuf, events_file: PathBuf },
    /// The transport failed, saying this.
    Dropped(String),
}

impl Attempt<'_, '_> {
    pub(super) async fn ship(&mut self, c: Connected) -> (Held, Observation) {
        match self.try_ship(&c).await {
            Ok(Sent::All { job_file, events_file }) => (
                Held::Shipped(Shipped {
                    connected: c,
                    job_file,
                    events_file,
                    agent_pid: None,
                }),
                Observation::Shipped,
            ),
            // The instance may have gone: EC2 says whether that is why.
            Ok(Sent::Dropped(why)) => {
                let o = self.lost_or(&c.instance_id, why).await;
                (Held::Connected(c), o)
            }
            Err(e) => (Held::Connected(c), Observation::Fatal(error_chain(&e))),
        }
    }

    /// `Err`: this machine failed, or the instance refused (no attempt fixes either).
    async fn try_ship(&mut self, c: &Connected) -> Result<Sent, ShipError> {
        let t = &*c.transport;
        let g = self.g;
        let remote = &g.settings.remote;
        let started = tokio::time::Instant::now();
        let argv = g.agent_argv(&["info", "--mirror", &remote.mirror.to_string_lossy()]);
        let answer = match t.exec(&argv, Vec::new()).await {
            Ok(out) => out,
            Err(source @ TransportError::Command { .. }) => {
                return Err(ShipError::Refused {
                    what: "the instance's spotbuild did not answer `agent info`",
                    source,
                })
            }
            Err(e) => return Ok(Sent::Dropped(format!("the agent did not answer: {e}"))),
        };
        let info: AgentInfo = serde_json::from_slice(&answer).map_err(ShipError::Info)?;
        if info.version != env!("CARGO_PKG_VERSION") {
            return Err(ShipError::Version {
                agent: info.version,
                controller: env!("CARGO_PKG_VERSION").into(),
            });
        }
        let bundle = g.attempt_dir(self.n).join("commit.bundle");
        let (git_dir, commit, have, out) = (g.git_dir.clone(), self.job.commit.clone(), info.mirror_commit.clone(), bundle.clone());
        let thin = tokio::task::spawn_blocking(move || crate::git::create_bundle(&git_dir, &commit, have.as_deref(), &out))
            .await
            .map_err(ShipError::BundleTask)??;
        let bytes = tokio::fs::read(&bundle).await.map_err(|source| ShipError::Read { path: bundle.clone(), source })?;
        let _ = tokio::fs::remove_file(&bundle).await;
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let workdir = remote.workdir.join(&g.build_id).join(format!("a{}", self.n));
        let remote_bundle = workdir.join("commit.bundle");
        let size = bytes.len() as u64;
        let argv = g.agent_argv(&["receive", "--to", &remote_bundle.to_string_lossy(), "--sha256", &sha]);
        match t.exec(&argv, bytes).await {
            Ok(_) => {}
            // It arrived and was refused (damaged, no space): the same would happen again.
            Err(source @ TransportError::Command { .. }) => return Err(ShipError::Refused { what: "the instance refused the commit", source }),
            Err(e) => return Ok(Sent::Dropped(format!("failed to ship the commit: {e}"))),
        }
        self.record.shipped_bytes = Some(size);
        self.record.thin_bundle = Some(thin);
        super::job::place_on_instance(&mut self.job, &workdir, remote_bundle, thin.then(|| remote.mirror.clone()), remote);
        let spec = serde_json::to_vec(&self.job).map_err(ShipError::Job)?;
        let job_file = workdir.join("job.json");
        let argv = g.agent_argv(&["receive", "--to", &job_file.to_string_lossy()]);
        match t.exec(&argv, spec).await {
            Ok(_) => {}
            Err(source @ TransportError::Command { .. }) => return Err(ShipError::Refused { what: "the instance refused the job", source }),
            Err(e) => return Ok(Sent::Dropped(format!("failed to ship the job: {e}"))),
        }
        let what = match (&info.mirror_commit, thin) {
            (Some(m), true) => format!("only what the mirror at {} lacks", m.get(..12).unwrap_or(m)),
            _ => "full history".into(),
        };
        self.say(Phase::Shipping, format!("shipped {} ({what}) in {:.1}s", human_bytes(size), started.elapsed().as_secs_f64()));
        Ok(Sent::All {
            job_file,
            events_file: workdir.join("events.ndjson"),
        })
    }
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
