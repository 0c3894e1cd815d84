//! The SSM transport: commands go through `SendCommand` (no inbound port, no SSH key on the
//! instance); bytes for a command's stdin go through a presigned S3 URL; a stream's output
//! is cut into chunks on S3 by `spotbuild agent upload-chunks` and followed here.
//!
//! Guarantees: a command's stdin never appears in the command: the command holds a
//! presigned URL for one object, and the agent checks the bytes' SHA-256 before handing
//! them on. The object is deleted as soon as the command ends, which also makes the URL
//! useless. Every wait is bounded. Closing cancels running streams and deletes what this
//! transport put under its prefix.
//! Assumptions: the instance runs the SSM agent and its instance profile may put objects
//! under its own part of the prefix in the bucket (`terraform/` grants exactly that); it
//! reads a command's input through the presigned URL only.
//! Caveats: the presigned URL is visible in the command's parameters to principals that can
//! read SSM command history, until the object is deleted or the URL expires
//! (`command_timeout`). SSM keeps at most 24,000 characters of a command's stdout; `exec`
//! only runs commands with short answers, and refuses a truncated one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use sha2::Digest;

use super::chunks::{self, FollowSettings};
use super::{shell_quote, Lines, Transport, TransportError};
use crate::objects::ObjectStore;

/// Where a command invocation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvocationStatus {
    Pending,
    InProgress,
    Success,
    Failed,
    Cancelled,
    TimedOut,
    Other(String),
}

impl InvocationStatus {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, InvocationStatus::Pending | InvocationStatus::InProgress)
    }
}

/// One command on one instance, as `GetCommandInvocation` reports it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub status: InvocationStatus,
    /// The script's exit code, once it has one.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandErrorKind {
    /// The instance is not (yet) registered with SSM: its agent has not started.
    NotRegistered,
    Other,
}

/// An SSM call failed. The SDK's error is kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("SSM {op} failed: {message}")]
pub struct CommandError {
    pub op: &'static str,
    pub kind: CommandErrorKind,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// The narrow slice of SSM the transport uses.
pub trait Commands: Send + Sync {
    /// Sends a shell script (one line per element) to one instance; returns the command id.
    fn send<'a>(&'a self, instance_id: &'a str, script: &'a [String], execution_timeout: Duration, comment: &'a str) -> BoxFuture<'a, Result<String, CommandError>>;

    /// The invocation on `instance_id`, or `None` if SSM has not created it yet.
    fn invocation<'a>(&'a self, command_id: &'a str, instance_id: &'a str) -> BoxFuture<'a, Result<Option<Invocation>, CommandError>>;

    fn cancel<'a>(&'a self, command_id: &'a str, instance_id: &'a str) -> BoxFuture<'a, Result<(), CommandError>>;
}

/// [`Commands`] on `aws-sdk-ssm`, with the `AWS-RunShellScript` document.
pub struct AwsCommands {
    client: aws_sdk_ssm::Client,
}

impl AwsCommands {
    pub fn new(client: aws_sdk_ssm::Client) -> AwsCommands {
        AwsCommands { client }
    }

    pub async fn from_env(region: Option<String>, endpoint: Option<String>) -> AwsCommands {
        AwsCommands::new(aws_sdk_ssm::Client::new(&crate::cloud::aws::sdk_config(region, endpoint).await))
    }
}

fn command_error<E>(op: &'static str, e: aws_sdk_ssm::error::SdkError<E>) -> CommandError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let kind = match e.code() {
        Some("InvalidInstanceId") => CommandErrorKind::NotRegistered,
        _ => CommandErrorKind::Other,
    };
    CommandError {
        op,
        kind,
        message: DisplayErrorContext(&e).to_string(),
        source: Some(Box::new(e)),
    }
}

impl Commands for AwsCommands {
    fn send<'a>(&'a self, instance_id: &'a str, script: &'a [String], execution_timeout: Duration, comment: &'a str) -> BoxFuture<'a, Result<String, CommandError>> {
        async move {
            // SSM bounds a command at 48 hours.
            let secs = execution_timeout.as_secs().clamp(1, 172_800);
            let out = self
                .client
                .send_command()
                .instance_ids(instance_id)
                .document_name("AWS-RunShellScript")
                .comment(comment.chars().take(100).collect::<String>())
                .parameters("commands", script.to_vec())
                .parameters("executionTimeout", vec![secs.to_string()])
                .send()
                .await
                .map_err(|e| command_error("SendCommand", e))?;
            out.command()
                .and_then(|c| c.command_id())
                .map(String::from)
                .ok_or_else(|| CommandError {
                    op: "SendCommand",
                    kind: CommandErrorKind::Other,
                    message: "the answer has no command id".into(),
                    source: None,
                })
        }
        .boxed()
    }

