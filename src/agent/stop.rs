//! When the agent's work stops early, as a pure policy: what an interruption notice, the
//! job's deadline or a stop signal does to the running steps. The run loop feeds [`next`]
//! the signals it sees and performs the [`Effect`]s it returns, so every transition is
//! tested here without a clock, a process or IMDS.

use std::time::{Duration, SystemTime};

use super::imds::Notice;

/// How long a running step may go on after an interruption notice whose time is unknown,
/// unreadable or already past.
pub const NOTICE_GRACE: Duration = Duration::from_secs(90);
/// How long before a notice's stated time running steps are killed; also how long the
/// salvage push of a build's finished stages may take.
pub const NOTICE_MARGIN: Duration = Duration::from_secs(20);
/// After the deadline or a stop signal, when the kill of the running steps is repeated,
/// and after that kill, how long the agent still waits for its steps before it stops
/// waiting (and exits, running the shutdown command past the deadline); also how long the
/// shutdown command may take.
pub const WIND_DOWN: Duration = Duration::from_secs(30);

/// Why work stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    Notice(Notice),
    Deadline,
    Cancelled,
    /// The events file cannot be written (a full disk): nobody would see what follows.
    EventsLost(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Nothing has asked the work to stop.
    Working,
    /// No new step starts. `out_of_time` once the grace (or wind-down) timer has fired.
    Halted { why: Halt, out_of_time: bool },
    /// The worker has returned, or was abandoned; `halted` says whether it was cut short,
    /// and why.
    Finished { halted: Option<Halt> },
}

