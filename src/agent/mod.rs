//! Agent mode: the instance side of a build. Turns a [`Job`] into pushed images and passed
//! test tags, and reports everything it does as [`crate::protocol`] events.
//!
//! # Guarantees
//! - Events are numbered without gaps, written to stdout and appended to the events file;
//!   a log line is never dropped or reordered within its stream.
//! - Registry passwords never reach an event or a file: docker gets them through a
//!   credential helper (this binary) from the environment, and every event is redacted.
//! - The exit code matches the result: 0 success, 1 failed, 6 interrupted.
//! - After an interruption notice no new step starts; a build that finishes within the
//!   notice's grace is still pushed, so the next attempt reuses it.
//! - Past the deadline, work stops and the shutdown command runs.
//!
//! # Caveats
//! - Submodule contents are not part of the checkout (`git archive` leaves them out).

pub mod docker;
pub mod dockerfile;
pub mod events;
pub mod exec;
pub mod imds;
pub mod lines;
pub mod stop;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use crate::settings::RegistryConfig;
use crate::errors::error_chain;
use crate::protocol::{Event, Job, JobProject, NoticeKind, Outcome, Source, StepKind, VERSION};
use crate::registry::auth::{Authenticator, Basic};
use crate::registry::{Client, RegistryRef};
use docker::{BuildSpec, BuilderKind, Docker, LayerCount};
use events::Events;
use exec::Stopped;
use stop::{Effect, Halt, Signal, State, WIND_DOWN};

/// Name under which docker finds this binary as its credential helper.
pub const CREDENTIAL_HELPER: &str = "docker-credential-spotbuild";
pub const CREDENTIAL_USERNAME_ENV: &str = "SPOTBUILD_CREDENTIAL_USERNAME";
pub const CREDENTIAL_SECRET_ENV: &str = "SPOTBUILD_CREDENTIAL_SECRET";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to read the job: unsupported version {0} (this agent speaks {VERSION})")]
    Version(u32),
    #[error("failed to read the job: {0}")]
    Invalid(String),
    #[error("failed to prepare {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `job`, writing events to `out`, until done, the deadline, or `cancel` resolves.
