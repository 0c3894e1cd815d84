//! A proxy in front of a real registry that counts what goes through it (blob uploads,
//! bytes sent), can demand basic credentials, and can refuse blob uploads after a number
//! of them: the deploy tests' eyes on the wire. Plus images made through the registry API
//! itself (random layers, manifest lists), so that no Docker is needed to make them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::server::TestServer;
use super::services::runtime;

#[derive(Default, Debug)]
pub struct Counts {
    /// Blob uploads committed (the final PUT sent on to the registry), by digest.
    pub uploads: BTreeMap<String, usize>,
    /// Bytes of blob upload bodies (PATCH and PUT).
    pub bytes: u64,
    /// Every request, as `METHOD path`.
    pub requests: Vec<String>,
}

struct Inner {
    upstream: String,
    basic: Option<String>,
    counts: Mutex<Counts>,
    /// Blob uploads still allowed; `None`: all.
    uploads_left: Mutex<Option<usize>>,
    http: reqwest::Client,
    own: Mutex<String>,
}

pub struct RegistryProxy {
    inner: Arc<Inner>,
    _server: TestServer,
}

impl RegistryProxy {
    /// In front of the registry at `upstream` (`host:port`), demanding `user:password` when given.
    pub fn start(upstream: &str, basic: Option<(&str, &str)>) -> RegistryProxy {
        use base64::Engine;
        let inner = Arc::new(Inner {
            upstream: upstream.to_string(),
            basic: basic.map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))),
            counts: Mutex::new(Counts::default()),
            uploads_left: Mutex::new(None),
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            own: Mutex::new(String::new()),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(inner.clone());
        let server = TestServer::start(app);
        *inner.own.lock().unwrap() = format!("127.0.0.1:{}", server.port);
        RegistryProxy { inner, _server: server }
    }

    pub fn host(&self) -> String {
        self.inner.own.lock().unwrap().clone()
    }

    pub fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.counts.lock().unwrap()
    }

    pub fn reset(&self) {
        *self.inner.counts.lock().unwrap() = Counts::default();
    }

    /// Lets `n` more blob uploads through, then answers every further one with 502 (as a
    /// connection cut mid-copy would end it); `None` lifts the limit.
    pub fn allow_uploads(&self, n: Option<usize>) {
        *self.inner.uploads_left.lock().unwrap() = n;
    }
}

