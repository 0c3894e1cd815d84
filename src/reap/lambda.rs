//! The reaper as an AWS Lambda function on the `provided.al2023` runtime: the spotbuild
//! binary, named `bootstrap` in the function's zip (`make reaper-zip`), serves the Lambda
//! runtime API and runs one [`super::Reaper::pass`] per invocation (the scheduled event's
//! content is ignored), answering with the pass's report.
//!
//! Configuration comes from the environment the Terraform module sets: `SPOTBUILD_LEDGER`
//! (the ledger whose heartbeats it reads), `SPOTBUILD_REAP_HEARTBEAT_WINDOW`, and the
//! function's own `AWS_REGION`. A pass that cannot list instances fails the invocation
//! (visible in the function's errors metric); the next scheduled one tries again.

use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::{service_fn, LambdaEvent};

use super::{Reaper, Report, Rules};
use crate::cloud::aws::AwsCloud;
use crate::ledger::LedgerStore;

pub const LEDGER_ENV: &str = "SPOTBUILD_LEDGER";
pub const WINDOW_ENV: &str = "SPOTBUILD_REAP_HEARTBEAT_WINDOW";

/// What every invocation shares.
pub struct Function {
    pub cloud: AwsCloud,
    /// The ledger and its untrusted part.
    pub ledgers: Vec<Arc<dyn LedgerStore>>,
    pub rules: Rules,
}

impl Function {
    async fn invoke(&self) -> Result<Report, super::ReapError> {
        Reaper {
            cloud: &self.cloud,
            ledgers: self.ledgers.iter().map(|l| l.as_ref()).collect(),
            rules: self.rules,
            dry_run: false,
        }
        .pass()
        .await
    }
}

/// Serves invocations until the runtime API goes away.
pub async fn serve(function: Function) -> Result<(), lambda_runtime::Error> {
    let function = Arc::new(function);
    lambda_runtime::run(service_fn(move |_: LambdaEvent<serde_json::Value>| {
        let function = function.clone();
        async move {
            let report = function.invoke().await?;
            tracing::info!(terminated = report.terminate.len(), kept = report.keep.len(), "reap pass");
            Ok::<Report, lambda_runtime::Error>(report)
        }
    }))
    .await
}

/// The heartbeat window from the environment's `10m`-style value, if set.
pub fn window_from_env() -> Result<Option<Duration>, humantime::DurationError> {
    match std::env::var(WINDOW_ENV) {
        Ok(v) if !v.trim().is_empty() => humantime::parse_duration(v.trim()).map(Some),
        _ => Ok(None),
    }
}
