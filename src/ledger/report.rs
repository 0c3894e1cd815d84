//! `spotbuild report`: totals, savings and waste over a period, grouped one way, computed
//! from ledger entries as a pure function, and rendered as a table, CSV or JSON (the HTML
//! page is `ledger::html`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use super::cost::{self, AttemptCost};
use super::BuildEntry;
use crate::cloud::Market;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GroupBy {
    Project,
    Day,
    InstanceType,
    Market,
    /// The machines' architecture (x86_64, arm64).
    Arch,
}

impl GroupBy {
    fn label(self) -> &'static str {
        match self {
            GroupBy::Project => "project",
            GroupBy::Day => "day",
            GroupBy::InstanceType => "instance type",
            GroupBy::Market => "market",
            GroupBy::Arch => "architecture",
        }
    }
}

/// USD unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub builds: usize,
    pub attempts: usize,
    pub cost: f64,
    pub spot_cost: f64,
    pub on_demand_cost: f64,
    /// The same instance-seconds had everything run on demand.
    pub on_demand_equivalent: f64,
    pub savings: f64,
    /// Savings as a share of the on-demand equivalent (0..1).
    pub savings_share: f64,
    /// Share of cost paid at spot prices (0..1).
    pub spot_share: f64,
    pub fallback_premium: f64,
    pub interruption_waste: f64,
    /// Attempts that were interrupted or lost.
    pub wasted_attempts: usize,
    pub boot_overhead: f64,
    pub cost_per_build: f64,
    pub p50_build_seconds: f64,
    pub p95_build_seconds: f64,
    pub instance_hours: f64,
    /// Attempts without a known price (counted as 0).
    pub unpriced_attempts: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub key: String,
    pub builds: usize,
    pub attempts: usize,
    pub cost: f64,
    pub spot_cost: f64,
    pub on_demand_cost: f64,
    pub savings: f64,
    pub waste: f64,
    pub instance_hours: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildRow {
    pub build_id: String,
    pub started_at: String,
    pub projects: Vec<String>,
    pub kind: String,
    pub branch: Option<String>,
    pub result: String,
    pub attempts: usize,
    pub markets: Vec<String>,
    pub duration_seconds: f64,
    pub cost: f64,
    pub savings: f64,
    pub ci_job_url: Option<String>,
    /// The folder of its archived logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Its failed steps' last lines, read from the archive (filled by whoever has it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_steps: Vec<super::archive::FailedStep>,
}

/// One UTC day, for the charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Day {
    pub day: String,
    pub by_project: BTreeMap<String, f64>,
    pub spot_cost: f64,
    pub on_demand_cost: f64,
    pub savings: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    pub by: GroupBy,
    pub totals: Totals,
    pub rows: Vec<Row>,
    pub builds: Vec<BuildRow>,
    pub days: Vec<Day>,
}

fn utc_day(ts: &str) -> String {
    ts.get(..10).unwrap_or(ts).to_string()
}