async fn forward(State(inner): State<Arc<Inner>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    if let Some(want) = &inner.basic {
        if path.starts_with("/v2") && headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
            return (StatusCode::UNAUTHORIZED, [("www-authenticate", "Basic realm=\"deploy\"")], "").into_response();
        }
    }
    let upload = path.contains("/blobs/uploads/");
    let finishing = upload && method == Method::PUT && path.contains("digest=");
    if upload && (method == Method::PATCH || finishing) {
        let mut left = inner.uploads_left.lock().unwrap();
        if let Some(n) = left.as_mut() {
            if *n == 0 {
                return (StatusCode::BAD_GATEWAY, "upload cut").into_response();
            }
            if finishing {
                *n -= 1;
            }
        }
    }
    if upload && (method == Method::PATCH || method == Method::PUT) {
        inner.counts.lock().unwrap().bytes += body.len() as u64;
    }
    if finishing {
        // Counted before it is forwarded: a client that goes away mid-request (its copy
        // failed elsewhere) may still have committed the blob upstream.
        let digest = path.split("digest=").nth(1).unwrap_or("").split('&').next().unwrap_or("").replace("%3A", ":");
        *inner.counts.lock().unwrap().uploads.entry(digest).or_default() += 1;
    }
    let mut req = inner.http.request(method.clone(), format!("http://{}{path}", inner.upstream));
    for (k, v) in &headers {
        if k != "host" && k != "authorization" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = match req.body(body).send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    inner.counts.lock().unwrap().requests.push(format!("{method} {path}"));
    let own = inner.own.lock().unwrap().clone();
    let mut out = HeaderMap::new();
    for (k, v) in resp.headers() {
        if k == "content-length" || k == "transfer-encoding" {
            continue;
        }
        let v = if k == "location" {
            v.to_str().unwrap_or("").replace(&inner.upstream, &own).parse().unwrap()
        } else {
            v.clone()
        };
        out.insert(k.clone(), v);
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    (status, out, bytes).into_response()
}

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Random bytes (a layer no other test or run shares).
pub fn random_layer(size: usize) -> Vec<u8> {
    let mut seed = Sha256::digest(format!("{:?}{}", std::time::SystemTime::now(), std::process::id()).as_bytes()).to_vec();
    let mut out = Vec::with_capacity(size + 32);
    while out.len() < size {
        seed = Sha256::digest(&seed).to_vec();
        out.extend_from_slice(&seed);
    }
    out.truncate(size);
    out
}

/// Talks to a registry directly (through the proxy's credentials when given).
pub struct Pusher {
    base: String,
    auth: Option<String>,
    http: reqwest::Client,
}

impl Pusher {
    pub fn new(host: &str, basic: Option<(&str, &str)>) -> Pusher {
        use base64::Engine;
        Pusher {
            base: format!("http://{host}"),
            auth: basic.map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))),
            http: reqwest::Client::new(),
        }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.auth {
            Some(a) => r.header("authorization", a),
            None => r,
        }
    }

    pub fn blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha(bytes);
        runtime().block_on(async {
            let resp = self.req(reqwest::Method::POST, &format!("{}/v2/{repo}/blobs/uploads/", self.base)).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 202);
            let loc = resp.headers()["location"].to_str().unwrap().to_string();
            let loc = if loc.starts_with("http") { loc } else { format!("{}{loc}", self.base) };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let resp = self
                .req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(bytes.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201, "blob upload");
        });
        digest
    }

    pub fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        runtime().block_on(async {
            let resp = self
                .req(reqwest::Method::PUT, &format!("{}/v2/{repo}/manifests/{reference}", self.base))
                .header("content-type", media_type)
                .body(body.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201, "manifest put: {:?}", resp.text().await);
        });
        sha(body)
    }

    /// Pushes an image of these layers (gzip media type; the registry does not look) under
    /// `tag`; returns (manifest digest, every blob digest).
    pub fn image(&self, repo: &str, tag: &str, layers: &[&[u8]], arch: &str) -> (String, Vec<String>) {
        let layer_digests: Vec<String> = layers.iter().map(|l| self.blob(repo, l)).collect();
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}},"config":{{}}}}"#,
            layer_digests.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(",")
        );
        let config_digest = self.blob(repo, config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": l.len()
            })).collect::<Vec<_>>(),
        });
        let body = serde_json::to_vec(&manifest).unwrap();
        let digest = self.put_manifest(repo, tag, "application/vnd.oci.image.manifest.v1+json", &body);
        let mut blobs = layer_digests;
        blobs.push(config_digest);
        (digest, blobs)
    }

    /// An OCI index of one image per architecture under `tag`; returns (index digest,
    /// child digests, every blob digest).
    pub fn index(&self, repo: &str, tag: &str, arches: &[&str]) -> (String, Vec<String>, Vec<String>) {
        let mut children = Vec::new();
        let mut blobs = Vec::new();
        let mut entries = Vec::new();
        for arch in arches {
            let layer = random_layer(4096);
            let (d, b) = self.image(repo, &format!("part-{arch}"), &[&layer], arch);
            let size = self.manifest_size(repo, &d);
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": size,
                "platform": {"os": "linux", "architecture": arch}
            }));
            children.push(d);
            blobs.extend(b);
        }
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
        let body = serde_json::to_vec(&index).unwrap();
        let digest = self.put_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &body);
        (digest, children, blobs)
    }

    fn manifest_size(&self, repo: &str, digest: &str) -> usize {
        self.manifest(repo, digest).map(|(_, b)| b.len()).unwrap()
    }

    /// A manifest's media type and bytes, if it exists.
    pub fn manifest(&self, repo: &str, reference: &str) -> Option<(String, Vec<u8>)> {
        runtime().block_on(async {
            let resp = self
                .req(reqwest::Method::GET, &format!("{}/v2/{repo}/manifests/{reference}", self.base))
                .header(
                    "accept",
                    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
                )
                .send()
                .await
                .unwrap();
            if resp.status().as_u16() == 404 {
                return None;
            }
            assert!(resp.status().is_success(), "manifest get: {}", resp.status());
            let mt = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            Some((mt, resp.bytes().await.unwrap().to_vec()))
        })
    }

    /// The digest `reference` points at, if it exists.
    pub fn digest(&self, repo: &str, reference: &str) -> Option<String> {
        self.manifest(repo, reference).map(|(_, b)| sha(&b))
    }

    /// A blob's bytes.
    pub fn blob_bytes(&self, repo: &str, digest: &str) -> Vec<u8> {
        runtime().block_on(async {
            let resp = self.req(reqwest::Method::GET, &format!("{}/v2/{repo}/blobs/{digest}", self.base)).send().await.unwrap();
            assert!(resp.status().is_success(), "blob get: {}", resp.status());
            resp.bytes().await.unwrap().to_vec()
        })
    }

    /// What a `HEAD` of `reference` answers when it accepts only index media types:
    /// (status, content type).
    pub fn head_index(&self, repo: &str, reference: &str) -> (u16, String) {
        runtime().block_on(async {
            let resp = self
                .req(reqwest::Method::HEAD, &format!("{}/v2/{repo}/manifests/{reference}", self.base))
                .header("accept", "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json")
                .send()
                .await
                .unwrap();
            let mt = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            (resp.status().as_u16(), mt)
        })
    }

    pub fn has_blob(&self, repo: &str, digest: &str) -> bool {
        runtime().block_on(async {
            self.req(reqwest::Method::HEAD, &format!("{}/v2/{repo}/blobs/{digest}", self.base)).send().await.unwrap().status().is_success()
        })
    }

    /// Tags `to` as `from` (a manifest copy).
    pub fn retag(&self, repo: &str, from: &str, to: &str) {
        let (mt, body) = self.manifest(repo, from).expect("the source tag exists");
        self.put_manifest(repo, to, &mt, &body);
    }
}
