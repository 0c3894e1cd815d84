//! Object storage: the narrow trait the SSM transport (commit, job and event chunks) and
//! the cost ledger's shared store use, with S3 behind it and an in-memory fake for tests.
//!
//! Guarantees: `list` returns keys in lexicographic order, as S3 does, so zero-padded
//! sequence numbers read back in order; a missing key is `Ok(None)`, not an error.
//! Assumptions: read-after-write consistency for puts and lists (S3 has it since 2020).

pub mod memory;
pub mod s3;

use std::time::Duration;

use futures::future::BoxFuture;

/// An object store failed. The SDK's error is kept as the source, not flattened.
#[derive(Debug, thiserror::Error)]
#[error("failed to {op} s3://{bucket}/{key}: {message}")]
pub struct ObjectError {
    pub op: &'static str,
    pub bucket: String,
    pub key: String,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub trait ObjectStore: Send + Sync {
    /// The bucket (or the fake's name), for messages.
    fn bucket(&self) -> &str;

    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<(), ObjectError>>;

    /// The object's bytes, or `None` when there is no such key.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, ObjectError>>;

    /// Keys under `prefix` that sort after `start_after`, in order (every page).
    fn list<'a>(&'a self, prefix: &'a str, start_after: Option<&'a str>) -> BoxFuture<'a, Result<Vec<String>, ObjectError>>;

    /// Deletes the key; deleting a missing key succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ObjectError>>;

    /// A URL that lets whoever holds it GET this one object until it expires.
    fn presign_get<'a>(&'a self, key: &'a str, expires_in: Duration) -> BoxFuture<'a, Result<String, ObjectError>>;
}
