//! Checking an AWS Signature Version 4 (`Authorization` header form) against a known
//! secret: what the farm's owner's door needs so that knowing the farm's key id is not
//! enough. Follows AWS's "Create a signed AWS API request" steps: canonical request, string
//! to sign, derived key, HMAC-SHA256.
//!
//! Guarantees: a request passes only if its signature is the one the secret gives for its
//! method, path, query, signed headers and payload hash, and its time is within
//! [`super::front::MAX_SKEW`]. Assumptions: the payload hash is the caller's (from
//! `x-amz-content-sha256`, or the hash of the body it read).

use std::time::SystemTime;

use axum::http::request::Parts;
use sha2::{Digest, Sha256};

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no AWS4-HMAC-SHA256 Authorization header")]
    NoAuthorization,
    #[error("the Authorization header is malformed")]
    Malformed,
    #[error("no x-amz-date header")]
    NoDate,
    #[error("signed at {0}, too far from this machine's time")]
    Skewed(String),
    #[error("a signed header is missing: {0}")]
    MissingHeader(String),
    #[error("the signature does not match")]
    Mismatch,
}

struct Authorization<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse(value: &str) -> Result<Authorization<'_>, Refused> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ").ok_or(Refused::NoAuthorization)?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',').map(str::trim) {
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let scope: Vec<&str> = credential.ok_or(Refused::Malformed)?.split('/').collect();
    match scope.as_slice() {
        [_, date, region, service, "aws4_request"] => Ok(Authorization {
            date,
            region,
            service,
            signed_headers: signed_headers.ok_or(Refused::Malformed)?,
            signature: signature.ok_or(Refused::Malformed)?,
        }),
        _ => Err(Refused::Malformed),
    }
}

/// Percent-encodes as SigV4 does: everything but `A-Za-z0-9-_.~` (and `/` when kept).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (a malformed one is kept as it is).
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%').then(|| bytes.get(i + 1..i + 3)).flatten().and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical_query(query: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = query
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (uri_encode(&percent_decode(k), false), uri_encode(&percent_decode(v), false))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// The canonical request of `parts` as signed for `service` (S3 paths are encoded once,
/// every other service's twice).
fn canonical_request(parts: &Parts, auth: &Authorization<'_>, payload: &str) -> Result<String, Refused> {
    let path = parts.uri.path();
    let path = if auth.service == "s3" { path.to_string() } else { uri_encode(path, true) };
    let mut headers = String::new();
    for name in auth.signed_headers.split(';') {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(Refused::MissingHeader(name.to_string()));
        }
        headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!(
        "{}\n{path}\n{}\n{headers}\n{}\n{payload}",
        parts.method.as_str(),
        canonical_query(parts.uri.query()),
        auth.signed_headers
    ))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The signature `secret` gives the request.
fn signature(parts: &Parts, auth: &Authorization<'_>, amz_date: &str, payload: &str, secret: &str) -> Result<String, Refused> {
    let canonical = canonical_request(parts, auth, payload)?;
    let scope = format!("{}/{}/{}/aws4_request", auth.date, auth.region, auth.service);
    let to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    for part in [auth.region, auth.service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    Ok(hex::encode(hmac(&key, to_sign.as_bytes())))
}

/// The `Authorization` header of the request in `parts`, signed once already, for a payload
/// that now hashes to `payload`: what a proxy that rewrites bodies (the tests' fault proxy)
/// sends on to the farm.
pub fn resign(parts: &Parts, payload: &str, secret: &str) -> Result<String, Refused> {
    let value = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).ok_or(Refused::NoAuthorization)?;
    let auth = parse(value)?;
    let amz_date = parts.headers.get("x-amz-date").and_then(|v| v.to_str().ok()).ok_or(Refused::NoDate)?;
    let fresh = signature(parts, &auth, amz_date, payload, secret)?;
    Ok(value.replace(auth.signature, &fresh))
}

/// `20261205T201503Z` as a time.
fn amz_time(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc = format!("{}-{}-{}T{}:{}:{}Z", &s[0..4], &s[4..6], &s[6..8], &s[9..11], &s[11..13], &s[13..15]);
    humantime::parse_rfc3339(&rfc).ok()
}

/// Whether the request in `parts`, whose payload hashes to `payload` (hex, or S3's literal
/// `UNSIGNED-PAYLOAD` and the like), was signed with `secret` close to `now`.
pub fn verify(parts: &Parts, payload: &str, secret: &str, now: SystemTime) -> Result<(), Refused> {
    let value = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).ok_or(Refused::NoAuthorization)?;
    let auth = parse(value)?;
    let amz_date = parts.headers.get("x-amz-date").and_then(|v| v.to_str().ok()).ok_or(Refused::NoDate)?;
    let at = amz_time(amz_date).ok_or_else(|| Refused::Skewed(amz_date.to_string()))?;
    let skew = now.duration_since(at).or_else(|e| Ok::<_, ()>(e.duration())).unwrap_or_default();
    if skew > super::front::MAX_SKEW || !amz_date.starts_with(auth.date) {
        return Err(Refused::Skewed(amz_date.to_string()));
    }
    let expected = signature(parts, &auth, amz_date, payload, secret)?;
    if super::front::same_secret(&expected, auth.signature) {
        Ok(())
    } else {
        Err(Refused::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's worked example ("Examples of the complete Signature Version 4 signing
    /// process"): IAM ListUsers, signed on 2015-08-30 with the documentation's example key.
    fn example(signature: &str, query: &str) -> Parts {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature={signature}"
        );
        let (parts, ()) = axum::http::Request::builder()
            .method("GET")
            .uri(format!("/?{query}"))
            .header("host", "iam.amazonaws.com")
            .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
            .header("x-amz-date", "20150830T123600Z")
            .header("authorization", auth)
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const SIGNATURE: &str = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn the_documentation_example_verifies_and_any_change_does_not() {
        let then = amz_time("20150830T123600Z").unwrap();
        let ok = example(SIGNATURE, "Action=ListUsers&Version=2010-05-08");
        assert_eq!(verify(&ok, EMPTY, SECRET, then), Ok(()));
        // Parameters in another order sign the same.
        assert_eq!(verify(&example(SIGNATURE, "Version=2010-05-08&Action=ListUsers"), EMPTY, SECRET, then), Ok(()));
        assert_eq!(verify(&ok, EMPTY, "another secret", then), Err(Refused::Mismatch));
        assert_eq!(verify(&example(SIGNATURE, "Action=DeleteUser&Version=2010-05-08"), EMPTY, SECRET, then), Err(Refused::Mismatch));
        assert_eq!(verify(&ok, &"0".repeat(64), SECRET, then), Err(Refused::Mismatch));
        let later = then + std::time::Duration::from_secs(16 * 60);
        assert!(matches!(verify(&ok, EMPTY, SECRET, later), Err(Refused::Skewed(_))));
        let mut no_host = ok.clone();
        no_host.headers.remove("host");
        assert_eq!(verify(&no_host, EMPTY, SECRET, then), Err(Refused::MissingHeader("host".into())));
        let mut bearer = ok;
        bearer.headers.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(verify(&bearer, EMPTY, SECRET, then), Err(Refused::NoAuthorization));
    }

    #[test]
    fn paths_are_encoded_once_for_s3_and_twice_elsewhere() {
        assert_eq!(uri_encode("/a b/c%2F", true), "/a%20b/c%252F");
        assert_eq!(canonical_query(Some("b=2&a=x%2Fy&a=1&flag")), "a=1&a=x%2Fy&b=2&flag=");
    }
}
