//! `spotbuild plan`: what needs building or testing at a commit, and why.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::error::{Error, Exit};
use crate::settings::{AuthMode, Config};
use crate::manifest::ManifestError;
use crate::plan::{self, explain, Plan};
use crate::registry::ImageStore;

const PLAN_AFTER_HELP: &str = "\
Examples:
  spotbuild plan                          every project at HEAD
  spotbuild plan app --json               app and its dependencies, for machines
  spotbuild plan --offline                hashes only; the registry is not asked
  spotbuild plan app --explain            which changed paths put app in the build set
  spotbuild plan --explain --since main   ... compared with main
  spotbuild plan --arch arm64             what an arm64 machine would build (multiarch: host)
  spotbuild plan api --test e2e -- --shard 2
                                          the success tag that invocation reads and writes

A project needs building when its image repository has no tag cache-<hash>;
a test job needs running when there is no tag cache-<hash>-<job> (with arguments,
cache-<hash>-<job>-<digest>). A `multiarch: host` project has one image per
architecture: cache-<hash>-<arch>, tested as cache-<hash>-<arch>-<job>; `--arch` says
which one is planned. Put [ci rebuild] or [ci rebuild <project>] in a commit
message to force a build. If the registry cannot be asked, projects are reported as
needing work.

The manifest is build_manifest.json or build_manifest.yml. An entry that cannot be read
only matters when it is asked for (or a project asked for depends on it): planning
everything plans the other entries, lists each broken one with its error, and exits 3.";

#[derive(Debug, Args)]
#[command(
    about = "Decide which projects need building or testing at a commit, and why",
    after_help = PLAN_AFTER_HELP
)]
pub struct PlanArgs {
    /// Projects to plan, with their dependencies [default: all].
    #[arg(value_name = "PROJECT")]
    pub projects: Vec<String>,

    /// The commit to plan (any revision: sha, branch, tag, HEAD~2).
    #[arg(long, value_name = "REV", default_value = "HEAD")]
    pub commit: String,

    /// Compute hashes without asking the registry; `needs_build` is then null.
    #[arg(long)]
    pub offline: bool,

    /// Print JSON (see the README for the contract) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Show which changed paths put each project in the build set.
    #[arg(long)]
    pub explain: bool,

    /// With --explain: compare with REV instead of the last commit whose hash was built.
    #[arg(long, value_name = "REV", requires = "explain")]
    pub since: Option<String>,

    /// Registry as HOST[:PORT][/PREFIX]; each project's images live in PREFIX/<project>.
    #[arg(long, value_name = "REGISTRY", env = "SPOTBUILD_REGISTRY")]
    pub registry: Option<String>,

    /// How to authenticate to the registry [default: from spotbuild.toml, else auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub registry_auth: Option<AuthMode>,

    /// Plan as an untrusted build (as a pull request would be): read the trusted
    /// namespace and the untrusted one. Trust can only be lowered, never raised.
    #[arg(long)]
    pub untrusted: bool,

    /// Plan a build on this architecture: x86_64 covers every project; arm64 covers the
    /// `multiarch: host` projects (tags cache-<hash>-arm64) and what they depend on.
    #[arg(long, value_name = "ARCH", default_value = "x86_64")]
    pub arch: crate::platform::Arch,

    /// Plan one test invocation of the named project, as `spotbuild test PROJECT JOB -- ARGS`
    /// would run it: its success tag is shown (with ARGS, it carries their digest).
    #[arg(long, value_name = "JOB", conflicts_with = "script")]
    pub test: Option<String>,

    /// With --test, or --script instead: the invocation, as `spotbuild test` takes it.
    #[command(flatten)]
    pub invocation: super::oneoff::InvocationFlags,
}

pub use crate::plan::planner::{PlanRequest, Planned};

/// What the CLI adds to a plan.
pub trait PlannedExt {
    fn report_broken(&self) -> Exit;
}

