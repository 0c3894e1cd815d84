//! The farm's doors to the AWS emulator. The emulator (moto server) runs in a network
//! namespace of its own, with nothing but loopback, so nothing reaches it except through a
//! door the farm opens:
//! - the owner's door, on this machine's loopback, lets in only requests signed (SigV4, in
//!   the `Authorization` header) with the farm's key, whose secret is in the farm's state
//!   file (mode 0600), and answers SSM's command calls itself by running the script on the
//!   host ([`super::ssm`]);
//! - each host's door, inside the host, lets in only S3 requests for the transport bucket,
//!   as an instance role's policy would.
//!
//! Guarantees: no request reaches the emulator without passing one of the two policies. The
//! owner's door checks the signature, not only the key id (which travels in presigned URLs
//! and so on command lines), and takes no presigned URL at all: those are for hosts.
//! Caveats: a signed request could be replayed within [`MAX_SKEW`] by someone who saw it
//! whole, which takes root on this machine; the hosts' doors check no signature (the
//! emulator has no IAM to check one against), only what they let through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

use super::{netns, sigv4, ssm};

/// Where the emulator listens: an address inside its private namespace.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub ns: String,
    pub addr: SocketAddr,
}

/// Who a door lets in.
#[derive(Clone)]
pub enum Policy {
    /// The farm's owner: requests signed with this key; SSM command calls go to `ssm`.
    Owner { key_id: String, secret: String, ssm: Arc<ssm::Runner> },
    /// A host: S3 requests for objects in `bucket`, nothing else.
    Host { bucket: String },
}

#[derive(Clone)]
struct Door {
    upstream: Upstream,
    policy: Policy,
}

/// A door's routes: every request is checked against `policy`, then relayed.
pub fn router(upstream: Upstream, policy: Policy) -> axum::Router {
    axum::Router::new().fallback(enter).with_state(Arc::new(Door { upstream, policy }))
}

/// What a SigV4 request says about its signer: from the `Authorization` header, or from a
/// presigned URL's `X-Amz-Credential`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub key_id: String,
    pub service: String,
}

pub fn credential(authorization: Option<&str>, query: Option<&str>) -> Option<Credential> {
    let scope = match authorization {
        Some(a) => a.split("Credential=").nth(1)?.split([',', ' ']).next()?.to_string(),
        None => {
            let raw = query?.split('&').find_map(|kv| kv.strip_prefix("X-Amz-Credential="))?;
            super::sigv4::percent_decode(raw)
        }
    };
    // KEY/DATE/REGION/SERVICE/aws4_request
    let parts: Vec<&str> = scope.split('/').collect();
    match parts.as_slice() {
        [key, _, _, service, "aws4_request"] if !key.is_empty() => Some(Credential {
            key_id: key.to_string(),
            service: service.to_string(),
        }),
        _ => None,
    }
}


/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn denied(why: &str) -> Response {
    (StatusCode::FORBIDDEN, format!("spotbuild farm: {why}\n")).into_response()
}

/// How far a signed request's time may be from this machine's.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Bodies the owner's door hashes itself (EC2's and SSM's; S3's carry their hash).
const HASHED_BODY_LIMIT: usize = 16 << 20;

async fn enter(State(door): State<Arc<Door>>, req: Request) -> Response {
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
    let cred = credential(auth.as_deref(), req.uri().query());
    let mut req = req;
    match &door.policy {
        Policy::Owner { key_id, secret, ssm } => {
            let signed_by_owner = auth.is_some() && cred.as_ref().is_some_and(|c| same_secret(&c.key_id, key_id));
            if !signed_by_owner {
                return denied("requests must be signed with the farm's key (`spotbuild farm env` prints it)");
            }
            let (parts, body) = req.into_parts();
            // The payload's hash: S3's requests say it (and stream); others are hashed here.
            let (payload, body) = match parts.headers.get("x-amz-content-sha256").and_then(|v| v.to_str().ok()) {
                Some(h) => (h.to_string(), body),
                None => match axum::body::to_bytes(body, HASHED_BODY_LIMIT).await {
                    Ok(b) => (hex::encode(Sha256::digest(&b)), Body::from(b)),
                    Err(_) => return denied("a request body over 16 MiB without x-amz-content-sha256"),
                },
            };
            if let Err(why) = sigv4::verify(&parts, &payload, secret, std::time::SystemTime::now()) {
                tracing::warn!(%why, method = %parts.method, path = %parts.uri.path(), "refused a request to the emulator");
                return denied(&format!("the request's signature does not hold: {why}"));
            }
            req = Request::from_parts(parts, body);
            let target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if let Some(op) = target.strip_prefix("AmazonSSM.") {
                if ssm::Runner::answers(op) {
                    let op = op.to_string();
                    let body = match axum::body::to_bytes(req.into_body(), 1 << 20).await {
                        Ok(b) => b,
                        Err(_) => return denied("an SSM request body over 1 MiB"),
                    };
                    return ssm.answer(&op, &body).await;
                }
            }
        }
        Policy::Host { bucket } => {
            let path = req.uri().path();
            let in_bucket = path.strip_prefix('/').and_then(|p| p.strip_prefix(bucket.as_str())).is_some_and(|rest| rest.starts_with('/'));
            if !cred.is_some_and(|c| c.service == "s3") || !in_bucket {
                return denied("a host may only reach objects in the transport bucket");
            }
        }
    }
    match relay(&door.upstream, req).await {
        Ok(r) => r,
        Err(e) => (StatusCode::BAD_GATEWAY, format!("spotbuild farm: the emulator did not answer: {e}\n")).into_response(),
    }
}

/// Sends `req` to the emulator on a connection of its own, streaming both bodies.
async fn relay(upstream: &Upstream, req: Request) -> Result<Response, Box<dyn std::error::Error + Send + Sync>> {
    let stream = netns::connect_in(&upstream.ns, upstream.addr, Duration::from_secs(10)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await?;
    // The connection ends once the response has been read and the sender is gone.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    Ok(resp.map(Body::new))
}

/// Waits (bounded) until the emulator answers inside its namespace.
pub async fn wait_upstream(upstream: &Upstream, limit: Duration) -> bool {
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = "/moto-api/".parse().expect("a path");
        req.headers_mut().insert("host", HeaderValue::from_static("localhost"));
        if relay(upstream, req).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signer_is_read_from_the_header_or_a_presigned_url() {
        let h = "AWS4-HMAC-SHA256 Credential=AKIAFARM/20261205/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=ab";
        assert_eq!(
            credential(Some(h), None),
            Some(Credential {
                key_id: "AKIAFARM".into(),
                service: "ec2".into()
            })
        );
        let q = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFARM%2F20261205%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=00";
        assert_eq!(credential(None, Some(q)).map(|c| c.service), Some("s3".into()));
        for bad in ["AWS4-HMAC-SHA256 Credential=/x/y/ec2/aws4_request", "Bearer abc", "AWS4-HMAC-SHA256 Credential=K/d/r/s3"] {
            assert_eq!(credential(Some(bad), None), None, "{bad}");
        }
        assert_eq!(credential(None, Some("X-Amz-Credential=K%2")), None);
        assert_eq!(credential(None, None), None);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }
}
