//! A fault-injection proxy in front of the AWS emulator, for what moto cannot do: answer
//! an action with an error (throttling, permissions), answer an EC2 Fleet request with
//! per-pool capacity errors, let a request take effect and answer too late for the client,
//! hide new instances for a while (EC2's eventual consistency), or throttle every call for
//! a while. Everything else is forwarded unchanged. Every action seen is recorded, so tests
//! can assert what was (not) called.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

#[derive(Clone, Debug)]
pub enum Fault {
    /// An EC2 error response with this HTTP status and code.
    Error { status: u16, code: &'static str },
    /// A CreateFleet answer that launched nothing, with this error for every pool asked for.
    FleetErrors { code: &'static str },
    /// CreateFleet without this instance type's pools (forwarded), and this error for them
    /// added to the answer: EC2's behaviour when one pool has no capacity.
    FleetPoolFails { instance_type: &'static str, code: &'static str },
    /// Forwarded (it takes effect), then answered only after this long: longer than the
    /// client waits, it is a request that succeeded at AWS and timed out at the client.
    Late(Duration),
}

struct Rule {
    action: &'static str,
    /// Only when the request body contains this text (e.g. `DefaultTargetCapacityType=spot`).
    when: Option<&'static str>,
    times: usize,
    fault: Fault,
}

#[derive(Default)]
struct Shared {
    upstream: String,
    rules: Mutex<Vec<Rule>>,
    actions: Mutex<Vec<String>>,
    /// (action, form body) of every request.
    bodies: Mutex<Vec<(String, String)>>,
    /// Every action is throttled until then.
    throttled_until: Mutex<Option<Instant>>,
    /// Instances launched from now on are hidden this long after their launch.
    hide_new_for: Mutex<Option<Duration>>,
    /// Instance ids EC2 "does not know yet", until when.
    hidden: Mutex<Vec<(String, Instant)>>,
    /// The secret requests are signed with, when the upstream checks signatures (the local
    /// farm's): a body rewritten here is signed again.
    secret: Option<String>,
}

pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    _server: super::server::TestServer,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        FaultProxy::start_with(upstream, None)
    }

    /// In front of an upstream that checks signatures made with `secret`.
    pub fn start_signed(upstream: &str, secret: &str) -> FaultProxy {
        FaultProxy::start_with(upstream, Some(secret.to_string()))
    }

    fn start_with(upstream: &str, secret: Option<String>) -> FaultProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            secret,
            ..Default::default()
        });
        let server = super::server::TestServer::start(axum::Router::new().fallback(handle).with_state(shared.clone()));
        FaultProxy {
            port: server.port,
            shared,
            _server: server,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next `times` requests for `action` (whose body contains `when`, if given) get `fault`.
    pub fn inject(&self, action: &'static str, when: Option<&'static str>, times: usize, fault: Fault) {
        self.shared.rules.lock().unwrap().push(Rule { action, when, times, fault });
    }

    /// Every action is answered RequestLimitExceeded for `d`.
    pub fn throttle_all_for(&self, d: Duration) {
        *self.shared.throttled_until.lock().unwrap() = Some(Instant::now() + d);
    }

    /// Instances launched from now on are unknown (InvalidInstanceID.NotFound to calls
    /// naming them) for `d` after their launch.
    pub fn hide_new_instances_for(&self, d: Duration) {
        *self.shared.hide_new_for.lock().unwrap() = Some(d);
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
        *self.shared.throttled_until.lock().unwrap() = None;
        *self.shared.hide_new_for.lock().unwrap() = None;
        self.shared.hidden.lock().unwrap().clear();
    }

    /// Every action seen, in order.
    pub fn actions(&self) -> Vec<String> {
        self.shared.actions.lock().unwrap().clone()
    }

    /// The decoded form parameters of the first request for `action`.
    pub fn params(&self, action: &str) -> std::collections::BTreeMap<String, String> {
        let bodies = self.shared.bodies.lock().unwrap();
        let body = bodies.iter().find(|(a, _)| a == action).map(|(_, b)| b.clone()).unwrap_or_default();
        body.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (decode(k), decode(v)))
            .collect()
    }
}

