//! The SSM transport against the AWS emulator. Every SSM and S3 call is real (the
//! emulator's); because the emulator runs no commands, a stand-in for the instance's SSM
//! agent runs each script the transport sent, on this machine, with the real `spotbuild`
//! binary as the agent. So the scripts, the presigned fetch and the chunk uploader are all
//! exercised as they would be on an instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use sha2::Digest;
use spotbuild::objects::s3::S3Store;
use spotbuild::objects::ObjectStore;
use spotbuild::transport::ssm::{AwsCommands, CommandError, Commands, Invocation, InvocationStatus, SsmTarget, SsmTransport};
use spotbuild::transport::{Transport, TransportError};

use crate::support::services::{runtime, s3_with_bucket, sdk_config, Moto};

const INSTANCE: &str = "i-0a1b2c3d4e5f60718";
const BUCKET: &str = "spotbuild-ssm-test";

/// A script the stand-in ran: its outcome, or the process still running.
enum Ran {
    Done(Invocation),
    Running(tokio::process::Child),
}

/// The emulator's SSM API, plus a stand-in for the instance's SSM agent.
struct LocalSsmAgent {
    ssm: AwsCommands,
    endpoint: String,
    /// Kill a script this long after it starts (a host that dies mid-stream).
    kill_after: Option<Duration>,
    ran: Mutex<HashMap<String, Ran>>,
    scripts: Mutex<Vec<Vec<String>>>,
}

impl LocalSsmAgent {
    fn command(&self, script: &[String]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(script.join("\n"))
            .env("AWS_ENDPOINT_URL_S3", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("PATH", path_with_spotbuild())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }
}

fn path_with_spotbuild() -> String {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_spotbuild")).parent().unwrap().to_path_buf();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

impl Commands for LocalSsmAgent {
    fn send<'a>(&'a self, instance_id: &'a str, script: &'a [String], timeout: Duration, comment: &'a str) -> BoxFuture<'a, Result<String, CommandError>> {
        async move {
            let id = self.ssm.send(instance_id, script, timeout, comment).await?;
            self.scripts.lock().unwrap().push(script.to_vec());
            let child = self.command(script).spawn().expect("sh runs");
            if let (Some(after), Some(pid)) = (self.kill_after, child.id()) {
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    // The whole group: the producer and the uploader die together.
                    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                });
            }
            self.ran.lock().unwrap().insert(id.clone(), Ran::Running(child));
            Ok(id)
        }
        .boxed()
    }

    fn invocation<'a>(&'a self, command_id: &'a str, instance_id: &'a str) -> BoxFuture<'a, Result<Option<Invocation>, CommandError>> {
        async move {
            // The API call is real; only the outcome comes from the stand-in.
            let api = self.ssm.invocation(command_id, instance_id).await?;
            assert!(api.is_some(), "the emulator knows command {command_id}");
            let mut ran = self.ran.lock().unwrap();
            let entry = ran.get_mut(command_id).expect("sent through here");
            if let Ran::Running(child) = entry {
                match child.try_wait().unwrap() {
                    None => {
                        return Ok(Some(Invocation {
                            status: InvocationStatus::InProgress,
                            exit_code: None,
                            stdout: String::new(),
                            stderr: String::new(),
                        }))
                    }
                    Some(status) => {
                        let mut out = String::new();
                        let mut err = String::new();
                        use std::io::Read;
                        // The pipes are closed once the script exited.
                        if let Some(o) = child.stdout.take() {
                            let mut o = o.into_owned_fd().map(std::fs::File::from).unwrap();
                            let _ = o.read_to_string(&mut out);
                        }
                        if let Some(e) = child.stderr.take() {
                            let mut e = e.into_owned_fd().map(std::fs::File::from).unwrap();
                            let _ = e.read_to_string(&mut err);
                        }
                        let code = status.code();
                        *entry = Ran::Done(Invocation {
                            status: if code == Some(0) { InvocationStatus::Success } else { InvocationStatus::Failed },
                            exit_code: code,
                            stdout: out,
                            stderr: err,
                        });
                    }
                }
            }
            match entry {
                Ran::Done(inv) => Ok(Some(inv.clone())),
                Ran::Running(_) => unreachable!(),
            }
        }
        .boxed()
    }

    fn cancel<'a>(&'a self, command_id: &'a str, _instance_id: &'a str) -> BoxFuture<'a, Result<(), CommandError>> {
        async move {
            if let Some(Ran::Running(child)) = self.ran.lock().unwrap().get_mut(command_id) {
                let _ = child.start_kill();
            }
            Ok(())
        }
        .boxed()
    }
}

