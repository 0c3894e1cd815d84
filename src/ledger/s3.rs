//! The ledger on S3, for teams: every CI job writes to one bucket. One object per build at
//! `PREFIX/builds/YYYY/MM/DD/BUILD_ID.json` (the day it started, UTC), so writing is
//! idempotent and a report lists only the days it covers. Interruptions go under
//! `PREFIX/interruptions/YYYY/MM/DD/` the moment they happen; a running build's heartbeat
//! is `PREFIX/live/BUILD_ID.json` (the reaper reads it by key, one GET per live build).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::{Beat, BuildEntry, DeployEntry, Interruption, LedgerError, LedgerStore};
use crate::objects::{ObjectError, ObjectStore};

pub struct S3Ledger {
    objects: Arc<dyn ObjectStore>,
    prefix: String,
}

const DAY: Duration = Duration::from_secs(86_400);

impl S3Ledger {
    pub fn new(objects: Arc<dyn ObjectStore>, prefix: impl Into<String>) -> S3Ledger {
        S3Ledger {
            objects,
            prefix: prefix.into().trim_matches('/').to_string(),
        }
    }

    fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    fn error(&self, e: ObjectError) -> LedgerError {
        LedgerError::Store {
            place: self.place(),
            message: e.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// The keys under `kind/` for every UTC day from `since` to `until`.
    async fn keys(&self, kind: &str, since: SystemTime, until: SystemTime) -> Result<Vec<String>, LedgerError> {
        let days = days(since, until);
        let lists = futures::stream::iter(days)
            .map(|d| {
                let prefix = self.key(&format!("{kind}/{d}/"));
                async move { self.objects.list(&prefix, None).await }
            })
            .buffered(8)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.error(e))?;
        Ok(lists.into_iter().flatten().collect())
    }
}

impl S3Ledger {
    /// The objects under `kind/` for every UTC day from `since` to `until` (those that
    /// went meanwhile are left out).
    async fn bodies(&self, kind: &str, since: SystemTime, until: SystemTime) -> Result<Vec<Vec<u8>>, LedgerError> {
        let keys = self.keys(kind, since, until).await?;
        let bodies: Vec<Option<Vec<u8>>> = futures::stream::iter(keys)
            .map(|k| async move { self.objects.get(&k).await })
            .buffered(16)
            .try_collect()
            .await
            .map_err(|e| self.error(e))?;
        Ok(bodies.into_iter().flatten().collect())
    }
}

/// `YYYY/MM/DD` of a time, UTC.
fn day(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    format!("{}/{}/{}", &s[0..4], &s[5..7], &s[8..10])
}

/// Every UTC day that `[since, until)` touches, in order (at most ten years' worth).
fn days(since: SystemTime, until: SystemTime) -> Vec<String> {
    let mut out = Vec::new();
    if until <= since {
        return out;
    }
    let secs = since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs - secs % DAY.as_secs());
    while t < until && out.len() < 3660 {
        out.push(day(t));
        t += DAY;
    }
    out
}

impl LedgerStore for S3Ledger {
    fn archive(&self) -> Option<Arc<dyn super::archive::LogArchive>> {
        Some(Arc::new(super::archive::ObjectArchive::new(self.objects.clone(), self.prefix.clone())))
    }

    fn place(&self) -> String {
        format!("s3://{}/{}", self.objects.bucket(), self.prefix)
    }

    fn put<'a>(&'a self, entry: &'a BuildEntry) -> BoxFuture<'a, Result<(), LedgerError>> {
        async move {
            let started = entry.started().unwrap_or_else(SystemTime::now);
            let key = self.key(&format!("builds/{}/{}.json", day(started), entry.build_id));
            let body = serde_json::to_vec_pretty(entry).expect("an entry always serialises");
            self.objects.put(&key, body).await.map_err(|e| self.error(e))
        }
        .boxed()
    }