impl PlannedExt for Planned {
    /// Says on stderr what could not be planned, each with its hints, and returns the exit
    /// code the command should end with when all else went well.
    fn report_broken(&self) -> Exit {
        if self.broken.is_empty() {
            return Exit::Success;
        }
        for e in &self.broken {
            eprint!("{}", Error::from(e.as_ref()).render());
        }
        let n = self.broken.len();
        eprintln!(
            "error: {n} project{} of {} could not be planned; the others were",
            plural(n),
            self.broken.len() + self.plan.projects.len()
        );
        Exit::InvalidInput
    }
}

/// Opens the repository, hashes the commit and asks the registry: the first half of
/// `plan`, `build` and `test`. Warnings go to stderr.
pub async fn compute(request: &PlanRequest) -> Result<Planned, Error> {
    let planned = crate::plan::planner::plan(request).await?;
    for w in &planned.warnings {
        eprintln!("warning: {w}");
    }
    Ok(planned)
}

pub async fn run(repo_dir: Option<PathBuf>, config: Option<PathBuf>, args: PlanArgs) -> Result<Exit, Error> {
    let test = match (&args.test, &args.invocation.script) {
        (None, None) if !args.invocation.args.is_empty() => {
            return Err(Error::new(Exit::Usage, "arguments after `--` belong to a test invocation")
                .hint("name it with --test JOB or --script PATH"))
        }
        (None, None) => None,
        (job, _) => {
            let [project] = args.projects.as_slice() else {
                return Err(Error::new(Exit::Usage, "--test and --script plan one project's test")
                    .hint("name exactly one project: `spotbuild plan api --test e2e -- --shard 1`"));
            };
            Some(args.invocation.run(project, job.clone())?)
        }
    };
    let planned = compute(&PlanRequest {
        repo_dir,
        settings: config,
        projects: args.projects.clone(),
        commit: args.commit.clone(),
        offline: args.offline,
        registry: args.registry.clone(),
        registry_auth: args.registry_auth,
        test: test.clone(),
        force_untrusted: args.untrusted,
        arch: args.arch,
    })
    .await?;
    if let Some(run) = &test {
        super::oneoff::check_test_run(&planned, run)?;
    }
    let exit = planned.report_broken();
    let Planned {
        repo,
        hashes,
        mut plan,
        client,
        broken,
        ..
    } = planned;

    if args.explain {
        let since = args.since.as_deref().map(|s| repo.resolve_commit(s)).transpose()?;
        let which: Vec<usize> = plan
            .projects
            .iter()
            .filter(|p| p.needs_build != Some(false))
            .filter_map(|p| hashes.manifest.position(&p.name))
            .collect();
        let store = client.as_ref().map(|c| c as &dyn ImageStore);
        // Explaining re-hashes older commits (tree walks, `dependencies` scripts): it blocks,
        // so this worker thread is handed over to it while the runtime goes on elsewhere.
        let handle = tokio::runtime::Handle::current();
        let mut explained =
            tokio::task::block_in_place(|| handle.block_on(explain::explain(&repo, &hashes, &which, since, store)))?;
        for p in &mut plan.projects {
            if let Some(i) = hashes.manifest.position(&p.name) {
                p.explain = explained.remove(&i);
            }
        }
    }

    let out = if args.json {
        // Entries that could not be planned are listed after the others, each with its error.
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        enum Entry<'a> {
            Planned(&'a plan::ProjectPlan),
            Broken { name: &'a str, error: String, hint: Option<String> },
        }
        #[derive(serde::Serialize)]
        struct Json<'a> {
            commit: &'a str,
            projects: Vec<Entry<'a>>,
        }
        let projects = plan
            .projects
            .iter()
            .map(Entry::Planned)
            .chain(broken.iter().map(|e| Entry::Broken {
                name: e.project().unwrap_or_default(),
                error: Error::from(e.as_ref()).message,
                hint: e.hint(),
            }))
            .collect();
        let mut s = serde_json::to_string_pretty(&Json {
            commit: &plan.commit,
            projects,
        })
        .expect("a plan always serialises");
        s.push('\n');
        s
    } else {
        render_table(&plan, &broken)
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`spotbuild plan | head`) is not an error worth a message.
    let _ = stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush());
    Ok(exit)
}

