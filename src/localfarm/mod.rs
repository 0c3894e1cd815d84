//! The local farm: everything spotbuild needs from AWS, on one machine, with only the
//! control plane emulated. The EC2, S3 and SSM APIs are moto server's (SSM's commands are
//! run by the farm, see [`ssm`]); each instance it reports running is backed by a real host
//! (see [`host`]); images go to a registry v2 server on loopback and are built by this
//! machine's Docker engine.
//!
//! Guarantees: hosts live only in the farm's own subnet, which is bridged locally, so no
//! address the emulator could invent is ever reached; every host, namespace and child
//! process the farm starts is removed when it stops (and, after a SIGKILL, by the next
//! `farm up` on the same subnet). The farm runs as root but gives no one root: the
//! emulator lives in a namespace of its own behind a door that wants the farm's key
//! ([`front`]), the control API wants the farm's token, both kept in the state file (mode
//! 0600), and hosts log in and run commands only as the non-root build user ([`user`]).
//! Assumptions: run as root, with iproute2, sshd, useradd, docker-registry and moto_server
//! installed (`make farm-deps`).

pub mod front;
pub mod host;
pub mod netns;
pub mod sigv4;
pub mod ssm;
pub mod user;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Filter;
use axum::extract::{Path as UrlPath, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine;
use tokio::sync::Mutex;

use host::{Host, HostSpec};

/// The farm's state file, read by `farm status`, `farm down` and the tests.
pub const STATE_FILE: &str = "farm.json";
/// The spotbuild.toml the farm writes for builds against it (over SSH).
pub const CONFIG_FILE: &str = "spotbuild.toml";
/// The same, for builds over SSM.
pub const CONFIG_SSM_FILE: &str = "spotbuild-ssm.toml";
/// Where the emulator listens inside its namespace.
const EMULATOR: ([u8; 4], u16) = ([127, 0, 0, 1], 5000);

#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: PathBuf,
    /// The /24 the emulated subnet and the bridge use, e.g. 10.251.37.0.
    pub subnet: Ipv4Addr,
    pub moto_server: PathBuf,
    pub registry_server: PathBuf,
    pub sshd: PathBuf,
    /// The spotbuild binary hosts run as the agent.
    pub agent: PathBuf,
    pub region: String,
    /// How often the farm looks at the emulator for instances to back or remove.
    pub poll: Duration,
    /// A repository to bake into the "image" as its git mirror, so builds ship only what
    /// the mirror lacks (as an AMI baked with `ami/` would).
    pub mirror_of: Option<PathBuf>,
    /// The non-root account hosts log in as (created if missing).
    pub user: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FarmState {
    pub pid: u32,
    /// The emulator's door (EC2, S3, SSM): requests signed with the farm's key only.
    pub ec2_endpoint: String,
    pub registry: String,
    /// The control API: requests bearing `token` only.
    pub control: String,
    pub token: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The build user hosts log in as.
    pub user: String,
    /// The bucket of the SSM transport's objects.
    pub transport_bucket: String,
    /// The spotbuild.toml for builds over SSM.
    pub config_ssm: PathBuf,
    pub subnet_cidr: String,
    pub subnet_id: String,
    /// The emulator's x86_64 image, and its arm64 one (`[cloud.arm64] ami`).
    pub ami: String,
    #[serde(default)]
    pub ami_arm64: String,
    pub bridge: String,
    pub region: String,
    pub config: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error("the local farm needs root (it creates network namespaces and a bridge)")]
    NotRoot,
    #[error("{} is not installed", .0.display())]
    Missing(PathBuf),
    #[error("another farm is using subnet {0} (bridge {1}); stop it with `spotbuild farm down`, or pick another --subnet")]
    SubnetInUse(String, String),
    #[error("failed to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A request to the EC2 emulator; the SDK's error types differ per operation.
    #[error("failed to {what}")]
    Ec2 {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to bake the git mirror: {stderr}")]
    Mirror { stderr: String },
    #[error("failed to find an image: the emulator has none")]
    NoImage,
    #[error("failed to start {what}: not answering at {url} after {}", humantime::format_duration(*.waited))]
    NotAnswering {
        what: String,
        url: String,
        waited: Duration,
    },
    #[error("{address} is outside the farm's subnet {subnet}")]
    OutsideSubnet { address: Ipv4Addr, subnet: String },
    #[error(transparent)]
    Net(#[from] netns::NetError),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error("the build user {user} cannot reach the farm's directory: {} is closed to it", .path.display())]
    Closed { path: PathBuf, user: String },
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> FarmError + '_ {
    move |source| FarmError::Io {
        what: what.to_string(),
        source,
    }
}

fn ec2_err<E, R>(what: &str) -> impl FnOnce(aws_sdk_ec2::error::SdkError<E, R>) -> FarmError + '_
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    move |e| FarmError::Ec2 {
        what: what.to_string(),
        source: Box::new(e),
    }
}

/// The short name every interface, namespace and file of this farm carries.
pub fn prefix_for(subnet: Ipv4Addr) -> String {
    format!("sbf{}", subnet.octets()[2])
}

/// What one poll of the emulator means for the hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAction {
    Start { instance_id: String, address: Ipv4Addr },
    Stop { instance_id: String },
}