/// Adds `v` to the spot or the on-demand figure, by the attempt's market.
fn add_by_market(market: Option<Market>, v: f64, spot: &mut f64, on_demand: &mut f64) {
    match market {
        Some(Market::Spot) => *spot += v,
        Some(Market::OnDemand) => *on_demand += v,
        None => {}
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Report {
    pub fn new(entries: &[BuildEntry], since: SystemTime, until: SystemTime, by: GroupBy) -> Report {
        let mut t = Totals::default();
        let mut rows: BTreeMap<String, (Row, BTreeSet<String>)> = BTreeMap::new();
        let mut days: BTreeMap<String, Day> = BTreeMap::new();
        let mut builds = Vec::new();
        let mut durations = Vec::new();
        for b in entries {
            t.builds += 1;
            durations.push(b.duration_seconds());
            let projects = if b.projects.is_empty() { vec!["(none)".to_string()] } else { b.projects.clone() };
            let mut build_cost = 0.0;
            let mut build_savings = 0.0;
            let mut markets = BTreeSet::new();
            for a in &b.attempts {
                let c: AttemptCost = cost::attempt_cost(a, b.volume_gb);
                t.attempts += 1;
                t.cost += c.total;
                add_by_market(a.rental.market, c.total, &mut t.spot_cost, &mut t.on_demand_cost);
                if let Some(m) = a.rental.market {
                    markets.insert(m.to_string());
                }
                // Without a price paid there is nothing to compare: count it as it is.
                t.on_demand_equivalent += if c.priced { c.on_demand_equivalent.unwrap_or(c.total) } else { c.total };
                t.savings += c.savings;
                t.fallback_premium += c.fallback_premium;
                t.interruption_waste += c.wasted;
                if matches!(a.outcome.as_str(), "interrupted" | "lost") {
                    t.wasted_attempts += 1;
                }
                t.boot_overhead += c.overhead;
                let hours = if a.rental.instance_id.is_some() { a.instance_seconds() / 3600.0 } else { 0.0 };
                t.instance_hours += hours;
                if a.rental.instance_id.is_some() && !c.priced {
                    t.unpriced_attempts += 1;
                }
                build_cost += c.total;
                build_savings += c.savings;

                // A build's cost is shared equally among its projects.
                let keys: Vec<(String, f64)> = match by {
                    GroupBy::Project => projects.iter().map(|p| (p.clone(), 1.0 / projects.len() as f64)).collect(),
                    GroupBy::Day => vec![(utc_day(&a.started_at), 1.0)],
                    GroupBy::InstanceType => vec![(a.rental.instance_type.clone().unwrap_or_else(|| "(none)".into()), 1.0)],
                    GroupBy::Market => vec![(a.rental.market.map(|m| m.to_string()).unwrap_or_else(|| "(none)".into()), 1.0)],
                    GroupBy::Arch => vec![(b.arch.to_string(), 1.0)],
                };
                for (key, share) in keys {
                    let (row, seen) = rows.entry(key.clone()).or_insert_with(|| (Row { key, ..Default::default() }, BTreeSet::new()));
                    seen.insert(b.build_id.clone());
                    row.attempts += 1;
                    row.cost += c.total * share;
                    add_by_market(a.rental.market, c.total * share, &mut row.spot_cost, &mut row.on_demand_cost);
                    row.savings += c.savings * share;
                    row.waste += c.wasted * share;
                    row.instance_hours += hours * share;
                }

                let day = days.entry(utc_day(&a.started_at)).or_insert_with(|| Day {
                    day: utc_day(&a.started_at),
                    ..Default::default()
                });
                for p in &projects {
                    *day.by_project.entry(p.clone()).or_default() += c.total / projects.len() as f64;
                }
                add_by_market(a.rental.market, c.total, &mut day.spot_cost, &mut day.on_demand_cost);
                day.savings += c.savings;
            }
            builds.push(BuildRow {
                build_id: b.build_id.clone(),
                started_at: b.started_at.clone(),
                projects: b.projects.clone(),
                kind: b.kind.clone(),
                branch: b.branch.clone(),
                result: b.result.clone(),
                attempts: b.attempts.len(),
                markets: markets.into_iter().collect(),
                duration_seconds: b.duration_seconds(),
                cost: build_cost,
                savings: build_savings,
                ci_job_url: b.ci_job_url.clone(),
                log: b.log.clone(),
                failed_steps: Vec::new(),
            });
        }
        durations.sort_by(|a, b| a.total_cmp(b));
        t.p50_build_seconds = percentile(&durations, 0.50);
        t.p95_build_seconds = percentile(&durations, 0.95);
        if t.builds > 0 {
            t.cost_per_build = t.cost / t.builds as f64;
        }
        if t.on_demand_equivalent > 0.0 {
            t.savings_share = t.savings / t.on_demand_equivalent;
        }
        if t.cost > 0.0 {
            t.spot_share = t.spot_cost / t.cost;
        }
        let rows = rows
            .into_values()
            .map(|(mut r, seen)| {
                r.builds = seen.len();
                r
            })
            .collect();
        let mut report = Report {
            since: humantime::format_rfc3339_seconds(since).to_string(),
            until: humantime::format_rfc3339_seconds(until).to_string(),
            by,
            totals: t,
            rows,
            builds,
            days: days.into_values().collect(),
        };
        report.round();
        report
    }

    /// Money to a millionth of a dollar and shares to 1e-6: sums of floats otherwise
    /// print as 0.18203999999999998.
    fn round(&mut self) {
        fn r(v: &mut f64) {
            *v = (*v * 1e6).round() / 1e6;
        }
        let t = &mut self.totals;
        for v in [
            &mut t.cost,
            &mut t.spot_cost,
            &mut t.on_demand_cost,
            &mut t.on_demand_equivalent,
            &mut t.savings,
            &mut t.savings_share,
            &mut t.spot_share,
            &mut t.fallback_premium,
            &mut t.interruption_waste,
            &mut t.boot_overhead,
            &mut t.cost_per_build,
            &mut t.instance_hours,
        ] {
            r(v);
        }
        for row in &mut self.rows {
            for v in [&mut row.cost, &mut row.spot_cost, &mut row.on_demand_cost, &mut row.savings, &mut row.waste, &mut row.instance_hours] {
                r(v);
            }
        }
        for b in &mut self.builds {
            r(&mut b.cost);
            r(&mut b.savings);
        }
        for d in &mut self.days {
            r(&mut d.spot_cost);
            r(&mut d.on_demand_cost);
            r(&mut d.savings);
            d.by_project.values_mut().for_each(r);
        }
    }

    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let t = &self.totals;
        writeln!(out, "spotbuild report: {} to {} (UTC), by {}", self.since, self.until, self.by.label())?;
        if t.builds == 0 {
            return writeln!(out, "\nno builds in this period");
        }
        let width = self.rows.iter().map(|r| r.key.len()).max().unwrap_or(0).max(self.by.label().len()).max(5);
        writeln!(
            out,
            "\n{:<width$}  {:>6}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
            self.by.label(),
            "builds",
            "attempts",
            "cost",
            "spot",
            "on-demand",
            "saved",
            "wasted"
        )?;
        for r in &self.rows {
            writeln!(
                out,
                "{:<width$}  {:>6}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
                r.key,
                r.builds,
                r.attempts,
                usd(r.cost),
                usd(r.spot_cost),
                usd(r.on_demand_cost),
                usd(r.savings),
                usd(r.waste)
            )?;
        }
        writeln!(
            out,
            "{:<width$}  {:>6}  {:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
            "total",
            t.builds,
            t.attempts,
            usd(t.cost),
            usd(t.spot_cost),
            usd(t.on_demand_cost),
            usd(t.savings),
            usd(t.interruption_waste)
        )?;
        writeln!(out)?;
        writeln!(out, "cost                {} over {} builds ({} per build), {:.2} instance-hours", usd(t.cost), t.builds, usd(t.cost_per_build), t.instance_hours)?;
        writeln!(out, "spot / on-demand    {} / {} ({:.0}% of cost at spot prices)", usd(t.spot_cost), usd(t.on_demand_cost), t.spot_share * 100.0)?;
        writeln!(out, "saved by spot       {} ({:.0}% below the same hours on demand: {})", usd(t.savings), t.savings_share * 100.0, usd(t.on_demand_equivalent))?;
        writeln!(out, "on-demand fallback  {} more than spot would have cost", usd(t.fallback_premium))?;
        writeln!(out, "interruption waste  {} on {} interrupted or lost attempts", usd(t.interruption_waste), t.wasted_attempts)?;
        writeln!(out, "boot overhead       {} (launch, boot, connect, ship)", usd(t.boot_overhead))?;
        writeln!(out, "build duration      p50 {}, p95 {}", duration(t.p50_build_seconds), duration(t.p95_build_seconds))?;
        if t.unpriced_attempts > 0 {
            writeln!(out, "note: {} attempts had no known price and count as $0", t.unpriced_attempts)?;
        }
        Ok(())
    }

    pub fn write_csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "{},builds,attempts,cost_usd,spot_usd,on_demand_usd,saved_usd,wasted_usd,instance_hours", self.by.label().replace(' ', "_"))?;
        for r in &self.rows {
            writeln!(
                out,
                "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.4}",
                csv_field(&r.key),
                r.builds,
                r.attempts,
                r.cost,
                r.spot_cost,
                r.on_demand_cost,
                r.savings,
                r.waste,
                r.instance_hours
            )?;
        }
        Ok(())
    }

    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }
}

