//! `spotbuild.toml`: settings that belong to a team's deployment rather than to the code
//! (where the registry is, how to authenticate, how long to wait). Every bound on a wait is
//! a named setting here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::platform::Arch;

pub const CONFIG_FILE: &str = "spotbuild.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub cloud: CloudConfig,
    #[serde(default)]
    pub remote: RemoteConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(default)]
    pub plan: PlanConfig,
    /// Which refs are trusted, and where untrusted builds write.
    #[serde(default)]
    pub trust: crate::trust::TrustConfig,
    /// Where `spotbuild deploy` promotes images, and how long its hooks may take.
    #[serde(default)]
    pub deploy: DeployConfig,
}

/// `[deploy]`: the registry images are promoted to (`--to` takes precedence; the build
/// registry when neither is set) and the bound on each hook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// `HOST[:PORT][/PREFIX]` of the deploy registry.
    pub registry: Option<String>,
    /// How to authenticate to it; basic credentials come from
    /// SPOTBUILD_DEPLOY_REGISTRY_USERNAME and SPOTBUILD_DEPLOY_REGISTRY_PASSWORD.
    #[serde(default)]
    pub auth: AuthMode,
    /// AWS region for its ECR tokens when the host does not say.
    pub region: Option<String>,
    /// Bound on one project's hook, unless its manifest entry sets `deploy.timeout`.
    #[serde(default = "default_hook_timeout", with = "humantime_serde_compat")]
    pub hook_timeout: Duration,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            registry: None,
            auth: AuthMode::Auto,
            region: None,
            hook_timeout: default_hook_timeout(),
        }
    }
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

/// How the planner reads the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Bound on one `dependencies` script of the manifest.
    #[serde(default = "default_dependencies_timeout", with = "humantime_serde_compat")]
    pub dependencies_timeout: Duration,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            dependencies_timeout: default_dependencies_timeout(),
        }
    }
}

fn default_dependencies_timeout() -> Duration {
    crate::manifest::DEPENDENCY_SCRIPT_TIMEOUT
}

/// Where builds' costs are recorded (`--ledger` and `SPOTBUILD_LEDGER` take precedence).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// A file path (SQLite), `s3://bucket/prefix`, or `off` [default: a file under the
    /// user's data directory].
    pub url: Option<String>,
    /// An S3-compatible endpoint for an `s3://` ledger (an emulator) [default: AWS's].
    pub endpoint: Option<String>,
    /// How often a running build rewrites its entry (cost so far) and its heartbeat, which
    /// `spotbuild reap` reads to find builds whose controller died.
    #[serde(default = "default_ledger_heartbeat", with = "humantime_serde_compat")]
    pub heartbeat: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            url: None,
            endpoint: None,
            heartbeat: default_ledger_heartbeat(),
        }
    }
}

fn default_ledger_heartbeat() -> Duration {
    Duration::from_secs(60)
}

/// How the controller reaches an instance and runs the agent there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// The login on the instance (the AMI creates it).
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    /// The spotbuild binary on the instance.
    #[serde(default = "default_agent")]
    pub agent: PathBuf,
    /// Where builds keep their files on the instance.
    #[serde(default = "default_remote_workdir")]
    pub workdir: PathBuf,
    /// The git mirror baked into the image: only what it lacks is shipped.
    #[serde(default = "default_mirror")]
    pub mirror: PathBuf,
    /// The controller connects only to addresses in these networks (empty: any). The local
    /// farm sets its bridged subnet.
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// Bound on SSH coming up on a fresh instance.
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// How often the agent sends a heartbeat event.
    #[serde(default = "default_agent_heartbeat", with = "humantime_serde_compat")]
    pub agent_heartbeat: Duration,
    /// How long the agent may send nothing (not even a heartbeat) before the controller
    /// checks its process over the transport; a dead agent fails the attempt, an
    /// unreachable host loses it. At least twice `agent_heartbeat`.
    #[serde(default = "default_agent_silence", with = "humantime_serde_compat")]
    pub agent_silence: Duration,
    /// Attempts per build (interruptions and lost hosts start a new one).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Reconnects to one instance after the event stream drops.
    #[serde(default = "default_max_reconnects")]
    pub max_reconnects: u32,
    /// Instances one build may spread its independent parts over.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// What the agent runs at the job's deadline [default: `shutdown -h now`; empty: nothing].
    pub shutdown_command: Option<Vec<String>>,
    /// How the controller reaches the instance: `ssh` (the default) or `ssm`.
    #[serde(default)]
    pub transport: TransportKind,
    /// Settings of the SSM transport.
    #[serde(default)]
    pub ssm: SsmConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// SSH to the instance's private address, host key pinned.
    #[default]
    Ssh,
    /// SSM `SendCommand`, with S3 for the commit and the event stream: no inbound port.
    Ssm,
}

