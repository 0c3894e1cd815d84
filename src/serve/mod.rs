//! `spotbuild serve`: a read-only dashboard over the ledger and the log archive. Running
//! builds (from their heartbeats) with phase, instance, market, elapsed time and cost so
//! far; recent builds with filters; a build's page with its log, live over server-sent
//! events; and the cost report's charts. Server-rendered HTML with no external assets
//! and no front-end build step.
//!
//! # Guarantees
//! - Nothing is written: every handler only reads the ledger and the archive.
//! - Bound to a non-loopback address, every request must carry the token (a bearer
//!   header, a `token` query parameter, or the cookie the latter sets).
//!
//! # Caveats
//! - Pages are read from the ledger on each request; a ledger in a bucket answers as fast
//!   as its LIST of the last days does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::Stream;

use crate::ledger::archive::{self, LogArchive, LogKey};
use crate::ledger::html::esc;
use crate::ledger::report::{duration, usd, GroupBy, Report};
use crate::ledger::{cost, BuildEntry, LedgerStore};

/// How often a build's live log is read again.
pub const LOG_POLL: Duration = Duration::from_secs(1);
/// A running build whose heartbeat is older than this is shown as silent (its controller
/// may be gone; `spotbuild reap` ends its instances).
pub const SILENT_AFTER: Duration = Duration::from_secs(180);
/// How far back "running" and "recent" look by default.
const RECENT: Duration = Duration::from_secs(7 * 86_400);

/// What the dashboard reads.
#[derive(Clone)]
pub struct Dashboard {
    pub ledger: Arc<dyn LedgerStore>,
    pub archive: Option<Arc<dyn LogArchive>>,
    /// Required of every request when set.
    pub token: Option<String>,
}

/// Serves `dashboard` on `listener` until `shutdown` resolves.
pub async fn serve(listener: tokio::net::TcpListener, dashboard: Dashboard, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router(dashboard)).with_graceful_shutdown(shutdown).await
}

/// Whether `addr` may be served without a token.
pub fn needs_token(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

pub fn router(dashboard: Dashboard) -> Router {
    let token = dashboard.token.clone();
    Router::new()
        .route("/", get(running))
        .route("/builds", get(builds))
        .route("/builds/{id}", get(build_page))
        .route("/builds/{id}/events", get(build_events))
        .route("/report", get(report))
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let token = token.clone();
            async move { authorize(token.as_deref(), req, next).await }
        }))
        .with_state(dashboard)
}

const COOKIE: &str = "spotbuild_token";

