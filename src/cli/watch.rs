//! `spotbuild watch`: rebuild on file change. The working tree (tracked files and untracked
//! ones that are not ignored) is hashed like a commit, with the same manifest and
//! patterns; only the projects whose hash changed are built, here, under `dev-<hash>`
//! tags; then `--then` runs. File events come from the OS, debounced.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use notify_debouncer_mini::notify::RecursiveMode;

use super::error::{Error, Exit};
use crate::farm::job::{self, JobOptions};
use crate::git::Repo;
use crate::plan::planner::{self, PlanRequest};
use crate::protocol::{BuilderChoice, Outcome};
use crate::registry::ImageStore;
use crate::settings::AuthMode;

/// How many times the working tree is read again when a file changes while it is read.
const WORKTREE_TRIES: u32 = 5;

const WATCH_AFTER_HELP: &str = "\
Examples:
  spotbuild watch                                   rebuild what a saved file affects, here
  spotbuild watch api --then kubectl apply -f deploy.yml
                                                    api (and what it is built from); then deploy it
  spotbuild watch --explain                         also say which paths changed each time

The working tree is hashed like a commit (tracked files as they are on disk, untracked
files that are not ignored), with the same manifest and patterns. Only the projects whose
hash changed are built, on this machine, and pushed as dev-<hash> (a hash no commit has),
never as cache-<hash>: the registry's cache tags stay the record of commits. A file that
is ignored, or that no project's patterns match, triggers nothing, so files a build or
--then writes do not loop unless they are inputs. --then runs after each successful build
only, with SPOTBUILD_DEV_TAGS (project=tag, space-separated). --remote builds on a rented
machine instead ([cloud] settings, as `spotbuild build`). Ctrl-C stops after the step
running (and a rented machine is terminated).";

#[derive(Debug, Args)]
#[command(about = "Rebuild what each saved change affects, then run a command", after_help = WATCH_AFTER_HELP)]
pub struct WatchArgs {
    /// Projects to watch, with what they are built from [default: all].
    #[arg(value_name = "PROJECT")]
    pub projects: Vec<String>,

    /// Build on a rented machine instead of this one (the working-tree commit is shipped;
    /// the tags are the same dev tags).
    #[arg(long)]
    pub remote: bool,

    /// How long files must be quiet before a rebuild.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,

    /// Say which paths changed before each rebuild.
    #[arg(long)]
    pub explain: bool,

    /// Registry as HOST[:PORT][/PREFIX].
    #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_REGISTRY")]
    pub registry: Option<String>,

    /// How to authenticate to the registry.
    #[arg(long, value_enum, value_name = "MODE")]
    pub registry_auth: Option<AuthMode>,

    /// Which Docker builder to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub builder: BuilderChoice,

    /// NDJSON: the agent's events and one `watch` line per rebuild and per --then.
    #[arg(long)]
    pub json: bool,

    /// The command to run after each successful build: everything after --then.
    #[arg(long, value_name = "CMD", num_args = 1.., allow_hyphen_values = true)]
    pub then: Vec<String>,
}