/// The SSM transport: a bucket the controller and the instance profile can both use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsmConfig {
    /// The S3 bucket for commands' input and the event chunks (required for `ssm`).
    pub bucket: Option<String>,
    /// Keys go under `PREFIX/[ROLE_ID:INSTANCE/]BUILD/ATTEMPT/`.
    #[serde(default = "default_ssm_prefix")]
    pub prefix: String,
    /// The SSM API endpoint [default: AWS's; an emulator's for tests].
    pub endpoint: Option<String>,
    /// The S3 endpoint the controller uses [default: AWS's].
    pub s3_endpoint: Option<String>,
    /// Bound on one command (receive, start); also the lifetime of its presigned URL.
    #[serde(default = "default_command_timeout", with = "humantime_serde_compat")]
    pub command_timeout: Duration,
    /// The unique id of the trusted instance role (`terraform output instance_role_id`).
    /// Set, an attempt's objects go under `PREFIX/<role id>:<instance id>/`, the only
    /// place that instance's role may write (its `aws:userid`).
    pub role_id: Option<String>,
    /// The same for the untrusted instance role (`terraform output untrusted_instance_role_id`).
    pub untrusted_role_id: Option<String>,
}

fn default_ssm_prefix() -> String {
    "spotbuild".into()
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Default for SsmConfig {
    fn default() -> Self {
        SsmConfig {
            bucket: None,
            prefix: default_ssm_prefix(),
            endpoint: None,
            s3_endpoint: None,
            command_timeout: default_command_timeout(),
            role_id: None,
            untrusted_role_id: None,
        }
    }
}

fn default_user() -> String {
    "spotbuild".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_agent() -> PathBuf {
    "/usr/local/bin/spotbuild".into()
}
fn default_remote_workdir() -> PathBuf {
    "/var/lib/spotbuild/builds".into()
}
fn default_mirror() -> PathBuf {
    "/var/lib/spotbuild/mirror.git".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_agent_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_agent_silence() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    3
}
fn default_max_reconnects() -> u32 {
    5
}
fn default_max_instances() -> u32 {
    1
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            user: default_user(),
            ssh_port: default_ssh_port(),
            agent: default_agent(),
            workdir: default_remote_workdir(),
            mirror: default_mirror(),
            allow_cidrs: Vec::new(),
            connect_timeout: default_connect_timeout(),
            agent_heartbeat: default_agent_heartbeat(),
            agent_silence: default_agent_silence(),
            max_attempts: default_max_attempts(),
            max_reconnects: default_max_reconnects(),
            max_instances: default_max_instances(),
            shutdown_command: None,
            transport: TransportKind::default(),
            ssm: SsmConfig::default(),
        }
    }
}

/// The x86_64 instance types tried for a 64-vCPU build, across several families so that
/// one family's capacity shortage does not stop a build.
pub const DEFAULT_INSTANCE_TYPES: &[&str] = &[
    "m7a.16xlarge",
    "m6a.16xlarge",
    "c7a.16xlarge",
    "c6a.16xlarge",
    "r6a.16xlarge",
    "m7i.16xlarge",
    "c7i.16xlarge",
];

/// The arm64 (Graviton) instance types tried for a 64-vCPU build.
pub const DEFAULT_ARM64_INSTANCE_TYPES: &[&str] = &["c7g.16xlarge", "m7g.16xlarge", "r7g.16xlarge", "c8g.16xlarge", "m8g.16xlarge"];