pub fn open_registry(config: &Config, flag: Option<&str>, auth: Option<AuthMode>) -> Result<crate::registry::Client, Error> {
    Ok(crate::plan::planner::open_registry(config, flag, auth)?)
}

fn state_word(needs: Option<bool>, yes: &'static str, no: &'static str) -> &'static str {
    match needs {
        Some(true) => yes,
        Some(false) => no,
        None => "?",
    }
}

/// The readable table: one row per project, one indented row per test job, then a summary.
fn render_table(plan: &Plan, broken: &[Arc<ManifestError>]) -> String {
    let mut rows: Vec<[String; 4]> = vec![["PROJECT".into(), "HASH".into(), "STATE".into(), "REASON".into()]];
    // The project each row starts, for its explanation.
    let mut starts: Vec<Option<&crate::plan::ProjectPlan>> = vec![None];
    for p in &plan.projects {
        starts.push(Some(p));
        starts.extend(p.tests.iter().map(|_| None));
        rows.push([
            match p.arch {
                Some(a) => format!("{} ({a})", p.name),
                None => p.name.clone(),
            },
            p.hash[..12].to_string(),
            state_word(p.needs_build, "build", "built").into(),
            p.reason.clone(),
        ]);
        for t in &p.tests {
            rows.push([
                format!("  {}:{}", p.name, t.job),
                String::new(),
                state_word(t.needs_run, "test", "passed").into(),
                t.reason.clone(),
            ]);
        }
    }
    for e in broken {
        starts.push(None);
        rows.push([
            e.project().unwrap_or_default().to_string(),
            "-".into(),
            "error".into(),
            Error::from(e.as_ref()).message,
        ]);
    }
    let widths: Vec<usize> = (0..3)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!("commit {}\n", plan.commit);
    for (n, r) in rows.iter().enumerate() {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
        if let Some(p) = starts[n] {
            if let Some(e) = &p.explain {
                out.push_str(&render_explanation(e));
            }
        }
    }
    let builds = plan.projects.iter().filter(|p| p.needs_build == Some(true)).count();
    let jobs: usize = plan.projects.iter().map(|p| p.tests.len()).sum();
    let runs: usize = plan
        .projects
        .iter()
        .flat_map(|p| &p.tests)
        .filter(|t| t.needs_run == Some(true))
        .count();
    let offline = plan.projects.iter().any(|p| p.needs_build.is_none());
    let n = plan.projects.len();
    if !broken.is_empty() {
        out.push_str(&format!("{} project{} could not be planned (see above)\n", broken.len(), plural(broken.len())));
    }
    if offline {
        out.push_str(&format!(
            "{n} project{}, {jobs} test job{} (offline: nothing decided)\n",
            plural(n),
            plural(jobs)
        ));
    } else {
        out.push_str(&format!(
            "{builds} of {n} project{} to build, {runs} of {jobs} test job{} to run\n",
            plural(n),
            plural(jobs)
        ));
    }
    out
}

/// How many changed paths the table shows per project; `--json` has them all.
const EXPLAIN_PATHS_SHOWN: usize = 20;

fn render_explanation(e: &explain::Explanation) -> String {
    let mut out = format!("    why: {}\n", e.base_reason);
    for m in &e.manifest_changes {
        out.push_str(&format!("      {m}\n"));
    }
    for c in e.changes.iter().take(EXPLAIN_PATHS_SHOWN) {
        out.push_str(&format!("      {} {}\n", c.status, c.path));
    }
    if e.changes.len() > EXPLAIN_PATHS_SHOWN {
        out.push_str(&format!(
            "      … and {} more (see --json)\n",
            e.changes.len() - EXPLAIN_PATHS_SHOWN
        ));
    }
    if e.base.is_some() && e.changes.is_empty() && e.manifest_changes.is_empty() {
        out.push_str("      no input changed since then (a Dockerfile or the hash format may have)\n");
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