pub async fn run(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: WatchArgs) -> Result<Exit, Error> {
    let cwd = match repo_dir {
        Some(d) => d,
        None => std::env::current_dir().map_err(|e| Error::new(Exit::Usage, format!("failed to read the current directory: {e}")))?,
    };
    let repo = Repo::discover(&cwd)?;
    let root = repo.workdir().ok_or_else(|| Error::new(Exit::Usage, "watch needs a working tree (this repository is bare)"))?.to_path_buf();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = notify_debouncer_mini::new_debouncer(args.debounce, move |events: notify_debouncer_mini::DebounceEventResult| {
        if let Ok(events) = events {
            let _ = tx.send(events.into_iter().map(|e| e.path).collect());
        }
    })
    .map_err(|e| Error::new(Exit::Failed, format!("failed to watch files: {e}")))?;
    debouncer
        .watcher()
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|e| Error::new(Exit::Failed, format!("failed to watch {}: {e}", root.display())))?;

    let mut w = Watch {
        args: &args,
        repo,
        root: root.clone(),
        config,
        built: BTreeMap::new(),
        last_commit: None,
        last: None,
    };
    let stop = super::signals::stopped_with();
    tokio::pin!(stop);
    w.say(format!("watching {} (debounce {})", root.display(), humantime::format_duration(args.debounce)));
    let mut pending = true;
    loop {
        if std::mem::take(&mut pending) {
            let done = if args.remote {
                // A rented machine's build handles the signal itself (it tears its instance
                // down and says so): it must not be dropped halfway.
                w.rebuild().await
            } else {
                tokio::select! {
                    r = w.rebuild() => r,
                    s = &mut stop => return Ok(Exit::of_signal(s)),
                }
            };
            match done {
                Ok(Some(exit)) => return Ok(exit),
                Ok(None) => {}
                // A manifest being edited, a file saved mid-read: said, and the next save
                // tries again. Watching stops only when asked to.
                Err(e) => {
                    w.line(serde_json::json!({ "type": "watch", "event": "error", "message": e.message }));
                    if !args.json {
                        eprint!("{}", e.render());
                    }
                    w.last = Some("last: an error (see above)".into());
                }
            }
        }
        // On a terminal, the loop's state, redrawn while it waits (cleared before a build,
        // whose lines then scroll as usual).
        let idle = super::progress::Line::spinner(args.json);
        idle.set(format!("watching {} · {}", root.display(), w.last.as_deref().unwrap_or("waiting for a change")));
        tokio::select! {
            got = rx.recv() => {
                let Some(mut paths) = got else { break };
                // What arrived while building is one more change, not many.
                while let Ok(more) = rx.try_recv() {
                    paths.extend(more);
                }
                pending = paths
                    .iter()
                    .filter(|p| !p.is_dir())
                    .filter_map(|p| p.strip_prefix(&root).ok())
                    .any(|p| crate::watch::relevant(p, |q| w.repo.is_ignored(q)));
            }
            s = &mut stop => return Ok(Exit::of_signal(s)),
        }
    }
    Ok(Exit::Success)
}

struct Watch<'a> {
    args: &'a WatchArgs,
    repo: Repo,
    root: PathBuf,
    config: Option<PathBuf>,
    /// Each project's content hash at its last build here, successful or not: a failed
    /// build is tried again only once its inputs change.
    built: BTreeMap<String, String>,
    /// The working-tree commit of the last plan, for --explain.
    last_commit: Option<String>,
    /// What the last rebuild did, for the redrawn line.
    last: Option<String>,
}

