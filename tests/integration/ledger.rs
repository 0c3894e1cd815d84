//! The cost ledger and `spotbuild report`: the SQLite store on disk, the S3 store against
//! the emulator, snapshots of the table, CSV and JSON (times redacted), and the HTML page
//! opened in headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use spotbuild::ledger::sqlite::SqliteLedger;
use spotbuild::ledger::s3::S3Ledger;
use spotbuild::ledger::{BuildEntry, Interruption, LedgerStore};
use spotbuild::objects::s3::S3Store;
use spotbuild::objects::ObjectStore;

use crate::support::services::{runtime, s3_with_bucket, sdk_config, Moto};
use crate::support::{spotbuild, Run};

fn at(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}

fn attempt(n: u32, market: &str, price: f64, od: f64, start: &str, secs: u64, outcome: &str, phases: Value) -> Value {
    let end = humantime::format_rfc3339(at(start) + Duration::from_secs(secs)).to_string();
    json!({
        "attempt": n, "instance_id": format!("i-0fixture{n}{secs}"), "instance_type": if market == "spot" { "m7a.16xlarge" } else { "c7a.16xlarge" },
        "availability_zone": "us-east-1a", "market": market, "hourly_price": price, "on_demand_hourly": od,
        "spot_reference_hourly": if market == "on-demand" { Some(1.1) } else { None },
        "started_at": start, "ended_at": end, "outcome": outcome, "reason": null,
        "market_reason": if market == "on-demand" { Some("spot failed in every pool") } else { None },
        "seconds": phases
    })
}

/// Four builds over three days: spot successes, an interruption then a retry, and an
/// on-demand fallback.
fn fixture() -> Vec<BuildEntry> {
    let phases = json!({"launching": 20.0, "booting": 25.0, "connecting": 5.0, "shipping": 10.0, "running": 500.0, "building": 400.0, "testing": 90.0});
    let builds = vec![
        json!({"build_id": "b-fixture-1", "projects": ["api", "web"], "kind": "build", "commit": "c1", "branch": "main",
               "ci_job_url": "https://ci.example/job/1", "started_at": "2026-11-02T09:00:00Z", "ended_at": "2026-11-02T09:10:00Z",
               "result": "success", "attempts": [attempt(1, "spot", 1.2, 3.70944, "2026-11-02T09:00:00Z", 600, "success", phases.clone())]}),
        json!({"build_id": "b-fixture-2", "projects": ["web"], "kind": "build", "commit": "c2", "branch": "feature/x",
               "ci_job_url": null, "started_at": "2026-11-03T14:00:00Z", "ended_at": "2026-11-03T14:25:00Z",
               "result": "success", "attempts": [
                   attempt(1, "spot", 1.2, 3.70944, "2026-11-03T14:00:00Z", 700, "interrupted", phases.clone()),
                   attempt(2, "spot", 1.3, 3.70944, "2026-11-03T14:12:00Z", 780, "success", phases.clone())]}),
        json!({"build_id": "b-fixture-3", "projects": ["api"], "kind": "test", "commit": "c3", "branch": "main",
               "ci_job_url": null, "started_at": "2026-11-04T08:00:00Z", "ended_at": "2026-11-04T08:05:00Z",
               "result": "failed", "attempts": [attempt(1, "on-demand", 3.28448, 3.28448, "2026-11-04T08:00:00Z", 300, "failed", phases.clone())]}),
        json!({"build_id": "b-fixture-4", "projects": ["base", "api", "web"], "kind": "build", "commit": "c4", "branch": "main",
               "ci_job_url": null, "started_at": "2026-11-04T16:00:00Z", "ended_at": "2026-11-04T16:30:00Z",
               "result": "success", "attempts": [attempt(1, "spot", 1.25, 3.70944, "2026-11-04T16:00:00Z", 1800, "success", phases)]}),
    ];
    builds
        .into_iter()
        .map(|mut b| {
            b["schema"] = 1.into();
            b["region"] = "us-east-1".into();
            b["volume_gb"] = 200.into();
            serde_json::from_value(b).unwrap()
        })
        .collect()
}