fn form_value<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Percent-decoding of a form value (`+` is a space).
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error_response(status: u16, code: &str) -> Response {
    (StatusCode::from_u16(status).unwrap(), [("content-type", "text/xml")], error_xml(code)).into_response()
}

/// The instance ids a CreateFleet answer names.
fn launched_ids(xml: &str) -> Vec<String> {
    xml.split("<instanceIds>")
        .skip(1)
        .filter_map(|rest| rest.split_once("</instanceIds>").map(|(ids, _)| ids))
        .flat_map(|ids| ids.split("<item>").skip(1).filter_map(|i| i.split_once("</item>").map(|(id, _)| id.trim().to_string())))
        .collect()
}

fn error_xml(code: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>injected by the test's fault proxy</Message></Error></Errors>\
         <RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    )
}

/// A CreateFleet response with no instances and `code` for every override in the request.
fn fleet_errors_xml(body: &str, code: &str) -> String {
    let decoded = decode;
    let lifecycle = if body.contains("DefaultTargetCapacityType=spot") { "spot" } else { "on-demand" };
    let mut items = String::new();
    for i in 1.. {
        let Some(t) = form_value(body, &format!("LaunchTemplateConfigs.1.Overrides.{i}.InstanceType")) else { break };
        let subnet = form_value(body, &format!("LaunchTemplateConfigs.1.Overrides.{i}.SubnetId")).unwrap_or("");
        items.push_str(&format!(
            "<item><launchTemplateAndOverrides><overrides><instanceType>{}</instanceType><subnetId>{}</subnetId>\
             </overrides></launchTemplateAndOverrides><lifecycle>{lifecycle}</lifecycle><errorCode>{code}</errorCode>\
             <errorMessage>injected: no capacity in this pool</errorMessage></item>",
            decoded(t),
            decoded(subnet)
        ));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CreateFleetResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
         <requestId>00000000-0000-0000-0000-000000000000</requestId><fleetId>fleet-injected</fleetId>\
         <errorSet>{items}</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    )
}

