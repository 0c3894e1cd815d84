//! `spotbuild reap`: which instances to terminate. A pure decision over what EC2 reports,
//! so that what is never touched (anything without spotbuild's tags) is a tested rule.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{tags, Observed};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub instance_id: String,
    pub build_id: Option<String>,
    pub project: Option<String>,
    pub expires_at: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub terminate: Vec<Verdict>,
    pub keep: Vec<Verdict>,
}

/// Terminate a spotbuild instance when its `spotbuild:expires-at` has passed, or (with
/// `older_than`) when it was launched longer ago than that. Instances without the
/// build-id tag are never touched; instances already ending are left alone.
pub fn decide(instances: &[Observed], now: SystemTime, older_than: Option<Duration>) -> Decision {
    let mut d = Decision::default();
    for o in instances {
        let Some(build_id) = o.tags.get(tags::BUILD_ID) else {
            continue;
        };
        if o.ending() {
            continue;
        }
        let expires_raw = o.tags.get(tags::EXPIRES_AT).cloned();
        let expires = expires_raw.as_deref().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
        let age = o.launched_at.and_then(|t| now.duration_since(t).ok());
        let verdict = |reason: String| Verdict {
            instance_id: o.instance_id.clone(),
            build_id: Some(build_id.clone()),
            project: o.tags.get(tags::PROJECT).cloned(),
            expires_at: expires_raw.clone(),
            reason,
        };
        match (expires, older_than, age) {
            (Some(e), _, _) if e <= now => d.terminate.push(verdict(format!(
                "expired {} ago",
                humantime::format_duration(Duration::from_secs(now.duration_since(e).unwrap_or_default().as_secs()))
            ))),
            (_, Some(limit), Some(age)) if age > limit => d.terminate.push(verdict(format!(
                "running for {}, longer than --older-than {}",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(limit)
            ))),
            (Some(e), _, _) => d.keep.push(verdict(format!(
                "expires in {}",
                humantime::format_duration(Duration::from_secs(e.duration_since(now).unwrap_or_default().as_secs()))
            ))),
            (None, _, _) => d.keep.push(verdict(format!(
                "no valid {} tag; use --older-than to reap it by age",
                tags::EXPIRES_AT
            ))),
        }
    }
    d
}

/// An open or active spot request, as EC2 reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotRequest {
    pub id: String,
    pub instance_id: Option<String>,
    pub created_at: Option<SystemTime>,
    pub tags: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestVerdict {
    pub request_id: String,
    pub instance_id: Option<String>,
    pub reason: String,
}

/// How long an unfulfilled request may stay open before it counts as orphaned (a launch
/// in flight has one for a moment).
pub const OPEN_REQUEST_GRACE: Duration = Duration::from_secs(600);

/// Spot requests to cancel: spotbuild's (tagged itself, or its instance is) whose instance
/// is ending or gone, or that stayed open without an instance past the grace. `instances`
/// are spotbuild's instances in any state. Nothing else is ever touched.
pub fn orphaned_requests(requests: &[SpotRequest], instances: &[Observed], now: SystemTime) -> Vec<RequestVerdict> {
    let mut out = Vec::new();
    for r in requests {
        let instance = r.instance_id.as_ref().and_then(|id| instances.iter().find(|o| &o.instance_id == id));
        let ours = r.tags.contains_key(tags::BUILD_ID) || instance.is_some();
        if !ours {
            continue;
        }
        let verdict = |reason: String| RequestVerdict {
            request_id: r.id.clone(),
            instance_id: r.instance_id.clone(),
            reason,
        };
        match (&r.instance_id, instance) {
            (Some(_), Some(o)) if o.ending() => out.push(verdict("its instance is terminated".into())),
            (Some(_), Some(_)) => {}
            (Some(id), None) => out.push(verdict(format!("its instance {id} is gone"))),
            (None, _) => {
                let age = r.created_at.and_then(|t| now.duration_since(t).ok());
                if age.is_some_and(|a| a > OPEN_REQUEST_GRACE) {
                    out.push(verdict(format!("open without an instance for {}", humantime::format_duration(Duration::from_secs(age.unwrap_or_default().as_secs())))));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cloud::InstanceState;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn instance(id: &str, tags: &[(&str, String)], state: InstanceState, launched: SystemTime) -> Observed {
        Observed {
            state,
            launched_at: Some(launched),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
            ..Observed::not_found(id)
        }
    }

    fn rfc(t: SystemTime) -> String {
        humantime::format_rfc3339_seconds(t).to_string()
    }

    #[test]
    fn only_expired_spotbuild_instances_are_reaped() {
        let now = at(10_000);
        let list = vec![
            instance("i-expired", &[(tags::BUILD_ID, "b1".into()), (tags::EXPIRES_AT, rfc(at(9_000)))], InstanceState::Running, at(0)),
            instance("i-fresh", &[(tags::BUILD_ID, "b2".into()), (tags::EXPIRES_AT, rfc(at(11_000)))], InstanceState::Running, at(9_500)),
            instance("i-foreign", &[("Name", "database".into())], InstanceState::Running, at(0)),
            instance("i-ending", &[(tags::BUILD_ID, "b3".into()), (tags::EXPIRES_AT, rfc(at(1)))], InstanceState::ShuttingDown, at(0)),
            instance("i-untimed", &[(tags::BUILD_ID, "b4".into())], InstanceState::Running, at(0)),
        ];
        let d = decide(&list, now, None);
        let ids = |v: &[Verdict]| v.iter().map(|x| x.instance_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&d.terminate), ["i-expired"]);
        assert_eq!(ids(&d.keep), ["i-fresh", "i-untimed"]);
        assert!(d.terminate[0].reason.starts_with("expired 16m"), "{}", d.terminate[0].reason);

        let d = decide(&list, now, Some(Duration::from_secs(3600)));
        assert_eq!(ids(&d.terminate), ["i-expired", "i-untimed"], "--older-than reaps by age too, never i-foreign");
    }

    #[test]
    fn only_spotbuild_requests_whose_instance_ended_or_never_came_are_cancelled() {
        let now = at(10_000);
        let ours = |id: &str| instance(id, &[(tags::BUILD_ID, "b1".into())], InstanceState::Running, at(0));
        let mut ended = ours("i-ended");
        ended.state = InstanceState::Terminated;
        let instances = vec![ours("i-live"), ended];
        let req = |id: &str, inst: Option<&str>, tagged: bool, created: u64| SpotRequest {
            id: id.into(),
            instance_id: inst.map(String::from),
            created_at: Some(at(created)),
            tags: if tagged { BTreeMap::from([(tags::BUILD_ID.to_string(), "b1".to_string())]) } else { BTreeMap::new() },
        };
        let requests = vec![
            req("sir-live", Some("i-live"), false, 0),
            req("sir-ended", Some("i-ended"), false, 0),
            req("sir-gone", Some("i-gone"), true, 0),
            req("sir-foreign", Some("i-db"), false, 0),
            req("sir-stuck", None, true, 0),
            req("sir-in-flight", None, true, 9_990),
            req("sir-foreign-open", None, false, 0),
        ];
        let got: Vec<String> = orphaned_requests(&requests, &instances, now).into_iter().map(|v| v.request_id).collect();
        assert_eq!(got, ["sir-ended", "sir-gone", "sir-stuck"]);
    }
}