    fn list(&self, since: SystemTime, until: SystemTime) -> BoxFuture<'_, Result<Vec<BuildEntry>, LedgerError>> {
        async move {
            let bodies = self.bodies("builds", since, until).await?;
            let mut entries = Vec::new();
            for body in bodies {
                match serde_json::from_slice::<BuildEntry>(&body) {
                    Ok(e) if e.started().is_some_and(|s| s >= since && s < until) => entries.push(e),
                    Ok(_) => {}
                    // One damaged object must not hide the rest of the ledger.
                    Err(e) => tracing::warn!(error = %e, "skipping an unreadable ledger entry"),
                }
            }
            entries.sort_by(|a, b| (a.started(), &a.build_id).cmp(&(b.started(), &b.build_id)));
            Ok(entries)
        }
        .boxed()
    }

    fn record_interruption<'a>(&'a self, i: &'a Interruption) -> BoxFuture<'a, Result<(), LedgerError>> {
        async move {
            let at = humantime::parse_rfc3339_weak(&i.at).unwrap_or_else(|_| SystemTime::now());
            let key = self.key(&format!("interruptions/{}/{}-{}.json", day(at), i.build_id, i.attempt));
            let body = serde_json::to_vec(i).expect("serialisable");
            self.objects.put(&key, body).await.map_err(|e| self.error(e))
        }
        .boxed()
    }

    fn interruptions(&self, since: SystemTime) -> BoxFuture<'_, Result<Vec<SystemTime>, LedgerError>> {
        async move {
            let now = SystemTime::now() + DAY;
            let keys = self.keys("interruptions", since, now).await?;
            let mut times = Vec::new();
            for k in keys {
                if let Some(body) = self.objects.get(&k).await.map_err(|e| self.error(e))? {
                    if let Ok(i) = serde_json::from_slice::<Interruption>(&body) {
                        if let Ok(t) = humantime::parse_rfc3339_weak(&i.at) {
                            if t >= since {
                                times.push(t);
                            }
                        }
                    }
                }
            }
            times.sort();
            Ok(times)
        }
        .boxed()
    }

    fn get<'a>(&'a self, build_id: &'a str, started_at: &'a str) -> BoxFuture<'a, Result<Option<BuildEntry>, LedgerError>> {
        async move {
            let started = humantime::parse_rfc3339_weak(started_at).unwrap_or_else(|_| SystemTime::now());
            let key = self.key(&format!("builds/{}/{build_id}.json", day(started)));
            let Some(body) = self.objects.get(&key).await.map_err(|e| self.error(e))? else { return Ok(None) };
            serde_json::from_slice(&body).map(Some).map_err(|e| LedgerError::Store {
                place: self.place(),
                message: format!("{key} is not a ledger entry"),
                source: Some(Box::new(e)),
            })
        }
        .boxed()
    }

    fn beat<'a>(&'a self, beat: &'a Beat) -> BoxFuture<'a, Result<(), LedgerError>> {
        async move {
            let key = self.key(&format!("live/{}.json", beat.build_id));
            let body = serde_json::to_vec(beat).expect("a beat always serialises");
            self.objects.put(&key, body).await.map_err(|e| self.error(e))
        }
        .boxed()
    }

    fn beats<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Beat>, LedgerError>> {
        async move {
            let keys: Vec<String> = build_ids.iter().map(|id| self.key(&format!("live/{id}.json"))).collect();
            let bodies: Vec<Option<Vec<u8>>> = futures::stream::iter(keys)
                .map(|key| async move { self.objects.get(&key).await })
                .buffered(8)
                .try_collect()
                .await
                .map_err(|e| self.error(e))?;
            Ok(bodies.into_iter().flatten().filter_map(|b| serde_json::from_slice(&b).ok()).collect())
        }
        .boxed()
    }

    fn record_deploy<'a>(&'a self, entry: &'a DeployEntry) -> BoxFuture<'a, Result<(), LedgerError>> {
        async move {
            let at = entry.at().unwrap_or_else(SystemTime::now);
            let key = self.key(&format!("deploys/{}/{}-{}.json", day(at), entry.deploy_id, entry.project));
            let body = serde_json::to_vec_pretty(entry).expect("an entry always serialises");
            self.objects.put(&key, body).await.map_err(|e| self.error(e))
        }
        .boxed()
    }

    fn deploys(&self, since: SystemTime, until: SystemTime) -> BoxFuture<'_, Result<Vec<DeployEntry>, LedgerError>> {
        async move {
            let bodies = self.bodies("deploys", since, until).await?;
            let mut entries: Vec<DeployEntry> = bodies
                .into_iter()
                .filter_map(|b| serde_json::from_slice::<DeployEntry>(&b).ok())
                .filter(|e| e.at().is_some_and(|t| t >= since && t < until))
                .collect();
            entries.sort_by(|a, b| (a.at(), &a.deploy_id, &a.project).cmp(&(b.at(), &b.deploy_id, &b.project)));
            Ok(entries)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::memory::MemoryStore;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn days_cover_both_ends_of_a_range() {
        assert_eq!(days(at("2026-11-01T23:00:00Z"), at("2026-11-02T01:00:00Z")), vec!["2026/11/01", "2026/11/02"]);
        assert_eq!(days(at("2026-11-01T00:00:00Z"), at("2026-11-04T00:00:00Z")), vec!["2026/11/01", "2026/11/02", "2026/11/03"]);
        assert!(days(at("2026-11-02T00:00:00Z"), at("2026-11-01T00:00:00Z")).is_empty());
    }

    #[tokio::test]
    async fn entries_go_under_their_day_and_writing_twice_keeps_one() {
        let objects = Arc::new(MemoryStore::default());
        let ledger = S3Ledger::new(objects.clone(), "team/ci/");
        let mut e: BuildEntry = serde_json::from_value(serde_json::json!({
            "schema": 1, "build_id": "b1", "projects": ["api"], "kind": "build", "commit": "c",
            "branch": null, "ci_job_url": null, "started_at": "2026-11-02T10:00:00Z",
            "ended_at": "2026-11-02T10:05:00Z", "result": "success", "region": null,
            "volume_gb": 200, "attempts": []
        }))
        .unwrap();
        ledger.put(&e).await.unwrap();
        e.result = "failed".into();
        ledger.put(&e).await.unwrap();
        assert_eq!(objects.keys(), vec!["team/ci/builds/2026/11/02/b1.json"]);
        let got = ledger.list(at("2026-11-01T00:00:00Z"), at("2026-11-03T00:00:00Z")).await.unwrap();
        assert_eq!(got, vec![e]);
        let none = ledger.list(at("2026-11-02T10:00:01Z"), at("2026-11-03T00:00:00Z")).await.unwrap();
        assert!(none.is_empty(), "filtered by the exact start, not only the day");
    }
}
