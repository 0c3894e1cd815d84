//! The HTML report: one self-contained file (no external assets, no network) with SVG
//! charts of cost per day stacked by project, the spot/on-demand split and savings per
//! day, the totals, and a sortable table of builds. It prints cleanly.

use std::fmt::Write as _;

use super::report::{duration, usd, Report};

/// Colours for projects, in order; the charts' legend names them.
pub const PALETTE: &[&str] = &["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
pub const SPOT_COLOUR: &str = "#2e7d32";
pub const ON_DEMAND_COLOUR: &str = "#c62828";
pub const SAVINGS_COLOUR: &str = "#1565c0";

/// `s` made safe as HTML text and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

pub fn render(r: &Report) -> String {
    let t = &r.totals;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>spotbuild cost report {since} to {until}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.4em; margin-bottom: 0.2em; }}
.sub {{ color: #666; margin-top: 0; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 10em; }}
.card b {{ display: block; font-size: 1.3em; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 2em; }}
figure {{ margin: 0; break-inside: avoid; }}
figcaption {{ font-weight: 600; margin-bottom: 0.3em; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: left; }}
td.n, th.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
th {{ cursor: pointer; user-select: none; background: #f6f6f6; }}
th[aria-sort=ascending]::after {{ content: " ▲"; }}
th[aria-sort=descending]::after {{ content: " ▼"; }}
tr.failed pre {{ margin: 0.3em 0; max-height: 20em; overflow: auto; background: #fff5f5; padding: 0.4em; font-size: 12px; }}
tr.failed summary {{ color: #b00; cursor: pointer; }}
a.log {{ font-size: 0.85em; margin-left: 0.3em; }}
.legend span {{ display: inline-block; margin-right: 1em; }}
.legend i {{ display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; }}
@media print {{ body {{ margin: 0.5cm; }} th {{ cursor: auto; }} th::after {{ content: "" !important; }} .cards, .charts {{ break-inside: avoid; }} }}
</style></head><body>
<h1>spotbuild cost report</h1>
<p class="sub">{since} to {until} (UTC) · {builds} builds · {attempts} attempts</p>
"#,
        since = esc(&r.since),
        until = esc(&r.until),
        builds = t.builds,
        attempts = t.attempts
    );
    let cards = [
        ("cost", usd(t.cost)),
        ("per build", usd(t.cost_per_build)),
        ("saved by spot", format!("{} ({:.0}%)", usd(t.savings), t.savings_share * 100.0)),
        ("at spot prices", format!("{:.0}%", t.spot_share * 100.0)),
        ("on-demand fallback extra", usd(t.fallback_premium)),
        ("interruption waste", usd(t.interruption_waste)),
        ("boot overhead", usd(t.boot_overhead)),
        ("build p50 / p95", format!("{} / {}", duration(t.p50_build_seconds), duration(t.p95_build_seconds))),
    ];
    h.push_str("<div class=\"cards\">");
    for (label, value) in cards {
        let _ = write!(h, "<div class=\"card\">{}<b>{}</b></div>", esc(label), esc(&value));
    }
    h.push_str("</div>\n<div class=\"charts\">\n");
    h.push_str(&cost_per_day(r));
    h.push_str(&market_split(r));
    h.push_str(&savings_per_day(r));
    h.push_str("</div>\n");
    h.push_str(&builds_table(r));
    h.push_str(SORT_SCRIPT);
    h.push_str("</body></html>\n");
    h
}

/// Projects in a stable order, each with its colour.
fn project_colours(r: &Report) -> Vec<(String, &'static str)> {
    let mut names: Vec<String> = r.days.iter().flat_map(|d| d.by_project.keys().cloned()).collect();
    names.sort();
    names.dedup();
    names.into_iter().enumerate().map(|(i, n)| (n, PALETTE[i % PALETTE.len()])).collect()
}

const W: f64 = 520.0;
const H: f64 = 220.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 30.0;

/// The y axis with a few gridlines, for a chart whose top is `max`.
fn axis(svg: &mut String, max: f64) {
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = H - BOTTOM - (H - BOTTOM - 10.0) * i as f64 / 4.0;
        let _ = write!(svg, r##"<line x1="{LEFT}" x2="{W}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#555">{}</text>"##, LEFT - 4.0, y + 3.0, esc(&usd(v)));
    }
}

/// A chart with one column per day: the axis up to `max`, the day labels, and `column`
/// drawing each day's bars at `x` with width `bar`. The `</svg>` is left to the caller.
fn per_day_chart(r: &Report, id: &str, caption: &str, max: f64, column: impl Fn(&mut String, &super::report::Day, f64, f64)) -> String {
    let max = max.max(1e-9);
    let slot = (W - LEFT) / r.days.len().max(1) as f64;
    let bar = (slot * 0.7).min(40.0);
    let mut svg = format!(
        r#"<figure id="{id}"><figcaption>{}</figcaption><svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{}">"#,
        esc(caption),
        esc(caption)
    );
    axis(&mut svg, max);
    for (i, d) in r.days.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        // Many days: label about eight of them.
        if r.days.len() <= 16 || i % (r.days.len() / 8).max(1) == 0 {
            let _ = write!(svg, r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#555">{}</text>"##, x + bar / 2.0, H - BOTTOM + 14.0, esc(d.day.get(5..).unwrap_or(&d.day)));
        }
        column(&mut svg, d, x, bar);
    }
    svg
}

/// The height of `v` on a chart whose top is `max`.
fn height(v: f64, max: f64) -> f64 {
    (H - BOTTOM - 10.0) * v / max.max(1e-9)
}

fn cost_per_day(r: &Report) -> String {
    let colours = project_colours(r);
    let max = r.days.iter().map(|d| d.by_project.values().sum::<f64>()).fold(0.0, f64::max);
    let mut svg = per_day_chart(r, "cost-per-day", "Cost per day, by project", max, |svg, d, x, bar| {
        let mut y = H - BOTTOM;
        for (name, colour) in &colours {
            let v = d.by_project.get(name).copied().unwrap_or(0.0);
            if v <= 0.0 {
                continue;
            }
            let h = height(v, max);
            y -= h;
            let _ = write!(svg, r#"<rect x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}" fill="{colour}"><title>{} {}: {}</title></rect>"#, esc(&d.day), esc(name), esc(&usd(v)));
        }
    });
    svg.push_str("</svg><div class=\"legend\">");
    for (name, colour) in &colours {
        let _ = write!(svg, r#"<span><i style="background:{colour}"></i>{}</span>"#, esc(name));
    }
    svg.push_str("</div></figure>\n");
    svg
}

fn market_split(r: &Report) -> String {
    let t = &r.totals;
    let total = (t.spot_cost + t.on_demand_cost).max(1e-9);
    let width = 300.0;
    let spot_w = width * t.spot_cost / total;
    let mut svg = format!(r#"<figure id="market-split"><figcaption>Spot and on-demand share of cost</figcaption><svg width="{width}" height="70" viewBox="0 0 {width} 70" role="img" aria-label="spot and on-demand share">"#);
    let _ = write!(svg, r#"<rect x="0" y="10" width="{spot_w:.1}" height="30" fill="{SPOT_COLOUR}"><title>spot: {}</title></rect>"#, esc(&usd(t.spot_cost)));
    let _ = write!(svg, r#"<rect x="{spot_w:.1}" y="10" width="{:.1}" height="30" fill="{ON_DEMAND_COLOUR}"><title>on-demand: {}</title></rect>"#, width - spot_w, esc(&usd(t.on_demand_cost)));
    let _ = write!(svg, r##"<text x="0" y="58" font-size="11" fill="#333">spot {:.0}% · on-demand {:.0}%</text>"##, t.spot_cost / total * 100.0, t.on_demand_cost / total * 100.0);
    svg.push_str("</svg></figure>\n");
    svg
}

fn savings_per_day(r: &Report) -> String {
    let max = r.days.iter().map(|d| d.savings).fold(0.0, f64::max);
    let mut svg = per_day_chart(r, "savings", "Saved by spot, per day (against the same hours on demand)", max, |svg, d, x, bar| {
        if d.savings > 0.0 {
            let h = height(d.savings, max);
            let _ = write!(svg, r#"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{SAVINGS_COLOUR}"><title>{}: {}</title></rect>"#, H - BOTTOM - h, esc(&d.day), esc(&usd(d.savings)));
        }
    });
    svg.push_str("</svg></figure>\n");
    svg
}

fn builds_table(r: &Report) -> String {
    let mut h = String::from(
        "<h2>Builds</h2>\n<table id=\"builds\"><thead><tr><th>started (UTC)</th><th>build</th><th>projects</th><th>kind</th><th>branch</th><th>result</th><th class=\"n\">attempts</th><th>markets</th><th class=\"n\">duration</th><th class=\"n\">cost</th><th class=\"n\">saved</th></tr></thead><tbody>\n",
    );
    for b in &r.builds {
        let mut id = match &b.ci_job_url {
            Some(url) if url.starts_with("https://") || url.starts_with("http://") => format!("<a href=\"{}\">{}</a>", esc(url), esc(&b.build_id)),
            _ => esc(&b.build_id),
        };
        // The archived log: a link when it is a folder here, else where it is (read it
        // with `spotbuild logs`).
        if let Some(log) = &b.log {
            let href = if log.starts_with('/') { format!("file://{log}") } else { log.clone() };
            let _ = write!(id, " <a class=\"log\" href=\"{}\" title=\"spotbuild logs {}\">log</a>", esc(&href), esc(&b.build_id));
        }
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\" data-v=\"{:.3}\">{}</td><td class=\"n\" data-v=\"{:.6}\">{}</td><td class=\"n\" data-v=\"{:.6}\">{}</td></tr>",
            esc(b.started_at.get(..19).unwrap_or(&b.started_at)),
            esc(&b.projects.join(", ")),
            esc(&b.kind),
            esc(b.branch.as_deref().unwrap_or("")),
            esc(&b.result),
            b.attempts,
            esc(&b.markets.join(", ")),
            b.duration_seconds,
            esc(&duration(b.duration_seconds)),
            b.cost,
            esc(&usd(b.cost)),
            b.savings,
            esc(&usd(b.savings)),
        );
        for f in &b.failed_steps {
            let _ = writeln!(
                h,
                "<tr class=\"failed\"><td></td><td colspan=\"10\"><details open><summary>{} failed (exit {})</summary><pre>{}</pre></details></td></tr>",
                esc(&f.step),
                f.exit_code,
                esc(&f.last_lines.join("\n")),
            );
        }
    }
    h.push_str("</tbody></table>\n");
    h
}

/// Click a header to sort by it; numbers sort by value (`data-v`), the rest as text.
const SORT_SCRIPT: &str = r#"<script>
(function () {
  var table = document.getElementById("builds");
  var heads = table.tHead.rows[0].cells;
  function key(row, i) {
    var c = row.cells[i];
    return c.hasAttribute("data-v") ? parseFloat(c.getAttribute("data-v")) : c.textContent;
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      // A build's failed-step rows move with it.
      var groups = [];
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        if (r.className === "failed" && groups.length) { groups[groups.length - 1].push(r); } else { groups.push([r]); }
      });
      groups.sort(function (a, b) {
        var x = key(a[0], i), y = key(b[0], i);
        var d = (typeof x === "number") ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      groups.forEach(function (g) { g.forEach(function (r) { table.tBodies[0].appendChild(r); }); });
    });
  });
  document.body.setAttribute("data-ready", "1");
})();
</script>
"#;