async fn handle(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let action = form_value(&text, "Action").unwrap_or("").to_string();
    s.actions.lock().unwrap().push(action.clone());
    s.bodies.lock().unwrap().push((action.clone(), text.clone()));
    if s.throttled_until.lock().unwrap().is_some_and(|t| Instant::now() < t) {
        return error_response(503, "RequestLimitExceeded");
    }
    // A call naming an instance EC2 does not list yet.
    {
        let now = Instant::now();
        let mut hidden = s.hidden.lock().unwrap();
        hidden.retain(|(_, until)| *until > now);
        let names_hidden = hidden.iter().any(|(id, _)| text.split('&').any(|kv| kv.split_once('=').is_some_and(|(k, v)| k.starts_with("InstanceId") && v == id)));
        if names_hidden && (action == "DescribeInstances" || action == "TerminateInstances") {
            return error_response(400, "InvalidInstanceID.NotFound");
        }
    }
    let fault = {
        let mut rules = s.rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|r| r.times > 0 && r.action == action && r.when.is_none_or(|w| text.contains(w)))
            .map(|r| {
                r.times -= 1;
                r.fault.clone()
            })
    };
    match fault {
        Some(Fault::Error { status, code }) => {
            return (StatusCode::from_u16(status).unwrap(), [("content-type", "text/xml")], error_xml(code)).into_response()
        }
        Some(Fault::FleetErrors { code }) => {
            return (StatusCode::OK, [("content-type", "text/xml")], fleet_errors_xml(&text, code)).into_response()
        }
        Some(Fault::FleetPoolFails { instance_type, code }) => {
            let (body, failed) = without_pool(&text, instance_type);
            let mut headers = headers.clone();
            if let Some(secret) = &s.secret {
                let mut req = axum::http::Request::builder().method(method.clone()).uri(uri.clone()).body(()).unwrap();
                *req.headers_mut() = headers.clone();
                let (parts, ()) = req.into_parts();
                let payload = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
                let auth = spotbuild::localfarm::sigv4::resign(&parts, &payload, secret).expect("a signed request");
                headers.insert("authorization", auth.parse().unwrap());
            }
            let answer = forward(&s, method, &uri, &headers, Bytes::from(body)).await;
            let (status, xml) = answer;
            let items = fleet_errors_xml(&failed, code);
            let items = items
                .split_once("<errorSet>")
                .and_then(|(_, rest)| rest.split_once("</errorSet>"))
                .map(|(i, _)| i.to_string())
                .unwrap_or_default();
            let xml = match xml.rfind("</") {
                Some(end) => format!("{}<errorSet>{items}</errorSet>{}", &xml[..end], &xml[end..]),
                None => xml,
            };
            return (status, [("content-type", "text/xml")], xml).into_response();
        }
        Some(Fault::Late(delay)) => {
            let (status, text) = forward(&s, method, &uri, &headers, body).await;
            tokio::time::sleep(delay).await;
            return (status, [("content-type", "text/xml")], text).into_response();
        }
        None => {}
    }
    let (status, text) = forward(&s, method, &uri, &headers, body).await;
    if action == "CreateFleet" {
        if let Some(d) = *s.hide_new_for.lock().unwrap() {
            let until = Instant::now() + d;
            s.hidden.lock().unwrap().extend(launched_ids(&text).into_iter().map(|id| (id, until)));
        }
    }
    (status, [("content-type", "text/xml")], text).into_response()
}

async fn forward(s: &Shared, method: Method, uri: &Uri, headers: &HeaderMap, body: Bytes) -> (StatusCode, String) {
    let url = format!("{}{}", s.upstream, uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let client = reqwest::Client::new();
    let mut req = client.request(method, url).body(body);
    for (k, v) in headers.iter() {
        // The Host header too: requests to the farm are signed over it.
        if k != "content-length" {
            req = req.header(k, v);
        }
    }
    match req.send().await {
        Ok(resp) => (resp.status(), resp.text().await.unwrap_or_default()),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// The CreateFleet form body without the overrides for `instance_type` (the rest
/// renumbered), and a body holding just the removed ones (for the error items).
fn without_pool(body: &str, instance_type: &str) -> (String, String) {
    const PREFIX: &str = "LaunchTemplateConfigs.1.Overrides.";
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    let mut overrides: std::collections::BTreeMap<u32, Vec<(String, String)>> = Default::default();
    for kv in body.split('&') {
        let Some((k, v)) = kv.split_once('=') else { continue };
        match k.strip_prefix(PREFIX).and_then(|r| r.split_once('.')) {
            Some((n, field)) if n.parse::<u32>().is_ok() => {
                overrides.entry(n.parse().unwrap()).or_default().push((field.to_string(), v.to_string()));
            }
            _ => kept.push(kv.to_string()),
        }
    }
    let mut next = 1;
    for fields in overrides.values() {
        let fails = fields.iter().any(|(f, v)| f == "InstanceType" && decode(v) == instance_type);
        if fails {
            for (f, v) in fields {
                removed.push(format!("{PREFIX}{}.{f}={v}", removed.len() / fields.len() + 1));
            }
        } else {
            for (f, v) in fields {
                kept.push(format!("{PREFIX}{next}.{f}={v}"));
            }
            next += 1;
        }
    }
    let capacity: Vec<String> = kept.iter().filter(|kv| kv.starts_with("TargetCapacitySpecification.DefaultTargetCapacityType")).cloned().collect();
    removed.extend(capacity);
    (kept.join("&"), removed.join("&"))
}
