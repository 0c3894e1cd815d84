//! One step of a job as the steps themselves see it: a [`Step`] to run commands and say
//! things in, and the [`StepStatus`] it ends with, which becomes the `exit_code` of its
//! `step_end` event in one place ([`StepStatus::exit_code`]).

use tokio::process::Command;
use tokio::sync::watch;

use super::events::Events;
use super::exec::{self, Observer, Stopped};

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepStatus {
    Passed,
    /// A command of the step exited with this code (never 0; 128 + n for signal n).
    Failed { code: i32 },
    /// The agent's own part of the step failed (a file it could not read or write, the
    /// registry refusing a tag); the step's log says why.
    Errored,
    /// Its time ran out before it finished.
    TimedOut,
    /// It was stopped from outside: an interruption notice, the deadline, a signal.
    Killed,
    NotRun(NotRun),
}

/// Why a step's command never ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRun {
    /// The job gives an empty command.
    NoCommand,
    /// Its program could not be started or waited for; the step's log says why.
    CouldNotStart,
}

/// The `exit_code`s of `step_end` events that no command returned, spelled as shells
/// spell them, so a reader of the events sees the usual numbers.
mod exit_code {
    /// A general failure.
    pub const ERRORED: i32 = 1;
    /// A usage error: nothing to run.
    pub const NO_COMMAND: i32 = 2;
    /// As `timeout(1)` reports it.
    pub const TIMED_OUT: i32 = 124;
    /// As a shell reports a command it cannot run.
    pub const COULD_NOT_START: i32 = 127;
    /// 128 + SIGKILL.
    pub const KILLED: i32 = 137;
}

impl StepStatus {
    pub fn passed(&self) -> bool {
        *self == StepStatus::Passed
    }

    /// The `exit_code` of the step's `step_end` event.
    pub fn exit_code(&self) -> i32 {
        match self {
            StepStatus::Passed => 0,
            StepStatus::Failed { code } => *code,
            StepStatus::Errored => exit_code::ERRORED,
            StepStatus::TimedOut => exit_code::TIMED_OUT,
            StepStatus::Killed => exit_code::KILLED,
            StepStatus::NotRun(NotRun::NoCommand) => exit_code::NO_COMMAND,
            StepStatus::NotRun(NotRun::CouldNotStart) => exit_code::COULD_NOT_START,
        }
    }
}

impl From<&Stopped> for StepStatus {
    fn from(stopped: &Stopped) -> StepStatus {
        match stopped {
            Stopped::Exited(0) => StepStatus::Passed,
            Stopped::Exited(code) => StepStatus::Failed { code: *code },
            Stopped::NotStarted(_) => StepStatus::NotRun(NotRun::CouldNotStart),
            Stopped::Killed => StepStatus::Killed,
        }
    }
}

/// A running step: its name, where its log lines go, and the kill flag its commands obey.
pub struct Step {
    name: String,
    events: Events,
    kill: watch::Receiver<bool>,
}

impl Step {
    pub fn new(name: impl Into<String>, events: Events, kill: watch::Receiver<bool>) -> Step {
        Step {
            name: name.into(),
            events,
            kill,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Says something in the step's log, as the agent.
    pub async fn say(&self, line: impl Into<String>) {
        self.events.say(&self.name, line).await
    }

    /// Runs one command of the step, its output going to the step's log (and `observer`).
    /// A command that cannot start says why in the log.
    pub async fn exec(&self, cmd: Command, observer: Option<Observer>) -> Stopped {
        let stopped = exec::run(cmd, &self.name, &self.events, self.kill.clone(), observer).await;
        if let Stopped::NotStarted(why) = &stopped {
            self.say(format!("error: {why}")).await;
        }
        stopped
    }

    /// [`Step::exec`] without an observer, as a status.
    pub async fn run(&self, cmd: Command) -> StepStatus {
        StepStatus::from(&self.exec(cmd, None).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_the_exit_codes_the_events_always_had() {
        let cases = [
            (StepStatus::Passed, 0),
            (StepStatus::Failed { code: 5 }, 5),
            (StepStatus::Errored, 1),
            (StepStatus::NotRun(NotRun::NoCommand), 2),
            (StepStatus::TimedOut, 124),
            (StepStatus::NotRun(NotRun::CouldNotStart), 127),
            (StepStatus::Killed, 137),
        ];
        for (status, code) in cases {
            assert_eq!(status.exit_code(), code, "{status:?}");
        }
    }

    #[test]
    fn a_command_that_stopped_maps_to_its_status() {
        assert_eq!(StepStatus::from(&Stopped::Exited(0)), StepStatus::Passed);
        assert_eq!(StepStatus::from(&Stopped::Exited(3)), StepStatus::Failed { code: 3 });
        assert_eq!(StepStatus::from(&Stopped::Killed), StepStatus::Killed);
        assert_eq!(
            StepStatus::from(&Stopped::NotStarted("no such file".into())),
            StepStatus::NotRun(NotRun::CouldNotStart)
        );
    }
}