/// Pure: instances that run (or are starting) get a host; hosts whose instance is ending
/// or gone are stopped. `seen` maps instance id to (state is pending/running, address).
pub fn reconcile(seen: &BTreeMap<String, (bool, Option<Ipv4Addr>)>, hosts: &[String]) -> Vec<HostAction> {
    let mut actions = Vec::new();
    for (id, (alive, address)) in seen {
        if *alive && !hosts.contains(id) {
            if let Some(address) = address {
                actions.push(HostAction::Start {
                    instance_id: id.clone(),
                    address: *address,
                });
            }
        }
    }
    for id in hosts {
        if !seen.get(id).is_some_and(|(alive, _)| *alive) {
            actions.push(HostAction::Stop { instance_id: id.clone() });
        }
    }
    actions
}

type Hosts = Arc<Mutex<BTreeMap<String, Host>>>;

struct Farm {
    settings: Settings,
    state: FarmState,
    ec2: aws_sdk_ec2::Client,
    registry_port: u16,
    prefix: String,
    hosts: Hosts,
    next_index: std::sync::atomic::AtomicU32,
    user: user::BuildUser,
    /// What each host's door to S3 is: the port it listens on inside, and its routes.
    s3_door: (u16, axum::Router),
    /// The instance role's key, from each host's metadata service.
    instance_credentials: (String, String),
}

/// Runs the farm until `shutdown` resolves, then removes everything it started. `ready`
/// is called once the state file is written.
///
/// Cleanup is awaited on the way out rather than done by guards in `Drop`, which could
/// only block; after a panic or a SIGKILL the next `farm up` on the subnet removes what
/// is left.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>, ready: impl FnOnce(&FarmState)) -> Result<(), FarmError> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(FarmError::NotRoot);
    }
    for p in [&settings.moto_server, &settings.registry_server, &settings.sshd] {
        if !is_file(p).await {
            return Err(FarmError::Missing(p.clone()));
        }
    }
    let prefix = prefix_for(settings.subnet);
    let bridge = format!("{prefix}br");
    // One farm per subnet on this machine, whatever its directory: the owner's pid is
    // kept under /run, and a live owner is never disturbed.
    let owner = PathBuf::from(format!("/run/spotbuild-{prefix}.pid"));
    let other = tokio::fs::read_to_string(&owner).await.ok().and_then(|p| p.trim().parse::<u32>().ok());
    if other.is_some_and(|p| p != std::process::id() && pid_alive(p)) {
        return Err(FarmError::SubnetInUse(format!("{}/24", settings.subnet), bridge));
    }
    tokio::fs::write(&owner, std::process::id().to_string())
        .await
        .map_err(io_err("record the farm's owner"))?;
    let result = run_owned(&settings, prefix, bridge, shutdown, ready).await;
    let _ = tokio::fs::remove_file(&owner).await;
    result
}

