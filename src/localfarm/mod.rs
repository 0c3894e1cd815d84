//! The local farm: everything spotbuild needs from AWS, on one machine, with only the
//! control plane emulated. The EC2 API is moto server; each instance it reports running is
//! backed by a real host (see [`host`]); images go to a registry v2 server on loopback and
//! are built by this machine's Docker engine.
//!
//! Guarantees: hosts live only in the farm's own subnet, which is bridged locally, so no
//! address the emulator could invent is ever reached; every host, namespace and child
//! process the farm starts is removed when it stops (and, after a SIGKILL, by the next
//! `farm up` on the same subnet). Assumptions: run as root, with iproute2, sshd,
//! docker-registry and moto_server installed (`make farm-deps`).

pub mod host;
pub mod netns;

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
/// The spotbuild.toml the farm writes for builds against it.
pub const CONFIG_FILE: &str = "spotbuild.toml";

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
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FarmState {
    pub pid: u32,
    pub ec2_endpoint: String,
    pub registry: String,
    pub control: String,
    pub subnet_cidr: String,
    pub subnet_id: String,
    pub ami: String,
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

struct Farm {
    settings: Settings,
    state: FarmState,
    ec2: aws_sdk_ec2::Client,
    registry_port: u16,
    prefix: String,
    hosts: Mutex<BTreeMap<String, Host>>,
    next_index: std::sync::atomic::AtomicU32,
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
    tokio::fs::create_dir_all(settings.dir.join("hosts"))
        .await
        .map_err(io_err("create the farm directory"))?;
    let mirror = settings.dir.join("mirror.git");
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
    }

    let moto_port = free_port();
    let _moto = spawn(
        tokio::process::Command::new(&settings.moto_server).args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]),
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
    let ec2_endpoint = format!("http://127.0.0.1:{moto_port}");
    wait_http(&format!("{ec2_endpoint}/moto-api/"), Duration::from_secs(60), "the EC2 emulator (moto_server)").await?;
    wait_http(&format!("http://127.0.0.1:{registry_port}/v2/"), Duration::from_secs(30), "the registry").await?;

    let ec2 = ec2_client(&ec2_endpoint, &settings.region).await;
    let (subnet_id, ami) = prepare_ec2(&ec2, settings.subnet).await?;
    let gateway = with_last(settings.subnet, 1);
    netns::create_bridge(&bridge, gateway, 24).await?;
    let result = async {
        let control = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io_err("listen for farm control"))?;
        let control_addr = control.local_addr().map_err(io_err("listen for farm control"))?;
        let farm = Farm {
            settings: settings.clone(),
            state: FarmState {
                pid: std::process::id(),
                ec2_endpoint,
                registry: format!("127.0.0.1:{registry_port}"),
                control: format!("http://{control_addr}"),
                subnet_cidr: format!("{}/24", settings.subnet),
                subnet_id,
                ami,
                bridge: bridge.clone(),
                region: settings.region.clone(),
                config: settings.dir.join(CONFIG_FILE),
            },
            ec2,
            registry_port,
            prefix: prefix.clone(),
            hosts: Mutex::new(BTreeMap::new()),
            next_index: std::sync::atomic::AtomicU32::new(1),
        };
        serve(farm, control, shutdown, ready).await
    }
    .await;
    // A host being removed by a control request when the farm stopped may be half gone:
    // sweep every namespace of this farm, whatever state it was left in.
    for ns in netns::namespaces_with_prefix(&format!("{prefix}-")).await {
        netns::delete_host(&ns, "").await;
    }
    netns::delete_link(&bridge).await;
    result
}

/// Serves the control API on `control` and backs instances with hosts until `shutdown`;
/// then removes every host and the state file.
async fn serve(
    farm: Farm,
    control: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&FarmState),
) -> Result<(), FarmError> {
    tokio::fs::write(&farm.state.config, config_text(&farm.settings, &farm.state))
        .await
        .map_err(io_err("write the farm's spotbuild.toml"))?;
    // Written before the control API runs: connections wait in the bound listener's
    // backlog, and a farm whose state cannot be written has started no task to stop.
    let state_path = farm.settings.dir.join(STATE_FILE);
    tokio::fs::write(&state_path, serde_json::to_vec_pretty(&farm.state).expect("serialisable"))
        .await
        .map_err(io_err("write the farm state"))?;
    let farm = Arc::new(farm);
    let router = axum::Router::new()
        .route("/hosts", axum::routing::get(list_hosts))
        .route("/hosts/{id}/interrupt", axum::routing::post(interrupt_host))
        .route("/hosts/{id}/kill", axum::routing::post(kill_host))
        .route("/hosts/{id}/cut", axum::routing::post(cut_host))
        .route("/hosts/{id}/freeze", axum::routing::post(freeze_host))
        .route("/hosts/{id}/kill-agent", axum::routing::post(kill_agent))
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

fn config_text(s: &Settings, st: &FarmState) -> String {
    format!(
        r#"# The local farm's settings, written by `spotbuild farm up`. Use them with
#   spotbuild --config {config} build --all
# (AWS credentials can be anything: export AWS_ACCESS_KEY_ID=farm AWS_SECRET_ACCESS_KEY=farm).

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

[remote]
user = "root"
agent = "{agent}"
workdir = "{work}"
mirror = "{mirror}"
allow_cidrs = ["{cidr}"]
connect_timeout = "30s"
# A host shares this machine's kernel: at a deadline it must not power the machine off.
# The farm plays out each instance's TTL itself.
shutdown_command = []

[ledger]
# What each build cost, for `spotbuild report` (the emulator's prices are not AWS's).
url = "{ledger}"
"#,
        ledger = s.dir.join("ledger.sqlite").display(),
        config = st.config.display(),
        registry = st.registry,
        endpoint = st.ec2_endpoint,
        region = st.region,
        subnet_id = st.subnet_id,
        ami = st.ami,
        agent = s.agent.display(),
        work = s.dir.join("work").display(),
        mirror = s.dir.join("mirror.git").display(),
        cidr = st.subnet_cidr,
    )
}

/// A VPC around the farm's subnet, the subnet, and an image to launch.
async fn prepare_ec2(ec2: &aws_sdk_ec2::Client, subnet: Ipv4Addr) -> Result<(String, String), FarmError> {
    let o = subnet.octets();
    let vpc = ec2
        .create_vpc()
        .cidr_block(format!("{}.{}.0.0/16", o[0], o[1]))
        .send()
        .await
        .map_err(ec2_err("create the farm's VPC"))?;
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap_or_default().to_string();
    let sub = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block(format!("{subnet}/24"))
        .send()
        .await
        .map_err(ec2_err("create the farm's subnet"))?;
    let subnet_id = sub.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_string();
    let images = ec2.describe_images().send().await.map_err(ec2_err("list the emulator's images"))?;
    let mut ids: Vec<&str> = images.images().iter().filter_map(|i| i.image_id()).collect();
    ids.sort();
    let ami = ids.first().ok_or(FarmError::NoImage)?.to_string();
    Ok((subnet_id, ami))
}

pub async fn ec2_client(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new("farm", "farm", None, None, "local-farm"))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
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
    let log = tokio::fs::File::create(log).await.map_err(io_err(&what))?.into_std().await;
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