struct Setup {
    _moto: Moto,
    agent: Arc<LocalSsmAgent>,
    store: Arc<S3Store>,
    ssm: aws_sdk_ssm::Client,
    prefix: String,
}

async fn setup(moto: Moto, kill_after: Option<Duration>) -> Setup {
    let config = sdk_config(&moto.endpoint()).await;
    let s3 = s3_with_bucket(&config, BUCKET).await;
    let ssm = aws_sdk_ssm::Client::new(&config);
    Setup {
        agent: Arc::new(LocalSsmAgent {
            ssm: AwsCommands::new(ssm.clone()),
            endpoint: moto.endpoint(),
            kill_after,
            ran: Mutex::new(HashMap::new()),
            scripts: Mutex::new(Vec::new()),
        }),
        store: Arc::new(S3Store::new(s3, BUCKET)),
        ssm,
        prefix: "spotbuild/b-test/a1".into(),
        _moto: moto,
    }
}

impl Setup {
    async fn connect(&self) -> SsmTransport {
        let target = SsmTarget {
            instance_id: INSTANCE.into(),
            prefix: self.prefix.clone(),
            agent: env!("CARGO_BIN_EXE_spotbuild").into(),
            region: Some("us-east-1".into()),
            connect_timeout: Duration::from_secs(20),
            command_timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(60),
            follow: Default::default(),
        };
        SsmTransport::connect(target, self.agent.clone(), self.store.clone()).await.expect("the stand-in answers")
    }

    async fn objects_left(&self) -> Vec<String> {
        self.store.list(&self.prefix, None).await.unwrap()
    }