/// The farm's services and bridge, once this process owns the subnet.
async fn run_owned(
    settings: &Settings,
    prefix: String,
    bridge: String,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&FarmState),
) -> Result<(), FarmError> {
    // What a killed farm on this subnet left behind.
    for ns in netns::namespaces_with_prefix(&format!("{prefix}-")).await {
        netns::delete_host(&ns, "").await;
    }
    if netns::link_exists(&bridge).await {
        netns::delete_link(&bridge).await;
    }
    let user = user::ensure(&settings.user).await?;
    prepare_dir(settings, &user).await?;

    // The emulator, in a namespace of its own: only the farm's doors lead to it.
    let aws_ns = format!("{prefix}-aws");
    netns::create_private(&aws_ns).await?;
    let upstream = front::Upstream {
        ns: aws_ns.clone(),
        addr: std::net::SocketAddr::from(EMULATOR),
    };
    let _moto = spawn(
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &aws_ns])
            .arg(&settings.moto_server)
            .args(["-H", "127.0.0.1", "-p", &EMULATOR.1.to_string()]),
        &settings.dir.join("moto.log"),
    )
    .await?;
    let registry_port = free_port();
    let registry_dir = settings.dir.join("registry");
    let registry_config = settings.dir.join("registry.yml");
    tokio::fs::write(
        &registry_config,
        format!(
            "version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: 127.0.0.1:{registry_port}}}\n",
            registry_dir.display()
        ),
    )
    .await
    .map_err(io_err("write the registry configuration"))?;
    let _registry = spawn(
        tokio::process::Command::new(&settings.registry_server).arg("serve").arg(&registry_config),
        &settings.dir.join("registry.log"),
    )
    .await?;

    let (access_key_id, secret_access_key, token) = (format!("AKIA{}", random_hex(8).to_uppercase()), random_hex(20), random_hex(16));
    let hosts: Hosts = Arc::new(Mutex::new(BTreeMap::new()));
    let door = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io_err("listen for the emulator's door"))?;
    let door_port = door.local_addr().map_err(io_err("listen for the emulator's door"))?.port();
    let ec2_endpoint = format!("http://127.0.0.1:{door_port}");
    let transport_bucket = "spotbuild-farm-transport".to_string();
    let namespaces: ssm::Namespaces = {
        let hosts = hosts.clone();
        Arc::new(move |id: &str| {
            let (hosts, id) = (hosts.clone(), id.to_string());
            Box::pin(async move { hosts.lock().await.get(&id).map(|h| h.ns.clone()) })
        })
    };
    let instance_env = vec![
        ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("AWS_REGION".to_string(), settings.region.clone()),
        // The host's door to S3 listens at the same address inside the host.
        ("AWS_ENDPOINT_URL_S3".to_string(), ec2_endpoint.clone()),
    ];
    let runner = Arc::new(ssm::Runner::new(namespaces, user.clone(), instance_env));
    let owner = front::router(
        upstream.clone(),
        front::Policy::Owner {
            key_id: access_key_id.clone(),
            secret: secret_access_key.clone(),
            ssm: runner,
        },
    );
    let door_task = tokio::spawn(async move {
        let _ = axum::serve(door, owner).await;
    });
    let result = async {
        let waited = Duration::from_secs(60);
        if !front::wait_upstream(&upstream, waited).await {
            return Err(FarmError::NotAnswering {
                what: "the AWS emulator (moto_server)".into(),
                url: format!("http://{} in namespace {aws_ns}", upstream.addr),
                waited,
            });
        }
        wait_http(&format!("http://127.0.0.1:{registry_port}/v2/"), Duration::from_secs(30), "the registry").await?;
        let sdk = sdk_config(&ec2_endpoint, &settings.region, &access_key_id, &secret_access_key).await;
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let (subnet_id, ami, ami_arm64) = prepare_ec2(&ec2, settings.subnet, &settings.region).await?;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).build());
        s3.create_bucket()
            .bucket(&transport_bucket)
            .send()
            .await
            .map_err(ec2_err("create the transport bucket"))?;
        let gateway = with_last(settings.subnet, 1);
        netns::create_bridge(&bridge, gateway, 24).await?;
        let control = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io_err("listen for farm control"))?;
        let control_addr = control.local_addr().map_err(io_err("listen for farm control"))?;
        let farm = Farm {
            settings: settings.clone(),
            state: FarmState {
                pid: std::process::id(),
                ec2_endpoint: ec2_endpoint.clone(),
                registry: format!("127.0.0.1:{registry_port}"),
                control: format!("http://{control_addr}"),
                token,
                access_key_id: access_key_id.clone(),
                secret_access_key: secret_access_key.clone(),
                user: user.name.clone(),
                transport_bucket: transport_bucket.clone(),
                config_ssm: settings.dir.join(CONFIG_SSM_FILE),
                subnet_cidr: format!("{}/24", settings.subnet),
                subnet_id,
                ami,
                ami_arm64,
                bridge: bridge.clone(),
                region: settings.region.clone(),
                config: settings.dir.join(CONFIG_FILE),
            },
            ec2,
            registry_port,
            prefix: prefix.clone(),
            hosts: hosts.clone(),
            next_index: std::sync::atomic::AtomicU32::new(1),
            user: user.clone(),
            s3_door: (door_port, front::router(upstream.clone(), front::Policy::Host { bucket: transport_bucket.clone() })),
            instance_credentials: (format!("ASIA{}", random_hex(8).to_uppercase()), random_hex(20)),
        };
        serve(farm, control, shutdown, ready).await
    }
    .await;
    door_task.abort();
    // A host being removed by a control request when the farm stopped may be half gone:
    // sweep every namespace of this farm, whatever state it was left in (the emulator's too).
    for ns in netns::namespaces_with_prefix(&format!("{prefix}-")).await {
        netns::delete_host(&ns, "").await;
    }
    netns::delete_link(&bridge).await;
    result
}

