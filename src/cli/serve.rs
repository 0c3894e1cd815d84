//! `spotbuild serve`: the dashboard ([`crate::serve`]) on a local address until SIGINT or
//! SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::error::{Error, Exit};
use crate::settings::Config;

/// Where the token for a non-loopback address comes from.
pub const TOKEN_ENV: &str = "SPOTBUILD_SERVE_TOKEN";

const SERVE_AFTER_HELP: &str = "\
Examples:
  spotbuild serve                                   http://127.0.0.1:8080: running builds, recent builds, logs, costs
  spotbuild serve --ledger s3://acme-ci/spotbuild   the team's shared ledger
  SPOTBUILD_SERVE_TOKEN=… spotbuild serve --listen 0.0.0.0:8080
                                                    reachable by others: every request needs the token

Pages: / running builds (phase, instance, market, elapsed, cost so far; reloads every 5 s),
/builds recent builds with filters, /builds/<id> one build with its log live (server-sent
events), /report the cost report. Read-only. A non-loopback address needs a token in
SPOTBUILD_SERVE_TOKEN; open the first page with ?token=… (a cookie keeps it) or send
Authorization: Bearer ….";

#[derive(Debug, Args)]
#[command(about = "Serve a read-only dashboard of running and recent builds, their logs and costs", after_help = SERVE_AFTER_HELP)]
pub struct ServeArgs {
    /// Address to listen on; anything but loopback needs SPOTBUILD_SERVE_TOKEN.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The ledger to show: a file (SQLite) or `s3://bucket/prefix` [default: `[ledger] url`,
    /// else ~/.local/share/spotbuild/ledger.sqlite].
    #[arg(long, value_name = "LOCATION", env = "SPOTBUILD_LEDGER")]
    pub ledger: Option<String>,
}

pub async fn run(repo: Option<PathBuf>, config: Option<PathBuf>, args: ServeArgs) -> Result<Exit, Error> {
    let root = repo.or_else(|| std::env::current_dir().ok());
    let cfg = Config::load(config.as_deref(), root.as_deref())?;
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    if crate::serve::needs_token(&args.listen) && token.is_none() {
        return Err(Error::new(Exit::Usage, format!("{} is not a loopback address, and no token is set", args.listen))
            .hint(format!("set {TOKEN_ENV} (every request must then carry it), or listen on 127.0.0.1")));
    }
    let (_, ledger) = super::report::open_existing(args.ledger.as_deref(), &cfg).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Error::new(Exit::Usage, format!("failed to listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr().map_err(|e| Error::new(Exit::Failed, e.to_string()))?;
    eprintln!("serving {} on http://{addr}/ (Ctrl-C stops)", ledger.place());
    let dashboard = crate::serve::Dashboard {
        archive: ledger.archive(),
        ledger,
        token,
    };
    crate::serve::serve(listener, dashboard, super::signals::stop())
        .await
        .map_err(|e| Error::new(Exit::Failed, format!("the dashboard stopped: {e}")))?;
    Ok(Exit::Success)
}
