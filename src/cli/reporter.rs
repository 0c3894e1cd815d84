//! Turning agent events into what a person reads: timestamped lines prefixed with the step,
//! a mark for each step's end, and a closing table. Events are the only input.

use std::io::Write;
use std::time::Duration;

use crate::protocol::{Envelope, Event, NoticeKind, Outcome};

/// One step as the closing table shows it.
struct StepRow {
    step: String,
    /// None while running (or if it never ended).
    exit_code: Option<i32>,
    duration_ms: u64,
    layers: Option<(u32, u32)>,
}

#[derive(Default)]
pub struct Reporter {
    steps: Vec<StepRow>,
    result: Option<(Outcome, Option<String>)>,
}

/// BuildKit's progress carries blank separator lines and bare vertex digests; they stay in
/// the events (and `--json`) but add nothing for a person reading along.
fn is_noise(line: &str) -> bool {
    if line.is_empty() {
        return true;
    }
    let Some((vertex, rest)) = line.strip_prefix('#').and_then(|l| l.split_once(' ')) else {
        return false;
    };
    vertex.bytes().all(|b| b.is_ascii_digit())
        && rest.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn clock(ts: &str) -> &str {
    // 2026-11-22T03:15:50.123Z -> 03:15:50
    ts.get(11..19).unwrap_or(ts)
}

impl Reporter {
    pub fn outcome(&self) -> Option<Outcome> {
        self.result.as_ref().map(|r| r.0)
    }

    /// Writes the lines for one event.
    pub fn show(&mut self, env: &Envelope, out: &mut impl Write) -> std::io::Result<()> {
        let t = clock(&env.ts);
        match &env.event {
            Event::Hello {
                agent_version,
                cpus,
                memory_bytes,
                instance_id,
                builder,
            } => {
                writeln!(
                    out,
                    "{t} agent {agent_version} on {} · {cpus} CPUs · {:.1} GiB{}",
                    instance_id.as_deref().unwrap_or("this machine"),
                    *memory_bytes as f64 / (1u64 << 30) as f64,
                    builder.as_ref().map(|b| format!(" · builder {b}")).unwrap_or_default()
                )
            }
            Event::StepStart { step, .. } => {
                self.steps.push(StepRow {
                    step: step.clone(),
                    exit_code: None,
                    duration_ms: 0,
                    layers: None,
                });
                writeln!(out, "{t} {step} ▶ started")
            }
            Event::Log { line, .. } if is_noise(line) => Ok(()),
            Event::Log { step, line, .. } => writeln!(out, "{t} {step} │ {line}"),
            Event::StepEnd {
                step,
                exit_code,
                duration_ms,
                cached_layers,
                total_layers,
            } => {
                let layers = cached_layers.zip(*total_layers);
                if let Some(s) = self.steps.iter_mut().rev().find(|s| &s.step == step) {
                    s.exit_code = Some(*exit_code);
                    s.duration_ms = *duration_ms;
                    s.layers = layers;
                }
                let took = humantime::format_duration(Duration::from_millis(*duration_ms / 100 * 100));
                let cache = layers
                    .map(|(c, n)| format!(", {c}/{n} layers cached"))
                    .unwrap_or_default();
                if *exit_code == 0 {
                    writeln!(out, "{t} {step} ✔ done in {took}{cache}")
                } else {
                    writeln!(out, "{t} {step} ✘ failed with exit code {exit_code} after {took}")
                }
            }
            Event::Heartbeat {} => Ok(()),
            Event::Notice { kind, action, time } => {
                let what = match kind {
                    NoticeKind::Interruption => "spot interruption notice",
                    NoticeKind::Rebalance => "rebalance recommendation",
                };
                writeln!(
                    out,
                    "{t} ! {what}{}{}",
                    action.as_ref().map(|a| format!(": {a}")).unwrap_or_default(),
                    time.as_ref().map(|a| format!(" at {a}")).unwrap_or_default()
                )
            }
            Event::Result { outcome, message, .. } => {
                self.result = Some((*outcome, message.clone()));
                Ok(())
            }
        }
    }

    /// The closing table of steps and the overall result.
    pub fn summary(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.steps.is_empty() && self.result.is_none() {
            return Ok(());
        }
        let width = self.steps.iter().map(|s| s.step.len()).max().unwrap_or(4).max(4);
        writeln!(out)?;
        writeln!(out, "{:width$}  {:8}  {:>9}  CACHE", "STEP", "RESULT", "TIME")?;
        for StepRow {
            step,
            exit_code,
            duration_ms,
            layers,
        } in &self.steps
        {
            let result = match exit_code {
                Some(0) => "ok".to_string(),
                Some(c) => format!("exit {c}"),
                None => "stopped".to_string(),
            };
            let cache = layers.map(|(c, n)| format!("{c}/{n}")).unwrap_or_default();
            writeln!(out, "{step:width$}  {result:8}  {:>8.1}s  {cache}", *duration_ms as f64 / 1000.0)?;
        }
        match &self.result {
            Some((Outcome::Success, _)) => writeln!(out, "result: success"),
            Some((o, m)) => writeln!(
                out,
                "result: {}{}",
                match o {
                    Outcome::Failed => "failed",
                    Outcome::Interrupted => "interrupted",
                    Outcome::Success => "success",
                },
                m.as_ref().map(|m| format!(" ({m})")).unwrap_or_default()
            ),
            None => writeln!(out, "result: none (the agent ended without one)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_noise;

    #[test]
    fn hides_only_buildkit_noise() {
        assert!(is_noise(""));
        assert!(is_noise(&format!("#12 sha256:{}", "a".repeat(64))));
        assert!(!is_noise("#12 [2/3] COPY a /a"));
        assert!(!is_noise("sha256:abc"));
        assert!(!is_noise("#12 CACHED"));
    }
}