/// The farm's directory as its hosts see it: open to the build user for traversal only
/// (state, keys and logs stay root's), the agent and the git mirror baked in as an image
/// would have them, and a work directory the build user owns.
async fn prepare_dir(settings: &Settings, user: &user::BuildUser) -> Result<(), FarmError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = &settings.dir;
    tokio::fs::create_dir_all(dir.join("hosts"))
        .await
        .map_err(io_err("create the farm directory"))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .await
        .map_err(io_err("open the farm directory to the build user"))?;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(m) = tokio::fs::metadata(ancestor).await else { continue };
        let mode = m.mode();
        let open = mode & 0o001 != 0 || (m.uid() == user.uid && mode & 0o100 != 0) || (m.gid() == user.gid && mode & 0o010 != 0);
        if !open {
            return Err(FarmError::Closed {
                path: ancestor.to_path_buf(),
                user: user.name.clone(),
            });
        }
    }
    // The agent, where the build user can run it whatever the permissions of its source.
    let bin = dir.join("bin");
    tokio::fs::create_dir_all(&bin).await.map_err(io_err("create the farm's bin directory"))?;
    let agent = bin.join("spotbuild");
    let _ = tokio::fs::remove_file(&agent).await;
    if tokio::fs::hard_link(&settings.agent, &agent).await.is_err() {
        tokio::fs::copy(&settings.agent, &agent).await.map_err(io_err("copy the agent into the farm"))?;
    }
    tokio::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))
        .await
        .map_err(io_err("make the agent runnable"))?;
    let work = dir.join("work");
    tokio::fs::create_dir_all(&work).await.map_err(io_err("create the work directory"))?;
    user::give(user, &work, false).await?;
    let mirror = dir.join("mirror.git");
    let _ = tokio::fs::remove_dir_all(&mirror).await;
    if let Some(repo) = &settings.mirror_of {
        let out = tokio::process::Command::new("git")
            .args(["clone", "-q", "--mirror"])
            .arg(repo)
            .arg(&mirror)
            .output()
            .await
            .map_err(io_err("run git"))?;
        if !out.status.success() {
            return Err(FarmError::Mirror {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        user::give(user, &mirror, true).await?;
    }
    Ok(())
}

/// `bytes` random bytes from the OS, as hex.
fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("the OS has randomness");
    hex::encode(b)
}

/// Serves the control API on `control` and backs instances with hosts until `shutdown`;
/// then removes every host and the state file.
async fn serve(
    farm: Farm,
    control: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&FarmState),
) -> Result<(), FarmError> {
    tokio::fs::write(&farm.state.config, config_text(&farm.settings, &farm.state, false))
        .await
        .map_err(io_err("write the farm's spotbuild.toml"))?;
    tokio::fs::write(&farm.state.config_ssm, config_text(&farm.settings, &farm.state, true))
        .await
        .map_err(io_err("write the farm's spotbuild-ssm.toml"))?;
    // Written before the control API runs: connections wait in the bound listener's
    // backlog, and a farm whose state cannot be written has started no task to stop. It
    // holds the farm's key and token: the owner's only.
    let state_path = farm.settings.dir.join(STATE_FILE);
    write_private(&state_path, &serde_json::to_vec_pretty(&farm.state).expect("serialisable"))
        .await
        .map_err(io_err("write the farm state"))?;
    let token = farm.state.token.clone();
    let farm = Arc::new(farm);
    let router = axum::Router::new()
        .route("/hosts", axum::routing::get(list_hosts))
        .route("/hosts/{id}/interrupt", axum::routing::post(interrupt_host))
        .route("/hosts/{id}/kill", axum::routing::post(kill_host))
        .route("/hosts/{id}/cut", axum::routing::post(cut_host))
        .route("/hosts/{id}/freeze", axum::routing::post(freeze_host))
        .route("/hosts/{id}/kill-agent", axum::routing::post(kill_agent))
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let bearer = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
                if bearer.is_some_and(|b| front::same_secret(b, &token)) {
                    next.run(req).await
                } else {
                    (axum::http::StatusCode::UNAUTHORIZED, "spotbuild farm: the control API wants the farm's token (farm.json)\n").into_response()
                }
            }
        }))
        .with_state(farm.clone());
    let control_task = tokio::spawn(async move {
        let _ = axum::serve(control, router).await;
    });
    ready(&farm.state);

    let mut tick = tokio::time::interval(farm.settings.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tick.tick() => {}
        }
        // A pass runs to its end, never cancelled midway: that would leave a host half made
        // or half removed (out of the map, its namespace still there).
        if let Err(e) = farm.poll().await {
            tracing::warn!(error = %crate::errors::error_chain(&e), "farm poll failed");
        }
    };
    control_task.abort();
    let mut hosts = farm.hosts.lock().await;
    for (_, mut h) in std::mem::take(&mut *hosts) {
        h.destroy().await;
    }
    let _ = tokio::fs::remove_file(&state_path).await;
    result
}

