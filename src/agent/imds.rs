//! Watching the instance metadata service (IMDSv2: a session token first) for a spot
//! interruption notice or a rebalance recommendation.
//!
//! Every request is bounded by [`REQUEST_TIMEOUT`]; an unreachable IMDS is reported once and
//! polled again, never fatal: the build goes on.

use std::time::Duration;

use tokio::sync::watch;

use super::events::Events;
use crate::protocol::{Event, NoticeKind};

pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
pub const ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const TOKEN_TTL_SECS: u32 = 21600;

pub struct Imds {
    http: reqwest::Client,
    endpoint: String,
    token: Option<String>,
}

/// Why a metadata request got no answer. Never fatal: the watcher reports it once.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("failed to reach IMDS at {endpoint}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to read an answer from IMDS at {endpoint}")]
    Read {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("IMDS refused a session token: HTTP {0}")]
    TokenRefused(u16),
    #[error("IMDS answered HTTP {status} for {path}")]
    Status { status: u16, path: String },
    #[error("IMDS kept refusing its own token")]
    TokenRejected,
}

/// A notice that stops the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: NoticeKind,
    pub action: Option<String>,
    pub time: Option<String>,
}

impl Imds {
    pub fn new(endpoint: Option<String>) -> Imds {
        let endpoint = endpoint
            .or_else(|| std::env::var(ENDPOINT_ENV).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Imds {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(REQUEST_TIMEOUT)
                .no_proxy()
                .build()
                .expect("a plain HTTP client builds"),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: None,
        }
    }

    async fn fetch_token(&mut self) -> Result<String, ImdsError> {
        let resp = self
            .http
            .put(format!("{}/latest/api/token", self.endpoint))
            .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS.to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(ImdsError::TokenRefused(resp.status().as_u16()));
        }
        let token = resp.text().await.map_err(|e| self.unreadable(e))?;
        self.token = Some(token.clone());
        Ok(token)
    }

    /// GETs a metadata path; `Ok(None)` on 404 (no such notice).
    pub async fn get(&mut self, path: &str) -> Result<Option<String>, ImdsError> {
        for attempt in 0..2 {
            let token = match &self.token {
                Some(t) => t.clone(),
                None => self.fetch_token().await?,
            };
            let resp = self
                .http
                .get(format!("{}/latest/{}", self.endpoint, path))
                .header("X-aws-ec2-metadata-token", token)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            match resp.status().as_u16() {
                200 => return Ok(Some(resp.text().await.map_err(|e| self.unreadable(e))?)),
                404 => return Ok(None),
                // An expired token: get a new one once.
                401 if attempt == 0 => self.token = None,
                status => {
                    return Err(ImdsError::Status {
                        status,
                        path: path.to_string(),
                    })
                }
            }
        }
        Err(ImdsError::TokenRejected)
    }

    fn unreachable(&self, e: reqwest::Error) -> ImdsError {
        ImdsError::Unreachable {
            endpoint: self.endpoint.clone(),
            // The endpoint is already in the message.
            source: e.without_url(),
        }
    }

    fn unreadable(&self, e: reqwest::Error) -> ImdsError {
        ImdsError::Read {
            endpoint: self.endpoint.clone(),
            source: e.without_url(),
        }
    }

    pub async fn instance_id(&mut self) -> Option<String> {
        self.get("meta-data/instance-id").await.ok().flatten()
    }

    /// Polls until a stopping notice, sending it on `notices` (and every notice as an event).
    /// Runs until aborted.
    pub async fn watch(
        mut self,
        interval: Duration,
        stop_on_rebalance: bool,
        events: Events,
        notices: watch::Sender<Option<Notice>>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut said_unreachable = false;
        let mut rebalance_seen = false;
        loop {
            ticker.tick().await;
            match self.get("meta-data/spot/instance-action").await {
                Ok(Some(body)) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let notice = Notice {
                        kind: NoticeKind::Interruption,
                        action: v["action"].as_str().map(String::from),
                        time: v["time"].as_str().map(String::from),
                    };
                    emit(&events, &notice).await;
                    let _ = notices.send(Some(notice));
                    return;
                }
                Ok(None) => {}
                Err(e) if !said_unreachable => {
                    said_unreachable = true;
                    let e = crate::errors::error_chain(&e);
                    events.say("agent", format!("warning: {e}; interruption notices may be missed")).await;
                }
                Err(_) => {}
            }
            if !rebalance_seen {
                if let Ok(Some(body)) = self.get("meta-data/events/recommendations/rebalance").await {
                    rebalance_seen = true;
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let notice = Notice {
                        kind: NoticeKind::Rebalance,
                        action: None,
                        time: v["noticeTime"].as_str().map(String::from),
                    };
                    emit(&events, &notice).await;
                    if stop_on_rebalance {
                        let _ = notices.send(Some(notice));
                        return;
                    }
                }
            }
        }
    }
}

async fn emit(events: &Events, n: &Notice) {
    events
        .emit(Event::Notice {
            kind: n.kind,
            action: n.action.clone(),
            time: n.time.clone(),
        })
        .await;
}