fn fixture_ledger(dir: &Path) -> PathBuf {
    let path = dir.join("ledger.sqlite");
    runtime().block_on(async {
        let l = SqliteLedger::open(&path).unwrap();
        for e in fixture() {
            l.put(&e).await.unwrap();
        }
    });
    path
}

fn report(dir: &Path, ledger: &Path, args: &[&str]) -> Run {
    Run::of(
        spotbuild(dir)
            .args(["report", "--ledger"])
            .arg(ledger)
            .args(["--since", "2026-11-01", "--until", "2026-11-08"])
            .args(args),
    )
}

fn redact(text: &str) -> String {
    let times = regex::Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z").unwrap();
    times.replace_all(text, "<time>").into_owned()
}

/// Compares with `tests/snapshots/NAME`; `UPDATE_SNAPSHOTS=1` rewrites it.
fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(name);
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no snapshot {} (run with UPDATE_SNAPSHOTS=1 to create it)", path.display()));
    assert!(expected == actual, "{name} changed (UPDATE_SNAPSHOTS=1 accepts it):\n--- expected\n{expected}\n--- actual\n{actual}");
}

#[test]
fn the_report_as_a_table_csv_and_json_matches_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = fixture_ledger(dir.path());
    for (format, by, name) in [
        ("table", "project", "report-by-project.txt"),
        ("table", "day", "report-by-day.txt"),
        ("table", "market", "report-by-market.txt"),
        ("csv", "instance-type", "report-by-instance-type.csv"),
        ("json", "project", "report.json"),
    ] {
        let run = report(dir.path(), &ledger, &["--format", format, "--by", by]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        snapshot(name, &redact(&run.stdout));
    }
    // The arithmetic behind the snapshots, checked independently.
    let run = report(dir.path(), &ledger, &["--format", "json"]);
    let t = &run.json()["totals"];
    assert_eq!(t["builds"], 4);
    assert_eq!(t["attempts"], 5);
    assert_eq!(t["wasted_attempts"], 1);
    // The interrupted attempt (700 s, EC2's doing, first hour) paid only its volume.
    let volume = 200.0 * 0.08 * 700.0 / (30.0 * 86400.0);
    assert!((t["interruption_waste"].as_f64().unwrap() - volume).abs() < 1e-6, "{t}");
    // Fallback: (3.28448 - 1.1) per hour for 300 s.
    assert!((t["fallback_premium"].as_f64().unwrap() - (3.28448 - 1.1) * 300.0 / 3600.0).abs() < 1e-6);
    assert_eq!(t["p50_build_seconds"], 600.0);
    assert_eq!(t["p95_build_seconds"], 1800.0);
}

#[test]
fn report_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Run::of(spotbuild(dir.path()).args(["report", "--ledger"]).arg(dir.path().join("none.sqlite")));
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(missing.stderr.contains("no ledger at") && missing.stderr.contains("hint:"), "{}", missing.stderr);
    let bad = Run::of(spotbuild(dir.path()).args(["report", "--ledger", "gs://bucket/x"]));
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("not a ledger location"), "{}", bad.stderr);
    let ledger = fixture_ledger(dir.path());
    let backwards = report(dir.path(), &ledger, &["--until", "2026-10-01"]);
    assert_eq!(backwards.code, 2);
    let when = Run::of(spotbuild(dir.path()).args(["report", "--since", "last tuesday", "--ledger"]).arg(&ledger));
    assert_eq!(when.code, 2);
    assert!(when.stderr.contains("--since"), "{}", when.stderr);
    // An empty period is not an error.
    let empty = Run::of(spotbuild(dir.path()).args(["report", "--since", "2020-01-01", "--until", "2020-02-01", "--ledger"]).arg(&ledger));
    assert_eq!(empty.code, 0);
    assert!(empty.stdout.contains("no builds in this period"));
}

