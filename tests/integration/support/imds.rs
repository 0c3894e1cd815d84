//! A stand-in for the EC2 instance metadata service (IMDSv2): a session token is required,
//! and the test decides when a spot interruption notice appears.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

pub struct FakeImds {
    pub port: u16,
    /// Seconds ahead of now that the termination is announced for; 0: no notice yet.
    notice: Arc<AtomicU64>,
    _server: super::server::TestServer,
}

impl FakeImds {
    pub fn start() -> FakeImds {
        let notice = Arc::new(AtomicU64::new(0));
        let server = super::server::TestServer::start(axum::Router::new().fallback(handle).with_state(notice.clone()));
        FakeImds {
            port: server.port,
            notice,
            _server: server,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, `spot/instance-action` reports a termination `secs` ahead.
    pub fn interrupt_in(&self, secs: u64) {
        self.notice.store(secs, Ordering::SeqCst);
    }
}

async fn handle(State(notice): State<Arc<AtomicU64>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    if path == "/latest/api/token" {
        return if method == Method::PUT && headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
            "test-token".into_response()
        } else {
            StatusCode::BAD_REQUEST.into_response()
        };
    }
    if headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) != Some("test-token") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match path {
        "/latest/meta-data/instance-id" => "i-0123456789abcdef0".into_response(),
        "/latest/meta-data/spot/instance-action" if notice.load(Ordering::SeqCst) > 0 => {
            let at = std::time::SystemTime::now() + std::time::Duration::from_secs(notice.load(Ordering::SeqCst));
            let body = format!(r#"{{"action":"terminate","time":"{}"}}"#, humantime::format_rfc3339_seconds(at));
            body.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A metadata service that does not help: it refuses session tokens (403), or accepts
/// connections and never answers, or is not there at all.
pub enum BadImds {
    Refusing(super::server::TestServer),
    /// Bound and never accepted: connections complete in the kernel's backlog, and every
    /// request waits forever.
    Hanging(std::net::TcpListener),
    Absent(u16),
}

impl BadImds {
    pub fn all() -> Vec<BadImds> {
        let refusing = super::server::TestServer::start(axum::Router::new().fallback(|| async { StatusCode::FORBIDDEN }));
        let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let absent = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        vec![BadImds::Refusing(refusing), BadImds::Hanging(hanging), BadImds::Absent(absent)]
    }

    pub fn name(&self) -> &'static str {
        match self {
            BadImds::Refusing(_) => "refusing tokens (403)",
            BadImds::Hanging(_) => "hanging",
            BadImds::Absent(_) => "absent",
        }
    }

    pub fn endpoint(&self) -> String {
        let port = match self {
            BadImds::Refusing(s) => s.port,
            BadImds::Hanging(l) => l.local_addr().unwrap().port(),
            BadImds::Absent(p) => *p,
        };
        format!("http://127.0.0.1:{port}")
    }
}
