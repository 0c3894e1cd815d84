//! One attempt at a build on one instance, as a pure state machine: [`next`] takes the
//! current state and what was just observed, and returns the new state and the one action
//! to take. The driver in [`super`] performs actions and reports observations; every
//! transition is unit-tested here without I/O.
//!
//! Guarantees: every path that launched an instance passes through `Terminating` before
//! `Done`; a dropped event stream is resumed (bounded) rather than treated as a failure; an
//! instance that ends under us makes the attempt `Interrupted` or `Lost`, never `Failed`.

use crate::protocol::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Launching,
    Booting,
    Connecting,
    Shipping,
    Running,
    Collecting,
    Terminating,
    Done,
}

impl Phase {
    /// The phase's one name: in progress lines, `--json` events and the ledger's seconds.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Launching => "launching",
            Phase::Booting => "booting",
            Phase::Connecting => "connecting",
            Phase::Shipping => "shipping",
            Phase::Running => "running",
            Phase::Collecting => "collecting",
            Phase::Terminating => "terminating",
            Phase::Done => "done",
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome", content = "reason")]
pub enum AttemptOutcome {
    Success,
    /// A build or test failed: retrying would fail the same way.
    Failed,
    /// A spot interruption (notice or reclaim): retry, skipping what was pushed.
    Interrupted,
    /// The host went away or stopped answering: retry.
    Lost(String),
    /// Something that another attempt would not fix (launch refused, bad config).
    Error(String),
}

impl AttemptOutcome {
    pub fn retryable(&self) -> bool {
        matches!(self, AttemptOutcome::Interrupted | AttemptOutcome::Lost(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Launched,
    /// No instance: nothing to terminate.
    LaunchFailed(String),
    Running,
    Connected,
    Shipped,
    /// The agent's result event arrived.
    Result(Outcome),
    /// The event stream ended without a result (`notice`: an interruption notice was among
    /// the events seen so far).
    StreamDropped { notice: bool },
    Reconnected,
    /// The instance is shutting down or gone (`interrupted`: EC2 said spot reclaimed it).
    InstanceEnded { interrupted: bool },
    Collected,
    Terminated,
    /// A step failed in a way that another attempt may fix (e.g. SSH never came up).
    StepFailed(String),
    /// A step failed in a way no attempt fixes.
    Fatal(String),
    /// The agent's process is gone without a result (killed, crashed, never started): the
    /// same image would do the same again.
    AgentDied(String),
    /// The overall timeout passed.
    Deadline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Launch,
    WaitRunning,
    Connect,
    Ship,
    /// Start the agent (first time) and follow its events.
    StartAndFollow,
    Reconnect,
    /// Follow the events after the last `seq` seen.
    Resume,
    Collect,
    Terminate,
    Finish(AttemptOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    /// Decided before teardown; reported once terminated.
    pub outcome: Option<AttemptOutcome>,
    pub reconnects: u32,
    pub notice: bool,
    pub max_reconnects: u32,
}

impl State {
    pub fn new(max_reconnects: u32) -> State {
        State {
            phase: Phase::Launching,
            outcome: None,
            reconnects: 0,
            notice: false,
            max_reconnects,
        }
    }
}

/// The first action of an attempt.
pub fn start() -> Action {
    Action::Launch
}

pub fn next(s: &State, o: Observation) -> (State, Action) {
    use Observation as O;
    use Phase as P;
    let mut n = s.clone();
    let teardown = |mut n: State, outcome: AttemptOutcome| {
        // The first decided outcome stands: e.g. an interruption seen before a drop.
        n.outcome.get_or_insert(outcome);
        n.phase = P::Terminating;
        (n, Action::Terminate)
    };
    match (s.phase, o) {
        (P::Done, _) => (n, Action::Finish(s.outcome.clone().unwrap_or(AttemptOutcome::Error("finished twice".into())))),
        (P::Launching, O::Launched) => {
            n.phase = P::Booting;
            (n, Action::WaitRunning)
        }
        (P::Launching, O::LaunchFailed(why)) | (P::Launching, O::Fatal(why)) => {
            n.phase = P::Done;
            n.outcome = Some(AttemptOutcome::Error(why.clone()));
            (n, Action::Finish(AttemptOutcome::Error(why)))
        }
        (P::Launching, O::Deadline) => {
            n.phase = P::Done;
            let o = AttemptOutcome::Error("the overall timeout passed while launching".into());
            n.outcome = Some(o.clone());
            (n, Action::Finish(o))
        }
        (P::Terminating, O::Terminated) => {
            n.phase = P::Done;
            let o = s.outcome.clone().unwrap_or(AttemptOutcome::Error("ended without an outcome".into()));
            (n, Action::Finish(o))
        }
        // Teardown is already under way: nothing else matters.
        (P::Terminating, _) => (n, Action::Terminate),
        (_, O::Deadline) => teardown(n, AttemptOutcome::Error("the overall timeout passed".into())),
        (_, O::Fatal(why)) | (_, O::AgentDied(why)) => teardown(n, AttemptOutcome::Error(why)),
        (_, O::InstanceEnded { interrupted }) => {
            let o = if interrupted || s.notice {
                AttemptOutcome::Interrupted
            } else {
                AttemptOutcome::Lost("the instance ended under the build".into())
            };
            teardown(n, o)
        }
        (P::Booting, O::Running) => {
            n.phase = P::Connecting;
            (n, Action::Connect)
        }
        (P::Booting, O::StepFailed(why)) | (P::Connecting, O::StepFailed(why)) | (P::Shipping, O::StepFailed(why)) => {
            teardown(n, AttemptOutcome::Lost(why))
        }
        (P::Connecting, O::Connected) => {
            n.phase = P::Shipping;
            (n, Action::Ship)
        }
        (P::Shipping, O::Shipped) => {
            n.phase = P::Running;
            (n, Action::StartAndFollow)
        }
        (P::Running, O::Result(outcome)) => {
            n.phase = P::Collecting;
            n.outcome = Some(match outcome {
                Outcome::Success => AttemptOutcome::Success,
                Outcome::Failed => AttemptOutcome::Failed,
                Outcome::Interrupted => AttemptOutcome::Interrupted,
            });
            (n, Action::Collect)
        }
        (P::Running, O::StreamDropped { notice }) => {
            n.notice |= notice;
            if s.reconnects >= s.max_reconnects {
                let why = format!("the event stream dropped {} times", s.reconnects + 1);
                let lost = if n.notice { AttemptOutcome::Interrupted } else { AttemptOutcome::Lost(why) };
                return teardown(n, lost);
            }
            n.reconnects += 1;
            (n, Action::Reconnect)
        }
        (P::Running, O::Reconnected) => (n, Action::Resume),
        (P::Running, O::StepFailed(why)) => {
            teardown(n, if s.notice { AttemptOutcome::Interrupted } else { AttemptOutcome::Lost(why) })
        }
        (P::Collecting, O::Collected) | (P::Collecting, O::StepFailed(_)) => {
            n.phase = P::Terminating;
            (n, Action::Terminate)
        }
        (phase, o) => teardown(n, AttemptOutcome::Error(format!("unexpected {o:?} while {phase:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation as O;

    fn run(obs: Vec<Observation>) -> (State, Vec<Action>) {
        let mut s = State::new(2);
        let mut actions = vec![start()];
        for o in obs {
            let (n, a) = next(&s, o);
            s = n;
            actions.push(a);
        }
        (s, actions)
    }

    #[test]
    fn a_good_attempt_walks_every_phase_and_terminates() {
        let (s, a) = run(vec![
            O::Launched,
            O::Running,
            O::Connected,
            O::Shipped,
            O::Result(Outcome::Success),
            O::Collected,
            O::Terminated,
        ]);
        assert_eq!(
            a,
            vec![
                Action::Launch,
                Action::WaitRunning,
                Action::Connect,
                Action::Ship,
                Action::StartAndFollow,
                Action::Collect,
                Action::Terminate,
                Action::Finish(AttemptOutcome::Success),
            ]
        );
        assert_eq!(s.phase, Phase::Done);
    }

    #[test]
    fn a_failed_launch_has_nothing_to_terminate() {
        let (_, a) = run(vec![O::LaunchFailed("no capacity anywhere".into())]);
        assert_eq!(a.last(), Some(&Action::Finish(AttemptOutcome::Error("no capacity anywhere".into()))));
        assert!(!a.contains(&Action::Terminate));
    }

    #[test]
    fn drops_are_resumed_a_bounded_number_of_times() {
        let (s, a) = run(vec![
            O::Launched,
            O::Running,
            O::Connected,
            O::Shipped,
            O::StreamDropped { notice: false },
            O::Reconnected,
            O::StreamDropped { notice: false },
            O::Reconnected,
            O::StreamDropped { notice: false },
            O::Terminated,
        ]);
        assert_eq!(a[5..9], [Action::Reconnect, Action::Resume, Action::Reconnect, Action::Resume]);
        assert_eq!(a[9], Action::Terminate);
        assert!(matches!(a[10], Action::Finish(AttemptOutcome::Lost(_))));
        assert_eq!(s.reconnects, 2);
    }

    #[test]
    fn a_notice_then_a_vanished_host_is_an_interruption() {
        let (_, a) = run(vec![
            O::Launched,
            O::Running,
            O::Connected,
            O::Shipped,
            O::StreamDropped { notice: true },
            O::InstanceEnded { interrupted: false },
            O::Terminated,
        ]);
        assert_eq!(a.last(), Some(&Action::Finish(AttemptOutcome::Interrupted)));
    }

    #[test]
    fn a_failed_build_is_not_retryable_and_still_terminates() {
        let (_, a) = run(vec![O::Launched, O::Running, O::Connected, O::Shipped, O::Result(Outcome::Failed), O::Collected, O::Terminated]);
        assert_eq!(a.last(), Some(&Action::Finish(AttemptOutcome::Failed)));
        assert!(!AttemptOutcome::Failed.retryable() && AttemptOutcome::Interrupted.retryable());
    }

    #[test]
    fn the_deadline_tears_down_from_any_phase_after_launch() {
        for prefix in [vec![O::Launched], vec![O::Launched, O::Running], vec![O::Launched, O::Running, O::Connected, O::Shipped]] {
            let mut obs = prefix;
            obs.push(O::Deadline);
            let (s, a) = run(obs);
            assert_eq!(a.last(), Some(&Action::Terminate));
            assert_eq!(s.phase, Phase::Terminating);
        }
    }

    #[test]
    fn a_dead_agent_is_an_error_that_still_tears_down() {
        let (s, a) = run(vec![
            O::Launched,
            O::Running,
            O::Connected,
            O::Shipped,
            O::AgentDied("the agent (pid 7) exited before its first event".into()),
            O::Terminated,
        ]);
        assert_eq!(a[5], Action::Terminate);
        assert!(matches!(a.last(), Some(Action::Finish(AttemptOutcome::Error(why))) if why.contains("pid 7")));
        assert!(!s.outcome.unwrap().retryable(), "a dead agent is not retried as an interruption");
    }

    #[test]
    fn ssh_that_never_comes_up_loses_the_attempt() {
        let (_, a) = run(vec![O::Launched, O::Running, O::StepFailed("ssh: timeout".into()), O::Terminated]);
        assert_eq!(a.last(), Some(&Action::Finish(AttemptOutcome::Lost("ssh: timeout".into()))));
    }
}