impl Watch<'_> {
    fn say(&self, message: String) {
        if !self.args.json {
            eprintln!("watch: {message}");
        }
    }

    fn line(&self, v: serde_json::Value) {
        if self.args.json {
            let _ = writeln!(std::io::stdout().lock(), "{v}");
        }
    }

    /// Hashes the working tree, builds what changed, and runs --then after a success.
    /// `Some`: a signal stopped a rented machine's build; watch ends with that exit code.
    async fn rebuild(&mut self) -> Result<Option<Exit>, Error> {
        // A file saved while it is read makes git refuse the snapshot: read again.
        let mut tries = 0;
        let commit = loop {
            match self.repo.worktree_commit() {
                Ok(c) => break c.to_string(),
                Err(_) if tries < WORKTREE_TRIES => {
                    tries += 1;
                    tokio::time::sleep(self.args.debounce.max(Duration::from_millis(50))).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let request = PlanRequest::offline(Some(self.root.clone()), self.config.clone(), self.args.projects.clone(), commit.clone());
        let planned = planner::plan(&request).await?;
        for w in &planned.warnings {
            self.say(format!("warning: {w}"));
        }
        let hashes: BTreeMap<String, String> = planned.plan.projects.iter().map(|p| (p.name.clone(), p.hash.clone())).collect();
        let changed = crate::watch::changed(&hashes, &self.built);
        let previous = self.last_commit.replace(commit.clone());
        if changed.is_empty() {
            self.say("no project's inputs changed".into());
            return Ok(None);
        }
        self.last = Some(format!("last: {} changed", changed.join(", ")));
        if self.args.explain {
            if let Some(prev) = previous.and_then(|p| self.repo.resolve_commit(&p).ok()) {
                let now = self.repo.resolve_commit(&commit)?;
                for c in self.repo.changed_paths(prev, now)? {
                    self.say(format!("changed: {:?} {}", c.status, crate::git::display_path(&c.path)));
                }
            }
        }
        let client = planner::open_registry(&planned.config, self.args.registry.as_deref(), self.args.registry_auth)?;
        // What is in the registry under its dev tag already (an earlier session built this
        // very tree) is not built again.
        let mut build = Vec::new();
        for name in &changed {
            let tag = crate::watch::dev_tag(&hashes[name]);
            if !client.tag_exists(name, &tag).await.unwrap_or(false) {
                build.push(name.clone());
            }
        }
        let tags: BTreeMap<String, String> = hashes.iter().map(|(p, h)| (p.clone(), crate::watch::dev_tag(h))).collect();
        self.say(format!("{} changed: building {}", changed.join(", "), if build.is_empty() { "nothing (built before)".into() } else { build.join(", ") }));
        let started = Instant::now();
        let outcome = if build.is_empty() {
            Some(Outcome::Success)
        } else if self.args.remote {
            // The same plan on a rented machine: the working-tree commit is shipped like any
            // other, and the remote build takes the dev tags too.
            let flags = super::remote::RemoteFlags {
                commit: commit.clone(),
                json: self.args.json,
                registry: self.args.registry.clone(),
                timeout: Duration::from_secs(3600),
                cpus: None,
                arch: crate::platform::Arch::X86_64,
                market: None,
                record: None,
                ledger: std::env::var("SPOTBUILD_LEDGER").ok(),
                untrusted: false,
            };
            let remote = super::remote::Remote {
                projects: build.clone(),
                flags: &flags,
                scope: super::remote::Scope::Build,
                registry_auth: self.args.registry_auth,
                branch: Some(crate::watch::dev_branch()),
                builder: self.args.builder,
                max_instances: None,
                dev: true,
            };
            match super::remote::build(Some(self.root.clone()), self.config.clone(), remote).await? {
                Exit::Success => Some(Outcome::Success),
                e @ (Exit::Sigint | Exit::Sigterm) => return Ok(Some(e)),
                _ => Some(Outcome::Failed),
            }
        } else {
            let build_id = crate::farm::build::new_build_id();
            let workdir = std::env::temp_dir().join(format!("spotbuild-watch-{build_id}"));
            let options = JobOptions {
                build_id,
                registry_auth: self.args.registry_auth,
                // Its own branch cache tag: a working tree never moves a real branch's.
                branch: Some(crate::watch::dev_branch()),
                builder: self.args.builder,
                timeout: Duration::from_secs(3600),
            };
            let mut job = job::local(&planned, &options, &workdir);
            job.registry.url = client.reference().to_string();
            for p in &mut job.projects {
                p.tag = tags[&p.name].clone();
                p.build = build.contains(&p.name);
                p.image = None;
                p.tests.clear();
            }
            let outcome = super::build::run_agent(&job, self.args.json).await;
            let _ = tokio::fs::remove_dir_all(&workdir).await;
            outcome?
        };
        let ok = outcome == Some(Outcome::Success);
        let secs = started.elapsed().as_secs_f64();
        for p in &changed {
            self.built.insert(p.clone(), hashes[p].clone());
        }
        self.line(serde_json::json!({ "type": "watch", "event": if ok { "built" } else { "failed" }, "projects": build, "changed": changed, "tags": tags, "seconds": secs }));
        self.last = Some(format!("last: {} {} in {secs:.1}s", changed.join(", "), if ok { "built" } else { "failed" }));
        if !ok {
            self.say(format!("the build failed after {secs:.1}s; waiting for the next change"));
            return Ok(None);
        }
        self.say(format!("built in {secs:.1}s: {}", changed.iter().map(|p| format!("{p}:{}", tags[p])).collect::<Vec<_>>().join(" ")));
        if !self.args.then.is_empty() {
            self.then(&tags).await;
        }
        Ok(None)
    }

    async fn then(&self, tags: &BTreeMap<String, String>) {
        let (program, rest) = self.args.then.split_first().expect("not empty");
        let dev_tags = tags.iter().map(|(p, t)| format!("{p}={t}")).collect::<Vec<_>>().join(" ");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(rest).current_dir(&self.root).env("SPOTBUILD_DEV_TAGS", dev_tags).kill_on_drop(true);
        if self.args.json {
            // Its output must not mix with the NDJSON.
            cmd.stdout(to_stderr());
        }
        let status = cmd.status().await;
        let code = status.as_ref().ok().and_then(|s| s.code());
        match &status {
            Ok(s) => self.say(format!("--then {}: {s}", self.args.then.join(" "))),
            Err(e) => self.say(format!("--then {}: failed to start: {e}", self.args.then.join(" "))),
        }
        self.line(serde_json::json!({ "type": "watch", "event": "then", "exit_code": code }));
    }
}

/// Stdio that writes to this process's stderr (a command's output kept off stdout).
fn to_stderr() -> std::process::Stdio {
    use std::os::fd::AsFd;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => std::process::Stdio::from(fd),
        Err(_) => std::process::Stdio::null(),
    }
}
