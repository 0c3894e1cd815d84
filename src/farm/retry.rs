//! The build-level retry decision, as a pure function: after each attempt, another one or
//! the build's result. Attempts themselves are [`super::attempt`]'s.
//!
//! Guarantees: a failed build or test is never retried (it would fail the same way); an
//! interrupted or lost attempt is retried while attempts and time are left; running out
//! of attempts is `GaveUp` (exit 6: retrying later is safe), running out of time
//! `TimedOut`.

use super::attempt::AttemptOutcome;
use super::record::BuildResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Plan again and start attempt `attempt + 1`.
    Retry,
    Finish(BuildResult),
}

/// What follows attempt `attempt` (1-based) of at most `max_attempts`, which ended with
/// `outcome`; `past_deadline`: the build's overall timeout has passed.
pub fn after_attempt(outcome: &AttemptOutcome, attempt: u32, max_attempts: u32, past_deadline: bool) -> Decision {
    match outcome {
        AttemptOutcome::Success => Decision::Finish(BuildResult::Success),
        AttemptOutcome::Failed => Decision::Finish(BuildResult::Failed),
        AttemptOutcome::Error(_) if past_deadline => Decision::Finish(BuildResult::TimedOut),
        AttemptOutcome::Error(_) => Decision::Finish(BuildResult::Error),
        AttemptOutcome::Interrupted | AttemptOutcome::Lost(_) if past_deadline => Decision::Finish(BuildResult::TimedOut),
        AttemptOutcome::Interrupted | AttemptOutcome::Lost(_) if attempt >= max_attempts.max(1) => {
            Decision::Finish(BuildResult::GaveUp)
        }
        AttemptOutcome::Interrupted | AttemptOutcome::Lost(_) => Decision::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptOutcome as A;
    use BuildResult as R;
    use Decision::*;

    #[test]
    fn a_final_outcome_ends_the_build_whatever_is_left() {
        for past in [false, true] {
            assert_eq!(after_attempt(&A::Success, 1, 3, past), Finish(R::Success));
            assert_eq!(after_attempt(&A::Failed, 1, 3, past), Finish(R::Failed));
        }
        assert_eq!(after_attempt(&A::Error("launch refused".into()), 1, 3, false), Finish(R::Error));
    }

    #[test]
    fn interruptions_and_lost_hosts_are_retried_while_attempts_are_left() {
        assert_eq!(after_attempt(&A::Interrupted, 1, 3, false), Retry);
        assert_eq!(after_attempt(&A::Lost("ssh".into()), 2, 3, false), Retry);
        assert_eq!(after_attempt(&A::Interrupted, 3, 3, false), Finish(R::GaveUp));
        assert_eq!(after_attempt(&A::Lost("ssh".into()), 3, 3, false), Finish(R::GaveUp));
    }

    #[test]
    fn the_deadline_stops_retrying_as_a_timeout() {
        assert_eq!(after_attempt(&A::Interrupted, 1, 3, true), Finish(R::TimedOut));
        assert_eq!(after_attempt(&A::Lost("gone".into()), 1, 3, true), Finish(R::TimedOut));
        assert_eq!(after_attempt(&A::Error("the overall timeout passed".into()), 1, 3, true), Finish(R::TimedOut));
    }

    #[test]
    fn zero_max_attempts_means_one() {
        assert_eq!(after_attempt(&A::Interrupted, 1, 0, false), Finish(R::GaveUp));
    }
}