#[test]
fn the_sqlite_ledger_keeps_entries_on_disk_and_rewrites_a_build_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/ledger.sqlite");
    runtime().block_on(async {
        let l = SqliteLedger::open(&path).unwrap();
        let mut entries = fixture();
        for e in &entries {
            l.put(e).await.unwrap();
        }
        entries[0].result = "failed".into();
        l.put(&entries[0]).await.unwrap();
        l.record_interruption(&Interruption {
            at: "2026-11-03T14:11:40Z".into(),
            build_id: "b-fixture-2".into(),
            attempt: 1,
            instance_type: Some("m7a.16xlarge".into()),
            availability_zone: Some("us-east-1a".into()),
        })
        .await
        .unwrap();
    });
    // Another process (a later CI job) opens the same file.
    runtime().block_on(async {
        let l = SqliteLedger::open(&path).unwrap();
        let all = l.list(at("2026-11-01T00:00:00Z"), at("2026-11-08T00:00:00Z")).await.unwrap();
        assert_eq!(all.len(), 4, "a rewrite is not a second entry");
        assert_eq!(all[0].result, "failed");
        let ids: Vec<&str> = all.iter().map(|e| e.build_id.as_str()).collect();
        assert_eq!(ids, ["b-fixture-1", "b-fixture-2", "b-fixture-3", "b-fixture-4"], "ordered by start");
        let day = l.list(at("2026-11-04T00:00:00Z"), at("2026-11-04T12:00:00Z")).await.unwrap();
        assert_eq!(day.len(), 1);
        let i = l.interruptions(at("2026-11-03T00:00:00Z")).await.unwrap();
        assert_eq!(i, vec![at("2026-11-03T14:11:40Z")]);
        assert!(l.interruptions(at("2026-11-04T00:00:00Z")).await.unwrap().is_empty());
    });
}

#[test]
fn the_s3_ledger_writes_one_object_per_build_under_its_day() {
    let moto = Moto::start();
    runtime().block_on(async {
        let config = sdk_config(&moto.endpoint()).await;
        let s3 = s3_with_bucket(&config, "acme-ci").await;
        let objects = std::sync::Arc::new(S3Store::new(s3, "acme-ci"));
        let l = S3Ledger::new(objects.clone(), "spotbuild/ledger");
        for e in fixture() {
            l.put(&e).await.unwrap();
            l.put(&e).await.unwrap();
        }
        let keys = objects.list("spotbuild/ledger/builds/", None).await.unwrap();
        assert_eq!(
            keys,
            [
                "spotbuild/ledger/builds/2026/11/02/b-fixture-1.json",
                "spotbuild/ledger/builds/2026/11/03/b-fixture-2.json",
                "spotbuild/ledger/builds/2026/11/04/b-fixture-3.json",
                "spotbuild/ledger/builds/2026/11/04/b-fixture-4.json"
            ],
            "idempotent: one object per build, under the day it started"
        );
        let got = l.list(at("2026-11-03T00:00:00Z"), at("2026-11-05T00:00:00Z")).await.unwrap();
        assert_eq!(got.iter().map(|e| e.build_id.as_str()).collect::<Vec<_>>(), ["b-fixture-2", "b-fixture-3", "b-fixture-4"]);
        assert_eq!(got, fixture()[1..].to_vec(), "entries come back whole");
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        l.record_interruption(&Interruption {
            at: now.clone(),
            build_id: "b-live".into(),
            attempt: 1,
            instance_type: None,
            availability_zone: None,
        })
        .await
        .unwrap();
        let seen = l.interruptions(SystemTime::now() - Duration::from_secs(3600)).await.unwrap();
        assert_eq!(seen, vec![humantime::parse_rfc3339(&now).unwrap()]);
    });
    // The same ledger read by the CLI, as another CI job would.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("spotbuild.toml");
    std::fs::write(&cfg, format!("[cloud]\nregion = \"us-east-1\"\n[ledger]\nendpoint = \"{}\"\n", moto.endpoint())).unwrap();
    let run = Run::of(
        spotbuild(dir.path())
            .arg("--config")
            .arg(&cfg)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .args(["report", "--ledger", "s3://acme-ci/spotbuild/ledger", "--since", "2026-11-01", "--until", "2026-11-08", "--format", "json"]),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["totals"]["builds"], 4);
}

fn chromium() -> PathBuf {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).is_file() {
            return c.into();
        }
    }
    panic!("chromium not found: install Debian's `chromium` package (`make test` does)");
}

/// Runs headless Chromium on a local file with every host name unresolvable, so the page
/// (and the browser) can reach nothing.
fn headless(dir: &Path, page: &Path, args: &[&str]) -> std::process::Output {
    headless_at(dir, &format!("file://{}", page.display()), args)
}