async fn authorize(token: Option<&str>, req: Request, next: Next) -> Response {
    let Some(want) = token else { return next.run(req).await };
    let eq = |got: &str| got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let cookie = req
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').find_map(|kv| kv.trim().strip_prefix(&format!("{COOKIE}="))));
    let query = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    if bearer.is_some_and(eq) || cookie.is_some_and(eq) {
        return next.run(req).await;
    }
    if query.is_some_and(eq) {
        // Links inside the pages carry no token: the cookie does.
        let mut resp = next.run(req).await;
        if let Ok(v) = format!("{COOKIE}={want}; HttpOnly; SameSite=Strict; Path=/").parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    (StatusCode::UNAUTHORIZED, "a token is required: open the page with ?token=… or send Authorization: Bearer …\n").into_response()
}

/// The page around `body`, with the navigation; `refresh` reloads it every so many seconds.
fn page(title: &str, body: &str, refresh: Option<u32>) -> Html<String> {
    let refresh = refresh.map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">")).unwrap_or_default();
    Html(format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">{refresh}
<title>{title} · spotbuild</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }}
nav {{ background: #263238; padding: 0.6em 2em; }}
nav a {{ color: #eceff1; margin-right: 1.5em; text-decoration: none; }}
main {{ margin: 1.5em 2em; }}
h1 {{ font-size: 1.3em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: left; }}
th {{ background: #f6f6f6; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.running {{ color: #1565c0; }} .success {{ color: #2e7d32; }} .failed, .error, .gave-up {{ color: #c62828; }} .silent {{ color: #e65100; }}
pre#log {{ background: #fafafa; border: 1px solid #eee; padding: 0.6em; max-height: 70vh; overflow: auto; font-size: 12px; white-space: pre-wrap; }}
form input, form select {{ margin-right: 0.6em; }}
.empty {{ color: #777; }}
</style></head>
<body><nav><a href="/">running</a><a href="/builds">recent builds</a><a href="/report">cost report</a></nav>
<main>
{body}
</main></body></html>
"#,
        title = esc(title)
    ))
}

fn failed(e: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_GATEWAY, page("error", &format!("<h1>The ledger could not be read</h1><p>{}</p>", esc(&e.to_string())), None)).into_response()
}

/// Entries of builds started in the last `back`.
async fn recent(d: &Dashboard, back: Duration) -> Result<Vec<BuildEntry>, crate::ledger::LedgerError> {
    let now = SystemTime::now();
    let mut entries = d.ledger.list(now - back, now + Duration::from_secs(1)).await?;
    entries.sort_by(|a, b| (b.started(), &b.build_id).cmp(&(a.started(), &a.build_id)));
    Ok(entries)
}

fn cost_so_far(e: &BuildEntry) -> f64 {
    e.attempts.iter().map(|a| cost::attempt_cost(a, e.volume_gb).total).sum()
}

fn elapsed(e: &BuildEntry, until: SystemTime) -> String {
    let secs = e.started().and_then(|s| until.duration_since(s).ok()).map_or(0.0, |d| d.as_secs_f64());
    duration(secs)
}

/// The last controller phase the archive has of the build's newest attempt.
async fn phase_of(d: &Dashboard, build_id: &str) -> Option<String> {
    let archive = d.archive.as_ref()?;
    let last = *archive.attempts(build_id).await.ok()?.iter().filter(|n| **n > 0).max()?;
    let bytes = archive.read(&LogKey { build_id: build_id.to_string(), attempt: last }).await.ok()??;
    let (lines, _) = archive::lines(&bytes);
    lines.iter().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        match v["type"].as_str()? {
            "controller" => Some(v["phase"].as_str()?.to_string()),
            "step_start" => Some(format!("running {}", v["step"].as_str()?)),
            _ => None,
        }
    })
}

async fn running(State(d): State<Dashboard>) -> Response {
    let entries = match recent(&d, Duration::from_secs(2 * 86_400)).await {
        Ok(e) => e,
        Err(e) => return failed(e),
    };
    let live: Vec<&BuildEntry> = entries.iter().filter(|e| e.result == "running").collect();
    let ids: Vec<String> = live.iter().map(|e| e.build_id.clone()).collect();
    let beats = d.ledger.beats(&ids).await.unwrap_or_default();
    let now = SystemTime::now();
    let mut rows = String::new();
    let mut total = 0.0;
    for e in &live {
        let beat = beats.iter().find(|b| b.build_id == e.build_id);
        if beat.is_some_and(|b| b.ended) {
            continue;
        }
        let silent = beat
            .and_then(|b| humantime::parse_rfc3339_weak(&b.at).ok())
            .and_then(|at| now.duration_since(at).ok())
            .is_none_or(|age| age > SILENT_AFTER);
        let a = e.attempts.last();
        let phase = phase_of(&d, &e.build_id).await.unwrap_or_else(|| "starting".into());
        let cost = cost_so_far(e);
        total += cost;
        rows.push_str(&format!(
            "<tr class=\"build\" data-build=\"{id}\"><td><a href=\"/builds/{id}\">{id}</a></td><td>{projects}</td><td class=\"{state}\">{phase}{silent}</td><td>{attempt}</td><td>{instance}</td><td>{itype}</td><td>{market}</td><td class=\"n\">{elapsed}</td><td class=\"n\">{cost}</td></tr>\n",
            id = esc(&e.build_id),
            projects = esc(&e.projects.join(", ")),
            state = if silent { "silent" } else { "running" },
            phase = esc(&phase),
            silent = if silent { " (heartbeat silent)" } else { "" },
            attempt = a.map_or(0, |a| a.attempt),
            instance = esc(a.and_then(|a| a.rental.instance_id.as_deref()).unwrap_or("-")),
            itype = esc(a.and_then(|a| a.rental.instance_type.as_deref()).unwrap_or("-")),
            market = a.and_then(|a| a.rental.market).map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            elapsed = elapsed(e, now),
            cost = usd(cost),
        ));
    }
    let body = if rows.is_empty() {
        "<h1>Running builds</h1>\n<p class=\"empty\" id=\"none\">No build is running.</p>".to_string()
    } else {
        format!(
            "<h1>Running builds</h1>\n<p>Costing {} so far.</p>\n<table id=\"running\"><thead><tr><th>build</th><th>projects</th><th>phase</th><th>attempt</th><th>instance</th><th>type</th><th>market</th><th>elapsed</th><th>cost so far</th></tr></thead><tbody>\n{rows}</tbody></table>",
            usd(total)
        )
    };
    page("running builds", &body, Some(5)).into_response()
}

#[derive(serde::Deserialize, Default)]
struct Filters {
    /// `7d`, `24h`, … [default: 7d]
    since: Option<String>,
    result: Option<String>,
    project: Option<String>,
    branch: Option<String>,
}

async fn builds(State(d): State<Dashboard>, Query(f): Query<Filters>) -> Response {
    let back = f.since.as_deref().filter(|s| !s.is_empty()).and_then(|s| humantime::parse_duration(s).ok()).unwrap_or(RECENT);
    let entries = match recent(&d, back).await {
        Ok(e) => e,
        Err(e) => return failed(e),
    };
    let some = |o: &Option<String>| o.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let (result, project, branch) = (some(&f.result), some(&f.project), some(&f.branch));
    let shown: Vec<&BuildEntry> = entries
        .iter()
        .filter(|e| result.as_ref().is_none_or(|r| &e.result == r))
        .filter(|e| project.as_ref().is_none_or(|p| e.projects.contains(p)))
        .filter(|e| branch.as_ref().is_none_or(|b| e.branch.as_ref() == Some(b)))
        .collect();
    let mut rows = String::new();
    for e in &shown {
        rows.push_str(&format!(
            "<tr class=\"build\" data-build=\"{id}\"><td>{started}</td><td><a href=\"/builds/{id}\">{id}</a></td><td>{projects}</td><td>{kind}</td><td>{branch}</td><td class=\"{result}\">{result}</td><td>{arch}</td><td class=\"n\">{attempts}</td><td class=\"n\">{cost}</td></tr>\n",
            started = esc(e.started_at.get(..19).unwrap_or(&e.started_at)),
            id = esc(&e.build_id),
            projects = esc(&e.projects.join(", ")),
            kind = esc(&e.kind),
            branch = esc(e.branch.as_deref().unwrap_or("")),
            result = esc(&e.result),
            arch = e.arch,
            attempts = e.attempts.len(),
            cost = usd(cost_so_far(e)),
        ));
    }
    let value = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let results = ["", "running", "success", "failed", "gave-up", "error", "timed-out", "cancelled", "abandoned"];
    let options: String = results
        .iter()
        .map(|r| format!("<option value=\"{r}\"{}>{}</option>", if result.as_deref() == Some(*r) { " selected" } else { "" }, if r.is_empty() { "any result" } else { r }))
        .collect();
    let body = format!(
        "<h1>Recent builds</h1>\n<form method=\"get\" action=\"/builds\"><input name=\"since\" placeholder=\"7d\" value=\"{since}\" size=\"5\"><select name=\"result\">{options}</select><input name=\"project\" placeholder=\"project\" value=\"{project}\"><input name=\"branch\" placeholder=\"branch\" value=\"{branch}\"><button>filter</button></form>\n<p>{n} of {all} builds.</p>\n<table id=\"builds\"><thead><tr><th>started (UTC)</th><th>build</th><th>projects</th><th>kind</th><th>branch</th><th>result</th><th>arch</th><th>attempts</th><th>cost</th></tr></thead><tbody>\n{rows}</tbody></table>",
        since = value(&f.since),
        project = value(&project),
        branch = value(&branch),
        n = shown.len(),
        all = entries.len(),
    );
    page("recent builds", &body, None).into_response()
}

/// The entry of `id`, from the day its id says it started.
async fn entry_of(d: &Dashboard, id: &str) -> Result<Option<BuildEntry>, crate::ledger::LedgerError> {
    let Some(started) = archive::started_of(id) else { return Ok(None) };
    let day = Duration::from_secs(86_400);
    let entries = d.ledger.list(started - day, started + day).await?;
    Ok(entries.into_iter().find(|e| e.build_id == id))
}

async fn build_page(State(d): State<Dashboard>, Path(id): Path<String>) -> Response {
    let entry = match entry_of(&d, &id).await {
        Ok(Some(e)) => e,
        Ok(None) => return (StatusCode::NOT_FOUND, page("not found", &format!("<h1>No build {}</h1>", esc(&id)), None)).into_response(),
        Err(e) => return failed(e),
    };
    let mut attempts = String::new();
    for a in &entry.attempts {
        attempts.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"n\">{}</td></tr>\n",
            a.attempt,
            esc(a.rental.instance_id.as_deref().unwrap_or("-")),
            esc(a.rental.instance_type.as_deref().unwrap_or("-")),
            esc(a.rental.availability_zone.as_deref().unwrap_or("-")),
            a.rental.market.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            esc(&a.outcome),
            esc(&a.outcome),
            usd(cost::attempt_cost(a, entry.volume_gb).total),
        ));
    }
    let body = format!(
        r#"<h1>Build {id}</h1>
<p>{projects} · {kind} · commit <code>{commit}</code> · {branch} · {arch} · started {started} · <span class="{result}" id="result">{result}</span> · {cost}</p>
<table><thead><tr><th>attempt</th><th>instance</th><th>type</th><th>zone</th><th>market</th><th>outcome</th><th>cost</th></tr></thead><tbody>
{attempts}</tbody></table>
<h2>Log</h2>
<pre id="log"></pre>
<p id="log-state" class="empty">reading the log…</p>
<script>
(function () {{
  var log = document.getElementById("log"), state = document.getElementById("log-state");
  var source = new EventSource("/builds/{id_js}/events");
  source.onmessage = function (e) {{
    var line = document.createElement("div");
    line.textContent = e.data;
    log.appendChild(line);
    state.textContent = log.childNodes.length + " lines";
  }};
  source.addEventListener("end", function () {{ state.textContent = log.childNodes.length + " lines · the build has ended"; source.close(); document.body.setAttribute("data-ended", "1"); }});
  source.onerror = function () {{ if (source.readyState === 2) {{ state.textContent = "the log stream closed"; }} }};
  document.body.setAttribute("data-ready", "1");
}})();
</script>"#,
        id = esc(&id),
        id_js = esc(&id).replace('\\', ""),
        projects = esc(&entry.projects.join(", ")),
        kind = esc(&entry.kind),
        commit = esc(entry.commit.get(..12).unwrap_or(&entry.commit)),
        branch = esc(entry.branch.as_deref().unwrap_or("-")),
        arch = entry.arch,
        started = esc(entry.started_at.get(..19).unwrap_or(&entry.started_at)),
        result = esc(&entry.result),
        cost = usd(cost_so_far(&entry)),
    );
    page(&format!("build {id}"), &body, None).into_response()
}