/// The SSM parameter an architecture's AMI is resolved from when `ami` is not set
/// (`ami/publish.sh` writes it): `/spotbuild/ami/latest-<arch>`.
pub fn default_ami(arch: Arch) -> String {
    format!("/spotbuild/ami/latest-{arch}")
}

/// `[cloud.x86_64]` and `[cloud.arm64]`: one architecture's machines. The AMI decides the
/// architecture, so each has its own image and its own instance types.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchConfig {
    /// Instance types, in order of preference [default: the architecture's defaults].
    pub instance_types: Option<Vec<String>>,
    /// An AMI id (`ami-…`) or an SSM parameter path (`/…`) resolved at launch
    /// [default: `/spotbuild/ami/latest-<arch>`].
    pub ami: Option<String>,
}

/// `[cloud] sizes`: which sizes a fleet may consider besides the one asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sizes {
    /// Only types of the size asked for (`--cpus`), or the configured types as they are.
    #[default]
    Exact,
    /// Also the larger sizes of the same families, up to `[cloud] max_cpus`: when the
    /// asked size is short, a larger one is often free at a lower price per vCPU.
    AtLeast,
}

/// How many vCPUs a build asks for (`--cpus N` or `--cpus MIN-MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuWant {
    /// The configured types as they are (widened by `sizes = "at-least"`).
    Configured,
    /// This many (or more, with `sizes = "at-least"`).
    Exactly(u32),
    /// Any size in this range, whatever `sizes` says: the job allows it.
    Between(u32, u32),
}

impl std::str::FromStr for CpuWant {
    type Err = String;

    fn from_str(s: &str) -> Result<CpuWant, String> {
        let n = |t: &str| t.trim().parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| format!("`{t}` is not a positive number of vCPUs"));
        match s.split_once('-') {
            None => Ok(CpuWant::Exactly(n(s)?)),
            Some((lo, hi)) => match (n(lo)?, n(hi)?) {
                (lo, hi) if lo <= hi => Ok(CpuWant::Between(lo, hi)),
                (lo, hi) => Err(format!("the range {lo}-{hi} is empty: write MIN-MAX")),
            },
        }
    }
}

/// The machines a launch may ask for: one architecture's image and pools.
#[derive(Debug, Clone, PartialEq)]
pub struct Machines {
    pub arch: Arch,
    pub image: crate::cloud::Image,
    /// Instance types in the order the fleet should prefer them.
    pub instance_types: Vec<String>,
    /// Every type in every subnet, in that order.
    pub pools: Vec<crate::cloud::Pool>,
    /// The types differ in size: the fleet follows the order (cheapest per vCPU first)
    /// instead of comparing prices per instance.
    pub prioritized: bool,
}

/// `[cloud]` settings that do not make a launchable request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudSettingsError {
    #[error("[cloud] {key} and [cloud.x86_64] {key} are both set: keep one (the top-level key is the x86_64 shorthand)")]
    Twice { key: &'static str },
    #[error("[cloud.{listed}] instance_types lists {instance_type}, an {actual} type: a fleet never mixes architectures, since the AMI decides")]
    WrongArch {
        listed: Arch,
        instance_type: String,
        actual: Arch,
    },
    #[error("[cloud] max_cpus ({0}) must be at least 1")]
    MaxCpus(u32),
}

/// Why no pool fits a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPools {
    #[error("no {arch} instance type has {want} vCPUs (configured: {})", configured.join(", "))]
    NoSize { arch: Arch, want: String, configured: Vec<String> },
    #[error("no {arch} instance types are configured")]
    NoTypes { arch: Arch },
}