impl Farm {
    /// One reconcile pass: back new instances with hosts, remove hosts whose instance ended,
    /// and play out TTLs and reclaims.
    async fn poll(&self) -> Result<(), FarmError> {
        let seen = self.instances().await?;
        let ids: Vec<String> = self.hosts.lock().await.keys().cloned().collect();
        for action in reconcile(&seen, &ids) {
            match action {
                HostAction::Start { instance_id, address } => {
                    if let Err(e) = self.start_host(&instance_id, address).await {
                        tracing::warn!(instance = %instance_id, error = %crate::errors::error_chain(&e), "failed to start a host");
                    }
                }
                HostAction::Stop { instance_id } => {
                    let host = self.hosts.lock().await.remove(&instance_id);
                    if let Some(mut h) = host {
                        h.destroy().await;
                    }
                }
            }
        }
        // A reclaim or a TTL: the host dies and EC2 reports the instance terminated.
        let now = SystemTime::now();
        let due: Vec<String> = self
            .hosts
            .lock()
            .await
            .values()
            .filter(|h| h.reclaim_at.is_some_and(|t| t <= now) || h.expires_at.is_some_and(|t| t <= now))
            .map(|h| h.instance_id.clone())
            .collect();
        for id in due {
            self.kill(&id).await;
        }
        Ok(())
    }