/// The build's log as server-sent events: every archived line (the readable form, as
/// `spotbuild logs` prints it), then new ones as they are archived, then `end` once the
/// build's final record is there.
async fn build_events(State(d): State<Dashboard>, Path(id): Path<String>) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    struct Tail {
        d: Dashboard,
        id: String,
        printed: std::collections::BTreeMap<u32, usize>,
        queue: std::collections::VecDeque<Event>,
        ended: bool,
        first: bool,
    }
    let tail = Tail {
        d,
        id,
        printed: Default::default(),
        queue: Default::default(),
        ended: false,
        first: true,
    };
    let stream = futures::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(e) = t.queue.pop_front() {
                return Some((Ok(e), t));
            }
            if t.ended {
                return None;
            }
            if !t.first {
                tokio::time::sleep(LOG_POLL).await;
            }
            t.first = false;
            let Some(archive) = t.d.archive.clone() else {
                t.queue.push_back(Event::default().event("end").data("no log archive"));
                t.ended = true;
                continue;
            };
            let attempts = archive.attempts(&t.id).await.unwrap_or_default();
            for n in attempts {
                let Ok(Some(bytes)) = archive.read(&LogKey { build_id: t.id.clone(), attempt: n }).await else { continue };
                let (lines, _) = archive::lines(&bytes);
                let done = t.printed.entry(n).or_default();
                for line in lines.iter().skip(*done) {
                    if let Some(text) = readable(line) {
                        t.queue.push_back(Event::default().data(text));
                    }
                    if line.contains("\"type\":\"build_record\"") {
                        t.ended = true;
                    }
                }
                *done = (*done).max(lines.len());
            }
            if t.ended {
                t.queue.push_back(Event::default().event("end").data("ended"));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// One archived line as a person reads it (agent log lines are their text).
fn readable(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let attempt = v["attempt"].as_u64().map(|a| format!("[attempt {a}] ")).unwrap_or_default();
    Some(match v["type"].as_str()? {
        "log" => format!("{attempt}{} | {}", v["step"].as_str()?, v["line"].as_str()?),
        "step_start" => format!("{attempt}▶ {}", v["step"].as_str()?),
        "step_end" => format!("{attempt}■ {} exit {}", v["step"].as_str()?, v["exit_code"]),
        "controller" => format!("{attempt}{}: {}", v["phase"].as_str()?, v["detail"].as_str()?),
        "note" => v["message"].as_str()?.to_string(),
        "build" => format!("build {} at {}", v["build_id"].as_str()?, v["commit"].as_str()?),
        "attempt_ended" => format!("[attempt {}] ended: {}", v["attempt"]["attempt"], v["attempt"]["outcome"].as_str()?),
        "build_record" => format!("build ended: {}", v["record"]["result"].as_str()?),
        _ => return None,
    })
}

async fn report(State(d): State<Dashboard>) -> Response {
    let now = SystemTime::now();
    let since = now - RECENT;
    match d.ledger.list(since, now).await {
        Ok(entries) => Html(crate::ledger::html::render(&Report::new(&entries, since, now, GroupBy::Project))).into_response(),
        Err(e) => failed(e),
    }
}