    fn invocation<'a>(&'a self, command_id: &'a str, instance_id: &'a str) -> BoxFuture<'a, Result<Option<Invocation>, CommandError>> {
        async move {
            let out = match self.client.get_command_invocation().command_id(command_id).instance_id(instance_id).send().await {
                Ok(out) => out,
                Err(e) if e.code() == Some("InvocationDoesNotExist") => return Ok(None),
                Err(e) => return Err(command_error("GetCommandInvocation", e)),
            };
            use aws_sdk_ssm::types::CommandInvocationStatus as S;
            let status = match out.status() {
                Some(S::Pending) | Some(S::Delayed) | None => InvocationStatus::Pending,
                Some(S::InProgress) | Some(S::Cancelling) => InvocationStatus::InProgress,
                Some(S::Success) => InvocationStatus::Success,
                Some(S::Failed) => InvocationStatus::Failed,
                Some(S::Cancelled) => InvocationStatus::Cancelled,
                Some(S::TimedOut) => InvocationStatus::TimedOut,
                Some(other) => InvocationStatus::Other(other.as_str().to_string()),
            };
            let code = out.response_code();
            Ok(Some(Invocation {
                exit_code: (status.is_terminal() && code >= 0).then_some(code),
                status,
                stdout: out.standard_output_content().unwrap_or_default().to_string(),
                stderr: out.standard_error_content().unwrap_or_default().to_string(),
            }))
        }
        .boxed()
    }

    fn cancel<'a>(&'a self, command_id: &'a str, instance_id: &'a str) -> BoxFuture<'a, Result<(), CommandError>> {
        async move {
            self.client
                .cancel_command()
                .command_id(command_id)
                .instance_ids(instance_id)
                .send()
                .await
                .map_err(|e| command_error("CancelCommand", e))?;
            Ok(())
        }
        .boxed()
    }
}

/// SSM keeps this many characters of stdout in the invocation.
const STDOUT_LIMIT: usize = 24_000;

/// Which instance, and where its objects go.
#[derive(Debug, Clone)]
pub struct SsmTarget {
    pub instance_id: String,
    /// Key prefix for this attempt's objects (stdin payloads and stream chunks).
    pub prefix: String,
    /// The spotbuild binary on the instance.
    pub agent: std::path::PathBuf,
    /// The region the instance's uploader talks to.
    pub region: Option<String>,
    /// Bound on the instance registering with SSM and answering a first command.
    pub connect_timeout: Duration,
    /// Bound on one `exec` (and the lifetime of its presigned URL).
    pub command_timeout: Duration,
    /// Bound on one stream's command on the instance.
    pub stream_timeout: Duration,
    pub follow: FollowSettings,
}

pub struct SsmTransport {
    target: SsmTarget,
    commands: Arc<dyn Commands>,
    objects: Arc<dyn ObjectStore>,
    next: AtomicU64,
    /// Stream commands to cancel on close.
    streams: Mutex<Vec<String>>,
}

impl SsmTransport {
    /// Waits (bounded, with backoff) until the instance answers a no-op command.
    pub async fn connect(target: SsmTarget, commands: Arc<dyn Commands>, objects: Arc<dyn ObjectStore>) -> Result<SsmTransport, TransportError> {
        let t = SsmTransport {
            target,
            commands,
            objects,
            next: AtomicU64::new(0),
            streams: Mutex::new(Vec::new()),
        };
        t.ping().await?;
        Ok(t)
    }

    fn host(&self) -> String {
        self.target.instance_id.clone()
    }

    fn io(&self, message: impl std::fmt::Display) -> TransportError {
        TransportError::Io {
            host: self.host(),
            message: message.to_string(),
        }
    }