pub fn usd(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("${v:.2}")
    } else {
        format!("${v:.4}")
    }
}

pub fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 10.0);
        assert_eq!(percentile(&v, 0.95), 19.0);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn cost_groups_by_architecture_and_old_entries_are_x86_64() {
        let entry = |id: &str, arch: Option<&str>, itype: &str, price: f64| -> BuildEntry {
            let mut v = serde_json::json!({
                "schema": 1, "build_id": id, "projects": ["app"], "kind": "build", "commit": "c",
                "branch": null, "ci_job_url": null, "started_at": "2026-12-01T10:00:00Z",
                "ended_at": "2026-12-01T11:00:00Z", "result": "success", "region": "us-east-1", "volume_gb": 0,
                "attempts": [{"attempt": 1, "instance_id": "i-1", "instance_type": itype, "availability_zone": "a",
                    "market": "spot", "hourly_price": price, "on_demand_hourly": price * 3.0, "spot_reference_hourly": null,
                    "market_reason": null, "started_at": "2026-12-01T10:00:00Z", "ended_at": "2026-12-01T11:00:00Z",
                    "outcome": "success", "reason": null, "seconds": {}}]
            });
            if let Some(a) = arch {
                v["arch"] = a.into();
            }
            serde_json::from_value(v).unwrap()
        };
        let entries = [
            entry("a", None, "m7a.16xlarge", 1.2),
            entry("b", Some("arm64"), "c7g.16xlarge", 0.8),
            entry("c", Some("arm64"), "m8g.16xlarge", 1.0),
        ];
        let t = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let r = Report::new(&entries, t("2026-11-30T00:00:00Z"), t("2026-12-02T00:00:00Z"), GroupBy::Arch);
        let rows: Vec<(&str, usize, i64)> = r.rows.iter().map(|r| (r.key.as_str(), r.builds, (r.cost * 100.0).round() as i64)).collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.contains(&("x86_64", 1, 120)) && rows.contains(&("arm64", 2, 180)), "{rows:?}");
    }
}
