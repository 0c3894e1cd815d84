//! Agent mode: the instance side of a build. Turns a [`Job`](crate::protocol::Job) into
//! pushed images and passed test tags, and reports everything it does as
//! [`crate::protocol`] events.
//!
//! [`run`] checks the job ([`job`]), says hello and keeps the heartbeat and the IMDS watch
//! going ([`machine`]), and drives the [`worker`], which runs the steps in order:
//! [`checkout`], [`build`] (a pure plan of stages and cache sources, then docker), then
//! [`publish`] (push, branch tags, docker's credentials), then [`test`]. When work stops
//! early is the pure policy in [`stop`]; how a step ended is a [`step::StepStatus`].
//!
//! # Guarantees
//! - Events are numbered without gaps, written to stdout and appended to the events file;
//!   a log line is never dropped or reordered within its stream.
//! - Registry passwords never reach an event or a file: docker gets them through a
//!   credential helper (this binary) from the environment, and every event is redacted.
//! - The exit code matches the result: 0 success, 1 failed, 6 interrupted.
//! - After an interruption notice no new step starts; a build that finishes within the
//!   notice's grace is still pushed, so the next attempt reuses it, and one killed when the
//!   grace ran out still pushes the stages it finished.
//! - Past the deadline, work stops and the shutdown command runs.
//!
//! # Caveats
//! - Submodule contents are not part of the checkout (`git archive` leaves them out).

pub mod build;
pub mod checkout;
pub mod docker;
pub mod dockerfile;
pub mod events;
pub mod exec;
pub mod imds;
pub mod job;
pub mod lines;
pub mod machine;
pub mod publish;
pub mod redact;
pub mod run;
pub mod step;
pub mod stop;
pub mod test;
pub mod worker;

pub use build::branch_tag;
pub use job::AgentError;
pub use publish::{credential_helper, CREDENTIAL_HELPER, CREDENTIAL_SECRET_ENV, CREDENTIAL_USERNAME_ENV};
pub use run::run;
