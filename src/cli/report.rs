//! `spotbuild report`: what builds cost over a period, what spot saved, and what
//! interruptions, fallbacks and boot time took; and opening the ledger for every command
//! that records into it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};

use super::error::{Error, Exit};
use crate::ledger::report::{GroupBy, Report};
use crate::ledger::{self, LedgerStore, Location};
use crate::settings::Config;

const REPORT_AFTER_HELP: &str = "\
WHEN is a time ago (`7d`, `36h`, `90m`), a date (`2026-11-01`, UTC midnight) or an
RFC 3339 time (`2026-11-01T09:30:00Z`).

Costs follow AWS's rules: per-second billing with a 60-second minimum; a spot instance
that EC2 interrupts in its first hour is free; gp3 root volumes pro rata. Savings are
against the same seconds at the on-demand list price. A build's cost is shared equally
among its projects for `--by project`.

Examples:
  spotbuild report                                  the last 7 days, by project
  spotbuild report --since 30d --by day --format csv -o costs.csv
  spotbuild report --by arch                        x86_64 against arm64 (Graviton)
  spotbuild report --ledger s3://acme-ci/spotbuild --format html -o report.html";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    Html,
}

#[derive(Debug, Args)]
#[command(about = "Report what builds cost, what spot saved and what was wasted", after_help = REPORT_AFTER_HELP)]
pub struct ReportArgs {
    /// Start of the period.
    #[arg(long, value_name = "WHEN", default_value = "7d")]
    pub since: String,

    /// End of the period [default: now].
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,

    /// How to group the table and CSV rows.
    #[arg(long, value_enum, default_value = "project")]
    pub by: GroupBy,

    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,

    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// The ledger to read: a file (SQLite) or `s3://bucket/prefix` [default: `[ledger] url`,
    /// else ~/.local/share/spotbuild/ledger.sqlite].
    #[arg(long, value_name = "LOCATION", env = "SPOTBUILD_LEDGER")]
    pub ledger: Option<String>,
}

/// A WHEN that is none of the three forms.
#[derive(Debug, thiserror::Error)]
#[error("`{when}` is not a time ago (7d), a date (2026-11-01) or an RFC 3339 time")]
pub struct WhenError {
    when: String,
    /// Why it is not an RFC 3339 time, the last form tried.
    #[source]
    source: humantime::TimestampError,
}

