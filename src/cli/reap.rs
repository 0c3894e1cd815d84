//! `spotbuild reap`: terminate every spotbuild instance past its `spotbuild:expires-at`.
//! Safe to run from cron or a CI step: it never touches an instance without spotbuild's
//! tags, and `--dry-run` shows what it would do.

use std::time::{Duration, SystemTime};

use clap::Args;

use super::error::{Error, Exit};
use crate::cloud::aws::AwsCloud;
use crate::cloud::reap::{decide, orphaned_requests, Decision, RequestVerdict};
use crate::cloud::Cloud;

const REAP_AFTER_HELP: &str = "\
Examples:
  spotbuild reap --dry-run               what would be terminated
  spotbuild reap                         terminate expired spotbuild instances
  spotbuild reap --older-than 6h --json  also anything launched over 6 hours ago

Only instances tagged spotbuild:build-id are considered. Spot requests that are
spotbuild's (tagged, or behind a spotbuild instance) are cancelled when their instance
is gone, or when they stayed open with none for 10 minutes. Every launch carries
spotbuild:expires-at and an on-instance shutdown timer; reap is the third line of
defence, for a controller that was killed outright.";

#[derive(Debug, Args)]
#[command(about = "Terminate spotbuild instances whose time is up", after_help = REAP_AFTER_HELP)]
pub struct ReapArgs {
    /// Show what would be terminated; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Also terminate spotbuild instances launched longer ago than this (e.g. 6h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,

    /// AWS region [default: from the AWS configuration].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,

    /// The EC2 API endpoint [default: AWS's, or AWS_ENDPOINT_URL].
    #[arg(long, value_name = "URL", env = "SPOTBUILD_EC2_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ReapArgs) -> Result<Exit, Error> {
    let cloud = AwsCloud::from_env(args.region.clone(), args.endpoint.clone()).await;
    let cloud_error = |e: crate::cloud::CloudFailure| {
        let mut err = Error::new(Exit::Cloud, format!("failed to reap: {e}"));
        if e.kind == crate::cloud::FailureKind::Permission {
            err = err.hint("reap needs ec2:DescribeInstances and ec2:TerminateInstances on instances tagged spotbuild:build-id");
        }
        err
    };
    let instances = cloud.list_spotbuild_instances().await.map_err(cloud_error)?;
    let decision = decide(&instances, SystemTime::now(), args.older_than);
    let ids: Vec<String> = decision.terminate.iter().map(|v| v.instance_id.clone()).collect();
    if !args.dry_run && !ids.is_empty() {
        cloud.terminate(&ids).await.map_err(cloud_error)?;
    }
    // Spot requests left open after their instance (or with none): cancel them too.
    let requests = cloud.list_spot_requests().await.map_err(cloud_error)?;
    let orphans = orphaned_requests(&requests, &instances, SystemTime::now());
    let request_ids: Vec<String> = orphans.iter().map(|v| v.request_id.clone()).collect();
    if !args.dry_run && !request_ids.is_empty() {
        cloud.cancel_spot_requests(&request_ids).await.map_err(cloud_error)?;
    }
    if args.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            dry_run: bool,
            #[serde(flatten)]
            decision: &'a Decision,
            cancel_requests: &'a [RequestVerdict],
        }
        let out = Out {
            dry_run: args.dry_run,
            decision: &decision,
            cancel_requests: &orphans,
        };
        println!("{}", serde_json::to_string_pretty(&out).expect("serialisable"));
    } else {
        print!("{}", render(&decision, args.dry_run));
        let verb = if args.dry_run { "would cancel" } else { "cancelled" };
        for v in &orphans {
            println!("{verb} spot request {} ({})", v.request_id, v.reason);
        }
    }
    Ok(Exit::Success)
}

fn render(d: &Decision, dry_run: bool) -> String {
    let verb = if dry_run { "would terminate" } else { "terminated" };
    let mut out = String::new();
    for v in &d.terminate {
        out.push_str(&format!(
            "{verb} {} (build {}, {}): {}\n",
            v.instance_id,
            v.build_id.as_deref().unwrap_or("?"),
            v.project.as_deref().unwrap_or("?"),
            v.reason
        ));
    }
    for v in &d.keep {
        out.push_str(&format!("kept {} (build {}): {}\n", v.instance_id, v.build_id.as_deref().unwrap_or("?"), v.reason));
    }
    out.push_str(&format!(
        "{} instance{} {verb}, {} kept\n",
        d.terminate.len(),
        if d.terminate.len() == 1 { "" } else { "s" },
        d.keep.len()
    ));
    out
}