/// The same on `url` (a page this test serves on loopback: an address, not a name).
pub(crate) fn headless_at(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            // Nothing resolves but loopback (the pages a test serves itself).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1700",
        ])
        .arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs")
}

/// Pixels of exactly `rgb` in a PNG.
pub(crate) fn count_colour(png_path: &Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    buf[..info.buffer_size()].chunks(step).filter(|p| p[..3] == rgb).count()
}

pub(crate) fn hex(c: &str) -> [u8; 3] {
    let v = u32::from_str_radix(c.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

#[test]
fn the_html_report_renders_in_headless_chromium_with_its_charts() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = fixture_ledger(dir.path());
    // The failed build's log is archived beside the ledger: its failing step's end shows.
    runtime().block_on(async {
        use spotbuild::ledger::archive::{frame, LogKey};
        let l = SqliteLedger::open(&ledger).unwrap();
        let archive = l.archive().unwrap();
        let key = LogKey { build_id: "b-fixture-3".into(), attempt: 1 };
        let mut lines = String::new();
        for i in 0..30 {
            lines.push_str(&format!("{}\n", json!({"type": "log", "step": "api:test:unit", "stream": "stdout", "line": format!("case {i} <ok>"), "attempt": 1})));
        }
        lines.push_str(&format!("{}\n", json!({"type": "step_end", "step": "api:test:unit", "exit_code": 3, "duration_ms": 5, "attempt": 1})));
        archive.append(&key, frame(lines.as_bytes())).await.unwrap();
        let mut failed = fixture().into_iter().find(|e| e.build_id == "b-fixture-3").unwrap();
        failed.log = Some(format!("{}/logs/unknown/b-fixture-3/", dir.path().display()));
        l.put(&failed).await.unwrap();
    });
    let page = dir.path().join("report.html");
    let run = report(dir.path(), &ledger, &["--format", "html", "-o", page.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("api:test:unit failed (exit 3)") && html.contains("case 29 &lt;ok&gt;") && !html.contains("case 9 "), "the last 20 lines");
    assert!(html.contains("class=\"log\" href=\"file://"), "a link to the log");
    assert!(!html.contains("http://") && !html.contains("src=\""), "self-contained: no external assets");
    assert!(html.contains("<svg") && html.contains("@media print"));

    // The script ran to its end (it marks the body), with no console error.
    let dom = headless(dir.path(), &page, &["--dump-dom"]);
    let stdout = String::from_utf8_lossy(&dom.stdout);
    let stderr = String::from_utf8_lossy(&dom.stderr);
    assert!(stdout.contains("data-ready=\"1\""), "the page's script did not finish:\n{stderr}");
    for bad in ["Uncaught", "CONSOLE(", "ERROR:CONSOLE"] {
        assert!(!stderr.lines().any(|l| l.contains(bad) && !l.contains("dbus")), "console error ({bad}):\n{stderr}");
    }

    // The charts draw the data: each project's colour, the spot and on-demand split, and
    // the savings bars are on the screenshot.
    let shot = dir.path().join("report.png");
    let out = headless(dir.path(), &page, &[&format!("--screenshot={}", shot.display())]);
    assert!(shot.is_file(), "no screenshot:\n{}", String::from_utf8_lossy(&out.stderr));
    // To look at it: SPOTBUILD_TEST_KEEP_SCREENSHOT=/tmp/report.png
    if let Ok(keep) = std::env::var("SPOTBUILD_TEST_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    let palette = spotbuild::ledger::html::PALETTE;
    for (name, colour, at_least) in [
        ("api (first project)", palette[0], 300),
        ("base", palette[1], 100),
        ("web", palette[2], 300),
        ("spot share", spotbuild::ledger::html::SPOT_COLOUR, 2000),
        ("on-demand share", spotbuild::ledger::html::ON_DEMAND_COLOUR, 200),
        ("savings", spotbuild::ledger::html::SAVINGS_COLOUR, 300),
    ] {
        let n = count_colour(&shot, hex(colour));
        assert!(n >= at_least, "{name} ({colour}): {n} pixels on the screenshot, expected at least {at_least}");
    }
}