impl State {
    /// Why the work was (or is being) cut short, if it was.
    pub fn halt(&self) -> Option<&Halt> {
        match self {
            State::Working => None,
            State::Halted { why, .. } => Some(why),
            State::Finished { halted } => halted.as_ref(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The worker has done all it will do.
    WorkFinished,
    DeadlineReached,
    /// The agent was told to stop (SIGINT/SIGTERM, or its caller's own cancel).
    Cancel,
    /// Writing the events file failed, saying this.
    EventsLost(String),
    /// IMDS announced an interruption (or a rebalance the job stops for), seen at `now`.
    Notice { notice: Notice, now: SystemTime },
    /// The timer of the last [`Effect::ArmTimer`] went off.
    TimerFired,
    /// The worker asks to push the stages a stopped build finished.
    SalvageRequested,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Tell the worker that no new step may start.
    HaltWorker,
    /// Kill the running steps, and any started until [`Effect::Rearm`].
    Kill,
    /// Send [`Signal::TimerFired`] after this long.
    ArmTimer(Duration),
    /// Let steps run again, for a salvage push that may take this long.
    Rearm { within: Duration },
    /// Run the job's shutdown command once the result is written.
    Shutdown,
    /// Stop waiting for the worker: a step did not end when killed (its processes hold on,
    /// or it waits on something that never comes). The result is written without it.
    Abandon,
}

/// The policy: what `signal` does in `state`.
///
/// Past a halt's grace (a notice's, or the wind-down after the deadline, a signal or lost
/// events) running steps are killed; one more [`WIND_DOWN`] later the worker is abandoned,
/// so the agent always writes its result and exits, whatever a step is doing.
pub fn next(state: State, signal: Signal) -> (State, Vec<Effect>) {
    use Effect::*;
    match (state, signal) {
        (State::Working, Signal::WorkFinished) => (State::Finished { halted: None }, vec![]),
        (State::Working, Signal::DeadlineReached) => (halted(Halt::Deadline), vec![HaltWorker, Kill, ArmTimer(WIND_DOWN)]),
        (State::Working, Signal::Cancel) => (halted(Halt::Cancelled), vec![HaltWorker, Kill, ArmTimer(WIND_DOWN)]),
        (State::Working, Signal::EventsLost(why)) => (halted(Halt::EventsLost(why)), vec![HaltWorker, Kill, ArmTimer(WIND_DOWN)]),
        // A build that finishes within the grace is still pushed: nothing is killed yet.
        (State::Working, Signal::Notice { notice, now }) => {
            let grace = grace(&notice, now);
            (halted(Halt::Notice(notice)), vec![HaltWorker, ArmTimer(grace)])
        }
        // Told to stop during a notice's grace: the steps are killed now (the notice stays
        // the reason: the outcome is still an interruption).
        (State::Halted { why: why @ Halt::Notice(_), out_of_time: false }, Signal::Cancel) => {
            (State::Halted { why, out_of_time: true }, vec![Kill, ArmTimer(WIND_DOWN)])
        }
        (State::Halted { why, out_of_time: false }, Signal::TimerFired) => (State::Halted { why, out_of_time: true }, vec![Kill, ArmTimer(WIND_DOWN)]),
        (State::Halted { why, out_of_time: true }, Signal::TimerFired) => {
            let mut effects = vec![Abandon];
            if why == Halt::Deadline {
                effects.push(Shutdown);
            }
            (State::Finished { halted: Some(why) }, effects)
        }
        // What a build finished before the notice's kill is worth keeping for the next
        // attempt; after the deadline or a signal nothing more may run.
        (State::Halted { why: Halt::Notice(n), out_of_time }, Signal::SalvageRequested) => (
            State::Halted {
                why: Halt::Notice(n),
                out_of_time,
            },
            vec![Rearm { within: NOTICE_MARGIN }],
        ),
        (State::Halted { why, .. }, Signal::WorkFinished) => {
            let effects = if why == Halt::Deadline { vec![Shutdown] } else { vec![] };
            (State::Finished { halted: Some(why) }, effects)
        }
        // The first reason to stop is the one that counts; anything else changes nothing.
        (state, _) => (state, vec![]),
    }
}

fn halted(why: Halt) -> State {
    State::Halted { why, out_of_time: false }
}

/// How long running steps may go on after `notice`, seen at `now`: until
/// [`NOTICE_MARGIN`] before the time it states, else [`NOTICE_GRACE`].
pub fn grace(notice: &Notice, now: SystemTime) -> Duration {
    notice
        .time
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(now).ok())
        .map(|left| left.saturating_sub(NOTICE_MARGIN))
        .unwrap_or(NOTICE_GRACE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::NoticeKind;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2025-01-01T00:00:00Z").unwrap()
    }

    fn notice(time: Option<&str>) -> Notice {
        Notice {
            kind: NoticeKind::Interruption,
            action: Some("terminate".into()),
            time: time.map(String::from),
        }
    }

    fn notice_at(time: Option<&str>) -> Signal {
        Signal::Notice { notice: notice(time), now: now() }
    }

    /// Runs `signals` from `Working`, returning the final state and each step's effects.
    fn run(signals: Vec<Signal>) -> (State, Vec<Vec<Effect>>) {
        let mut state = State::Working;
        let mut all = Vec::new();
        for s in signals {
            let (next_state, effects) = next(state, s);
            state = next_state;
            all.push(effects);
        }
        (state, all)
    }

    #[test]
    fn work_that_finishes_unhindered_is_not_halted() {
        let (state, effects) = run(vec![Signal::WorkFinished]);
        assert_eq!(state, State::Finished { halted: None });
        assert_eq!(effects, [vec![]]);
    }

    #[test]
    fn a_notice_then_finishing_within_the_grace_kills_nothing() {
        let (state, effects) = run(vec![notice_at(Some("2025-01-01T00:02:00Z")), Signal::WorkFinished]);
        assert_eq!(effects, [vec![Effect::HaltWorker, Effect::ArmTimer(Duration::from_secs(100))], vec![]]);
        assert_eq!(state, State::Finished { halted: Some(Halt::Notice(notice(Some("2025-01-01T00:02:00Z")))) });
    }

    #[test]
    fn a_notice_whose_grace_runs_out_kills_the_running_steps() {
        let (state, effects) = run(vec![notice_at(None), Signal::TimerFired, Signal::WorkFinished]);
        assert_eq!(
            effects,
            [vec![Effect::HaltWorker, Effect::ArmTimer(NOTICE_GRACE)], vec![Effect::Kill, Effect::ArmTimer(WIND_DOWN)], vec![]]
        );
        assert_eq!(state, State::Finished { halted: Some(Halt::Notice(notice(None))) });
    }

    #[test]
    fn after_a_notice_the_finished_stages_may_still_be_pushed() {
        let (_, effects) = run(vec![notice_at(None), Signal::TimerFired, Signal::SalvageRequested]);
        assert_eq!(effects[2], [Effect::Rearm { within: NOTICE_MARGIN }]);
        // Also when the build failed by itself before the grace ran out.
        let (_, effects) = run(vec![notice_at(None), Signal::SalvageRequested]);
        assert_eq!(effects[1], [Effect::Rearm { within: NOTICE_MARGIN }]);
    }

    #[test]
    fn salvage_is_refused_unless_a_notice_halted_the_work() {
        for first in [None, Some(Signal::DeadlineReached), Some(Signal::Cancel)] {
            let (_, effects) = run(first.into_iter().chain([Signal::SalvageRequested]).collect());
            assert_eq!(effects.last().unwrap(), &Vec::<Effect>::new());
        }
    }

    #[test]
    fn the_deadline_kills_at_once_again_after_the_wind_down_and_shuts_down() {
        let (state, effects) = run(vec![Signal::DeadlineReached, Signal::TimerFired, Signal::WorkFinished]);
        assert_eq!(
            effects,
            [
                vec![Effect::HaltWorker, Effect::Kill, Effect::ArmTimer(WIND_DOWN)],
                vec![Effect::Kill, Effect::ArmTimer(WIND_DOWN)],
                vec![Effect::Shutdown]
            ]
        );
        assert_eq!(state, State::Finished { halted: Some(Halt::Deadline) });
    }

    #[test]
    fn a_cancel_kills_at_once_and_does_not_shut_down() {
        let (state, effects) = run(vec![Signal::Cancel, Signal::TimerFired, Signal::WorkFinished]);
        assert_eq!(
            effects,
            [vec![Effect::HaltWorker, Effect::Kill, Effect::ArmTimer(WIND_DOWN)], vec![Effect::Kill, Effect::ArmTimer(WIND_DOWN)], vec![]]
        );
        assert_eq!(state, State::Finished { halted: Some(Halt::Cancelled) });
    }

    #[test]
    fn a_second_signal_after_halting_changes_nothing_but_a_cancel_ends_a_notices_grace() {
        let stops = || [notice_at(None), Signal::DeadlineReached, Signal::Cancel, Signal::EventsLost("disk full".into())];
        for first in stops() {
            for second in stops() {
                let (state, effects) = run(vec![first.clone(), second.clone()]);
                let (expected, _) = next(State::Working, first.clone());
                if matches!((&first, &second), (Signal::Notice { .. }, Signal::Cancel)) {
                    assert_eq!(effects[1], [Effect::Kill, Effect::ArmTimer(WIND_DOWN)]);
                    assert_eq!(state.halt(), expected.halt(), "the notice stays the reason");
                    continue;
                }
                assert_eq!(effects[1], [], "{first:?} then {second:?}");
                assert_eq!(state, expected);
            }
        }
    }

    #[test]
    fn a_step_that_will_not_end_is_abandoned_one_wind_down_after_the_kill() {
        let (state, effects) = run(vec![Signal::DeadlineReached, Signal::TimerFired, Signal::TimerFired]);
        assert_eq!(effects[2], [Effect::Abandon, Effect::Shutdown], "past the deadline the shutdown runs anyway");
        assert_eq!(state, State::Finished { halted: Some(Halt::Deadline) });
        let (state, effects) = run(vec![Signal::Cancel, Signal::TimerFired, Signal::TimerFired]);
        assert_eq!(effects[2], [Effect::Abandon]);
        assert_eq!(state, State::Finished { halted: Some(Halt::Cancelled) });
        let (_, effects) = run(vec![notice_at(None), Signal::TimerFired, Signal::TimerFired]);
        assert_eq!(effects[2], [Effect::Abandon]);
        // Once finished, a late timer does nothing.
        let (_, effects) = run(vec![Signal::Cancel, Signal::WorkFinished, Signal::TimerFired]);
        assert_eq!(effects[2], []);
    }

    #[test]
    fn lost_events_stop_the_work_like_a_signal() {
        let (state, effects) = run(vec![Signal::EventsLost("No space left on device".into()), Signal::WorkFinished]);
        assert_eq!(effects[0], [Effect::HaltWorker, Effect::Kill, Effect::ArmTimer(WIND_DOWN)]);
        assert_eq!(state, State::Finished { halted: Some(Halt::EventsLost("No space left on device".into())) });
    }

    #[test]
    fn a_timer_or_salvage_without_a_halt_does_nothing() {
        let (state, effects) = run(vec![Signal::TimerFired, Signal::SalvageRequested]);
        assert_eq!(state, State::Working);
        assert_eq!(effects, [vec![], vec![]]);
    }

    #[test]
    fn signals_after_the_work_finished_are_ignored() {
        for late in [notice_at(None), Signal::DeadlineReached, Signal::Cancel, Signal::TimerFired, Signal::SalvageRequested, Signal::EventsLost("x".into())] {
            let (state, effects) = run(vec![Signal::WorkFinished, late]);
            assert_eq!(state, State::Finished { halted: None });
            assert_eq!(effects[1], []);
        }
    }

    #[test]
    fn the_grace_ends_a_margin_before_the_notice_time_or_defaults() {
        // Two minutes ahead: stop 20 s before.
        assert_eq!(grace(&notice(Some("2025-01-01T00:02:00Z")), now()), Duration::from_secs(100));
        // Less than the margin ahead: stop at once.
        assert_eq!(grace(&notice(Some("2025-01-01T00:00:10Z")), now()), Duration::ZERO);
        // In the past, unreadable or missing: the default grace.
        assert_eq!(grace(&notice(Some("2024-12-31T23:59:00Z")), now()), NOTICE_GRACE);
        assert_eq!(grace(&notice(Some("soon")), now()), NOTICE_GRACE);
        assert_eq!(grace(&notice(None), now()), NOTICE_GRACE);
    }
}
