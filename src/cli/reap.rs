//! `spotbuild reap`: end what spotbuild left running (see [`crate::reap`]). Safe to run
//! from cron, a CI step or a loop: it never touches anything without spotbuild's tags, and
//! `--dry-run` shows what it would do. As the Terraform module's scheduled Lambda the same
//! binary runs as `bootstrap` (or `reap --lambda`).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::error::{Error, Exit};
use crate::cloud::aws::AwsCloud;
use crate::ledger::{self, Location, LedgerStore};
use crate::reap::{lambda, ReapError, Reaper, Report, Rules, DEFAULT_HEARTBEAT_WINDOW};

const REAP_AFTER_HELP: &str = "\
Examples:
  spotbuild reap --dry-run                        what would be done
  spotbuild reap --ledger s3://acme-ci/spotbuild  also end builds whose controller died
  spotbuild reap --every 5m                       keep reaping, one pass every 5 minutes
  spotbuild reap --older-than 6h --json           also anything launched over 6 hours ago

What is ended, and why:
  - an instance tagged spotbuild:build-id whose spotbuild:expires-at has passed;
  - one whose build's heartbeat in the ledger stopped for --heartbeat-window (its
    controller was killed, e.g. SIGKILL or a lost CI runner), or says the build is over;
    the build is then marked `abandoned` in the ledger, with its cost so far;
  - spot requests that are spotbuild's whose instance is gone, or that stayed open with
    none for 10 minutes;
  - launch templates that are spotbuild's (they hold host keys) older than 10 minutes, or
    whose build is over.
Nothing without spotbuild's tags is ever touched. Every launch also carries an
on-instance shutdown timer: reap is the line of defence for a controller that died.