/// Parses WHEN relative to `now`.
pub fn parse_when(s: &str, now: SystemTime) -> Result<SystemTime, WhenError> {
    let s = s.trim();
    if let Ok(ago) = humantime::parse_duration(s) {
        return Ok(now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    if s.len() == 10 {
        if let Ok(t) = humantime::parse_rfc3339_weak(&format!("{s}T00:00:00Z")) {
            return Ok(t);
        }
    }
    humantime::parse_rfc3339_weak(s).map_err(|source| WhenError {
        when: s.to_string(),
        source,
    })
}

/// The ledger location: the flag (or `SPOTBUILD_LEDGER`), then `[ledger] url`, then the
/// default file. A malformed location is a usage error; a ledger that cannot be opened
/// is reported and skipped (`None`), never a reason to fail a build.
pub async fn open_ledger(flag: Option<&str>, cfg: &Config, trust: crate::trust::Level) -> Result<Option<Arc<dyn LedgerStore>>, Error> {
    let location = resolve(flag, cfg)?;
    let location = match trust {
        crate::trust::Level::Trusted => location,
        crate::trust::Level::Untrusted => location.untrusted(),
    };
    match open_at(&location, cfg).await {
        Ok(l) => Ok(l),
        Err(e) => {
            eprintln!("warning: the build's cost will not be recorded: {e}");
            Ok(None)
        }
    }
}

/// An `s3://` ledger uses `[ledger] endpoint`, else the cloud's.
async fn open_at(location: &Location, cfg: &Config) -> Result<Option<Arc<dyn LedgerStore>>, ledger::LedgerError> {
    let endpoint = cfg.ledger.endpoint.clone().or_else(|| cfg.cloud.endpoint.clone());
    ledger::open(location, cfg.cloud.region.clone(), endpoint).await
}

/// The ledger to read (trusted part): it must exist, and not be `off`.
pub async fn open_existing(flag: Option<&str>, cfg: &Config) -> Result<(Location, Arc<dyn LedgerStore>), Error> {
    let location = resolve(flag, cfg)?;
    if let Location::Sqlite(path) = &location {
        if !tokio::fs::try_exists(path).await.unwrap_or(false) {
            return Err(Error::new(Exit::Usage, format!("no ledger at {}", path.display()))
                .hint("builds record there once they run; choose another with --ledger or [ledger] url"));
        }
    }
    let store = open_at(&location, cfg)
        .await
        .map_err(|e| Error::new(Exit::Failed, e.to_string()))?
        .ok_or_else(|| Error::new(Exit::Usage, "the ledger is `off`: nothing is recorded").hint("pass --ledger LOCATION"))?;
    Ok((location, store))
}

/// How many of a failed step's last lines the HTML report shows.
const FAILED_STEP_LINES: usize = 20;

/// Fills each failed build's failed steps from its archived log (a log that cannot be
/// read leaves the row as it is: the report is about cost).
async fn failed_steps(report: &mut Report, archives: &[Arc<dyn crate::ledger::archive::LogArchive>]) {
    use crate::ledger::archive::{self, LogKey};
    for row in report.builds.iter_mut().filter(|b| b.log.is_some() && !matches!(b.result.as_str(), "success" | "running")) {
        for a in archives {
            let Ok(attempts) = a.attempts(&row.build_id).await else { continue };
            for n in attempts.into_iter().filter(|n| *n > 0) {
                let key = LogKey { build_id: row.build_id.clone(), attempt: n };
                if let Ok(Some(bytes)) = a.read(&key).await {
                    row.failed_steps.extend(archive::failed_steps(&archive::lines(&bytes).0, FAILED_STEP_LINES));
                }
            }
        }
    }
}

/// The untrusted part of the ledger at `location`, when it exists.
pub async fn open_untrusted_part(location: &Location, cfg: &Config) -> Option<Arc<dyn LedgerStore>> {
    let untrusted = location.untrusted();
    let exists = match &untrusted {
        Location::Sqlite(path) => tokio::fs::try_exists(path).await.unwrap_or(false),
        _ => true,
    };
    if !exists {
        return None;
    }
    open_at(&untrusted, cfg).await.ok().flatten()
}

fn resolve(flag: Option<&str>, cfg: &Config) -> Result<Location, Error> {
    match flag.or(cfg.ledger.url.as_deref()) {
        Some(s) => s.parse().map_err(|e: ledger::LedgerError| {
            Error::new(Exit::Usage, e.to_string()).hint("e.g. --ledger ~/ledger.sqlite, --ledger s3://acme-ci/spotbuild, or --ledger off")
        }),
        None => Ok(ledger::default_location()),
    }
}

pub async fn run(repo: Option<PathBuf>, config: Option<PathBuf>, args: ReportArgs) -> Result<Exit, Error> {
    let root = repo.or_else(|| std::env::current_dir().ok());
    let cfg = Config::load(config.as_deref(), root.as_deref())?;
    let now = SystemTime::now();
    let since = parse_when(&args.since, now).map_err(|e| Error::new(Exit::Usage, format!("--since: {e}")))?;
    let until = match &args.until {
        Some(u) => parse_when(u, now).map_err(|e| Error::new(Exit::Usage, format!("--until: {e}")))?,
        None => now + Duration::from_millis(1),
    };
    if until <= since {
        return Err(Error::new(Exit::Usage, "--until is not after --since").hint("the period is [since, until)"));
    }
    let (location, store) = open_existing(args.ledger.as_deref(), &cfg).await?;
    let mut entries = store.list(since, until).await.map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
    // Untrusted builds (pull requests) record in a part of their own; they cost too.
    let mut archives: Vec<Arc<dyn crate::ledger::archive::LogArchive>> = store.archive().into_iter().collect();
    {
        if let Some(part) = open_untrusted_part(&location, &cfg).await {
            let more = part.list(since, until).await.map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
            entries.extend(more);
            entries.sort_by(|a, b| (a.started(), &a.build_id).cmp(&(b.started(), &b.build_id)));
            archives.extend(part.archive());
        }
    }
    let mut report = Report::new(&entries, since, until, args.by);
    if args.format == Format::Html {
        failed_steps(&mut report, &archives).await;
    }
    let mut buf = Vec::new();
    match args.format {
        Format::Table => report.write_table(&mut buf),
        Format::Csv => report.write_csv(&mut buf),
        Format::Json => report.write_json(&mut buf),
        Format::Html => {
            buf = ledger::html::render(&report).into_bytes();
            Ok(())
        }
    }
    .map_err(|e| Error::new(Exit::Failed, format!("failed to render the report: {e}")))?;
    match &args.output {
        Some(path) => {
            tokio::fs::write(path, &buf)
                .await
                .map_err(|e| Error::new(Exit::Failed, format!("failed to write {}: {e}", path.display())))?;
            eprintln!("wrote {} ({} builds)", path.display(), report.totals.builds);
        }
        None => {
            use tokio::io::AsyncWriteExt;
            let mut out = tokio::io::stdout();
            let _ = out.write_all(&buf).await;
            let _ = out.flush().await;
        }
    }
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_is_a_time_ago_a_date_or_a_timestamp() {
        let now = humantime::parse_rfc3339("2026-11-22T12:00:00Z").unwrap();
        assert_eq!(parse_when("7d", now).unwrap(), humantime::parse_rfc3339("2026-11-15T12:00:00Z").unwrap());
        assert_eq!(parse_when("2026-11-01", now).unwrap(), humantime::parse_rfc3339("2026-11-01T00:00:00Z").unwrap());
        assert_eq!(parse_when("2026-11-01T09:30:00Z", now).unwrap(), humantime::parse_rfc3339("2026-11-01T09:30:00Z").unwrap());
        assert!(parse_when("last week", now).is_err());
    }
}
