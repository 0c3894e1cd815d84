//! Copying an image between repositories, of one registry or of two: a manifest, or a
//! manifest list / OCI index with every child, and each blob they name.
//!
//! # Guarantees
//! - Byte for byte: manifests are put exactly as read, so every digest at the destination
//!   equals the source's. A manifest read by digest is hashed before it is used; a blob is
//!   hashed and counted as it streams through, and its upload is committed only when both
//!   match its descriptor. The destination's own answer (`Docker-Content-Digest`) is
//!   checked too.
//! - Only what is missing moves: a blob the destination has is skipped (one `HEAD`), one
//!   of the same registry is mounted, and only the rest are streamed through this process,
//!   never held whole in memory.
//! - Nothing is tagged before everything it names is in place: blobs first, then the
//!   children of an index by digest, then the root under each tag. So an interrupted copy
//!   leaves no tag pointing at a partial image, and a rerun sends only the blobs that had
//!   not arrived.
//!
//! # Caveats
//! - A blob cut off mid-stream is sent again from its first byte on the next attempt.
//! - Every bound is a named timeout: a blob may take [`BLOB_TIMEOUT_BASE`] plus its size at
//!   [`MIN_BLOB_RATE`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::client::{describe, pull_scope, upload_path};
use super::{Client, RegistryError};

/// How long any blob transfer may take before its size counts.
pub const BLOB_TIMEOUT_BASE: Duration = Duration::from_secs(60);
/// The slowest transfer tolerated (bytes per second) when bounding a blob's transfer.
pub const MIN_BLOB_RATE: u64 = 1 << 20;
/// Blobs of one image in flight at once.
const BLOB_CONCURRENCY: usize = 4;

/// One repository of one registry.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub client: &'a Client,
    pub repository: &'a str,
}

impl Endpoint<'_> {
    fn name(&self, reference: &str) -> String {
        let sep = if reference.starts_with("sha256:") { '@' } else { ':' };
        format!("{}/{}{sep}{reference}", self.client.reference().host, self.repository)
    }

    fn same_registry(&self, other: &Endpoint<'_>) -> bool {
        self.client.reference().base_url() == other.client.reference().base_url()
    }
}

/// A blob, as a manifest names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// A manifest's bytes, as read.
#[derive(Debug, Clone)]
pub struct ManifestBytes {
    pub digest: String,
    pub media_type: HeaderValue,
    pub body: Vec<u8>,
    /// `os/architecture` of an index's child, when the index says.
    pub platform: Option<String>,
}

/// Everything copying one image involves, read from the source, and what the destination
/// lacks. Computing it changes nothing anywhere (a dry run prints it).
#[derive(Debug, Clone)]
pub struct CopyPlan {
    /// Children first, the root last.
    pub manifests: Vec<ManifestBytes>,
    /// Every blob named, once each.
    pub blobs: Vec<Blob>,
    /// The blobs the destination does not have.
    pub missing: Vec<Blob>,
}

impl CopyPlan {
    pub fn root(&self) -> &ManifestBytes {
        self.manifests.last().expect("a plan always holds its root")
    }

    pub fn missing_bytes(&self) -> u64 {
        self.missing.iter().map(|b| b.size).sum()
    }

    /// `os/arch` of each child, for an index.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests.iter().filter_map(|m| m.platform.clone()).collect()
    }
}

/// How a blob came to be at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlobWay {
    Present,
    Mounted,
    Sent,
}

/// What a copy reports while it runs.
#[derive(Debug, Clone)]
pub enum CopyProgress {
    /// This many more bytes went through.
    Bytes(u64),
    /// A blob is in place.
    Blob { digest: String, size: u64, way: BlobWay },
}

pub type ProgressSink = Arc<dyn Fn(CopyProgress) + Send + Sync>;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyStats {
    pub blobs_present: usize,
    pub blobs_mounted: usize,
    pub blobs_sent: usize,
    pub bytes_sent: u64,
    pub manifests_put: usize,
}

