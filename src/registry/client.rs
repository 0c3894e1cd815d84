//! An OCI distribution v2 client: does a tag exist, list tags, copy a manifest to a new tag.
//! Throttling (429) and server errors (5xx) are retried with jittered exponential backoff;
//! every request is bounded by the configured timeout.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LINK, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use super::auth::{Authenticator, Challenge};
use super::{ImageStore, RegistryError, RegistryRef};
use crate::settings::RegistryConfig;

/// Every manifest media type we are willing to see, so that a tag pointing at a
/// multi-arch index or an OCI manifest is found, and copied byte for byte.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

pub struct Client {
    reference: RegistryRef,
    http: reqwest::Client,
    /// Shared with the clients of the same registry's other namespaces (tokens and all).
    auth: std::sync::Arc<Authenticator>,
    retries: usize,
    concurrency: usize,
    /// First backoff delay; tests shorten it.
    backoff_base: Duration,
    /// Set once a request has exhausted its retries without reaching the registry, so the
    /// remaining lookups of a plan fail at once instead of each waiting out its own retries.
    down: std::sync::Mutex<Option<String>>,
}

/// One request's failure, split by whether trying again could help.
enum Failure {
    Retry(RegistryError),
    Final(RegistryError),
}

impl Client {
    pub fn new(
        reference: RegistryRef,
        settings: &RegistryConfig,
        auth: Authenticator,
    ) -> Result<Client, RegistryError> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .user_agent(concat!("spotbuild/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RegistryError::Unreachable {
                host: reference.host.clone(),
                detail: e.to_string(),
            })?;
        Ok(Client {
            reference,
            http,
            auth: std::sync::Arc::new(auth),
            retries: settings.retries,
            concurrency: settings.concurrency.max(1),
            backoff_base: Duration::from_millis(200),
            down: std::sync::Mutex::new(None),
        })
    }

    /// A client for the same registry under `sub` of this prefix (an untrusted build's
    /// namespace), sharing the connection pool and credentials.
    pub fn within(&self, sub: &str) -> Client {
        Client {
            reference: self.reference.within(sub),
            http: self.http.clone(),
            auth: self.auth.clone(),
            retries: self.retries,
            concurrency: self.concurrency,
            backoff_base: self.backoff_base,
            down: std::sync::Mutex::new(None),
        }
    }

    /// Shortens backoff delays (for tests that exercise retries).
    pub fn with_backoff_base(mut self, base: Duration) -> Client {
        self.backoff_base = base;
        self
    }

    pub fn reference(&self) -> &RegistryRef {
        &self.reference
    }

    /// The connection pool, for a request that must be sent exactly once (a streamed body).
    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The `Authorization` header a request for `scope` would start with, once an earlier
    /// request has learnt what the registry wants.
    pub(super) async fn auth_header(&self, scope: &str) -> Result<Option<String>, RegistryError> {
        self.auth.initial_header(scope).await
    }

    /// The retry budget and first backoff delay of this client's requests.
    pub(super) fn retry_policy(&self) -> (usize, Duration) {
        (self.retries, self.backoff_base)
    }

    /// Whether `repository` has `tag`. A repository that does not exist has no tags.
    pub async fn has_tag(&self, repository: &str, tag: &str) -> Result<bool, RegistryError> {
        let path = format!("/v2/{repository}/manifests/{tag}");
        let what = format!("{repository}:{tag}");
        let resp = self
            .request(Method::HEAD, &path, &pull_scope(repository), &what, |r| {
                r.header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.status_error(&what, s, String::new())),
        }
    }

    /// The digest `reference` (a tag) of `repository` points at, if it exists: what a
    /// test ran is recorded by it, so that a tag moved meanwhile is noticed.
    pub async fn digest(&self, repository: &str, reference: &str) -> Result<Option<String>, RegistryError> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let what = format!("{repository}:{reference}");
        let resp = self
            .request(Method::GET, &path, &pull_scope(repository), &what, |r| r.header(ACCEPT, MANIFEST_ACCEPT))
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let header = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(String::from);
                let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
                    host: self.reference.host.clone(),
                    detail: e.without_url().to_string(),
                })?;
                // The registry's word, else the manifest's own hash (what a digest is).
                Ok(Some(header.unwrap_or_else(|| {
                    use sha2::Digest;
                    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)))
                })))
            }
            s => Err(self.status_error(&what, s, String::new())),
        }
    }

    /// Every tag of `repository`, following pagination. A missing repository has none.
    pub async fn list_tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let mut tags = Vec::new();
        let mut path = format!("/v2/{repository}/tags/list?n=1000");
        let what = format!("the tags of {repository}");
        loop {
            let resp = self
                .request(Method::GET, &path, &pull_scope(repository), &what, |r| r)
                .await?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND {
                return Ok(tags);
            }
            if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.status_error(&what, status, body));
            }
            let next = resp
                .headers()
                .get(LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let page: TagList = resp.json().await.map_err(|e| RegistryError::Unreachable {
                host: self.reference.host.clone(),
                detail: format!("unreadable tag list: {e}"),
            })?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(n) => path = n,
                None => return Ok(tags),
            }
        }
    }

    /// Points `to` at the manifest `from` (a tag or a digest) points at, by copying the
    /// manifest bytes: no layer is pulled or pushed.
    pub async fn copy_tag(&self, repository: &str, from: &str, to: &str) -> Result<(), RegistryError> {
        let scope = format!("repository:{repository}:pull,push");
        let what = format!("{repository}:{from}");
        let resp = self
            .request(Method::GET, &format!("/v2/{repository}/manifests/{from}"), &scope, &what, |r| {
                r.header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(self.status_error(&what, status, body));
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"));
        let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
            host: self.reference.host.clone(),
            detail: e.without_url().to_string(),
        })?;
        let what = format!("{repository}:{to}");
        let resp = self
            .request(Method::PUT, &format!("/v2/{repository}/manifests/{to}"), &scope, &what, |r| {
                r.header(CONTENT_TYPE, media_type.clone()).body(body.clone())
            })
            .await?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            let body = resp.text().await.unwrap_or_default();
            Err(self.status_error(&what, status, body))
        }
    }

    /// Copies the manifest `digest` of `from` (another repository of this registry) to
    /// `to` as `tag`, with every blob it names: mounted from `from` when the registry can,
    /// else sent through; blobs `to` already has are skipped. A manifest list or index is
    /// copied whole, with its children. (An untrusted build records a test pass on an image
    /// of the trusted namespace this way, in its own.)
    pub async fn copy_across(&self, from: &str, digest: &str, to: &str, tag: &str) -> Result<(), RegistryError> {
        use super::copy::{self, Endpoint};
        let (src, dst) = (Endpoint { client: self, repository: from }, Endpoint { client: self, repository: to });
        let plan = copy::plan(src, dst, digest).await?;
        copy::copy(src, dst, &plan, &[tag.to_string()], std::sync::Arc::new(|_| {})).await.map(|_| ())
    }

    /// A manifest's media type and bytes, or `None` when there is no such manifest.
    pub(super) async fn manifest_if_any(&self, repository: &str, reference: &str) -> Result<Option<(HeaderValue, Vec<u8>)>, RegistryError> {
        match self.manifest(repository, reference).await {
            Ok(m) => Ok(Some(m)),
            Err(RegistryError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A manifest's media type and bytes.
    pub(super) async fn manifest(&self, repository: &str, reference: &str) -> Result<(HeaderValue, Vec<u8>), RegistryError> {
        let what = format!("{repository}@{reference}");
        let resp = self
            .request(Method::GET, &format!("/v2/{repository}/manifests/{reference}"), &pull_scope(repository), &what, |r| r.header(ACCEPT, MANIFEST_ACCEPT))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(self.status_error(&what, status, body));
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"));
        let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
            host: self.reference.host.clone(),
            detail: e.without_url().to_string(),
        })?;
        Ok((media_type, body.to_vec()))
    }

    /// Puts a manifest under `reference`; returns the digest the registry says it stored.
    pub(super) async fn put_manifest(&self, repository: &str, reference: &str, media_type: &HeaderValue, body: Vec<u8>) -> Result<Option<String>, RegistryError> {
        let scope = format!("repository:{repository}:pull,push");
        let what = format!("{repository}:{reference}");
        let resp = self
            .request(Method::PUT, &format!("/v2/{repository}/manifests/{reference}"), &scope, &what, |r| {
                r.header(CONTENT_TYPE, media_type.clone()).body(body.clone())
            })
            .await?;
        let status = resp.status();
        if status.is_success() {
            Ok(resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(String::from))
        } else {
            let body = resp.text().await.unwrap_or_default();
            Err(self.status_error(&what, status, body))
        }
    }

    pub(super) fn status_error(&self, what: &str, status: StatusCode, body: String) -> RegistryError {
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RegistryError::Unauthorized {
                host: self.reference.host.clone(),
                what: what.to_string(),
            };
        }
        RegistryError::Status {
            host: self.reference.host.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            body,
        }
    }

    /// Sends one request, answering an auth challenge once, and retrying throttling, server
    /// errors and connection failures with backoff. Returns the final response, whatever
    /// its status, for the caller to interpret.
    pub(super) async fn request(
        &self,
        method: Method,
        path: &str,
        scope: &str,
        what: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        if let Some(detail) = self.down.lock().expect("not poisoned").clone() {
            return Err(RegistryError::Unreachable {
                host: self.reference.host.clone(),
                detail: format!("{detail} (an earlier request failed this way; not retried)"),
            });
        }
        let url = format!("{}{}", self.reference.base_url(), path);
        let attempt = || async {
            match self.attempt(&method, &url, scope, what, &build).await {
                Ok(resp) => Ok(resp),
                Err(Failure::Retry(e)) => Err((true, e)),
                Err(Failure::Final(e)) => Err((false, e)),
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.backoff_base)
            .with_max_delay(self.backoff_base * 20)
            .with_max_times(self.retries)
            .with_jitter();
        attempt
            .retry(backoff)
            .when(|(retry, _)| *retry)
            .notify(|(_, e), after| {
                tracing::debug!(error = %e, retry_in = ?after, "registry request failed; retrying")
            })
            .await
            .map_err(|(_, e)| {
                if let RegistryError::Unreachable { detail, .. } = &e {
                    *self.down.lock().expect("not poisoned") = Some(detail.clone());
                }
                e
            })
    }

    async fn attempt(
        &self,
        method: &Method,
        url: &str,
        scope: &str,
        what: &str,
        build: &impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Failure> {
        let host = &self.reference.host;
        let mut header = self.auth.initial_header(scope).await.map_err(Failure::Final)?;
        for round in 0..2 {
            let mut req = build(self.http.request(method.clone(), url));
            if let Some(h) = &header {
                req = req.header(AUTHORIZATION, h);
            }
            let resp = req.send().await.map_err(|e| {
                Failure::Retry(RegistryError::Unreachable {
                    host: host.clone(),
                    detail: describe(&e),
                })
            })?;
            let status = resp.status();
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                let body = resp.text().await.unwrap_or_default();
                return Err(Failure::Retry(self.status_error(what, status, body)));
            }
            if status != StatusCode::UNAUTHORIZED || round == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(Challenge::parse)
                .unwrap_or(Challenge::Basic);
            let answer = self
                .auth
                .answer(&self.http, &challenge, scope, host, what)
                .await
                .map_err(Failure::Final)?;
            header = Some(answer);
        }
        unreachable!("the loop returns in its second round")
    }
}