/// Where and how instances are rented. Every wait is bounded by a setting here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    pub region: Option<String>,
    /// The EC2 API endpoint [default: AWS's]; the local farm sets its emulator.
    pub endpoint: Option<String>,
    /// x86_64 instance types, in order of preference (shorthand for `[cloud.x86_64]
    /// instance_types`) [default: DEFAULT_INSTANCE_TYPES].
    pub instance_types: Option<Vec<String>>,
    /// Subnets; every instance type is tried in every subnet.
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub market: crate::cloud::MarketPolicy,
    /// A cap on the spot price per vCPU-hour (USD).
    pub max_spot_price_per_vcpu_hour: Option<f64>,
    /// The x86_64 AMI: an id (`ami-…`) or an SSM parameter path (`/…`) resolved at launch
    /// (shorthand for `[cloud.x86_64] ami`) [default: `/spotbuild/ami/latest-x86_64`].
    pub ami: Option<String>,
    /// x86_64 machines.
    #[serde(default)]
    pub x86_64: ArchConfig,
    /// arm64 (Graviton) machines.
    #[serde(default)]
    pub arm64: ArchConfig,
    /// `exact`: only the size asked for; `at-least`: larger sizes of the same families too,
    /// up to `max_cpus`, preferred by price per vCPU.
    #[serde(default)]
    pub sizes: Sizes,
    /// The largest machine `sizes = "at-least"` may rent, in vCPUs.
    #[serde(default = "default_max_cpus")]
    pub max_cpus: u32,
    /// The instance profile of trusted builds.
    pub instance_profile: Option<String>,
    /// The instance profile of untrusted builds (pull requests): it may push only to the
    /// untrusted namespace. Required to build untrusted refs remotely.
    pub untrusted_instance_profile: Option<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default = "default_root_volume_gb")]
    pub root_volume_gb: u32,
    /// How long an instance may live; armed on the instance and in its tags.
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// Bound on waiting for a launched instance to run.
    #[serde(default = "default_running_timeout", with = "humantime_serde_compat")]
    pub running_timeout: Duration,
    /// Bound on one launch call (CreateLaunchTemplate, CreateFleet). Past it the launch is
    /// ambiguous: its instance is looked for by tag before anything else is tried.
    #[serde(default = "default_launch_call_timeout", with = "humantime_serde_compat")]
    pub launch_call_timeout: Duration,
    /// Cost-allocation tags added to every instance and volume.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// The spot breaker: after `threshold` interruptions (any CI job's, through the
    /// ledger) within `window`, launch on-demand for `cooldown`.
    #[serde(default)]
    pub spot_breaker: BreakerConfig,
}

/// `[cloud.spot_breaker]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default = "default_breaker_threshold")]
    pub threshold: usize,
    #[serde(default = "default_breaker_window", with = "humantime_serde_compat")]
    pub window: Duration,
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde_compat")]
    pub cooldown: Duration,
}

fn default_breaker_threshold() -> usize {
    crate::cloud::breaker::BreakerSettings::default().threshold
}
fn default_breaker_window() -> Duration {
    crate::cloud::breaker::BreakerSettings::default().window
}
fn default_breaker_cooldown() -> Duration {
    crate::cloud::breaker::BreakerSettings::default().cooldown
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: default_breaker_threshold(),
            window: default_breaker_window(),
            cooldown: default_breaker_cooldown(),
        }
    }
}

impl BreakerConfig {
    pub fn settings(&self) -> crate::cloud::breaker::BreakerSettings {
        crate::cloud::breaker::BreakerSettings {
            threshold: self.threshold,
            window: self.window,
            cooldown: self.cooldown,
        }
    }
}

fn default_max_cpus() -> u32 {
    192
}
fn default_root_volume_gb() -> u32 {
    200
}
fn default_ttl() -> Duration {
    Duration::from_secs(3 * 3600)
}
fn default_running_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_launch_call_timeout() -> Duration {
    crate::cloud::aws::LAUNCH_CALL_TIMEOUT
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            region: None,
            endpoint: None,
            instance_types: None,
            subnets: Vec::new(),
            market: Default::default(),
            max_spot_price_per_vcpu_hour: None,
            ami: None,
            x86_64: ArchConfig::default(),
            arm64: ArchConfig::default(),
            sizes: Sizes::default(),
            max_cpus: default_max_cpus(),
            instance_profile: None,
            untrusted_instance_profile: None,
            security_groups: Vec::new(),
            root_volume_gb: default_root_volume_gb(),
            ttl: default_ttl(),
            running_timeout: default_running_timeout(),
            launch_call_timeout: default_launch_call_timeout(),
            tags: Default::default(),
            spot_breaker: BreakerConfig::default(),
        }
    }
}

impl CloudConfig {
    fn arch_config(&self, arch: Arch) -> &ArchConfig {
        match arch {
            Arch::X86_64 => &self.x86_64,
            Arch::Arm64 => &self.arm64,
        }
    }

