//! The order of a job's steps: checkout, then per project (in dependency order) build,
//! push, pull and tests, then the job's own commands; each step announced by `step_start`
//! and `step_end` events. No new step starts once the stop policy halts the work.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::build::{self, Built};
use super::checkout::checkout;
use super::events::Events;
use super::job::CheckedJob;
use super::publish::{self, Tools};
use super::step::{Step, StepStatus};
use super::test;
use crate::protocol::{Event, JobProject, StepKind};

/// Asks the stop policy for time to push a stopped build's finished stages; the answer is
/// how long the push may take, or none.
pub type SalvageRequests = mpsc::Sender<oneshot::Sender<Option<Duration>>>;

pub struct Worker {
    pub cx: CheckedJob,
    pub events: Events,
    /// Kills running commands while true.
    pub kill: watch::Receiver<bool>,
    /// Whether the stop policy has halted the work.
    pub halt: watch::Receiver<bool>,
    pub salvage: SalvageRequests,
    /// The steps that failed, in order.
    pub failed: Vec<String>,
}

impl Worker {
    /// Runs every step. `tools` is there exactly when some project builds or tests (see
    /// `CheckedJob::needs_docker`); without it the projects have no step to run.
    pub async fn run(&mut self, tools: Option<&Tools>) {
        let (step, t) = self.begin("checkout", None, StepKind::Checkout).await;
        let status = checkout(&step, &self.cx).await;
        self.end(&step, t, &status, None).await;
        if !status.passed() {
            return;
        }
        if let Some(tools) = tools {
            // Boxed: the steps' futures nest deeper than the compiler lays out unaided.
            Box::pin(self.projects(tools)).await;
        }
        for c in self.cx.job.run.clone() {
            if self.halted() {
                break;
            }
            let (step, t) = self.begin(format!("run:{}", c.name), None, StepKind::Run).await;
            let status = test::command(&step, &self.cx.src, &c.command).await;
            self.end(&step, t, &status, None).await;
        }
    }

    async fn projects(&mut self, tools: &Tools) {
        let projects = self.cx.job.projects.clone();
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
                if !self.build_and_push(tools, p).await {
                    broken.insert(p.name.clone());
                    continue;
                }
                pulled.insert(p.name.clone());
            }
            for job in &p.tests {
                if self.halted() {
                    break;
                }
                // Host jobs (scripts above all) get the image too: they run it themselves.
                if !pulled.contains(&p.name) {
                    let (step, t) = self.begin(format!("{}:pull", p.name), Some(&p.name), StepKind::Pull).await;
                    let status = step.run(tools.docker.pull(&self.cx.existing(p))).await;
                    self.end(&step, t, &status, None).await;
                    if !status.passed() {
                        break;
                    }
                    pulled.insert(p.name.clone());
                }
                let (step, t) = self.begin(format!("{}:test:{}", p.name, job.job), Some(&p.name), StepKind::Test).await;
                let status = test::test(&step, tools, &self.cx, p, job).await;
                self.end(&step, t, &status, None).await;
            }
        }
    }

    /// Builds `p` and pushes it; whether its image is in the registry.
    async fn build_and_push(&mut self, tools: &Tools, p: &JobProject) -> bool {
        let (step, t) = self.begin(format!("{}:build", p.name), Some(&p.name), StepKind::Build).await;
        let built = build::build(&step, &tools.docker, &self.cx, p).await;
        self.end(&step, t, &built.status(), built.layers()).await;
        let push = format!("{}:push", p.name);
        match built {
            Built::Passed { image, stages, .. } => {
                // Pushed even after a notice: the next attempt starts from it.
                let (step, t) = self.begin(push, Some(&p.name), StepKind::Push).await;
                // A buildx build of every platform pushed its index itself.
                let pushed = p.multiarch == crate::manifest::Multiarch::Buildx;
                let status = publish::push(&step, tools, &self.cx.registry.repository(&p.name), &image, &stages, pushed).await;
                self.end(&step, t, &status, None).await;
                status.passed()
            }
            Built::Failed { stages, .. } => {
                // A build stopped by an interruption keeps the stages it finished, so the
                // next attempt on another instance starts from them. The running build was
                // killed; the push gets a short window of its own.
                let window = match stages.is_empty() {
                    true => None,
                    false => self.ask_salvage().await,
                };
                if let Some(within) = window {
                    let (step, t) = self.begin(push, Some(&p.name), StepKind::Push).await;
                    let refs = stages.iter().map(|s| s.reference.as_str());
                    let status = match tokio::time::timeout(within, publish::push_images(&step, &tools.docker, refs)).await {
                        Ok(status) => status,
                        Err(_) => {
                            step.say("error: no time left to push the finished stages").await;
                            StepStatus::TimedOut
                        }
                    };
                    self.end(&step, t, &status, None).await;
                }
                false
            }
        }
    }

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

    async fn begin(&self, name: impl Into<String>, project: Option<&str>, kind: StepKind) -> (Step, Instant) {
        let step = Step::new(name, self.events.clone(), self.kill.clone());
        self.events
            .emit(Event::StepStart {
                step: step.name().to_string(),
                project: project.map(String::from),
                kind,
            })
            .await;
        (step, Instant::now())
    }

    async fn end(&mut self, step: &Step, started: Instant, status: &StepStatus, layers: Option<(u32, u32)>) {
        self.events
            .emit(Event::StepEnd {
                step: step.name().to_string(),
                exit_code: status.exit_code(),
                duration_ms: started.elapsed().as_millis() as u64,
                cached_layers: layers.map(|l| l.0),
                total_layers: layers.map(|l| l.1),
            })
            .await;
        if !status.passed() {
            self.failed.push(step.name().to_string());
        }
    }
}
