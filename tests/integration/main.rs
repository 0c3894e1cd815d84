//! spotbuild's integration tests: one binary, a module per area, each running the real
//! `spotbuild` binary against real git repositories and local services.

mod agent;
mod auth;
mod chaos;
mod cli;
mod cloud;
mod compat;
mod deploy;
mod farm;
mod farm_security;
mod hash_properties;
mod hashing;
mod infra;
mod ledger;
mod manifest_errors;
mod multiarch;
mod registry;
mod serve;
mod ssm;
mod support;
mod trust;
mod watch;
mod wild_manifests;