    /// Sends `true` until SSM accepts it and it succeeds: the instance's agent is up.
    async fn ping(&self) -> Result<(), TransportError> {
        let started = tokio::time::Instant::now();
        let limit = self.target.connect_timeout;
        let mut delay = Duration::from_millis(500);
        let script = vec!["true".to_string()];
        loop {
            let last = match self.commands.send(&self.target.instance_id, &script, Duration::from_secs(60), "spotbuild: ping").await {
                Ok(id) => {
                    let left = limit.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
                    match self.wait(&id, left).await {
                        Ok(inv) if inv.status == InvocationStatus::Success => return Ok(()),
                        Ok(inv) => format!("a no-op command ended {:?}", inv.status),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) if e.kind == CommandErrorKind::NotRegistered => "the instance is not registered with SSM yet".to_string(),
                Err(e) => return Err(self.io(e)),
            };
            if started.elapsed() + delay > limit {
                return Err(TransportError::Connect {
                    host: self.host(),
                    waited: started.elapsed(),
                    last,
                });
            }
            tracing::debug!(instance = %self.target.instance_id, %last, "ssm not ready; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Polls the invocation until it ends, within `limit`.
    async fn wait(&self, command_id: &str, limit: Duration) -> Result<Invocation, TransportError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut delay = Duration::from_millis(200);
        loop {
            match self.commands.invocation(command_id, &self.target.instance_id).await {
                Ok(Some(inv)) if inv.status.is_terminal() => return Ok(inv),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "GetCommandInvocation failed; retrying"),
            }
            if tokio::time::Instant::now() + delay > deadline {
                let _ = self.commands.cancel(command_id, &self.target.instance_id).await;
                return Err(self.io(format!("command {command_id} did not finish within {}", humantime::format_duration(limit))));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    fn key(&self, kind: &str) -> String {
        format!("{}/{kind}/{:06}", self.target.prefix, self.next.fetch_add(1, Ordering::SeqCst))
    }

    async fn exec_inner(&self, argv: &[String], stdin: Vec<u8>, input_key: &str) -> Result<Vec<u8>, TransportError> {
        let script = if stdin.is_empty() {
            exec_script(argv, None)
        } else {
            let sha = hex::encode(sha2::Sha256::digest(&stdin));
            self.objects.put(input_key, stdin).await.map_err(|e| self.io(e))?;
            let url = self
                .objects
                .presign_get(input_key, self.target.command_timeout)
                .await
                .map_err(|e| self.io(e))?;
            exec_script(argv, Some(Fetch { agent: &self.target.agent, url: &url, sha256: &sha }))
        };
        let comment = format!("spotbuild: {}", argv.get(2).map(String::as_str).unwrap_or("exec"));
        let id = self
            .commands
            .send(&self.target.instance_id, &script, self.target.command_timeout, &comment)
            .await
            .map_err(|e| self.io(e))?;
        let inv = self.wait(&id, self.target.command_timeout + Duration::from_secs(30)).await?;
        if inv.status != InvocationStatus::Success {
            return Err(TransportError::Command {
                host: self.host(),
                command: argv.join(" "),
                status: match inv.exit_code {
                    Some(c) => format!("{:?}, exit {c}", inv.status),
                    None => format!("{:?}", inv.status),
                },
                stderr: inv.stderr.trim().to_string(),
            });
        }
        if inv.stdout.len() >= STDOUT_LIMIT {
            return Err(self.io(format!("`{}` printed more than SSM keeps ({STDOUT_LIMIT} characters)", argv.join(" "))));
        }
        Ok(inv.stdout.into_bytes())
    }
}

/// The instance fetches a command's stdin itself, from a presigned URL.
struct Fetch<'a> {
    agent: &'a std::path::Path,
    url: &'a str,
    sha256: &'a str,
}

/// The script for one `exec`. The URL goes in the environment of `agent fetch` only, so it
/// is not on any process's command line on the instance.
fn exec_script(argv: &[String], fetch: Option<Fetch<'_>>) -> Vec<String> {
    let command = argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ");
    let mut lines = vec!["set -e".to_string()];
    match fetch {
        None => lines.push(command),
        Some(f) => lines.push(format!(
            "SPOTBUILD_FETCH_URL={} {} agent fetch --sha256 {} -- {command}",
            shell_quote(f.url),
            shell_quote(&f.agent.to_string_lossy()),
            f.sha256
        )),
    }
    lines
}

/// The script for one stream: the command's stdout goes to the chunk uploader. Without
/// `pipefail` (not every `sh` has it) the uploader's end marker is what says the stream
/// ended normally; the controller needs the agent's result event anyway.
fn stream_script(argv: &[String], agent: &std::path::Path, bucket: &str, prefix: &str, region: Option<&str>) -> Vec<String> {
    let command = argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ");
    let mut upload = format!(
        "{} agent upload-chunks --bucket {} --prefix {}",
        shell_quote(&agent.to_string_lossy()),
        shell_quote(bucket),
        shell_quote(prefix)
    );
    if let Some(r) = region {
        upload.push_str(&format!(" --region {}", shell_quote(r)));
    }
    vec!["set -e".to_string(), format!("{command} | {upload}")]
}

impl Transport for SsmTransport {
    fn exec<'a>(&'a self, argv: &'a [String], stdin: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        async move {
            let input_key = self.key("in");
            let had_input = !stdin.is_empty();
            let out = self.exec_inner(argv, stdin, &input_key).await;
            // Whatever happened, the payload (and with it the URL) goes.
            if had_input {
                if let Err(e) = self.objects.delete(&input_key).await {
                    tracing::warn!(error = %e, "failed to delete a command's input");
                }
            }
            out
        }
        .boxed()
    }

    fn stream<'a>(&'a self, argv: &'a [String]) -> BoxFuture<'a, Result<Lines, TransportError>> {
        async move {
            let prefix = self.key("out");
            let script = stream_script(argv, &self.target.agent, self.objects.bucket(), &prefix, self.target.region.as_deref());
            let id = self
                .commands
                .send(&self.target.instance_id, &script, self.target.stream_timeout, "spotbuild: stream")
                .await
                .map_err(|e| self.io(e))?;
            self.streams.lock().expect("not poisoned").push(id.clone());
            let (commands, instance) = (self.commands.clone(), self.target.instance_id.clone());
            let finished: chunks::Finished = Box::new(move || {
                let (commands, id, instance) = (commands.clone(), id.clone(), instance.clone());
                async move { matches!(commands.invocation(&id, &instance).await, Ok(Some(inv)) if inv.status.is_terminal()) }.boxed()
            });
            Ok(chunks::follow(self.objects.clone(), prefix, self.target.follow, finished))
        }
        .boxed()
    }

    fn reconnect(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        // No connection to restore; check that the instance still answers.
        self.ping().boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let streams = std::mem::take(&mut *self.streams.lock().expect("not poisoned"));
            for id in streams {
                if let Err(e) = self.commands.cancel(&id, &self.target.instance_id).await {
                    tracing::debug!(error = %e, "failed to cancel a stream command");
                }
            }
            // Many small objects: deleted side by side (the caller bounds the whole close).
            match self.objects.list(&format!("{}/", self.target.prefix), None).await {
                Ok(keys) => {
                    futures::stream::iter(keys)
                        .for_each_concurrent(16, |k| async move {
                            let _ = self.objects.delete(&k).await;
                        })
                        .await;
                }
                Err(e) => tracing::warn!(error = %e, "failed to clean up the transport's objects"),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_script_fetches_stdin_by_url_and_quotes_every_word() {
        let argv: Vec<String> = ["/opt/spot build", "agent", "receive", "--to", "/w/it's.json"].iter().map(|s| s.to_string()).collect();
        let plain = exec_script(&argv, None);
        assert_eq!(plain, vec!["set -e", "'/opt/spot build' agent receive --to '/w/it'\\''s.json'"]);
        let fetch = exec_script(
            &argv,
            Some(Fetch {
                agent: std::path::Path::new("/usr/local/bin/spotbuild"),
                url: "https://b.s3.amazonaws.com/k?X-Amz-Signature=ab&x=1",
                sha256: "00ff",
            }),
        );
        assert_eq!(
            fetch[1],
            "SPOTBUILD_FETCH_URL='https://b.s3.amazonaws.com/k?X-Amz-Signature=ab&x=1' /usr/local/bin/spotbuild agent fetch --sha256 00ff -- '/opt/spot build' agent receive --to '/w/it'\\''s.json'"
        );
    }

    #[test]
    fn the_stream_script_pipes_into_the_uploader() {
        let argv: Vec<String> = ["spotbuild", "agent", "replay", "--after", "7"].iter().map(|s| s.to_string()).collect();
        let s = stream_script(&argv, std::path::Path::new("/usr/local/bin/spotbuild"), "bkt", "p/b1/a1/out/000001", Some("eu-west-1"));
        assert_eq!(
            s[1],
            "spotbuild agent replay --after 7 | /usr/local/bin/spotbuild agent upload-chunks --bucket bkt --prefix p/b1/a1/out/000001 --region eu-west-1"
        );
    }
}
