//! Reaching a running instance: the transport factory the driver is given, so that a test
//! can hand it a fake, and the real one that picks SSH or SSM from the settings.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::objects::ObjectStore;
use crate::settings::{Config, TransportKind};
use crate::transport::ssh::{SshTarget, SshTransport};
use crate::transport::ssm::{Commands, SsmTarget, SsmTransport};
use crate::transport::{keys, Cidr, Transport, TransportError};

/// What an attempt knows about the instance it is about to reach.
#[derive(Debug, Clone)]
pub struct Target {
    pub build_id: String,
    pub attempt: u32,
    pub instance_id: String,
    /// The private address EC2 reported (SSM needs none).
    pub address: Option<String>,
    /// This attempt's client key, authorised on the instance by its user data.
    pub client_key: PathBuf,
    /// The instance's host key, pinned.
    pub host_public: String,
    /// This attempt's private directory on this machine.
    pub dir: PathBuf,
    /// The unique id of the instance's role, when known: SSM objects then go where only
    /// this instance may write (`PREFIX/<role id>:<instance id>/`).
    pub role_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No attempt would do better: the settings or the address are wrong.
    #[error("bad [remote] allow_cidrs entry `{entry}`")]
    AllowCidrs {
        entry: String,
        #[source]
        source: crate::transport::CidrError,
    },
    #[error("{0} has no private address")]
    NoAddress(String),
    #[error("[remote] transport = \"ssm\" but no SSM client was set up")]
    NoSsmClients,
    #[error(transparent)]
    Refused(TransportError),
    #[error(transparent)]
    KnownHosts(keys::KeyError),
    /// The instance did not answer in time: another attempt may fare better.
    #[error(transparent)]
    Transport(TransportError),
}

impl ConnectError {
    /// Whether another attempt could not do better. A host key that does not match the
    /// pinned one is an attack or a misconfiguration: it fails the build.
    pub fn fatal(&self) -> bool {
        !matches!(self, ConnectError::Transport(e) if !matches!(e, TransportError::HostKeyMismatch { .. }))
    }
}

/// Makes transports to instances.
pub trait Connector: Send + Sync {
    /// How the connection is made, for the progress line (`ssh user@10.0.0.5 …`).
    fn describe(&self, to: &Target) -> String;
    /// Connects, bounded by the connect timeout of the settings.
    fn connect<'a>(&'a self, to: &'a Target) -> BoxFuture<'a, Result<Box<dyn Transport>, ConnectError>>;
}

/// Where an attempt's SSM objects go: `PREFIX/BUILD/aN`, or, with the role's id known,
/// `PREFIX/<role id>:<instance id>/BUILD/aN` (an instance role's `aws:userid`), the only
/// place the instance may write.
pub fn transport_prefix(prefix: &str, to: &Target) -> String {
    let prefix = prefix.trim_end_matches('/');
    match &to.role_id {
        Some(role) => format!("{prefix}/{role}:{}/{}/a{}", to.instance_id, to.build_id, to.attempt),
        None => format!("{prefix}/{}/a{}", to.build_id, to.attempt),
    }
}

/// What the SSM transport talks to.
#[derive(Clone)]
pub struct SsmClients {
    pub commands: Arc<dyn Commands>,
    pub objects: Arc<dyn ObjectStore>,
}

/// SSH or SSM, as `[remote] transport` says.
pub struct Connectors {
    pub settings: Config,
    /// Set when `[remote] transport = "ssm"`.
    pub ssm: Option<SsmClients>,
}

impl Connector for Connectors {
    fn describe(&self, to: &Target) -> String {
        let remote = &self.settings.remote;
        let bound = humantime::format_duration(remote.connect_timeout);
        match (remote.transport, &self.ssm) {
            (TransportKind::Ssh, _) => {
                format!("ssh {}@{} (host key pinned; up to {bound})", remote.user, to.address.as_deref().unwrap_or("?"))
            }
            (TransportKind::Ssm, Some(c)) => {
                format!("ssm {} via s3://{}/{} (up to {bound})", to.instance_id, c.objects.bucket(), remote.ssm.prefix)
            }
            (TransportKind::Ssm, None) => format!("ssm {}", to.instance_id),
        }
    }

    fn connect<'a>(&'a self, to: &'a Target) -> BoxFuture<'a, Result<Box<dyn Transport>, ConnectError>> {
        Box::pin(async move {
            match self.settings.remote.transport {
                TransportKind::Ssh => self.ssh(to).await,
                TransportKind::Ssm => self.ssm(to).await,
            }
        })
    }
}

impl Connectors {
    async fn ssh(&self, to: &Target) -> Result<Box<dyn Transport>, ConnectError> {
        let remote = &self.settings.remote;
        let address = to.address.clone().ok_or_else(|| ConnectError::NoAddress(to.instance_id.clone()))?;
        let allowed = remote
            .allow_cidrs
            .iter()
            .map(|c| c.parse::<Cidr>().map_err(|source| ConnectError::AllowCidrs { entry: c.clone(), source }))
            .collect::<Result<Vec<_>, _>>()?;
        crate::transport::check_allowed(&address, &allowed).map_err(ConnectError::Refused)?;
        let known_hosts = to.dir.join("known_hosts");
        keys::write_known_hosts(&known_hosts, &address, remote.ssh_port, &to.host_public)
            .await
            .map_err(ConnectError::KnownHosts)?;
        let target = SshTarget {
            host: address,
            port: remote.ssh_port,
            user: remote.user.clone(),
            key: to.client_key.clone(),
            known_hosts,
            dir: to.dir.clone(),
            connect_timeout: remote.connect_timeout,
        };
        let t = SshTransport::connect(target).await.map_err(ConnectError::Transport)?;
        Ok(Box::new(t))
    }

    /// SSM needs no address and no inbound port: the instance's SSM agent polls for
    /// commands, and bytes go through the bucket.
    async fn ssm(&self, to: &Target) -> Result<Box<dyn Transport>, ConnectError> {
        let remote = &self.settings.remote;
        let clients = self.ssm.clone().ok_or(ConnectError::NoSsmClients)?;
        let target = SsmTarget {
            instance_id: to.instance_id.clone(),
            prefix: transport_prefix(&remote.ssm.prefix, to),
            agent: remote.agent.clone(),
            region: self.settings.cloud.region.clone(),
            connect_timeout: remote.connect_timeout,
            command_timeout: remote.ssm.command_timeout,
            stream_timeout: self.settings.cloud.ttl,
            follow: Default::default(),
        };
        let t = SsmTransport::connect(target, clients.commands, clients.objects).await.map_err(ConnectError::Transport)?;
        Ok(Box::new(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_writes_its_objects_only_under_its_own_role_session() {
        let mut to = Target {
            build_id: "b1".into(),
            attempt: 2,
            instance_id: "i-0abc".into(),
            address: None,
            client_key: PathBuf::new(),
            host_public: String::new(),
            dir: PathBuf::new(),
            role_id: None,
        };
        assert_eq!(transport_prefix("spotbuild/", &to), "spotbuild/b1/a2");
        to.role_id = Some("AROAEXAMPLE".into());
        assert_eq!(transport_prefix("spotbuild", &to), "spotbuild/AROAEXAMPLE:i-0abc/b1/a2");
    }
}
