//! A scripted registry for what a real docker-registry cannot easily be made to do: bearer
//! token challenges, ECR-style basic auth, throttling and server errors. It answers only
//! manifest lookups and token requests, and records every request it sees.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;

#[derive(Clone)]
pub enum Auth {
    None,
    /// Requires `Authorization: Basic user:password`.
    Basic { user: String, password: String },
    /// Challenges with a bearer realm on this server; the token endpoint requires the given
    /// basic credentials when set.
    Bearer { login: Option<(String, String)> },
}

#[derive(Default)]
pub struct Log {
    /// `METHOD path authorization-scheme`.
    pub requests: Vec<String>,
    pub token_requests: usize,
}

struct Shared {
    auth: Auth,
    tags: HashSet<String>,
    /// Answer this many manifest requests with `fail_status` before behaving.
    fail: Mutex<(usize, u16)>,
    log: Mutex<Log>,
    port: u16,
}

pub struct FakeRegistry {
    pub port: u16,
    shared: Arc<Shared>,
    _server: super::server::TestServer,
}

impl FakeRegistry {
    /// `tags` are `repository:tag` strings that exist.
    pub fn start(auth: Auth, tags: &[&str]) -> FakeRegistry {
        // The bearer realm names this server, so the port is reserved first.
        let port = crate::support::services::free_port();
        let shared = Arc::new(Shared {
            auth,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            fail: Mutex::new((0, 500)),
            log: Mutex::new(Log::default()),
            port,
        });
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let server = super::server::TestServer::start_on(port, app);
        FakeRegistry {
            port,
            shared,
            _server: server,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The next `times` manifest requests get HTTP `status`.
    pub fn fail_next(&self, times: usize, status: u16) {
        *self.shared.fail.lock().unwrap() = (times, status);
    }

    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.shared.log.lock().unwrap()
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn handle(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = uri.path().to_string();
    s.log.lock().unwrap().requests.push(format!(
        "{method} {path} {}",
        auth.split(' ').next().unwrap_or("")
    ));

    if path == "/token" {
        s.log.lock().unwrap().token_requests += 1;
        if let Auth::Bearer { login: Some((u, p)) } = &s.auth {
            if auth != basic(u, p) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
        }
        let scope = uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("scope="))
            .unwrap_or("")
            .replace("%3A", ":")
            .replace("%2F", "/")
            .replace("%2C", ",");
        let body = format!(r#"{{"token":"tok {scope}","expires_in":300}}"#);
        return ([("content-type", "application/json")], body).into_response();
    }

    // /v2/<repository>/manifests/<tag>
    let Some(rest) = path.strip_prefix("/v2/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some((repository, tag)) = rest.split_once("/manifests/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    {
        let mut fail = s.fail.lock().unwrap();
        if fail.0 > 0 {
            fail.0 -= 1;
            return StatusCode::from_u16(fail.1).unwrap().into_response();
        }
    }
    match &s.auth {
        Auth::None => {}
        Auth::Basic { user, password } => {
            if auth != basic(user, password) {
                return (
                    StatusCode::UNAUTHORIZED,
                    [("www-authenticate", r#"Basic realm="fake""#.to_string())],
                )
                    .into_response();
            }
        }
        Auth::Bearer { .. } => {
            let scope = format!("repository:{repository}:pull");
            if auth != format!("Bearer tok {scope}") {
                let challenge = format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="fake",scope="{scope}""#,
                    s.port
                );
                return (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response();
            }
        }
    }
    if s.tags.contains(&format!("{repository}:{tag}")) {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}