    /// `arch`'s instance types as configured, in order of preference.
    pub fn instance_types(&self, arch: Arch) -> Vec<String> {
        let top = match arch {
            Arch::X86_64 => self.instance_types.as_ref(),
            Arch::Arm64 => None,
        };
        match self.arch_config(arch).instance_types.as_ref().or(top) {
            Some(types) => types.clone(),
            None => match arch {
                Arch::X86_64 => DEFAULT_INSTANCE_TYPES,
                Arch::Arm64 => DEFAULT_ARM64_INSTANCE_TYPES,
            }
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    /// `arch`'s image as the cloud layer takes it.
    pub fn image(&self, arch: Arch) -> crate::cloud::Image {
        let top = match arch {
            Arch::X86_64 => self.ami.as_ref(),
            Arch::Arm64 => None,
        };
        let ami = self.arch_config(arch).ami.clone().or_else(|| top.cloned()).unwrap_or_else(|| default_ami(arch));
        if ami.starts_with('/') {
            crate::cloud::Image::SsmParameter(ami)
        } else {
            crate::cloud::Image::Id(ami)
        }
    }

    /// Checks what parsing cannot: one place per setting, and every type under the
    /// architecture it runs.
    pub fn validate(&self) -> Result<(), CloudSettingsError> {
        if self.instance_types.is_some() && self.x86_64.instance_types.is_some() {
            return Err(CloudSettingsError::Twice { key: "instance_types" });
        }
        if self.ami.is_some() && self.x86_64.ami.is_some() {
            return Err(CloudSettingsError::Twice { key: "ami" });
        }
        if self.max_cpus == 0 {
            return Err(CloudSettingsError::MaxCpus(self.max_cpus));
        }
        for arch in Arch::ALL {
            for t in self.instance_types(arch) {
                let actual = crate::cloud::types::arch_of(&t);
                if actual != arch {
                    return Err(CloudSettingsError::WrongArch {
                        listed: arch,
                        instance_type: t,
                        actual,
                    });
                }
            }
        }
        Ok(())
    }

    /// The machines a launch of `arch` with `want` vCPUs may use: the configured types,
    /// each family at the sizes asked for (and, with `sizes = "at-least"`, larger ones up
    /// to `max_cpus`); of mixed sizes, cheapest per vCPU first (by the on-demand table of
    /// `region`; unknown prices last, in configured order).
    pub fn machines(&self, arch: Arch, want: CpuWant) -> Result<Machines, NoPools> {
        use crate::cloud::types::{family_sizes, vcpus, TypeName};
        let configured = self.instance_types(arch);
        if configured.is_empty() {
            return Err(NoPools::NoTypes { arch });
        }
        let at_least = self.sizes == Sizes::AtLeast;
        let mut types: Vec<String> = Vec::new();
        let mut add = |t: String| {
            if !types.contains(&t) {
                types.push(t);
            }
        };
        for t in &configured {
            let Some(name) = TypeName::parse(t) else { continue };
            let own = name.vcpus();
            let (lo, hi) = match want {
                CpuWant::Configured if at_least => match own {
                    Some(n) => (n, self.max_cpus.max(n)),
                    None => {
                        add(t.clone());
                        continue;
                    }
                },
                CpuWant::Configured => {
                    add(t.clone());
                    continue;
                }
                CpuWant::Exactly(n) if at_least => (n, self.max_cpus.max(n)),
                CpuWant::Exactly(n) => (n, n),
                CpuWant::Between(lo, hi) => (lo, hi),
            };
            if own.is_some_and(|n| (lo..=hi).contains(&n)) {
                add(t.clone());
            }
            for other in family_sizes(name.family, lo, hi) {
                add(other);
            }
        }
        if types.is_empty() {
            let want = match want {
                CpuWant::Exactly(n) => n.to_string(),
                CpuWant::Between(lo, hi) => format!("{lo} to {hi}"),
                CpuWant::Configured => "any".into(),
            };
            return Err(NoPools::NoSize { arch, want, configured });
        }
        let sizes: std::collections::BTreeSet<Option<u32>> = types.iter().map(|t| vcpus(t)).collect();
        let prioritized = sizes.len() > 1;
        if prioritized {
            let region = self.region.as_deref().unwrap_or("us-east-1");
            // In millionths of a dollar, so sizes priced in proportion compare equal.
            let per_vcpu = |t: &str| -> Option<u64> {
                let hourly = crate::cloud::prices::on_demand_hourly(region, t)?;
                Some((hourly / f64::from(vcpus(t)?) * 1e6).round() as u64)
            };
            // Stable: equal prices keep the configured order, smaller sizes first; unknown
            // prices last.
            types.sort_by_key(|t| per_vcpu(t).unwrap_or(u64::MAX));
        }
        let pools = types
            .iter()
            .flat_map(|t| {
                self.subnets.iter().map(move |s| crate::cloud::Pool {
                    instance_type: t.clone(),
                    subnet: s.clone(),
                })
            })
            .collect();
        Ok(Machines {
            arch,
            image: self.image(arch),
            instance_types: types,
            pools,
            prioritized,
        })
    }

    /// What is missing for a launch, as `[cloud]` keys.
    pub fn missing_for_launch(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if self.subnets.is_empty() {
            m.push("subnets");
        }
        m
    }
}

/// How registry credentials are obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// ECR for `*.dkr.ecr.*.amazonaws.com` hosts; basic auth when
    /// SPOTBUILD_REGISTRY_USERNAME/PASSWORD are set; anonymous otherwise. Bearer-token
    /// challenges are answered in every mode.
    #[default]
    Auto,
    /// No credentials (anonymous bearer tokens are still requested when challenged).
    None,
    /// SPOTBUILD_REGISTRY_USERNAME and SPOTBUILD_REGISTRY_PASSWORD.
    Basic,
    /// A token from ECR `GetAuthorizationToken`, with the standard AWS credential chain.
    Ecr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `HOST[:PORT][/PREFIX]`; `http://` or `https://` may be given explicitly.
    pub url: Option<String>,
    #[serde(default)]
    pub auth: AuthMode,
    /// AWS region for ECR tokens when it cannot be read from the registry host.
    pub region: Option<String>,
    /// How many registry requests may be in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Bound on one registry request (connect, send, and read the answer).
    #[serde(default = "default_request_timeout", with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// How many times a throttled (429) or failing (5xx) request is retried.
    #[serde(default = "default_retries")]
    pub retries: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: None,
            auth: AuthMode::Auto,
            region: None,
            concurrency: default_concurrency(),
            request_timeout: default_request_timeout(),
            retries: default_retries(),
        }
    }
}

