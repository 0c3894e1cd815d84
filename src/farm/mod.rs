//! The controller as a library: rents instances, ships the commit, runs the agent there,
//! follows its events, and always tears the instances down.
//!
//! - [`build::run`] is the whole build: spreading ([`spread`]), attempts with re-planning
//!   ([`retry`]), the breaker's shared memory ([`shared`]), teardown ([`teardown`]) and the
//!   ledger write ([`record`]).
//! - Each attempt is the pure state machine in [`attempt`], driven by [`driver`] with typed
//!   phase data; its actions are in [`rent`], [`ship`] and [`follow`], and it reaches the
//!   instance through a [`connect::Connector`].
//! - [`job`] makes every agent job; [`instance`] is the instance side of shipping.
//! - [`events::FarmEvent`] is the only way out to reporters.
//!
//! Guarantees, assumptions and caveats are stated on [`build`] and [`driver`].

pub mod attempt;
pub mod build;
pub mod connect;
pub mod driver;
pub mod events;
pub mod follow;
pub mod instance;
pub mod job;
pub mod record;
pub mod rent;
pub mod retry;
pub mod shared;
pub mod ship;
pub mod spread;
pub mod teardown;

#[cfg(test)]
mod tests;

pub use build::{run, BuildError, BuildOutcome, BuildRequest, Deps, GroupOutcome, Planner, StopSignal};
pub use events::{FarmEvent, Origin};
pub use record::{AttemptRecord, BuildRecord, BuildResult};
pub use teardown::Teardown;