    async fn instances(&self) -> Result<BTreeMap<String, (bool, Option<Ipv4Addr>)>, FarmError> {
        let mut out = BTreeMap::new();
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(Filter::builder().name("subnet-id").values(&self.state.subnet_id).build())
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(ec2_err("list the farm's instances"))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = i.instance_id() else { continue };
                let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
                let alive = state == "pending" || state == "running";
                let address = i.private_ip_address().and_then(|a| a.parse().ok());
                out.insert(id.to_string(), (alive, address));
            }
        }
        Ok(out)
    }

    async fn start_host(&self, instance_id: &str, address: Ipv4Addr) -> Result<(), FarmError> {
        // Only ever an address of the bridged subnet.
        if with_last(address, 0) != self.settings.subnet {
            return Err(FarmError::OutsideSubnet {
                address,
                subnet: self.state.subnet_cidr.clone(),
            });
        }
        let user_data = self
            .ec2
            .describe_instance_attribute()
            .instance_id(instance_id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .map_err(|e| FarmError::Ec2 {
                what: format!("read the user data of {instance_id}"),
                source: Box::new(e),
            })?;
        let script = user_data
            .user_data()
            .and_then(|u| u.value())
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        let index = self.next_index.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let spec = HostSpec {
            instance_id,
            ns: format!("{}-{instance_id}", self.prefix),
            veth: (format!("{}h{index}", self.prefix), format!("{}i{index}", self.prefix)),
            bridge: &self.state.bridge,
            address,
            prefix: 24,
            dir: self.settings.dir.join("hosts").join(instance_id),
            sshd: &self.settings.sshd,
            registry_port: self.registry_port,
            boot: crate::cloud::userdata::parse(&script),
            user: &self.user,
            s3_door: self.s3_door.clone(),
            credentials: self.instance_credentials.clone(),
        };
        let host = Host::start(spec).await?;
        tracing::info!(instance = %instance_id, %address, "host up");
        self.hosts.lock().await.insert(instance_id.to_string(), host);
        Ok(())
    }

    /// A spot reclaim (or the TTL): the host dies at once and EC2 terminates the instance.
    async fn kill(&self, instance_id: &str) -> bool {
        let host = self.hosts.lock().await.remove(instance_id);
        let Some(mut h) = host else { return false };
        // As on EC2: the instance is reported shutting down by the time its host is gone.
        let _ = self.ec2.terminate_instances().instance_ids(instance_id).send().await;
        h.destroy().await;
        true
    }
}

#[derive(serde::Serialize)]
struct HostView {
    instance_id: String,
    address: String,
    namespace: String,
    sshd_pid: Option<u32>,
    interrupted: bool,
}

async fn list_hosts(State(farm): State<Arc<Farm>>) -> Json<Vec<HostView>> {
    let hosts = farm.hosts.lock().await;
    Json(
        hosts
            .values()
            .map(|h| HostView {
                instance_id: h.instance_id.clone(),
                address: h.address.to_string(),
                namespace: h.ns.clone(),
                sshd_pid: h.sshd_pid,
                interrupted: h.notice.load(std::sync::atomic::Ordering::SeqCst) > 0,
            })
            .collect(),
    )
}

#[derive(serde::Deserialize)]
struct InterruptQuery {
    /// Seconds of warning announced (EC2 gives two minutes).
    #[serde(default = "two_minutes")]
    warning: u64,
    /// Reclaim the host this many seconds after the notice.
    kill_after: Option<u64>,
}

fn two_minutes() -> u64 {
    120
}

fn not_found(id: &str) -> axum::response::Response {
    (axum::http::StatusCode::NOT_FOUND, format!("no host for instance {id}\n")).into_response()
}

async fn interrupt_host(
    State(farm): State<Arc<Farm>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<InterruptQuery>,
) -> axum::response::Response {
    let mut hosts = farm.hosts.lock().await;
    let Some(h) = hosts.get_mut(&id) else { return not_found(&id) };
    h.interrupt(Duration::from_secs(q.warning), q.kill_after.map(Duration::from_secs));
    "interruption notice posted\n".into_response()
}

async fn kill_host(State(farm): State<Arc<Farm>>, UrlPath(id): UrlPath<String>) -> axum::response::Response {
    if farm.kill(&id).await {
        "host killed, instance terminated\n".into_response()
    } else {
        not_found(&id)
    }
}

async fn cut_host(State(farm): State<Arc<Farm>>, UrlPath(id): UrlPath<String>) -> axum::response::Response {
    let hosts = farm.hosts.lock().await;
    let Some(h) = hosts.get(&id) else { return not_found(&id) };
    format!("{} connection(s) cut\n", h.cut_connections().await).into_response()
}