fn default_concurrency() -> usize {
    16
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retries() -> usize {
    3
}

/// Durations are written the way people write them: `"10s"`, `"1m 30s"`.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// What the instance's TTL must leave room for beyond the build's own timeout: teardown,
/// and the agent winding down past its deadline.
pub const TTL_MARGIN: Duration = Duration::from_secs(600);

/// Settings that do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsConflict {
    #[error("[cloud] ttl ({ttl}) is shorter than the build's timeout ({timeout}) plus [cloud] running_timeout ({running}), [remote] connect_timeout ({connect}) and {margin} for teardown: the instance would shut itself down under a build still within its time")]
    TtlTooShort {
        ttl: String,
        timeout: String,
        running: String,
        connect: String,
        margin: String,
    },
    #[error("[remote] agent_silence ({silence}) is less than twice [remote] agent_heartbeat ({heartbeat}): one late heartbeat would fail a healthy build")]
    SilenceTooShort { silence: String, heartbeat: String },
}

impl Config {
    /// Checks the settings a remote build of at most `timeout` relies on together.
    pub fn check_remote(&self, timeout: Duration) -> Result<(), SettingsConflict> {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let needed = timeout + self.cloud.running_timeout + self.remote.connect_timeout + TTL_MARGIN;
        if self.cloud.ttl < needed {
            return Err(SettingsConflict::TtlTooShort {
                ttl: d(self.cloud.ttl),
                timeout: d(timeout),
                running: d(self.cloud.running_timeout),
                connect: d(self.remote.connect_timeout),
                margin: d(TTL_MARGIN),
            });
        }
        if self.remote.agent_silence < self.remote.agent_heartbeat * 2 {
            return Err(SettingsConflict::SilenceTooShort {
                silence: d(self.remote.agent_silence),
                heartbeat: d(self.remote.agent_heartbeat),
            });
        }
        Ok(())
    }

