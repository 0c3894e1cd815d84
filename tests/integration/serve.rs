//! `spotbuild serve` against a local farm build: the running page shows it in progress,
//! then finished; its page's log arrives live over server-sent events; the pages load in
//! headless Chromium without a console error; the cost report's charts draw. And the
//! token a non-loopback address needs.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::farm::{farm_repo, PASSING_TEST};
use crate::ledger::{count_colour, headless_at, hex};
use crate::support::docker::docker_required;
use crate::support::farm::LocalFarm;
use crate::support::services::{free_port, runtime, ChildGuard};
use crate::support::Run;

/// (status, body); (0, why) while nothing listens yet.
fn get(url: &str) -> (u16, String) {
    runtime().block_on(async {
        match reqwest::get(url).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    })
}

/// Polls `url` until `ok` holds of its body.
fn wait_for(url: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = get(url);
        if status == 200 && ok(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{url} never showed what was waited for:\n{body}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn console_errors(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| ["Uncaught", "CONSOLE(", "ERROR:CONSOLE"].iter().any(|b| l.contains(b)) && !l.contains("dbus")).collect()
}

#[test]
fn the_dashboard_shows_a_farm_build_running_then_finished_with_its_live_log() {
    docker_required();
    let farm = LocalFarm::start();
    // web's RUN keeps the build running long enough to be seen.
    let repo = farm_repo(Some(r#"["/bin/busybox", "sleep", "6"]"#), PASSING_TEST);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut serve = farm.spotbuild(repo.path());
    serve.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    // The ledger file appears with the first build; serve wants it to exist.
    let ledger = farm.dir.path().join("ledger.sqlite");

    let mut build = farm.spotbuild(repo.path()).args(["build", "--all", "--json"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut out = BufReader::new(build.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let build_id = serde_json::from_str::<Value>(&first).unwrap()["build_id"].as_str().unwrap().to_string();
    let drained = std::thread::spawn(move || out.lines().map_while(Result::ok).count());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ledger.exists() {
        assert!(Instant::now() < deadline, "no ledger at {}", ledger.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    let _server = ChildGuard::spawn(serve).unwrap();
    wait_for(&format!("{base}/builds"), Duration::from_secs(20), |_| true);

    // Running: the build is listed with its phase and what it costs so far.
    let running = wait_for(&format!("{base}/"), Duration::from_secs(60), |b| b.contains(&format!("data-build=\"{build_id}\"")));
    assert!(running.contains("cost so far") && running.contains("class=\"running\""), "{running}");
    let dir = tempfile::tempdir().unwrap();
    let dom = headless_at(dir.path(), &format!("{base}/"), &["--dump-dom"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&dom.stdout), String::from_utf8_lossy(&dom.stderr));
    assert!(stdout.contains(&build_id), "the running page in Chromium:\n{stdout}\n{stderr}");
    assert!(console_errors(&stderr).is_empty(), "{stderr}");

    // Its log, live: lines arrive while it runs, and the stream ends with the build.
    let events_url = format!("{base}/builds/{build_id}/events");
    let live = std::thread::spawn(move || {
        runtime().block_on(async {
            use futures::StreamExt;
            let resp = reqwest::get(&events_url).await.unwrap();
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            let mut body = resp.bytes_stream();
            let (mut text, mut first_line_at) = (String::new(), None);
            let started = Instant::now();
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                if first_line_at.is_none() && text.contains("data: ") {
                    first_line_at = Some(started.elapsed());
                }
                if text.contains("event: end") {
                    break;
                }
            }
            (text, first_line_at, started.elapsed())
        })
    });
    let status = crate::farm::wait_child(&mut build, Duration::from_secs(180));
    assert_eq!(status, Some(0));
    assert!(drained.join().unwrap() > 10);
    let (text, first_line_at, ended_at) = live.join().unwrap();
    assert!(text.contains("web:build") && text.contains("event: end"), "{text}");
    assert!(first_line_at.unwrap() < ended_at, "lines came before the end");

    // Finished: no longer running, listed as a success, its page shows the whole log.
    let idle = wait_for(&format!("{base}/"), Duration::from_secs(30), |b| !b.contains(&format!("data-build=\"{build_id}\"")));
    assert!(idle.contains("No build is running"), "{idle}");
    let (_, recent) = get(&format!("{base}/builds?result=success"));
    assert!(recent.contains(&format!("data-build=\"{build_id}\"")) && recent.contains("class=\"success\""), "{recent}");
    let dom = headless_at(dir.path(), &format!("{base}/builds"), &["--dump-dom"]);
    let stdout = String::from_utf8_lossy(&dom.stdout);
    assert!(stdout.contains(&format!("data-build=\"{build_id}\"")) && stdout.contains("class=\"success\""), "finished, in Chromium:\n{stdout}");
    assert!(console_errors(&String::from_utf8_lossy(&dom.stderr)).is_empty());
    let (_, none) = get(&format!("{base}/builds?result=failed"));
    assert!(!none.contains(&build_id), "filters filter");
    let page = headless_at(dir.path(), &format!("{base}/builds/{build_id}"), &["--dump-dom", "--virtual-time-budget=10000"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&page.stdout), String::from_utf8_lossy(&page.stderr));
    assert!(stdout.contains("data-ready=\"1\""), "the build page's script ran:\n{stderr}");
    assert!(stdout.contains("web:build"), "the log reached the page:\n{stdout}");
    assert!(console_errors(&stderr).is_empty(), "{stderr}");

    // The cost report's charts draw (a screenshot, as the report's own test checks).
    let shot = dir.path().join("report.png");
    let out = headless_at(dir.path(), &format!("{base}/report"), &[&format!("--screenshot={}", shot.display())]);
    assert!(shot.is_file(), "no screenshot:\n{}", String::from_utf8_lossy(&out.stderr));
    let n = count_colour(&shot, hex(spotbuild::ledger::html::SPOT_COLOUR));
    assert!(n >= 200, "the spot share is drawn: {n} pixels");
    farm.assert_nothing_left();
}

#[test]
fn serving_beyond_loopback_needs_a_token_and_every_request_carries_it() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.sqlite");
    runtime().block_on(async {
        spotbuild::ledger::sqlite::SqliteLedger::open(&ledger).unwrap();
    });
    // Refused before anything listens.
    let mut cmd = crate::support::spotbuild(dir.path());
    let refused = Run::of(cmd.args(["serve", "--listen", "0.0.0.0:0", "--ledger"]).arg(&ledger).env_remove("SPOTBUILD_SERVE_TOKEN"));
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("SPOTBUILD_SERVE_TOKEN"), "{}", refused.stderr);

    // The dashboard itself, with a token, on loopback.
    let rt = runtime();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let store: std::sync::Arc<dyn spotbuild::ledger::LedgerStore> = std::sync::Arc::new(spotbuild::ledger::sqlite::SqliteLedger::open(&ledger).unwrap());
    let dashboard = spotbuild::serve::Dashboard { archive: store.archive(), ledger: store, token: Some("s3cr3t".into()) };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(spotbuild::serve::serve(listener, dashboard, async { let _ = stopped.await; }));
    rt.block_on(async {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let url = format!("http://{addr}/");
        assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
        assert_eq!(http.get(format!("{url}?token=wrong")).send().await.unwrap().status(), 401);
        let with_query = http.get(format!("{url}?token=s3cr3t")).send().await.unwrap();
        assert_eq!(with_query.status(), 200);
        let cookie = with_query.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
        assert_eq!(http.get(format!("http://{addr}/builds")).header("cookie", cookie).send().await.unwrap().status(), 200);
        assert_eq!(http.get(&url).bearer_auth("s3cr3t").send().await.unwrap().status(), 200);
    });
    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
    assert!(spotbuild::serve::needs_token(&"10.0.0.1:80".parse().unwrap()) && !spotbuild::serve::needs_token(&"127.0.0.1:80".parse().unwrap()));
}
