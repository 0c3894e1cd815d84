//! The local farm as a test fixture: `spotbuild farm up --foreground` in a directory of its
//! own, on a /24 of its own, stopped (and checked to have removed every host and namespace)
//! when dropped, and then the images its hosts built removed. If the test process dies, the
//! kernel sends the farm SIGTERM and it cleans up.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::docker::Images;
use super::services::runtime;

static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);

pub struct LocalFarm {
    child: Option<Child>,
    pub dir: TempDir,
    pub state: Value,
    pub prefix: String,
    /// Dropped after the farm has stopped, when no host (and so no agent) is left to build
    /// or pull: a host is gone from `hosts()` before its processes are.
    _images: Images,
}

fn moto_server() -> PathBuf {
    if let Ok(p) = std::env::var("SPOTBUILD_TEST_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    assert!(p.is_file(), "{} not found: `make test` creates the venv with moto[server]", p.display());
    p
}

impl LocalFarm {
    pub fn start() -> LocalFarm {
        LocalFarm::start_with(None)
    }

    /// A farm whose hosts have a git mirror of `mirror_of` baked in.
    pub fn start_with(mirror_of: Option<&Path>) -> LocalFarm {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the local farm needs root (network namespaces); `make test` runs as root in CI");
        for p in ["/usr/sbin/sshd", "/usr/bin/docker-registry"] {
            assert!(Path::new(p).is_file(), "{p} is required: `make test` installs it");
        }
        // Each farm of this test run gets its own /24 (and so its own bridge and namespaces):
        // 100 to 239 (the demo and the benches use others), starting where this process's
        // id points, so that two test runs at once are unlikely to meet; a subnet another
        // farm holds is skipped.
        let mut attempts = 0;
        loop {
            let n = NEXT_SUBNET.fetch_add(1, Ordering::SeqCst) as u32;
            let octet = (100 + (std::process::id() * 7 + n) % 140) as u8;
            match LocalFarm::try_start(mirror_of, octet) {
                Ok(farm) => return farm,
                Err(log) if log.contains("another farm is using subnet") && attempts < 20 => attempts += 1,
                Err(log) => panic!("the farm stopped while starting:\n{log}"),
            }
        }
    }

    /// A farm on 10.251.`octet`.0/24; `Err` with its log when it stopped while starting.
    fn try_start(mirror_of: Option<&Path>, octet: u8) -> Result<LocalFarm, String> {
        let dir = tempfile::Builder::new().prefix("sbfarm").tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("farm.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spotbuild"));
        cmd.arg("farm")
            .arg("--dir")
            .arg(dir.path())
            .args(["up", "--foreground", "--subnet", &format!("10.251.{octet}.0")])
            .arg("--moto-server")
            .arg(moto_server());
        if let Some(m) = mirror_of {
            cmd.arg("--mirror").arg(m);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("failed to start `spotbuild farm up`");
        let deadline = Instant::now() + Duration::from_secs(90);
        let state = loop {
            if let Ok(text) = std::fs::read_to_string(dir.path().join("farm.json")) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    break v;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("({status}) {}", std::fs::read_to_string(dir.path().join("farm.log")).unwrap_or_default()));
            }
            assert!(Instant::now() < deadline, "the farm was not ready in 90s:\n{}", std::fs::read_to_string(dir.path().join("farm.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(100));
        };
        let images = Images::for_host(state["registry"].as_str().expect("the farm's registry"));
        Ok(LocalFarm {
            child: Some(child),
            dir,
            state,
            prefix: format!("sbf{octet}"),
            _images: images,
        })
    }

    pub fn config(&self) -> PathBuf {
        PathBuf::from(self.state["config"].as_str().unwrap())
    }

    pub fn registry(&self) -> String {
        self.state["registry"].as_str().unwrap().to_string()
    }

    pub fn ec2_endpoint(&self) -> String {
        self.state["ec2_endpoint"].as_str().unwrap().to_string()
    }

    /// The farm's key, which its emulator wants: (access key id, secret).
    pub fn key(&self) -> (String, String) {
        (self.state["access_key_id"].as_str().unwrap().to_string(), self.state["secret_access_key"].as_str().unwrap().to_string())
    }

    /// The farm's config for builds over SSM.
    pub fn config_ssm(&self) -> PathBuf {
        PathBuf::from(self.state["config_ssm"].as_str().unwrap())
    }

    /// A fault proxy in front of the farm's EC2 endpoint (it signs again what it rewrites).
    pub fn fault_proxy(&self) -> super::fault_proxy::FaultProxy {
        super::fault_proxy::FaultProxy::start_signed(&self.ec2_endpoint(), &self.key().1)
    }

    /// An EC2 client signing with the farm's key.
    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        let state: spotbuild::localfarm::FarmState = serde_json::from_value(self.state.clone()).unwrap();
        spotbuild::localfarm::ec2_client(&state).await
    }

    /// `cmd` with the farm's key (and nothing else of the farm's).
    pub fn with_key<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let (id, secret) = self.key();
        cmd.env("AWS_ACCESS_KEY_ID", id).env("AWS_SECRET_ACCESS_KEY", secret)
    }

    /// The farm's config with `[cloud] endpoint` replaced (e.g. by a fault proxy), as a new file.
    pub fn config_with_endpoint(&self, endpoint: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.config()).unwrap();
        let text = text.replace(&format!("endpoint = \"{}\"", self.ec2_endpoint()), &format!("endpoint = \"{endpoint}\""));
        let path = self.dir.path().join(format!("spotbuild-{}.toml", super::services::free_port()));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `spotbuild` for a build against this farm, from `repo`.
    pub fn spotbuild(&self, repo: &Path) -> Command {
        let mut cmd = super::spotbuild(repo);
        self.env(&mut cmd);
        cmd
    }

    /// What any command (spotbuild, or a CI step's shell calling it) needs to use this farm.
    pub fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        super::outside_ci(cmd);
        // Through the environment, so that a test can still pass a --config of its own.
        cmd.env("SPOTBUILD_CONFIG", self.config())
            .env("SPOTBUILD", env!("CARGO_BIN_EXE_spotbuild"))
            .env("AWS_REGION", "us-east-1")
            .env("TMPDIR", self.dir.path());
        self.with_key(cmd)
    }

    pub fn hosts(&self) -> Vec<Value> {
        let url = format!("{}/hosts", self.state["control"].as_str().unwrap());
        let token = self.state["token"].as_str().unwrap();
        runtime().block_on(async { reqwest::Client::new().get(&url).bearer_auth(token).send().await.unwrap().json::<Vec<Value>>().await.unwrap() })
    }

    pub fn post(&self, path: &str) -> String {
        let url = format!("{}{path}", self.state["control"].as_str().unwrap());
        runtime().block_on(async {
            let r = reqwest::Client::new().post(&url).bearer_auth(self.state["token"].as_str().unwrap()).send().await.unwrap();
            assert!(r.status().is_success(), "farm control {path}: {}", r.status());
            r.text().await.unwrap()
        })
    }

    /// Instances the emulator says are pending or running.
    pub fn live_instances(&self) -> Vec<String> {
        runtime().block_on(async {
            let ec2 = self.ec2().await;
            let out = ec2.describe_instances().send().await.unwrap();
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| matches!(i.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("pending" | "running")))
                .filter_map(|i| i.instance_id().map(String::from))
                .collect()
        })
    }

    /// Every instance the emulator knows, in any state.
    pub fn all_instances(&self) -> usize {
        runtime().block_on(async {
            let ec2 = self.ec2().await;
            let out = ec2.describe_instances().send().await.unwrap();
            out.reservations().iter().map(|r| r.instances().len()).sum()
        })
    }

    /// Waits (bounded) until no instance runs and no host is left.
    pub fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (live, hosts) = (self.live_instances(), self.hosts());
            if live.is_empty() && hosts.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left behind: instances {live:?}, hosts {hosts:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (bounded) for a host to come up, and returns its instance id.
    pub fn wait_host(&self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(h) = self.hosts().first() {
                return h["instance_id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no host came up within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The events file of the build running on the farm, once it has a line matching `pred`.
    pub fn wait_event(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            for f in glob_events(&self.dir.path().join("work")) {
                for line in std::fs::read_to_string(&f).unwrap_or_default().lines() {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        if pred(&v) {
                            return v;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no such event within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn glob_events(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "events.ndjson") {
                out.push(p);
            }
        }
    }
    out
}

impl Drop for LocalFarm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the farm process this fixture started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let left: Vec<String> = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with(&format!("{}-", self.prefix))).map(String::from).collect())
            .unwrap_or_default();
        if !std::thread::panicking() {
            assert!(left.is_empty(), "the farm left namespaces behind: {left:?}");
        }
    }
}