    /// Loads `path` if given (it must exist), else `<root>/spotbuild.toml` if it exists,
    /// else the defaults.
    pub fn load(explicit: Option<&Path>, root: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match (explicit, root) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(r)) if r.join(CONFIG_FILE).is_file() => r.join(CONFIG_FILE),
            _ => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        config.cloud.validate().map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert_eq!(c.registry.concurrency, 16);
        let c = Config::parse(
            "[registry]\nurl = \"r.example:5000/team\"\nauth = \"ecr\"\nrequest_timeout = \"3s\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.registry.auth, AuthMode::Ecr);
        assert_eq!(c.registry.request_timeout, Duration::from_secs(3));
    }

    #[test]
    fn the_cloud_section_has_launchable_defaults_and_pools() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert_eq!(c.cloud.instance_types(Arch::X86_64).len(), 7);
        assert_eq!(c.cloud.missing_for_launch(), ["subnets"]);
        assert_eq!(c.cloud.image(Arch::Arm64), crate::cloud::Image::SsmParameter("/spotbuild/ami/latest-arm64".into()));
        let c = Config::parse(
            "[cloud]\nami = \"/aws/service/spotbuild/ami\"\nsubnets = [\"subnet-a\", \"subnet-b\"]\n\
             instance_types = [\"m7a.16xlarge\", \"c7a.16xlarge\"]\nmarket = \"on-demand\"\nttl = \"90m\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(c.cloud.missing_for_launch().is_empty());
        let m = c.cloud.machines(Arch::X86_64, CpuWant::Configured).unwrap();
        assert_eq!(m.pools.len(), 4);
        assert_eq!(m.pools[1].subnet, "subnet-b");
        assert!(!m.prioritized, "one size: the fleet compares prices itself");
        assert_eq!(m.image, crate::cloud::Image::SsmParameter("/aws/service/spotbuild/ami".into()));
        assert_eq!(c.cloud.image(Arch::Arm64), crate::cloud::Image::SsmParameter("/spotbuild/ami/latest-arm64".into()));
        assert_eq!(c.cloud.market, crate::cloud::MarketPolicy::OnDemand);
        assert_eq!(c.cloud.ttl, Duration::from_secs(5400));
        assert!(Config::parse("[cloud]\nmarket = \"cheap\"\n", Path::new("x")).is_err());
    }