/// Reads the image `digest` of `src` (an index with its children), and asks `dst` which of
/// its blobs it lacks.
pub async fn plan(src: Endpoint<'_>, dst: Endpoint<'_>, digest: &str) -> Result<CopyPlan, RegistryError> {
    let mut manifests = Vec::new();
    let mut blobs = Vec::new();
    let mut seen = BTreeSet::new();
    read_tree(src, digest, None, &mut manifests, &mut blobs, &mut seen).await?;
    let scope = push_scope(dst, src);
    let present: Vec<bool> = stream::iter(blobs.iter())
        .map(|b| {
            let scope = scope.as_str();
            async move { has_blob(dst, &b.digest, scope).await }
        })
        .buffered(8)
        .try_collect()
        .await?;
    let missing = blobs.iter().zip(present).filter(|(_, p)| !p).map(|(b, _)| b.clone()).collect();
    Ok(CopyPlan {
        manifests,
        blobs,
        missing,
    })
}

/// Copies what `plan` found missing, then puts the manifests: children by digest, the
/// root under every tag of `tags` (by digest alone when there is none).
pub async fn copy(
    src: Endpoint<'_>,
    dst: Endpoint<'_>,
    plan: &CopyPlan,
    tags: &[String],
    progress: ProgressSink,
) -> Result<CopyStats, RegistryError> {
    let mut stats = CopyStats {
        blobs_present: plan.blobs.len() - plan.missing.len(),
        ..CopyStats::default()
    };
    // Every transfer started is let finish, even after one failed: what arrives now is
    // not sent again by the rerun.
    let results: Vec<Result<(BlobWay, u64), RegistryError>> = stream::iter(plan.missing.iter())
        .map(|b| {
            let progress = progress.clone();
            async move { ensure_blob(src, dst, b, progress).await.map(|w| (w, b.size)) }
        })
        .buffer_unordered(BLOB_CONCURRENCY)
        .collect()
        .await;
    let ways = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    for (way, size) in ways {
        match way {
            BlobWay::Present => stats.blobs_present += 1,
            BlobWay::Mounted => stats.blobs_mounted += 1,
            BlobWay::Sent => {
                stats.blobs_sent += 1;
                stats.bytes_sent += size;
            }
        }
    }
    let (children, root) = plan.manifests.split_at(plan.manifests.len() - 1);
    for m in children {
        put_verified(dst, &m.digest, m).await?;
        stats.manifests_put += 1;
    }
    let root = &root[0];
    if tags.is_empty() {
        put_verified(dst, &root.digest, root).await?;
        stats.manifests_put += 1;
    }
    for tag in tags {
        put_verified(dst, tag, root).await?;
        stats.manifests_put += 1;
    }
    Ok(stats)
}

/// Points `tags` of `dst` at the root manifest of `plan`, which is already there (a move
/// of `deployed-<env>`): no blob is looked at.
pub async fn tag(dst: Endpoint<'_>, root: &ManifestBytes, tags: &[String]) -> Result<(), RegistryError> {
    for tag in tags {
        put_verified(dst, tag, root).await?;
    }
    Ok(())
}

/// The digest `reference` of `at` points at, if it exists.
pub async fn resolve(at: Endpoint<'_>, reference: &str) -> Result<Option<String>, RegistryError> {
    at.client.digest(at.repository, reference).await
}

fn push_scope(dst: Endpoint<'_>, src: Endpoint<'_>) -> String {
    if dst.same_registry(&src) && dst.repository != src.repository {
        format!("repository:{}:pull,push repository:{}:pull", dst.repository, src.repository)
    } else {
        format!("repository:{}:pull,push", dst.repository)
    }
}