pub async fn run<W>(job: Job, out: W, cancel: impl Future<Output = ()> + Send) -> Result<Outcome, AgentError>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if job.v != VERSION {
        return Err(AgentError::Version(job.v));
    }
    let registry = RegistryRef::parse(&job.registry.url).map_err(|e| AgentError::Invalid(e.to_string()))?;
    let deadline = match &job.deadline {
        Some(d) => Some(
            humantime::parse_rfc3339_weak(d)
                .map_err(|e| AgentError::Invalid(format!("deadline `{d}`: {e}")))?,
        ),
        None => None,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { path, source }
    };
    std::fs::create_dir_all(&job.workdir).map_err(io(&job.workdir))?;
    let events_file = job.events_file.clone().unwrap_or_else(|| job.workdir.join("events.ndjson"));
    let mut secrets: Vec<String> = Vec::new();
    if let Some(p) = job.registry.password.as_ref().filter(|p| !p.is_empty()) {
        secrets.push(p.clone());
        if let Some(u) = &job.registry.username {
            let b = Basic {
                username: u.clone(),
                password: p.clone(),
            };
            secrets.push(b.header().trim_start_matches("Basic ").to_string());
        }
    }
    let (events, writer) = Events::start(out, &events_file, secrets).map_err(io(&events_file))?;

    let needs_docker = job.projects.iter().any(|p| p.build || !p.tests.is_empty());
    let docker = if needs_docker {
        Some(docker::detect(job.cache.builder, job.cache.docker.as_deref()).await)
    } else {
        None
    };
    let mut imds = job.imds.enabled.then(|| imds::Imds::new(job.imds.endpoint.clone()));
    let instance_id = match imds.as_mut() {
        Some(i) => i.instance_id().await,
        None => None,
    };
    events
        .emit(Event::Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_bytes: memory_bytes(),
            instance_id,
            builder: docker.as_ref().and_then(|d| d.as_ref().ok()).map(|d| d.kind.name().to_string()),
        })
        .await;

    // Background work, stopped by the guards when this function returns.
    let heartbeat = {
        let events = events.clone();
        let every = Duration::from_secs(job.heartbeat_secs.max(1));
        AbortOnDrop(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.tick().await;
            loop {
                t.tick().await;
                events.emit(Event::Heartbeat {}).await;
            }
        }))
    };
    let (notice_tx, mut notice_rx) = watch::channel(None);
    let _imds = imds.map(|i| {
        AbortOnDrop(tokio::spawn(i.watch(
            Duration::from_millis(job.imds.poll_interval_ms.max(100)),
            job.imds.stop_on_rebalance,
            events.clone(),
            notice_tx,
        )))
    });

    let (kill_tx, kill_rx) = watch::channel(false);
    let (halt_tx, halt_rx) = watch::channel(false);
    let (salvage_tx, mut salvage_rx) = mpsc::channel::<oneshot::Sender<Option<Duration>>>(1);
    let mut worker = Worker {
        events: events.clone(),
        docker: None,
        registry,
        client: None,
        src: job.workdir.join("src"),
        kill: kill_rx,
        halt: halt_rx,
        salvage: salvage_tx,
        failed: Vec::new(),
        job,
    };
    let docker_error = match docker {
        Some(Ok(mut d)) => {
            worker.prepare_credentials(&mut d).await;
            worker.docker = Some(d);
            None
        }
        Some(Err(e)) => Some(e),
        None => None,
    };

    let work = async move {
        if let Some(e) = docker_error {
            worker.events.say("agent", format!("error: {e}")).await;
            worker.failed.push("agent".into());
            return worker;
        }
        worker.run().await;
        worker
    };
    tokio::pin!(work);
    let deadline_sleep = async {
        match deadline {
            Some(t) => {
                let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline_sleep);
    tokio::pin!(cancel);

    // Only performs what the stop policy decides (see `stop::next`).
    let mut state = State::Working;
    let mut timer: Option<tokio::time::Instant> = None;
    let mut finished = None;
    let mut shutdown = false;
    let worker = loop {
        let armed = async {
            match timer {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // Once halted the policy ignores these; not polling them also keeps a finished
        // sleep from firing again.
        let working = state == State::Working;
        let mut salvage_reply = None;
        let signal = tokio::select! {
            w = &mut work => {
                finished = Some(w);
                Signal::WorkFinished
            }
            _ = &mut deadline_sleep, if working => Signal::DeadlineReached,
            _ = &mut cancel, if working => Signal::Cancel,
            Ok(()) = notice_rx.changed(), if working => {
                let Some(notice) = notice_rx.borrow_and_update().clone() else { continue };
                Signal::Notice { notice, now: SystemTime::now() }
            }
            _ = armed => {
                timer = None;
                Signal::TimerFired
            }
            Some(reply) = salvage_rx.recv() => {
                salvage_reply = Some(reply);
                Signal::SalvageRequested
            }
        };
        let (next_state, effects) = stop::next(state, signal);
        state = next_state;
        let mut salvage_window = None;
        for effect in effects {
            match effect {
                Effect::HaltWorker => {
                    halt_tx.send_replace(true);
                }
                Effect::Kill => {
                    kill_tx.send_replace(true);
                }
                Effect::ArmTimer(after) => timer = Some(tokio::time::Instant::now() + after),
                Effect::Rearm { within } => {
                    kill_tx.send_replace(false);
                    salvage_window = Some(within);
                }
                Effect::Shutdown => shutdown = true,
            }
        }
        if let Some(reply) = salvage_reply {
            let _ = reply.send(salvage_window);
        }
        if let Some(worker) = finished.take() {
            break worker;
        }
    };
    let halted = state.halt().cloned();
    drop(heartbeat);

    let failed = worker.failed.clone();
    let (outcome, message) = match &halted {
        Some(Halt::Notice(n)) => (
            Outcome::Interrupted,
            Some(match n.kind {
                NoticeKind::Interruption => format!(
                    "spot interruption notice ({} at {})",
                    n.action.as_deref().unwrap_or("terminate"),
                    n.time.as_deref().unwrap_or("an unknown time")
                ),
                NoticeKind::Rebalance => "rebalance recommendation".to_string(),
            }),
        ),
        Some(Halt::Deadline) => (Outcome::Failed, Some("the job's deadline passed".to_string())),
        Some(Halt::Cancelled) => (Outcome::Failed, Some("stopped by a signal".to_string())),
        None if failed.is_empty() => (Outcome::Success, None),
        None => (
            Outcome::Failed,
            Some(format!(
                "{} step{} failed: {}",
                failed.len(),
                if failed.len() == 1 { "" } else { "s" },
                failed.join(", ")
            )),
        ),
    };
    events
        .emit(Event::Result {
            outcome,
            failed_steps: failed,
            message,
        })
        .await;
    events.flush().await;
    let shutdown = shutdown.then(|| worker.job.shutdown_command.clone());
    drop(worker);
    drop(events);
    let _ = writer.await;
    if let Some(cmd) = shutdown {
        run_shutdown(cmd).await;
    }
    Ok(outcome)
}

/// The deadline's last resort, so that a forgotten instance ends itself.
async fn run_shutdown(cmd: Option<Vec<String>>) {
    let cmd = cmd.unwrap_or_else(|| vec!["shutdown".into(), "-h".into(), "now".into()]);
    if let Some((program, args)) = cmd.split_first() {
        let _ = tokio::time::timeout(WIND_DOWN, Command::new(program).args(args).status()).await;
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The tag a branch's newest build carries (a cache source for the next build).
pub fn branch_tag(branch: &str) -> String {
    let slug: String = branch
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let slug = slug.trim_matches(['-', '.']);
    let mut tag = format!("branch-{slug}");
    tag.truncate(120);
    tag
}

struct Worker {
    job: Job,
    events: Events,
    docker: Option<Docker>,
    registry: RegistryRef,
    client: Option<Client>,
    src: PathBuf,
    kill: watch::Receiver<bool>,
    /// Whether the stop policy has halted the work: no new step starts.
    halt: watch::Receiver<bool>,
    /// Asks the stop policy for time to push a stopped build's finished stages; the answer
    /// is how long the push may take, or none.
    salvage: mpsc::Sender<oneshot::Sender<Option<Duration>>>,
    failed: Vec<String>,
}

/// How a step went.
struct StepResult {
    code: i32,
    layers: Option<(u32, u32)>,
}

impl StepResult {
    fn of(stopped: &Stopped) -> StepResult {
        StepResult {
            code: stopped.code(),
            layers: None,
        }
    }
    fn ok(&self) -> bool {
        self.code == 0
    }
}

impl Worker {
    fn halted(&self) -> bool {
        *self.halt.borrow()
    }

    /// How long a push of a stopped build's finished stages may take, if the stop policy
    /// allows one (see `stop::next`).
    async fn ask_salvage(&self) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.salvage.send(tx).await.ok()?;
        rx.await.ok().flatten()
    }

    fn image(&self, project: &str, tag: &str) -> String {
        format!("{}/{}:{}", self.registry.host, self.registry.repository(project), tag)
    }

    /// Docker gets registry credentials from this binary acting as its credential helper,
    /// which reads them from the environment: nothing is written to disk.
    async fn prepare_credentials(&mut self, docker: &mut Docker) {
        let reg = &self.job.registry;
        let basic = match (&reg.username, &reg.password) {
            (Some(u), Some(p)) => Some(Basic {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => {
                let region = self.registry.ecr_region().or_else(|| reg.region.clone());
                match Authenticator::new(reg.auth, region) {
                    Ok(a) => match a.basic().await {
                        Ok(b) => b,
                        Err(e) => {
                            self.events.say("agent", format!("warning: no registry credentials: {}", error_chain(&e))).await;
                            None
                        }
                    },
                    Err(_) => None,
                }
            }
        };
        let auth = Authenticator::with_basic(basic.clone());
        self.client = Client::new(self.registry.clone(), &RegistryConfig::default(), auth).ok();
        let Some(basic) = basic else { return };
        let dir = self.job.workdir.join("docker-config");
        let bin = dir.join("bin");
        let prepared = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&bin)?;
            let helper = bin.join(CREDENTIAL_HELPER);
            let _ = std::fs::remove_file(&helper);
            std::os::unix::fs::symlink(std::env::current_exe()?, &helper)?;
            let host = self.registry.host.clone();
            let config = serde_json::json!({ "credHelpers": { host: "spotbuild" } });
            std::fs::write(dir.join("config.json"), config.to_string())
        })();
        if let Err(e) = prepared {
            self.events.say("agent", format!("warning: failed to set up docker credentials: {e}")).await;
            return;
        }
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        docker.env = vec![
            ("DOCKER_CONFIG".into(), dir.display().to_string()),
            ("PATH".into(), path),
            (CREDENTIAL_USERNAME_ENV.into(), basic.username),
            (CREDENTIAL_SECRET_ENV.into(), basic.password),
        ];
    }

    async fn start(&self, step: &str, project: Option<&str>, kind: StepKind) -> Instant {
        self.events
            .emit(Event::StepStart {
                step: step.to_string(),
                project: project.map(String::from),
                kind,
            })
            .await;
        Instant::now()
    }

    async fn end(&mut self, step: &str, started: Instant, r: &StepResult) {
        self.events
            .emit(Event::StepEnd {
                step: step.to_string(),
                exit_code: r.code,
                duration_ms: started.elapsed().as_millis() as u64,
                cached_layers: r.layers.map(|l| l.0),
                total_layers: r.layers.map(|l| l.1),
            })
            .await;
        if !r.ok() {
            self.failed.push(step.to_string());
        }
    }

    async fn exec(&self, cmd: Command, step: &str, observer: Option<exec::Observer>) -> Stopped {
        let stopped = exec::run(cmd, step, &self.events, self.kill.clone(), observer).await;
        if let Stopped::NotStarted(why) = &stopped {
            self.events.say(step, format!("error: {why}")).await;
        }
        stopped
    }

    async fn run(&mut self) {
        let step = "checkout";
        let t = self.start(step, None, StepKind::Checkout).await;
        let r = self.checkout(step).await;
        self.end(step, t, &r).await;
        if !r.ok() {
            return;
        }

        let projects = self.job.projects.clone();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        let mut pulled: BTreeSet<String> = BTreeSet::new();
        for p in &projects {
            if self.halted() {
                break;
            }
            if let Some(dep) = p.dependencies.iter().find(|d| broken.contains(*d)) {
                self.events.say("agent", format!("skipping {}: its dependency {dep} did not build", p.name)).await;
                broken.insert(p.name.clone());
                continue;
            }
            if p.build {
                let step = format!("{}:build", p.name);
                let t = self.start(&step, Some(&p.name), StepKind::Build).await;
                let (r, stage_images) = self.build(&step, p).await;
                self.end(&step, t, &r).await;
                if !r.ok() {
                    broken.insert(p.name.clone());
                    // A build stopped by an interruption keeps the stages it finished, so
                    // the next attempt on another instance starts from them. The running
                    // build was killed; the push gets a short window of its own.
                    let window = match stage_images.is_empty() {
                        true => None,
                        false => self.ask_salvage().await,
                    };
                    if let Some(within) = window {
                        let step = format!("{}:push", p.name);
                        let t = self.start(&step, Some(&p.name), StepKind::Push).await;
                        let r = match tokio::time::timeout(within, self.push_images(&step, &stage_images)).await {
                            Ok(r) => r,
                            Err(_) => {
                                self.events.say(&step, "error: no time left to push the finished stages").await;
                                StepResult { code: 124, layers: None }
                            }
                        };
                        self.end(&step, t, &r).await;
                    }
                    continue;
                }
                // Pushed even after a notice: the next attempt starts from it.
                let step = format!("{}:push", p.name);
                let t = self.start(&step, Some(&p.name), StepKind::Push).await;
                let r = self.push(&step, p, &stage_images).await;
                self.end(&step, t, &r).await;
                if !r.ok() {
                    broken.insert(p.name.clone());
                    continue;
                }
                pulled.insert(p.name.clone());
            }
            for test in &p.tests {
                if self.halted() {
                    break;
                }
                // Host jobs (scripts above all) get the image too: they run it themselves.
                if !pulled.contains(&p.name) {
                    let step = format!("{}:pull", p.name);
                    let t = self.start(&step, Some(&p.name), StepKind::Pull).await;
                    let docker = self.docker.clone().expect("docker is detected for image tests");
                    let stopped = self.exec(docker.pull(&self.image(&p.name, &p.tag)), &step, None).await;
                    let r = StepResult::of(&stopped);
                    self.end(&step, t, &r).await;
                    if !r.ok() {
                        break;
                    }
                    pulled.insert(p.name.clone());
                }
                let step = format!("{}:test:{}", p.name, test.job);
                let t = self.start(&step, Some(&p.name), StepKind::Test).await;
                let r = self.test(&step, p, test).await;
                self.end(&step, t, &r).await;
            }
        }
        for c in self.job.run.clone() {
            if self.halted() {
                break;
            }
            let step = format!("run:{}", c.name);
            let t = self.start(&step, None, StepKind::Run).await;
            let r = match c.command.split_first() {
                Some((program, args)) => {
                    let mut cmd = Command::new(program);
                    cmd.args(args).current_dir(&self.src);
                    StepResult::of(&self.exec(cmd, &step, None).await)
                }
                None => StepResult { code: 2, layers: None },
            };
            self.end(&step, t, &r).await;
        }
    }

    /// Materialises the commit's files under `src/` (from a repository or a bundle).
    async fn checkout(&self, step: &str) -> StepResult {
        let fail = |code| StepResult { code, layers: None };
        let git_dir = match &self.job.source {
            Source::Repository(path) => path.clone(),
            Source::Bundle { path, mirror } => {
                let repo = self.job.workdir.join("repo.git");
                if !repo.exists() {
                    let mut init = Command::new("git");
                    match mirror {
                        Some(m) => init.arg("clone").arg("--bare").arg("--shared").arg(m).arg(&repo),
                        None => init.args(["init", "--bare", "-q"]).arg(&repo),
                    };
                    let s = self.exec(init, step, None).await;
                    if !s.ok() {
                        return fail(s.code());
                    }
                }
                let mut verify = Command::new("git");
                verify.arg("-C").arg(&repo).arg("bundle").arg("verify").arg(path);
                let s = self.exec(verify, step, None).await;
                if !s.ok() {
                    self.events.say(step, "error: the bundle does not apply to this repository").await;
                    return fail(s.code());
                }
                let mut fetch = Command::new("git");
                fetch.arg("-C").arg(&repo).args(["fetch", "-q", "--no-tags"]).arg(path).arg("+refs/*:refs/spotbuild/*");
                let s = self.exec(fetch, step, None).await;
                if !s.ok() {
                    return fail(s.code());
                }
                repo
            }
        };
        let _ = std::fs::remove_dir_all(&self.src);
        if let Err(e) = std::fs::create_dir_all(&self.src) {
            self.events.say(step, format!("error: failed to create {}: {e}", self.src.display())).await;
            return fail(1);
        }
        let tar = self.job.workdir.join("src.tar");
        let mut archive = Command::new("git");
        archive
            .arg("-C")
            .arg(&git_dir)
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(format!("{}^{{commit}}", self.job.commit));
        let s = self.exec(archive, step, None).await;
        if !s.ok() {
            self.events.say(step, format!("error: commit {} is not in {}", self.job.commit, git_dir.display())).await;
            return fail(s.code());
        }
        let mut untar = Command::new("tar");
        // Fresh mtimes (-m): git archive stamps every file with the commit time, so a reused
        // workdir could see a changed file of the same size with the same stat, which
        // BuildKit's incremental context sync takes as unchanged. Layer cache keys are
        // content hashes, so fresh mtimes cost no cache hits.
        untar.arg("-xmf").arg(&tar).arg("-C").arg(&self.src);
        let s = self.exec(untar, step, None).await;
        let _ = std::fs::remove_file(&tar);
        if s.ok() {
            self.events.say(step, format!("checked out {}", self.job.commit)).await;
        }
        StepResult::of(&s)
    }

    /// Builds one project: each named stage first (so it can be cached on its own), then the
    /// image. Returns the stage images built, to push with it.
    async fn build(&self, step: &str, p: &JobProject) -> (StepResult, Vec<String>) {
        let fail = |code| (StepResult { code, layers: None }, Vec::new());
        let docker = self.docker.clone().expect("docker is detected when a build is needed");
        let source = self.src.join(&p.dockerfile);
        let text = match std::fs::read_to_string(&source) {
            Ok(t) => t,
            Err(e) => {
                self.events.say(step, format!("error: failed to read {}: {e}", p.dockerfile)).await;
                return fail(1);
            }
        };
        let images: BTreeMap<String, String> = self
            .job
            .projects
            .iter()
            .map(|q| (q.name.clone(), self.image(&q.name, &q.tag)))
            .collect();
        let (pinned, changes) = dockerfile::pin(&text, &images);
        for (from, to) in &changes {
            self.events.say(step, format!("FROM {from} pinned to {to}")).await;
        }
        let dockerfile = self.job.workdir.join("dockerfiles").join(format!("{}.Dockerfile", p.name));
        if let Err(e) = std::fs::create_dir_all(dockerfile.parent().expect("has a parent"))
            .and_then(|_| std::fs::write(&dockerfile, &pinned))
        {
            self.events.say(step, format!("error: failed to write {}: {e}", dockerfile.display())).await;
            return fail(1);
        }

        let repo = format!("{}/{}", self.registry.host, self.registry.repository(&p.name));
        let branch = branch_tag(self.job.branch.as_deref().unwrap_or(&self.job.main_branch));
        let main = branch_tag(&self.job.main_branch);
        let mut cache_tags = vec![branch.clone()];
        if main != branch {
            cache_tags.push(main.clone());
        }
        let counter = Arc::new(Mutex::new(LayerCount::default()));
        let observer: exec::Observer = {
            let c = counter.clone();
            Arc::new(Mutex::new(move |line: &str| c.lock().expect("not poisoned").observe(line)))
        };
        let context = self.src.join(&p.build_dir);
        let base_spec = BuildSpec {
            context,
            dockerfile,
            build_args: p.build_args.clone(),
            ..Default::default()
        };

        let mut stage_images = Vec::new();
        let mut stage_caches = Vec::new();
        let stages = dockerfile::stages(&pinned);
        if docker.kind != BuilderKind::Buildx {
            // Inline cache holds only the final stage: build and push named stages as images
            // of their own, so a fresh machine can reuse them.
            for stage in stages.iter().take(stages.len().saturating_sub(1)) {
                let Some(name) = &stage.name else { continue };
                let slug = branch_tag(name).trim_start_matches("branch-").to_string();
                // Named by content, never by branch: a cache source must not be an image this
                // job has just tagged locally (its inline cache names blobs that are nowhere
                // yet, which BuildKit 20.10 reports as "failed to compute cache key").
                let image = format!("{repo}:stage-{slug}-{}", p.tag);
                let caches: Vec<String> = cache_tags.iter().map(|t| format!("{repo}:stage-{slug}-{t}")).collect();
                let spec = BuildSpec {
                    image: image.clone(),
                    target: Some(name.clone()),
                    cache_from: caches.clone(),
                    ..base_spec.clone()
                };
                let s = self.build_once(&docker, &spec, step, &observer).await;
                counter.lock().expect("not poisoned").next_invocation();
                if !s.ok() {
                    // The stages finished so far are still worth keeping (see `run`).
                    return (StepResult { code: s.code(), layers: None }, stage_images);
                }
                stage_images.push(image);
                stage_caches.extend(caches);
            }
        }
        let mut cache_from = stage_caches;
        cache_from.extend(cache_tags.iter().map(|t| format!("{repo}:{t}")));
        let spec = BuildSpec {
            image: format!("{repo}:{}", p.tag),
            cache_from,
            cache_refs_from: cache_tags.iter().map(|t| format!("{repo}:buildcache-{t}")).collect(),
            cache_ref_to: Some(format!("{repo}:buildcache-{branch}")),
            ..base_spec
        };
        let s = self.build_once(&docker, &spec, step, &observer).await;
        let layers = counter.lock().expect("not poisoned").counts();
        (
            StepResult {
                code: s.code(),
                layers: Some(layers),
            },
            stage_images,
        )
    }

    async fn build_once(&self, docker: &Docker, spec: &BuildSpec, step: &str, observer: &exec::Observer) -> Stopped {
        if docker.kind == BuilderKind::Classic {
            // The classic builder only uses cache sources that are present locally.
            for image in &spec.cache_from {
                let _ = self.exec(docker.pull(image), step, None).await;
            }
        }
        self.exec(docker.build(spec), step, Some(observer.clone())).await
    }

    /// Pushes `cache-<hash>` (and the stage images), then points the branch tag at it by a
    /// manifest copy.
    async fn push(&self, step: &str, p: &JobProject, stage_images: &[String]) -> StepResult {
        let mut images = vec![self.image(&p.name, &p.tag)];
        images.extend(stage_images.iter().cloned());
        let pushed = self.push_images(step, &images).await;
        if !pushed.ok() {
            return pushed;
        }
        let branch = branch_tag(self.job.branch.as_deref().unwrap_or(&self.job.main_branch));
        let repository = self.registry.repository(&p.name);
        // The branch's tags move by manifest copy: (from, to) within the repository.
        let mut moves = vec![(p.tag.clone(), branch.clone())];
        for image in stage_images {
            let from = image.rsplit(':').next().unwrap_or_default().to_string();
            let to = from.replace(&p.tag, &branch);
            moves.push((from, to));
        }
        let Some(client) = &self.client else {
            self.events.say(step, format!("warning: no registry client; {branch} not moved")).await;
            return StepResult { code: 0, layers: None };
        };
        for (from, to) in moves {
            match client.copy_tag(&repository, &from, &to).await {
                Ok(()) => self.events.say(step, format!("{to} now points at {from}")).await,
                // The build itself is safely stored; a stale branch tag only costs cache hits.
                Err(e) => self.events.say(step, format!("warning: failed to move {to}: {}", error_chain(&e))).await,
            }
        }
        StepResult { code: 0, layers: None }
    }

    async fn push_images(&self, step: &str, images: &[String]) -> StepResult {
        let docker = self.docker.clone().expect("docker is detected when a build is needed");
        for image in images {
            let s = self.exec(docker.push(image), step, None).await;
            if !s.ok() {
                return StepResult::of(&s);
            }
        }
        StepResult { code: 0, layers: None }
    }

    /// Runs a test job; on success the image gains the test tag by a manifest copy.
    async fn test(&self, step: &str, p: &JobProject, test: &crate::protocol::JobTest) -> StepResult {
        let image = self.image(&p.name, &p.tag);
        let stopped = if test.host {
            let Some((program, args)) = test.command.split_first() else {
                return StepResult { code: 2, layers: None };
            };
            let dir = self.src.join(&p.project_dir);
            // `./scripts/run_tests` names a file of the project's folder.
            let program = if program.contains('/') { dir.join(program) } else { std::path::PathBuf::from(program) };
            let mut cmd = Command::new(program);
            // What the Aztec build-system's `run_tests` scripts expect, under their names too;
            // the image is already pulled, so `docker run "$IMAGE_URI"` needs no login.
            cmd.args(args)
                .current_dir(&dir)
                .env("SPOTBUILD_IMAGE", &image)
                .env("IMAGE_URI", &image)
                .env("CONTENT_HASH", &p.hash)
                .env("COMMIT_HASH", &self.job.commit)
                .env("ROOT_PATH", &self.src)
                .env("PROJECT_DIR", &dir);
            self.exec(cmd, step, None).await
        } else {
            let docker = self.docker.clone().expect("docker is detected for image tests");
            let name = container_name(&self.job.build_id, step);
            let s = self.exec(docker.run(&image, &name, &test.command, test.cpus), step, None).await;
            if s == Stopped::Killed {
                // Killing the client does not stop the container.
                let _ = docker.remove_container(&name).output().await;
            }
            s
        };
        if !stopped.ok() {
            return StepResult::of(&stopped);
        }
        let repository = self.registry.repository(&p.name);
        let Some(client) = &self.client else {
            self.events.say(step, "error: no registry client to record the pass").await;
            return StepResult { code: 1, layers: None };
        };
        match client.copy_tag(&repository, &p.tag, &test.tag).await {
            Ok(()) => {
                self.events.say(step, format!("passed: tagged {}", test.tag)).await;
                StepResult { code: 0, layers: None }
            }
            Err(e) => {
                self.events.say(step, format!("error: failed to record the pass as {}: {}", test.tag, error_chain(&e))).await;
                StepResult { code: 1, layers: None }
            }
        }
    }
}

fn container_name(build_id: &str, step: &str) -> String {
    let raw = format!("spotbuild-{build_id}-{step}");
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' { c } else { '-' })
        .collect()
}

/// `docker-credential-spotbuild get`: answers docker with the credentials the agent put in
/// the environment. `store`, `erase` and `list` do nothing: nothing is ever kept.
pub fn credential_helper(action: Option<&str>) -> i32 {
    use std::io::Read;
    let mut server = String::new();
    let _ = std::io::stdin().read_to_string(&mut server);
    match action {
        Some("get") => {
            let (Ok(user), Ok(secret)) = (std::env::var(CREDENTIAL_USERNAME_ENV), std::env::var(CREDENTIAL_SECRET_ENV)) else {
                println!("credentials not found in native keychain");
                return 1;
            };
            let answer = serde_json::json!({ "ServerURL": server.trim(), "Username": user, "Secret": secret });
            println!("{answer}");
            0
        }
        Some("list") => {
            println!("{{}}");
            0
        }
        Some("store") | Some("erase") => 0,
        _ => {
            eprintln!("usage: {CREDENTIAL_HELPER} get|store|erase|list");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_tags_are_valid_tags() {
        assert_eq!(branch_tag("main"), "branch-main");
        assert_eq!(branch_tag("feature/Add_Thing"), "branch-feature-add-thing");
        assert!(branch_tag(&"x".repeat(300)).len() <= 120);
    }

    #[test]
    fn container_names_are_valid() {
        assert_eq!(container_name("b1", "api:test:unit"), "spotbuild-b1-api-test-unit");
    }
}