    #[test]
    fn each_architecture_has_its_own_pools_and_image_and_never_mixes() {
        let c = Config::parse(
            "[cloud]\nsubnets = [\"subnet-a\"]\n[cloud.arm64]\nami = \"ami-arm\"\n[cloud.x86_64]\nami = \"ami-x86\"\n",
            Path::new("x"),
        )
        .unwrap();
        let arm = c.cloud.machines(Arch::Arm64, CpuWant::Exactly(64)).unwrap();
        assert_eq!(arm.instance_types, ["c7g.16xlarge", "m7g.16xlarge", "r7g.16xlarge", "c8g.16xlarge", "m8g.16xlarge"]);
        assert_eq!(arm.image, crate::cloud::Image::Id("ami-arm".into()));
        let x86 = c.cloud.machines(Arch::X86_64, CpuWant::Exactly(64)).unwrap();
        assert_eq!(x86.image, crate::cloud::Image::Id("ami-x86".into()));
        for (arch, m) in [(Arch::Arm64, &arm), (Arch::X86_64, &x86)] {
            assert!(m.pools.iter().all(|p| crate::cloud::types::arch_of(&p.instance_type) == arch), "{arch}: {:?}", m.pools);
        }
        // A type under the wrong architecture is refused when the file is read.
        let e = Config::parse("[cloud.arm64]\ninstance_types = [\"c7g.16xlarge\", \"m7a.16xlarge\"]\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("[cloud.arm64] instance_types lists m7a.16xlarge, an x86_64 type"), "{e}");
        let e = Config::parse("[cloud]\ninstance_types = [\"m7g.16xlarge\"]\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("an arm64 type"), "{e}");
        let e = Config::parse("[cloud]\nami = \"ami-1\"\n[cloud.x86_64]\nami = \"ami-2\"\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("both set"), "{e}");
    }

    #[test]
    fn sizes_at_least_widens_to_larger_sizes_cheapest_per_vcpu_first() {
        let c = Config::parse(
            "[cloud]\nregion = \"us-east-1\"\nsubnets = [\"s\"]\nsizes = \"at-least\"\nmax_cpus = 192\n\
             instance_types = [\"m7a.16xlarge\", \"c6a.16xlarge\"]\n",
            Path::new("x"),
        )
        .unwrap();
        let m = c.cloud.machines(Arch::X86_64, CpuWant::Exactly(64)).unwrap();
        assert!(m.prioritized);
        // c6a (0.03825/vCPU-h) before m7a (0.05796); within a family, smaller first.
        assert_eq!(
            m.instance_types,
            ["c6a.16xlarge", "c6a.24xlarge", "c6a.32xlarge", "c6a.48xlarge", "m7a.16xlarge", "m7a.24xlarge", "m7a.32xlarge", "m7a.48xlarge"]
        );
        let capped = Config::parse("[cloud]\nsubnets = [\"s\"]\nsizes = \"at-least\"\nmax_cpus = 128\n", Path::new("x")).unwrap();
        let m = capped.cloud.machines(Arch::X86_64, CpuWant::Configured).unwrap();
        assert!(m.instance_types.iter().all(|t| crate::cloud::types::vcpus(t).unwrap() <= 128), "{:?}", m.instance_types);
        assert!(m.instance_types.contains(&"m7a.32xlarge".to_string()));
        // Graviton3 stops at 16xlarge; Graviton4 goes on.
        let arm = capped.cloud.machines(Arch::Arm64, CpuWant::Exactly(64)).unwrap();
        assert!(arm.instance_types.contains(&"c8g.24xlarge".to_string()) && !arm.instance_types.iter().any(|t| t.starts_with("c7g.") && t != "c7g.16xlarge"));
        // Exact: only the size asked, from every configured family; a range when the job allows.
        let exact = Config::parse("[cloud]\nsubnets = [\"s\"]\n", Path::new("x")).unwrap();
        let m = exact.cloud.machines(Arch::X86_64, CpuWant::Exactly(32)).unwrap();
        assert!(m.instance_types.iter().all(|t| t.ends_with(".8xlarge")) && m.instance_types.len() == 7, "{:?}", m.instance_types);
        let m = exact.cloud.machines(Arch::Arm64, CpuWant::Between(48, 64)).unwrap();
        assert!(m.prioritized && m.instance_types.contains(&"c7g.12xlarge".to_string()) && m.instance_types.contains(&"m8g.16xlarge".to_string()));
        let none = exact.cloud.machines(Arch::X86_64, CpuWant::Exactly(36)).unwrap_err();
        assert!(none.to_string().contains("no x86_64 instance type has 36 vCPUs"), "{none}");
        assert_eq!("64".parse::<CpuWant>(), Ok(CpuWant::Exactly(64)));
        assert_eq!("48-192".parse::<CpuWant>(), Ok(CpuWant::Between(48, 192)));
        assert!("192-48".parse::<CpuWant>().is_err() && "0".parse::<CpuWant>().is_err() && "lots".parse::<CpuWant>().is_err());
    }

    #[test]
    fn the_ttl_must_cover_the_timeout_and_its_margins() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert_eq!(c.check_remote(Duration::from_secs(2 * 3600)), Ok(()), "the defaults fit");
        let e = c.check_remote(Duration::from_secs(3 * 3600)).unwrap_err();
        assert!(e.to_string().contains("[cloud] ttl (3h) is shorter than the build's timeout (3h)"), "{e}");
        let c = Config::parse("[remote]\nagent_heartbeat = \"40s\"\n", Path::new("x")).unwrap();
        assert!(matches!(c.check_remote(Duration::from_secs(60)), Err(SettingsConflict::SilenceTooShort { .. })));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::parse("[registry]\nulr = \"x\"\n", Path::new("spotbuild.toml")).unwrap_err();
        assert!(e.to_string().contains("ulr"), "{e}");
    }
}
