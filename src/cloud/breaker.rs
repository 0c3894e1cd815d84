//! The spot circuit breaker: after K interruptions within a window, use on-demand for a
//! cooldown. A pure function of the interruption history, so the history can live in a
//! shared store (separate CI jobs must agree) and every decision is unit-testable.

use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Interruptions that trip the breaker…
    pub threshold: usize,
    /// …within this window.
    pub window: Duration,
    /// How long on-demand is forced once tripped.
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            threshold: 2,
            window: Duration::from_secs(15 * 60),
            cooldown: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Spot may be used.
    Closed,
    /// On-demand only, until then; `tripped_at` is the interruption that tripped it.
    Open { until: SystemTime, tripped_at: SystemTime },
}

/// The breaker's state at `now`, given when past interruptions happened (any order).
pub fn state(interruptions: &[SystemTime], now: SystemTime, s: BreakerSettings) -> Breaker {
    if s.threshold == 0 {
        return Breaker::Closed;
    }
    let mut times: Vec<SystemTime> = interruptions.iter().copied().filter(|t| *t <= now).collect();
    times.sort();
    // The newest interruption that completes a run of `threshold` within the window decides.
    let mut open: Option<(SystemTime, SystemTime)> = None;
    for (i, &t) in times.iter().enumerate() {
        if i + 1 < s.threshold {
            continue;
        }
        let first = times[i + 1 - s.threshold];
        if t.duration_since(first).unwrap_or_default() <= s.window {
            open = Some((t + s.cooldown, t));
        }
    }
    match open {
        Some((until, tripped_at)) if until > now => Breaker::Open { until, tripped_at },
        _ => Breaker::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(mins: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + mins * 60)
    }

    #[test]
    fn two_interruptions_within_fifteen_minutes_open_it_for_thirty() {
        let s = BreakerSettings::default();
        assert_eq!(state(&[at(0)], at(1), s), Breaker::Closed);
        let b = state(&[at(0), at(10)], at(11), s);
        assert_eq!(b, Breaker::Open { until: at(40), tripped_at: at(10) });
        assert_eq!(state(&[at(0), at(10)], at(40), s), Breaker::Closed, "cooldown over");
    }

    #[test]
    fn interruptions_further_apart_than_the_window_do_not_trip_it() {
        let s = BreakerSettings::default();
        assert_eq!(state(&[at(0), at(16)], at(17), s), Breaker::Closed);
        assert_eq!(state(&[at(16), at(0)], at(17), s), Breaker::Closed, "order does not matter");
    }

    #[test]
    fn a_later_trip_extends_the_cooldown_and_future_events_are_ignored() {
        let s = BreakerSettings::default();
        let b = state(&[at(0), at(5), at(20), at(25)], at(30), s);
        assert_eq!(b, Breaker::Open { until: at(55), tripped_at: at(25) });
        assert_eq!(state(&[at(0), at(100)], at(1), s), Breaker::Closed);
    }
}