/// The path (and query) of an upload session's `Location`, finished with `digest`.
pub(super) fn upload_path(location: &str, digest: &str) -> String {
    let path = match location.find("://") {
        Some(i) => location[i + 3..].find('/').map(|p| location[i + 3 + p..].to_string()).unwrap_or_default(),
        None => location.to_string(),
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}digest={digest}")
}

pub(super) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// The target of a `Link: <url>; rel="next"` header, as a path (or absolute URL path part).
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let part = part.trim();
        if !part.contains("rel=\"next\"") && !part.contains("rel=next") {
            return None;
        }
        let start = part.find('<')? + 1;
        let end = part[start..].find('>')? + start;
        let target = &part[start..end];
        // Absolute links keep only their path and query: we always talk to our own host.
        match target.find("://") {
            Some(i) => target[i + 3..].find('/').map(|p| target[i + 3 + p..].to_string()),
            None => Some(target.to_string()),
        }
    })
}

/// A transport error with its cause chain, without the URL (which the message names).
pub(super) fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl ImageStore for Client {
    fn tag_exists<'a>(&'a self, project: &'a str, tag: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        Box::pin(async move { self.has_tag(&self.reference.repository(project), tag).await })
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn image_ref(&self, project: &str, tag: &str) -> String {
        format!("{}/{}:{}", self.reference.host, self.reference.repository(project), tag)
    }
}

#[cfg(test)]
mod tests {
    use super::next_link;

    #[test]
    fn follows_relative_and_absolute_next_links() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?last=x&n=2>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?last=x&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r.example/v2/a/tags/list?last=y>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?last=y")
        );
        assert_eq!(next_link(r#"</x>; rel="prev""#), None);
    }
}