async fn freeze_host(State(farm): State<Arc<Farm>>, UrlPath(id): UrlPath<String>) -> axum::response::Response {
    let hosts = farm.hosts.lock().await;
    let Some(h) = hosts.get(&id) else { return not_found(&id) };
    format!("{} process(es) stopped\n", h.freeze().await).into_response()
}

async fn kill_agent(State(farm): State<Arc<Farm>>, UrlPath(id): UrlPath<String>) -> axum::response::Response {
    let hosts = farm.hosts.lock().await;
    let Some(h) = hosts.get(&id) else { return not_found(&id) };
    format!("{} agent process(es) killed\n", h.kill_agent().await).into_response()
}

fn config_text(s: &Settings, st: &FarmState, ssm: bool) -> String {
    let (file, transport) = if ssm {
        (
            CONFIG_SSM_FILE,
            format!(
                r#"# No inbound port: commands go through SSM (run by the farm on the host), bytes
# through the transport bucket.
transport = "ssm"

[remote.ssm]
bucket = "{bucket}"
endpoint = "{endpoint}"
s3_endpoint = "{endpoint}"
"#,
                bucket = st.transport_bucket,
                endpoint = st.ec2_endpoint,
            ),
        )
    } else {
        (CONFIG_FILE, "transport = \"ssh\"\n".to_string())
    };
    format!(
        r#"# The local farm's settings, written by `spotbuild farm up`. Use them with
#   eval "$(spotbuild farm --dir {dir} env)"    (the farm's key and this file)
#   spotbuild --config {config} build --all
# The emulator accepts only the farm's key. {other} is the same farm over {other_transport}.

[registry]
url = "{registry}/farm"
auth = "none"

[cloud]
endpoint = "{endpoint}"
region = "{region}"
subnets = ["{subnet_id}"]
ami = "{ami}"
instance_types = ["m7a.16xlarge", "c7a.16xlarge", "m6a.16xlarge"]
ttl = "3h"
running_timeout = "30s"
{profile}
[cloud.arm64]
# The emulator's arm64 image. The farm's hosts are this machine, so an arm64 build runs
# here too: it works when the Dockerfile runs nothing (COPY-only, FROM scratch).
ami = "{ami_arm64}"
instance_types = ["c7g.16xlarge", "m7g.16xlarge"]

[ledger]
# What each build cost, for `spotbuild report` (the emulator's prices are not AWS's).
url = "{ledger}"

[remote]
# A non-root login, as on an instance baked with ami/.
user = "{user}"
agent = "{agent}"
workdir = "{work}"
mirror = "{mirror}"
allow_cidrs = ["{cidr}"]
connect_timeout = "30s"
# A host shares this machine's kernel: at a deadline it must not power the machine off.
# The farm plays out each instance's TTL itself.
shutdown_command = []
{transport}"#,
        dir = s.dir.display(),
        config = s.dir.join(file).display(),
        // The SSM agent registers, and writes to the bucket, with the instance's role; the
        // farm's metadata service hands out its credentials.
        // Both levels: the farm emulates no IAM, so one role stands for both.
        profile = if ssm {
            format!("instance_profile = \"{0}\"\nuntrusted_instance_profile = \"{0}\"\n", host::INSTANCE_ROLE)
        } else {
            String::new()
        },
        other = if ssm { CONFIG_FILE } else { CONFIG_SSM_FILE },
        other_transport = if ssm { "SSH" } else { "SSM" },
        ledger = s.dir.join("ledger.sqlite").display(),
        registry = st.registry,
        endpoint = st.ec2_endpoint,
        region = st.region,
        subnet_id = st.subnet_id,
        ami = st.ami,
        ami_arm64 = st.ami_arm64,
        user = st.user,
        agent = s.dir.join("bin").join("spotbuild").display(),
        work = s.dir.join("work").display(),
        mirror = s.dir.join("mirror.git").display(),
        cidr = st.subnet_cidr,
    )
}