async fn read_tree(
    src: Endpoint<'_>,
    digest: &str,
    platform: Option<String>,
    manifests: &mut Vec<ManifestBytes>,
    blobs: &mut Vec<Blob>,
    seen: &mut BTreeSet<String>,
) -> Result<(), RegistryError> {
    let what = src.name(digest);
    let (media_type, body) = src.client.manifest(src.repository, digest).await?;
    let actual = sha256_digest(&body);
    if actual != digest {
        return Err(RegistryError::DigestMismatch {
            what,
            expected: digest.to_string(),
            actual,
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| RegistryError::NotAManifest {
        what: what.clone(),
        detail: e.to_string(),
    })?;
    if let Some(children) = v["manifests"].as_array() {
        for child in children {
            let d = child["digest"].as_str().ok_or_else(|| RegistryError::NotAManifest {
                what: what.clone(),
                detail: "an index entry has no digest".into(),
            })?;
            let p = &child["platform"];
            let platform = p["os"].as_str().map(|os| {
                let mut s = format!("{os}/{}", p["architecture"].as_str().unwrap_or("?"));
                if let Some(v) = p["variant"].as_str() {
                    s.push('/');
                    s.push_str(v);
                }
                s
            });
            Box::pin(read_tree(src, d, platform, manifests, blobs, seen)).await?;
        }
    } else {
        let descriptors = v["config"].as_object().into_iter().chain(v["layers"].as_array().into_iter().flatten().filter_map(|l| l.as_object()));
        for d in descriptors {
            let (Some(digest), Some(size)) = (d.get("digest").and_then(|x| x.as_str()), d.get("size").and_then(|x| x.as_u64())) else {
                return Err(RegistryError::NotAManifest {
                    what: what.clone(),
                    detail: "a descriptor lacks its digest or size".into(),
                });
            };
            if seen.insert(digest.to_string()) {
                blobs.push(Blob {
                    digest: digest.to_string(),
                    size,
                });
            }
        }
    }
    manifests.push(ManifestBytes {
        digest: digest.to_string(),
        media_type,
        body,
        platform,
    });
    Ok(())
}

/// The OCI digest of `bytes`.
pub(super) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

async fn has_blob(at: Endpoint<'_>, digest: &str, scope: &str) -> Result<bool, RegistryError> {
    let what = at.name(digest);
    let resp = at
        .client
        .request(Method::HEAD, &format!("/v2/{}/blobs/{digest}", at.repository), scope, &what, |r| r)
        .await?;
    match resp.status() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        s => Err(at.client.status_error(&what, s, String::new())),
    }
}

async fn put_verified(dst: Endpoint<'_>, reference: &str, m: &ManifestBytes) -> Result<(), RegistryError> {
    let stored = dst.client.put_manifest(dst.repository, reference, &m.media_type, m.body.clone()).await?;
    match stored {
        Some(d) if d != m.digest => Err(RegistryError::DigestMismatch {
            what: dst.name(reference),
            expected: m.digest.clone(),
            actual: d,
        }),
        _ => Ok(()),
    }
}

/// The bound on one blob's transfer.
pub fn blob_timeout(size: u64) -> Duration {
    BLOB_TIMEOUT_BASE + Duration::from_secs(size / MIN_BLOB_RATE)
}

/// Makes `blob` exist at `dst`: mounted from `src` when both are one registry, else sent
/// through. Transport failures are retried (from the first byte) with backoff.
async fn ensure_blob(src: Endpoint<'_>, dst: Endpoint<'_>, blob: &Blob, progress: ProgressSink) -> Result<BlobWay, RegistryError> {
    let (retries, base) = dst.client.retry_policy();
    let mut attempt = 0;
    loop {
        match transfer(src, dst, blob, progress.clone()).await {
            Ok(way) => {
                progress(CopyProgress::Blob {
                    digest: blob.digest.clone(),
                    size: blob.size,
                    way,
                });
                return Ok(way);
            }
            Err(e @ RegistryError::Unreachable { .. }) if attempt < retries => {
                attempt += 1;
                tracing::debug!(error = %e, blob = %blob.digest, attempt, "blob transfer failed; retrying");
                tokio::time::sleep(base * 2u32.pow(attempt as u32)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn transfer(src: Endpoint<'_>, dst: Endpoint<'_>, blob: &Blob, progress: ProgressSink) -> Result<BlobWay, RegistryError> {
    let digest = &blob.digest;
    let what = dst.name(digest);
    let scope = push_scope(dst, src);
    let mount = dst.same_registry(&src) && dst.repository != src.repository;
    let start_path = if mount {
        format!("/v2/{}/blobs/uploads/?mount={digest}&from={}", dst.repository, src.repository)
    } else {
        format!("/v2/{}/blobs/uploads/", dst.repository)
    };
    let start = dst
        .client
        .request(Method::POST, &start_path, &scope, &what, |r| r.header(CONTENT_LENGTH, "0"))
        .await?;
    match start.status() {
        StatusCode::CREATED => return Ok(BlobWay::Mounted),
        StatusCode::ACCEPTED => {}
        s => {
            let body = start.text().await.unwrap_or_default();
            return Err(dst.client.status_error(&what, s, body));
        }
    }
    let location = start
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .ok_or_else(|| dst.client.status_error(&what, StatusCode::ACCEPTED, "no Location for the upload".into()))?;

    let timeout = blob_timeout(blob.size);
    let source = src.name(digest);
    let get = src
        .client
        .request(Method::GET, &format!("/v2/{}/blobs/{digest}", src.repository), &pull_scope(src.repository), &source, |r| r.timeout(timeout))
        .await?;
    if !get.status().is_success() {
        let status = get.status();
        return Err(src.client.status_error(&source, status, String::new()));
    }
    let seen = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let tally = seen.clone();
    let body = get.bytes_stream().inspect(move |chunk| {
        if let Ok(c) = chunk {
            let mut t = tally.lock().expect("not poisoned");
            t.0.update(c);
            t.1 += c.len() as u64;
            progress(CopyProgress::Bytes(c.len() as u64));
        }
    });
    let url = absolute(&dst.client.reference().base_url(), &location);
    let mut patch = dst
        .client
        .http()
        .patch(&url)
        .timeout(timeout)
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body));
    if let Some(h) = dst.client.auth_header(&scope).await? {
        patch = patch.header(AUTHORIZATION, h);
    }
    let sent = patch.send().await.map_err(|e| RegistryError::Unreachable {
        host: dst.client.reference().host.clone(),
        detail: describe(&e),
    })?;
    if !sent.status().is_success() {
        let status = sent.status();
        let body = sent.text().await.unwrap_or_default();
        return Err(dst.client.status_error(&what, status, body));
    }
    let location = sent.headers().get(LOCATION).and_then(|v| v.to_str().ok()).map(String::from).unwrap_or(location);
    let (hasher, n) = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != *digest || n != blob.size {
        // The upload is abandoned, not committed; the registry drops it.
        let _ = dst.client.request(Method::DELETE, &upload_path(&location, digest), &scope, &what, |r| r).await;
        return Err(RegistryError::DigestMismatch {
            what: format!("{source} ({n} bytes read, {} expected)", blob.size),
            expected: digest.clone(),
            actual,
        });
    }
    let commit = dst
        .client
        .request(Method::PUT, &upload_path(&location, digest), &scope, &what, |r| r.header(CONTENT_LENGTH, "0"))
        .await?;
    match commit.status() {
        s if s.is_success() => Ok(BlobWay::Sent),
        s => {
            let body = commit.text().await.unwrap_or_default();
            Err(dst.client.status_error(&what, s, body))
        }
    }
}

/// `location` as an absolute URL (registries may answer with a path).
fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else {
        format!("{base}{location}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_bounds_grow_with_size() {
        assert_eq!(blob_timeout(0), BLOB_TIMEOUT_BASE);
        assert_eq!(blob_timeout(600 << 20), BLOB_TIMEOUT_BASE + Duration::from_secs(600));
        assert_eq!(absolute("http://h:1", "/v2/x"), "http://h:1/v2/x");
        assert_eq!(absolute("http://h:1", "https://o/v2/x"), "https://o/v2/x");
    }
}
