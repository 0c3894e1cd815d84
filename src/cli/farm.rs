//! `spotbuild farm`: the local farm, for tests, demos and anyone without an AWS account.
//! The EC2 API is emulated; instances are real hosts (network namespaces running sshd and
//! the agent), images go to a registry on loopback and are built by this machine's Docker.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use super::error::{Error, Exit};
use crate::errors::error_chain;
use crate::localfarm::{self, FarmState, Settings};

const FARM_AFTER_HELP: &str = "\
Examples:
  sudo spotbuild farm up                       start it in the background (state in .farm/)
  eval \"$(sudo spotbuild farm env)\"            the farm's key and config, for this shell
  spotbuild build --all                        a build on the farm, over SSH
  spotbuild --config .farm/spotbuild-ssm.toml build --all    the same over SSM
  spotbuild farm status                        services and hosts
  spotbuild farm interrupt i-0abc --kill-after 5s   a spot interruption, played out
  spotbuild farm down                          stop it and remove every host

`farm up` writes .farm/spotbuild.toml (SSH) and .farm/spotbuild-ssm.toml (SSM): builds
that use them launch into the farm's subnet, and the controller refuses to connect
anywhere else. The emulator answers only requests signed with the farm's key, and the
control API only its token: both are in .farm/farm.json, readable by root alone. Hosts
log in and run commands as the non-root build user (`spotbuild`, created if missing, in
the Docker socket's group), as on an instance baked with ami/.
Needs root, iproute2, sshd, useradd, docker-registry, and moto_server (`make farm-deps`).";

#[derive(Debug, Args)]
#[command(about = "Run the local farm: emulated EC2, real hosts, a local registry", after_help = FARM_AFTER_HELP)]
pub struct FarmArgs {
    /// The farm's directory: state, logs, hosts, registry storage.
    #[arg(long, value_name = "DIR", default_value = ".farm", global = true)]
    pub dir: PathBuf,

    #[command(subcommand)]
    pub command: FarmCommand,
}

#[derive(Debug, Subcommand)]
pub enum FarmCommand {
    /// Start the farm (in the background unless --foreground).
    Up {
        /// The /24 for the emulated subnet and its local bridge.
        #[arg(long, value_name = "ADDR", default_value = "10.251.37.0")]
        subnet: std::net::Ipv4Addr,
        /// Stay in the foreground until SIGINT/SIGTERM.
        #[arg(long)]
        foreground: bool,
        /// moto_server [default: $SPOTBUILD_MOTO_SERVER, .venv/bin/moto_server, or on PATH].
        #[arg(long, value_name = "PATH")]
        moto_server: Option<PathBuf>,
        #[arg(long, value_name = "REGION", default_value = "us-east-1")]
        region: String,
        /// Bake a git mirror of this repository into the hosts' image, as an AMI would
        /// have: builds then ship only the objects it lacks.
        #[arg(long, value_name = "REPO")]
        mirror: Option<PathBuf>,
        /// Bound on the farm becoming ready.
        #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The non-root account hosts log in as (created if missing).
        #[arg(long, value_name = "NAME", default_value = "spotbuild")]
        user: String,
    },
    /// Stop the farm: every host, namespace and service it started.
    Down {
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// What runs: services and hosts.
    Status {
        /// Print the farm's state and its hosts as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Post a spot interruption notice to a host's metadata service.
    Interrupt {
        instance: String,
        /// Reclaim the host this long after the notice (EC2: about two minutes).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        kill_after: Option<Duration>,
    },
    /// Reclaim a host now: it dies and EC2 reports the instance terminated.
    Kill { instance: String },
    /// Cut every SSH connection to a host (it keeps running).
    Cut { instance: String },
    /// Print shell exports for using the farm: its key, region and config.
    Env {
        /// The SSM transport's config rather than SSH's.
        #[arg(long)]
        ssm: bool,
    },
}

pub async fn run(args: FarmArgs) -> Result<Exit, Error> {
    match args.command {
        FarmCommand::Up {
            subnet,
            foreground,
            moto_server,
            region,
            timeout,
            mirror,
            user,
        } => {
            if subnet.octets()[3] != 0 {
                return Err(Error::new(Exit::Usage, format!("--subnet {subnet} must end in .0 (a /24)")));
            }
            if crate::cloud::userdata::validate_user(&user).is_err() {
                return Err(Error::new(Exit::Usage, format!("--user {user:?} is not a build user the farm accepts")).hint("a lowercase login name other than root"));
            }
            if foreground {
                up(&args.dir, subnet, moto_server, region, mirror, user).await
            } else {
                up_background(&args.dir, subnet, moto_server, &region, timeout, mirror, &user).await
            }
        }
        FarmCommand::Env { ssm } => env(&args.dir, ssm).await,
        FarmCommand::Down { timeout } => down(&args.dir, timeout).await,
        FarmCommand::Status { json } => status(&args.dir, json).await,
        FarmCommand::Interrupt { instance, kill_after } => {
            let mut path = format!("/hosts/{instance}/interrupt");
            if let Some(k) = kill_after {
                path.push_str(&format!("?kill_after={}", k.as_secs()));
            }
            control(&args.dir, &path).await
        }
        FarmCommand::Kill { instance } => control(&args.dir, &format!("/hosts/{instance}/kill")).await,
        FarmCommand::Cut { instance } => control(&args.dir, &format!("/hosts/{instance}/cut")).await,
    }
}

async fn find_moto(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit.or_else(|| std::env::var_os("SPOTBUILD_MOTO_SERVER").map(PathBuf::from)) {
        return p;
    }
    let venv = PathBuf::from(".venv/bin/moto_server");
    if is_file(&venv).await {
        return tokio::fs::canonicalize(&venv).await.unwrap_or(venv);
    }
    which("moto_server").await.unwrap_or(venv)
}

async fn which(name: &str) -> Option<PathBuf> {
    for dir in std::env::split_paths(&std::env::var_os("PATH")?) {
        let p = dir.join(name);
        if is_file(&p).await {
            return Some(p);
        }
    }
    None
}

async fn is_file(p: &Path) -> bool {
    tokio::fs::metadata(p).await.is_ok_and(|m| m.is_file())
}

async fn create_dir(dir: &Path) -> Result<(), Error> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::new(Exit::Failed, format!("failed to create {}: {e}", dir.display())))
}

async fn up(dir: &Path, subnet: std::net::Ipv4Addr, moto: Option<PathBuf>, region: String, mirror: Option<PathBuf>, user: String) -> Result<Exit, Error> {
    create_dir(dir).await?;
    let dir = tokio::fs::canonicalize(dir).await.unwrap_or_else(|_| dir.to_path_buf());
    let settings = Settings {
        dir: dir.clone(),
        subnet,
        moto_server: find_moto(moto).await,
        registry_server: which("docker-registry").await.unwrap_or_else(|| "/usr/bin/docker-registry".into()),
        sshd: PathBuf::from("/usr/sbin/sshd"),
        agent: std::env::current_exe().map_err(|e| Error::new(Exit::Failed, format!("failed to find this program: {e}")))?,
        region,
        poll: Duration::from_millis(250),
        mirror_of: mirror,
        user,
    };
    localfarm::run(settings, super::signals::stop(), |s| {
        eprintln!("farm up: EC2 {} · registry {} · subnet {} · config {}", s.ec2_endpoint, s.registry, s.subnet_cidr, s.config.display());
    })
    .await
    .map_err(|e| {
        let hint = match e {
            localfarm::FarmError::NotRoot => Some("run it with sudo (make demo and make test do)"),
            localfarm::FarmError::Missing(_) => Some("run `make farm-deps` to install the farm's tools"),
            localfarm::FarmError::Closed { .. } => Some("put the farm's --dir where every directory above it is searchable (chmod o+x), e.g. under /tmp"),
            _ => None,
        };
        let err = Error::new(Exit::Failed, format!("failed to run the local farm: {}", error_chain(&e)));
        match hint {
            Some(h) => err.hint(h),
            None => err,
        }
    })?;
    Ok(Exit::Success)
}

async fn up_background(
    dir: &Path,
    subnet: std::net::Ipv4Addr,
    moto: Option<PathBuf>,
    region: &str,
    timeout: Duration,
    mirror: Option<PathBuf>,
    user: &str,
) -> Result<Exit, Error> {
    if let Some(s) = localfarm::read_state(dir).await.filter(|s| localfarm::pid_alive(s.pid)) {
        eprintln!("the farm is already up (pid {}); config: {}", s.pid, s.config.display());
        return Ok(Exit::Success);
    }
    create_dir(dir).await?;
    let log_path = dir.join("farm.log");
    let log_err = |e: std::io::Error| Error::new(Exit::Failed, format!("failed to create {}: {e}", log_path.display()));
    let log = tokio::fs::File::create(&log_path).await.map_err(log_err)?.into_std().await;
    let exe = std::env::current_exe().map_err(|e| Error::new(Exit::Failed, format!("failed to find this program: {e}")))?;
    // tokio's Command, so the wait below polls the child without blocking the runtime.
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("farm").arg("--dir").arg(dir).args(["up", "--foreground", "--subnet", &subnet.to_string(), "--region", region, "--user", user]);
    if let Some(m) = moto {
        cmd.arg("--moto-server").arg(m);
    }
    if let Some(m) = mirror {
        let m = tokio::fs::canonicalize(&m).await.unwrap_or(m);
        cmd.arg("--mirror").arg(m);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(log_err)?)
        .stderr(log);
    // SAFETY: setsid(2) before exec, so the farm outlives this terminal's session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::new(Exit::Failed, format!("failed to start the farm: {e}")))?;
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        if let Some(s) = localfarm::read_state(dir).await {
            eprintln!("farm up (pid {}): EC2 {} · registry {} · subnet {}", s.pid, s.ec2_endpoint, s.registry, s.subnet_cidr);
            eprintln!("config: {}", s.config.display());
            return Ok(Exit::Success);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = tokio::fs::read_to_string(&log_path).await.unwrap_or_default();
            return Err(Error::new(Exit::Failed, format!("the farm stopped while starting ({status}):\n{}", log.trim_end()))
                .hint(format!("its log is {}", log_path.display())));
        }
        if started.elapsed() > timeout {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the child we just started, which has not been reaped.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            return Err(Error::new(Exit::Failed, format!("the farm was not ready within {}", humantime::format_duration(timeout)))
                .hint(format!("its log is {}", log_path.display())));
        }
        if !said && started.elapsed() > Duration::from_secs(2) {
            eprintln!("starting the farm (the EC2 emulator takes a few seconds)…");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn down(dir: &Path, timeout: Duration) -> Result<Exit, Error> {
    readable_state(dir).await?;
    let Some(state) = localfarm::read_state(dir).await else {
        eprintln!("no farm is running in {}", dir.display());
        return Ok(Exit::Success);
    };
    if localfarm::pid_alive(state.pid) {
        // SAFETY: kill(2) on the farm's pid, read from the state file it wrote.
        unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
    }
    let started = std::time::Instant::now();
    while localfarm::pid_alive(state.pid) {
        if started.elapsed() > timeout {
            return Err(Error::new(Exit::Failed, format!("the farm (pid {}) did not stop within {}", state.pid, humantime::format_duration(timeout))));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tokio::fs::remove_file(dir.join(localfarm::STATE_FILE)).await;
    eprintln!("farm down");
    Ok(Exit::Success)
}

/// Fails when the state file is there but not ours to read (it is the owner's alone).
async fn readable_state(dir: &Path) -> Result<(), Error> {
    let path = dir.join(localfarm::STATE_FILE);
    match tokio::fs::File::open(&path).await {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(Error::new(Exit::Usage, format!("{} is the farm owner's alone", path.display())).hint("run it as the user who started the farm (sudo)"))
        }
        _ => Ok(()),
    }
}

async fn state_or_err(dir: &Path) -> Result<FarmState, Error> {
    readable_state(dir).await?;
    localfarm::read_state(dir)
        .await
        .filter(|s| localfarm::pid_alive(s.pid))
        .ok_or_else(|| Error::new(Exit::Usage, format!("no farm is running in {}", dir.display())).hint("start one with `spotbuild farm up`"))
}

async fn status(dir: &Path, json: bool) -> Result<Exit, Error> {
    let state = state_or_err(dir).await?;
    let hosts: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/hosts", state.control))
        .bearer_auth(&state.token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| Error::new(Exit::Failed, format!("failed to ask the farm: {e}")))?
        .json()
        .await
        .map_err(|e| Error::new(Exit::Failed, format!("failed to read the farm's answer: {e}")))?;
    let mut out = String::new();
    if json {
        let mut farm = serde_json::to_value(&state).expect("serialisable");
        // Secrets stay in farm.json: `farm env` prints the key for a shell that asks.
        for secret in ["token", "access_key_id", "secret_access_key"] {
            farm.as_object_mut().map(|o| o.remove(secret));
        }
        let _ = writeln!(out, "{}", serde_json::json!({ "farm": farm, "hosts": hosts }));
        return print(&out).await;
    }
    let _ = writeln!(out, "farm pid {} · EC2 {} · registry {} · subnet {}", state.pid, state.ec2_endpoint, state.registry, state.subnet_cidr);
    let _ = writeln!(out, "config: {}", state.config.display());
    let list = hosts.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        let _ = writeln!(out, "no hosts");
    }
    for h in list {
        let _ = writeln!(
            out,
            "  {}  {}  {}{}",
            h["instance_id"].as_str().unwrap_or("?"),
            h["address"].as_str().unwrap_or("?"),
            h["namespace"].as_str().unwrap_or("?"),
            if h["interrupted"].as_bool() == Some(true) { "  (interruption notice posted)" } else { "" }
        );
    }
    print(&out).await
}

/// `export …` lines: what a shell needs to build on the farm.
async fn env(dir: &Path, ssm: bool) -> Result<Exit, Error> {
    let state = state_or_err(dir).await?;
    let config = if ssm { &state.config_ssm } else { &state.config };
    let q = |s: &str| crate::transport::shell_quote(s);
    let out = format!(
        "export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_REGION={} SPOTBUILD_CONFIG={}\n",
        q(&state.access_key_id),
        q(&state.secret_access_key),
        q(&state.region),
        q(&config.to_string_lossy())
    );
    print(&out).await
}

/// Writes to stdout through the runtime (a full pipe must not stall a worker thread).
async fn print(text: &str) -> Result<Exit, Error> {
    use tokio::io::AsyncWriteExt;
    let mut stdout = tokio::io::stdout();
    let _ = stdout.write_all(text.as_bytes()).await;
    let _ = stdout.flush().await;
    Ok(Exit::Success)
}

async fn control(dir: &Path, path: &str) -> Result<Exit, Error> {
    let state = state_or_err(dir).await?;
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", state.control))
        .bearer_auth(&state.token)
        .send()
        .await
        .map_err(|e| Error::new(Exit::Failed, format!("failed to reach the farm: {e}")))?;
    let ok = resp.status().is_success();
    let text = resp.text().await.unwrap_or_default();
    if ok {
        eprint!("{text}");
        Ok(Exit::Success)
    } else {
        Err(Error::new(Exit::Usage, text.trim().to_string()).hint("`spotbuild farm status` lists the hosts"))
    }
}
