//! `spotbuild logs`: a build's archived event stream, long after its machine is gone, in
//! the live console's line format or as the NDJSON `--json` printed; `--follow` tails a
//! build still running.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::Value;

use super::error::{Error, Exit};
use super::reporter::Reporter;
use crate::ledger::archive::{self, LogArchive, LogKey};
use crate::ledger::LedgerStore;
use crate::protocol::Envelope;
use crate::settings::Config;

/// How often `--follow` reads the archive again.
pub const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// How long `--follow` waits on a build whose heartbeat has stopped before it gives up:
/// its controller is gone (killed), and nothing more will come.
pub const FOLLOW_SILENCE: Duration = Duration::from_secs(180);

const LOGS_AFTER_HELP: &str = "\
Examples:
  spotbuild logs lq3k2x1a-9f0c…             every attempt of the build, as the console showed it
  spotbuild logs lq3k2x1a-9f0c… --attempt 2 --step api:test:unit
  spotbuild logs lq3k2x1a-9f0c… --follow    tail a running build until it ends
  spotbuild logs lq3k2x1a-9f0c… --json      the NDJSON lines `build --json` printed

Every build on a rented machine archives its full event stream (compressed, written as it
streams) where its ledger is: logs/YYYY/MM/DD/<build>/<attempt>.ndjson.zst in the ledger's
bucket, or beside its SQLite file. Attempt 0 holds the build's own lines (its start, notes
and final record). A build spread over several instances has one log per instance, under
<build>-1, <build>-2, …; `spotbuild report --format json` lists build ids.
Exit code: 0, 2 when no such log exists, 1 when the archive cannot be read.";

#[derive(Debug, Args)]
#[command(about = "Show a build's archived log (also while it runs)", after_help = LOGS_AFTER_HELP)]
pub struct LogsArgs {
    /// The build id (a build on several instances: `<id>-<n>` for one of them).
    #[arg(value_name = "BUILD")]
    pub build: String,

    /// Only this attempt (0: the build's own lines).
    #[arg(long, value_name = "N")]
    pub attempt: Option<u32>,

    /// Only the agent's lines of this step (`api:build`, `api:test:unit`, `run:command`).
    #[arg(long, value_name = "STEP")]
    pub step: Option<String>,

    /// Keep reading until the build ends.
    #[arg(long)]
    pub follow: bool,

    /// Print the archived NDJSON lines as they are.
    #[arg(long)]
    pub json: bool,

    /// Read the untrusted part of the ledger (pull-request builds).
    #[arg(long)]
    pub untrusted: bool,

    /// The ledger whose logs to read: a file (SQLite) or `s3://bucket/prefix`
    /// [default: `[ledger] url`, else ~/.local/share/spotbuild/ledger.sqlite].
    #[arg(long, value_name = "LOCATION", env = "SPOTBUILD_LEDGER")]
    pub ledger: Option<String>,
}