    /// Every command the emulator recorded, as the text of its script.
    async fn recorded(&self) -> Vec<(String, String)> {
        let out = self.ssm.list_commands().send().await.unwrap();
        out.commands()
            .iter()
            .map(|c| {
                let script = c.parameters().and_then(|p| p.get("commands")).map(|l| l.join("\n")).unwrap_or_default();
                (c.document_name().unwrap_or_default().to_string(), script)
            })
            .collect()
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

#[test]
fn exec_ships_stdin_through_a_presigned_url_and_leaves_nothing_behind() {
    let moto = Moto::start();
    runtime().block_on(async {
        let s = setup(moto, None).await;
        let t = s.connect().await;
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("job.json");
        // A secret-looking payload, big enough to need streaming on both ends.
        let mut payload = b"{\"registry_password\":\"s3cr3t-NOT-IN-ANY-COMMAND\"}\n".to_vec();
        payload.extend((0..200_000u32).map(|i| (i % 251) as u8));
        let sha = hex::encode(sha2::Sha256::digest(&payload));
        let bin = env!("CARGO_BIN_EXE_spotbuild");
        t.exec(&argv(&[bin, "agent", "receive", "--to", to.to_str().unwrap(), "--sha256", &sha]), payload.clone())
            .await
            .expect("receive succeeds");
        assert_eq!(std::fs::read(&to).unwrap(), payload, "the bytes arrived whole");

        // The answer of a command comes back as its stdout.
        let info = t.exec(&argv(&[bin, "agent", "info"]), Vec::new()).await.unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
        assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

        let recorded = s.recorded().await;
        assert!(recorded.len() >= 3, "ping, receive, info: {recorded:?}");
        assert!(recorded.iter().all(|(doc, _)| doc == "AWS-RunShellScript"));
        let receive = &recorded.iter().find(|(_, s)| s.contains("receive")).unwrap().1;
        assert!(receive.contains("agent fetch --sha256"), "{receive}");
        assert!(receive.contains("SPOTBUILD_FETCH_URL="), "{receive}");
        for (_, script) in &recorded {
            assert!(!script.contains("s3cr3t"), "stdin never goes in a command: {script}");
        }
        assert!(s.objects_left().await.is_empty(), "the input object is deleted once the command ends");
        t.close().await;
    });
}

#[test]
fn a_failing_command_reports_its_exit_and_stderr_and_still_deletes_its_input() {
    let moto = Moto::start();
    runtime().block_on(async {
        let s = setup(moto, None).await;
        let t = s.connect().await;
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("commit.bundle");
        let bin = env!("CARGO_BIN_EXE_spotbuild");
        let wrong = "0".repeat(64);
        let err = t
            .exec(&argv(&[bin, "agent", "receive", "--to", to.to_str().unwrap(), "--sha256", &wrong]), b"bundle bytes".to_vec())
            .await
            .expect_err("a damaged transfer fails");
        match &err {
            TransportError::Command { status, stderr, .. } => {
                assert!(status.contains("exit"), "{status}");
                assert!(stderr.contains("damaged"), "{stderr}");
            }
            other => panic!("expected a command error, got {other}"),
        }
        assert!(!to.exists());
        assert!(s.objects_left().await.is_empty());
        // The URL is not handed on to the command it feeds.
        let out = t
            .exec(&argv(&["sh", "-c", "echo url=${SPOTBUILD_FETCH_URL:-unset}; wc -c"]), b"12345".to_vec())
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out).split_whitespace().collect::<Vec<_>>(), vec!["url=unset", "5"]);
    });
}

#[test]
fn a_stream_is_followed_through_chunks_to_its_end_in_order() {
    let moto = Moto::start();
    runtime().block_on(async {
        let s = setup(moto, None).await;
        let t = s.connect().await;
        // Output in bursts, so the uploader cuts several chunks, some by size, some by time.
        let script = "for i in $(seq 1 4); do seq $(( (i-1)*5000+1 )) $(( i*5000 )); sleep 1; done";
        let lines: Vec<String> = t.stream(&argv(&["sh", "-c", script])).await.unwrap().map(|l| l.unwrap()).collect().await;
        let want: Vec<String> = (1..=20_000).map(|i| i.to_string()).collect();
        assert_eq!(lines.len(), want.len());
        assert!(lines == want, "every line once, in order");
        let chunks = s.objects_left().await;
        assert!(chunks.len() > 3, "several chunks and the end marker: {chunks:?}");
        assert!(chunks.last().unwrap().ends_with("/end"));
        t.close().await;
        assert!(s.objects_left().await.is_empty(), "close deletes the chunks");
    });
}

#[test]
fn a_stream_whose_host_dies_ends_once_its_command_has_ended() {
    let moto = Moto::start();
    runtime().block_on(async {
        // Every script dies 3 s in; the ping (`true`) finishes long before.
        let s = setup(moto, Some(Duration::from_secs(3))).await;
        let t = s.connect().await;
        let started = std::time::Instant::now();
        let lines: Vec<String> =
            t.stream(&argv(&["sh", "-c", "echo first; echo second; sleep 60"])).await.unwrap().map(|l| l.unwrap()).collect().await;
        assert_eq!(lines, vec!["first", "second"], "what was uploaded before the host died is kept");
        assert!(started.elapsed() < Duration::from_secs(30), "the follower noticed the end: {:?}", started.elapsed());
        assert!(!s.objects_left().await.iter().any(|k| k.ends_with("/end")), "no end marker: it was a drop");
        t.close().await;
    });
}