The Terraform module runs this every 5 minutes as a Lambda (see the README's \"The
reaper\"): a team that deploys it runs nothing extra.";

#[derive(Debug, Args)]
#[command(about = "Terminate what spotbuild left running: expired or orphaned instances, spot requests, launch templates", after_help = REAP_AFTER_HELP)]
pub struct ReapArgs {
    /// Show what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Also terminate spotbuild instances launched longer ago than this (e.g. 6h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,

    /// The ledger the builds write their heartbeats to: a file, `s3://bucket/prefix`, or
    /// `off` (expiry only) [default: the default ledger file, if there is one].
    #[arg(long, value_name = "LOCATION", env = "SPOTBUILD_LEDGER")]
    pub ledger: Option<String>,

    /// An S3-compatible endpoint for an `s3://` ledger [default: AWS's].
    #[arg(long, value_name = "URL", env = "SPOTBUILD_LEDGER_ENDPOINT")]
    pub ledger_endpoint: Option<String>,

    /// A running build whose heartbeat is older than this is dead (keep it well above
    /// `[ledger] heartbeat`, 1m by default).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10m", env = "SPOTBUILD_REAP_HEARTBEAT_WINDOW")]
    pub heartbeat_window: Duration,

    /// Keep running: one pass every DURATION, until SIGINT or SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "lambda")]
    pub every: Option<Duration>,

    /// Serve the AWS Lambda runtime API (what the binary does when named `bootstrap`).
    #[arg(long)]
    pub lambda: bool,

    /// AWS region [default: from the AWS configuration].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,

    /// The EC2 API endpoint [default: AWS's, or AWS_ENDPOINT_URL].
    #[arg(long, value_name = "URL", env = "SPOTBUILD_EC2_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Print JSON (one object per pass).
    #[arg(long)]
    pub json: bool,
}

/// The ledger to read heartbeats from (the flag, else the default file if it exists), and
/// its untrusted part (where untrusted builds beat) when it exists.
async fn open_ledgers(args: &ReapArgs) -> Result<Vec<Arc<dyn LedgerStore>>, Error> {
    let location: Location = match &args.ledger {
        Some(s) => s.parse().map_err(|e: ledger::LedgerError| {
            Error::new(Exit::Usage, e.to_string()).hint("e.g. --ledger ~/ledger.sqlite, --ledger s3://acme-ci/spotbuild, or --ledger off")
        })?,
        None => match ledger::default_location() {
            Location::Sqlite(p) if p.is_file() => Location::Sqlite(p),
            _ => return Ok(Vec::new()),
        },
    };
    let open = |l: Location| async move {
        ledger::open(&l, args.region.clone(), args.ledger_endpoint.clone())
            .await
            .map_err(|e| Error::of(Exit::Usage, e).hint("the reaper reads the ledger the builds write; pass --ledger off to reap by expiry only"))
    };
    let untrusted = location.untrusted();
    let mut ledgers: Vec<Arc<dyn LedgerStore>> = open(location).await?.into_iter().collect();
    let exists = match &untrusted {
        Location::Sqlite(p) => p.is_file(),
        _ => true,
    };
    if exists {
        ledgers.extend(open(untrusted).await?);
    }
    Ok(ledgers)
}

fn cloud_error(e: ReapError) -> Error {
    let ReapError::Cloud(ref f) = e;
    let permission = f.kind == crate::cloud::FailureKind::Permission;
    let err = Error::of(Exit::Cloud, e);
    if permission {
        err.hint("reap needs ec2:DescribeInstances, DescribeLaunchTemplates and DescribeSpotInstanceRequests, and TerminateInstances, DeleteLaunchTemplate and CancelSpotInstanceRequests on resources tagged spotbuild:build-id (terraform/ has the policy)")
    } else {
        err
    }
}

pub async fn run(args: ReapArgs) -> Result<Exit, Error> {
    let cloud = AwsCloud::from_env(args.region.clone(), args.endpoint.clone()).await;
    let ledgers = open_ledgers(&args).await?;
    let rules = Rules {
        older_than: args.older_than,
        heartbeat_window: (!ledgers.is_empty()).then_some(args.heartbeat_window),
    };
    if args.lambda {
        let function = lambda::Function { cloud, ledgers, rules };
        return lambda::serve(function)
            .await
            .map(|()| Exit::Success)
            .map_err(|e| Error::new(Exit::Failed, format!("the Lambda runtime stopped: {e}")));
    }
    if ledgers.is_empty() && !args.json {
        eprintln!("note: no ledger: only expired instances are reaped (--ledger, SPOTBUILD_LEDGER)");
    }
    let reaper = Reaper {
        cloud: &cloud,
        ledgers: ledgers.iter().map(|l| l.as_ref()).collect(),
        rules,
        dry_run: args.dry_run,
    };
    let Some(every) = args.every else {
        let report = reaper.pass().await.map_err(cloud_error)?;
        show(&report, args.json);
        return Ok(Exit::Success);
    };
    let stop = super::signals::stopped_with();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            signal = &mut stop => return Ok(Exit::of_signal(signal)),
            _ = tick.tick() => {}
        }
        // A failed pass is said; the next one tries again.
        match reaper.pass().await {
            Ok(report) => show(&report, args.json),
            Err(e) => eprint!("{}", cloud_error(e).render()),
        }
    }
}

fn show(report: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(report).expect("a report always serialises"));
    } else {
        print!("{}", report.render());
    }
}

/// The binary as the reaper's Lambda function: `bootstrap` on `provided.al2023`.
pub fn lambda_args() -> ReapArgs {
    ReapArgs {
        dry_run: false,
        older_than: None,
        ledger: std::env::var(lambda::LEDGER_ENV).ok().filter(|s| !s.is_empty()),
        ledger_endpoint: std::env::var("SPOTBUILD_LEDGER_ENDPOINT").ok().filter(|s| !s.is_empty()),
        heartbeat_window: lambda::window_from_env().ok().flatten().unwrap_or(DEFAULT_HEARTBEAT_WINDOW),
        every: None,
        lambda: true,
        region: None,
        endpoint: std::env::var("SPOTBUILD_EC2_ENDPOINT").ok().filter(|s| !s.is_empty()),
        json: true,
    }
}