pub async fn run(repo: Option<PathBuf>, config: Option<PathBuf>, args: LogsArgs) -> Result<Exit, Error> {
    let root = repo.or_else(|| std::env::current_dir().ok());
    let cfg = Config::load(config.as_deref(), root.as_deref())?;
    let (location, store) = super::report::open_existing(args.ledger.as_deref(), &cfg).await?;
    let store: Arc<dyn LedgerStore> = if args.untrusted {
        super::report::open_untrusted_part(&location, &cfg)
            .await
            .ok_or_else(|| Error::new(Exit::Usage, "this ledger has no untrusted part"))?
    } else {
        store
    };
    let archive = store
        .archive()
        .ok_or_else(|| Error::new(Exit::Usage, format!("the ledger at {} keeps no logs", store.place())))?;
    let mut shown = Shown::new(&args);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let attempts = archive.attempts(&args.build).await.map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
        if attempts.is_empty() && !args.follow {
            let dir = archive.place(&LogKey { build_id: args.build.clone(), attempt: 0 });
            return Err(Error::new(Exit::Usage, format!("no log of build `{}` ({} has none)", args.build, parent(&dir)))
                .hint("`spotbuild report --format json` lists build ids; pull-request builds are read with --untrusted"));
        }
        let mut new = false;
        for n in attempts.into_iter().filter(|n| args.attempt.is_none_or(|a| a == *n)) {
            new |= shown.read(&*archive, &args.build, n).await?;
        }
        if !args.follow || shown.ended {
            break;
        }
        if new {
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= FOLLOW_POLL * 5 && controller_gone(&*store, &args.build).await {
            eprintln!("the build's controller stopped writing (its heartbeat ended or stopped): nothing more will come");
            break;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
    if shown.torn {
        eprintln!("warning: the log ends in a chunk that was cut off (its writer was killed); every whole line is shown");
    }
    Ok(Exit::Success)
}

fn parent(place: &str) -> &str {
    place.rsplit_once('/').map(|(d, _)| d).unwrap_or(place)
}

/// Whether the build's heartbeat says its controller is done, or has been silent too long.
async fn controller_gone(store: &dyn LedgerStore, build_id: &str) -> bool {
    let ids = [build_id.to_string()];
    let Ok(beats) = store.beats(&ids).await else { return false };
    match beats.first() {
        Some(b) if b.ended => true,
        Some(b) => humantime::parse_rfc3339_weak(&b.at)
            .ok()
            .and_then(|at| SystemTime::now().duration_since(at).ok())
            .is_some_and(|age| age > FOLLOW_SILENCE),
        // No heartbeat at all: a build that never reached the ledger; its log is all there is.
        None => true,
    }
}

/// What has been printed, per attempt, and how.
struct Shown<'a> {
    args: &'a LogsArgs,
    /// Lines printed of each attempt's log.
    printed: std::collections::BTreeMap<u32, usize>,
    reporter: Reporter,
    /// The build's final record was seen: it has ended.
    ended: bool,
    torn: bool,
}

impl<'a> Shown<'a> {
    fn new(args: &'a LogsArgs) -> Shown<'a> {
        Shown {
            args,
            printed: Default::default(),
            reporter: Reporter::default(),
            ended: false,
            torn: false,
        }
    }

    /// Prints attempt `n`'s lines not printed yet; whether there were any.
    async fn read(&mut self, archive: &dyn LogArchive, build_id: &str, n: u32) -> Result<bool, Error> {
        let key = LogKey { build_id: build_id.to_string(), attempt: n };
        let Some(bytes) = archive.read(&key).await.map_err(|e| Error::new(Exit::Failed, e.to_string()))? else {
            return Ok(false);
        };
        let (lines, torn) = archive::lines(&bytes);
        // Never fewer than already shown: a read that raced a bucket's join may come back
        // short, and the next one has it all.
        let done = self.printed.entry(n).or_default();
        let fresh = lines.get(*done..).unwrap_or_default().to_vec();
        *done = (*done).max(lines.len());
        // A torn tail is only final once nothing more comes.
        self.torn = torn && !self.args.follow;
        let mut out = std::io::stdout().lock();
        for line in &fresh {
            let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
            if v["type"] == "build_record" {
                self.ended = true;
            }
            if let Some(step) = &self.args.step {
                if v["step"].as_str() != Some(step) {
                    continue;
                }
            }
            let _ = if self.args.json { writeln!(out, "{line}") } else { self.readable(&v, &mut out) };
        }
        Ok(!fresh.is_empty())
    }

    /// The live console's lines for one archived line.
    fn readable(&mut self, v: &Value, out: &mut impl Write) -> std::io::Result<()> {
        let group = v["group"].as_u64().map(|g| g as u32);
        match v["type"].as_str().unwrap_or_default() {
            "build" => writeln!(
                out,
                "build {}: commit {} ({}: {})",
                v["build_id"].as_str().unwrap_or_default(),
                v["commit"].as_str().unwrap_or_default().get(..12).unwrap_or_default(),
                v["trust"]["level"].as_str().unwrap_or_default(),
                v["trust"]["reason"].as_str().unwrap_or_default()
            ),
            "note" => writeln!(out, "{}", v["message"].as_str().unwrap_or_default()),
            "controller" => writeln!(
                out,
                "{}",
                super::remote::controller_line(
                    v["ts"].as_str().unwrap_or_default(),
                    group,
                    v["attempt"].as_u64().unwrap_or_default() as u32,
                    v["phase"].as_str().unwrap_or_default(),
                    v["detail"].as_str().unwrap_or_default()
                )
            ),
            "attempt_ended" => writeln!(out, "{}", super::remote::attempt_ended_line(group, &v["attempt"])),
            "build_record" => {
                let r = &v["record"];
                writeln!(out, "build {} ended: {}", r["build_id"].as_str().unwrap_or_default(), r["result"].as_str().unwrap_or_default())
            }
            _ => match serde_json::from_value::<Envelope>(v.clone()) {
                Ok(env) => self.reporter.show(&env, out),
                Err(_) => writeln!(out, "{v}"),
            },
        }
    }
}
