//! Local services started per test: a real docker-registry (registry v2) and the AWS
//! emulator. They are required: a missing one fails the test with the way to get it.
//! Each is killed (by its own PID) when dropped, and by the kernel if the test dies.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// A child process that dies with its guard.
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> std::io::Result<ChildGuard> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; ask the kernel to kill the service if the test
        // process dies without running destructors.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(ChildGuard { child: cmd.spawn()? })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private current-thread runtime for the few async calls these sync fixtures make.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Polls `url` until it answers (any HTTP status), within `limit`.
fn wait_http(url: &str, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    let rt = runtime();
    while !rt.block_on(async { reqwest::get(url).await.is_ok() }) {
        assert!(Instant::now() < deadline, "{what} did not start within {limit:?} ({url})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find_program(env: &str, candidates: &[PathBuf], install: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for c in candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "{} not found (looked in {env} and {candidates:?}); {install}. `make test` installs and provides it.",
        candidates[0].display()
    );
}

/// A real registry v2 server (Debian's docker-registry) on loopback, with its own storage.
pub struct Registry {
    _child: ChildGuard,
    _storage: TempDir,
    pub port: u16,
}

impl Registry {
    pub fn start() -> Registry {
        let program = find_program(
            "SPOTBUILD_TEST_DOCKER_REGISTRY",
            &[PathBuf::from("/usr/bin/docker-registry")],
            "install Debian's docker-registry",
        );
        let storage = tempfile::Builder::new().prefix("spotbuild-registry").tempdir().unwrap();
        let port = free_port();
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(program);
        cmd.arg("serve").arg(&config);
        let child = ChildGuard::spawn(cmd).expect("failed to start docker-registry");
        wait_http(&format!("http://127.0.0.1:{port}/v2/"), Duration::from_secs(20), "docker-registry");
        Registry {
            _child: child,
            _storage: storage,
            port,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes a tiny image (a config blob, no layers) as `repository:tag`.
    pub fn push(&self, repository: &str, tag: &str) {
        let base = format!("http://{}", self.host());
        runtime().block_on(async {
            let http = reqwest::Client::new();
            let config = format!(
                r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{"Labels":{{"tag":"{tag}"}}}}}}"#
            );
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(config.as_bytes())));
            let resp = http
                .post(format!("{base}/v2/{repository}/blobs/uploads/"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 202, "upload start");
            let location = resp.headers()["location"].to_str().unwrap().to_string();
            let location = if location.starts_with("http") { location } else { format!("{base}{location}") };
            let sep = if location.contains('?') { '&' } else { '?' };
            let resp = http
                .put(format!("{location}{sep}digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(config.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201, "blob upload");
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{},"digest":"{digest}"}},"layers":[]}}"#,
                config.len()
            );
            let resp = http
                .put(format!("{base}/v2/{repository}/manifests/{tag}"))
                .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
                .body(manifest)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201, "manifest put: {:?}", resp.text().await);
        });
    }
}

/// The AWS emulator (moto server) on loopback.
pub struct Moto {
    _child: ChildGuard,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let program = find_program(
            "SPOTBUILD_TEST_MOTO_SERVER",
            &[PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")],
            "create the venv with `python3 -m venv .venv && .venv/bin/pip install 'moto[server]'`",
        );
        let port = free_port();
        let mut cmd = Command::new(program);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let child = ChildGuard::spawn(cmd).expect("failed to start moto_server");
        wait_http(&format!("http://127.0.0.1:{port}/moto-api/"), Duration::from_secs(30), "moto_server");
        Moto { _child: child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// An SDK configuration for the emulator at `endpoint`: fixed region and credentials.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await
}

/// An S3 client for the emulator with `bucket` created; path-style, since a bucket name is
/// not a host there.
pub async fn s3_with_bucket(config: &aws_config::SdkConfig, bucket: &str) -> aws_sdk_s3::Client {
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(config).force_path_style(true).build());
    s3.create_bucket().bucket(bucket).send().await.unwrap();
    s3
}
