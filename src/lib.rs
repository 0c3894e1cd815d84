//! spotbuild: a build farm controller for monorepos on EC2 spot instances.
//!
//! It decides what needs building before renting anything ([`plan`]), using the image
//! registry as its state ([`registry`]) and the repository's trees ([`git`]) as described
//! by the build manifest ([`manifest`]). The [`agent`] turns a job ([`protocol`]) into
//! pushed images and passed test tags. The controller ([`farm`]) rents an instance
//! ([`cloud`]), reaches it ([`transport`]) and runs the agent there; [`localfarm`] emulates
//! all of that on one machine. [`deploy`] promotes a green commit's images to an
//! environment. [`cli`] is the command-line surface.

pub mod agent;
pub mod cli;
pub mod cloud;
pub mod deploy;
pub mod errors;
pub mod farm;
pub mod ledger;
pub mod git;
pub mod localfarm;
pub mod manifest;
pub mod objects;
pub mod plan;
pub mod platform;
pub mod protocol;
pub mod reap;
pub mod registry;
pub mod serve;
pub mod settings;
pub mod transport;
pub mod trust;
pub mod watch;