/// A VPC around the farm's subnet, the subnet, and an image of each architecture to launch.
async fn prepare_ec2(ec2: &aws_sdk_ec2::Client, subnet: Ipv4Addr, region: &str) -> Result<(String, String, String), FarmError> {
    let o = subnet.octets();
    let vpc = ec2
        .create_vpc()
        .cidr_block(format!("{}.{}.0.0/16", o[0], o[1]))
        .send()
        .await
        .map_err(ec2_err("create the farm's VPC"))?;
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap_or_default().to_string();
    // In the region's first zone: left to itself the emulator picks one at random, and some
    // zones (us-east-1e) offer none of the farm's instance types, so no spot price is known
    // there and builds' costs show as unknown.
    let sub = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .availability_zone(format!("{region}a"))
        .cidr_block(format!("{subnet}/24"))
        .send()
        .await
        .map_err(ec2_err("create the farm's subnet"))?;
    let subnet_id = sub.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_string();
    let images = ec2.describe_images().send().await.map_err(ec2_err("list the emulator's images"))?;
    let first = |arch: &str| -> Result<String, FarmError> {
        let mut ids: Vec<&str> = images
            .images()
            .iter()
            .filter(|i| i.architecture().map(|a| a.as_str()) == Some(arch))
            .filter_map(|i| i.image_id())
            .collect();
        ids.sort();
        ids.first().map(|s| s.to_string()).ok_or(FarmError::NoImage)
    };
    Ok((subnet_id, first("x86_64")?, first("arm64")?))
}

/// The SDK's settings for the farm's door at `endpoint`, signing with the farm's key.
async fn sdk_config(endpoint: &str, region: &str, key_id: &str, secret: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(key_id, secret, None, None, "local-farm"))
        .load()
        .await
}

/// An EC2 client for the farm whose state is `state` (its door and its key).
pub async fn ec2_client(state: &FarmState) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&sdk_config(&state.ec2_endpoint, &state.region, &state.access_key_id, &state.secret_access_key).await)
}

async fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).await?;
    f.write_all(bytes).await?;
    f.flush().await
}

fn with_last(a: Ipv4Addr, last: u8) -> Ipv4Addr {
    let o = a.octets();
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

async fn is_file(p: &Path) -> bool {
    tokio::fs::metadata(p).await.is_ok_and(|m| m.is_file())
}

async fn spawn(cmd: &mut tokio::process::Command, log: &Path) -> Result<tokio::process::Child, FarmError> {
    let what = format!("create {}", log.display());
    // The owner's alone: a service's log shows requests (presigned URLs among them).
    let log = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(log)
        .await
        .map_err(io_err(&what))?
        .into_std()
        .await;
    let err = log.try_clone().map_err(io_err(&what))?;
    // SAFETY: prctl(2) in the child before exec: it dies with the farm, even after a SIGKILL.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err("start a farm service"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

async fn wait_http(url: &str, limit: Duration, what: &str) -> Result<(), FarmError> {
    let http = reqwest::Client::new();
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit {
        if http.get(url).send().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(FarmError::NotAnswering {
        what: what.to_string(),
        url: url.to_string(),
        waited: limit,
    })
}

pub async fn read_state(dir: &Path) -> Option<FarmState> {
    serde_json::from_slice(&tokio::fs::read(dir.join(STATE_FILE)).await.ok()?).ok()
}

pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_instances_get_hosts_and_ended_ones_lose_them() {
        let ip = |n| Some(Ipv4Addr::new(10, 251, 37, n));
        let seen = BTreeMap::from([
            ("i-new".to_string(), (true, ip(4))),
            ("i-kept".to_string(), (true, ip(5))),
            ("i-ended".to_string(), (false, ip(6))),
            ("i-noip".to_string(), (true, None)),
        ]);
        let hosts = vec!["i-kept".to_string(), "i-ended".to_string(), "i-vanished".to_string()];
        assert_eq!(
            reconcile(&seen, &hosts),
            vec![
                HostAction::Start { instance_id: "i-new".into(), address: Ipv4Addr::new(10, 251, 37, 4) },
                HostAction::Stop { instance_id: "i-ended".into() },
                HostAction::Stop { instance_id: "i-vanished".into() },
            ]
        );
    }
}
