//! Which instances, spot requests and launch templates to end: pure decisions over what
//! EC2 and the ledger report, so that what is never touched (anything without spotbuild's
//! tags) and when a build counts as dead are tested rules.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cloud::{tags, Observed, SpotRequest, Template};
use crate::ledger::Beat;

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
    /// Builds found dead (their heartbeat stopped while they ran), with their key in the
    /// heartbeats ([`beat_key`]): their ledger entries are marked `abandoned`.
    #[serde(skip)]
    pub abandoned: Vec<(String, Beat)>,
}

/// The longest an instance may be set to live: a `spotbuild:expires-at` further than this
/// after its launch is not one spotbuild's controller wrote (its TTL is hours).
pub const MAX_LIFETIME: Duration = Duration::from_secs(48 * 3600);

/// How long an instance without a valid `spotbuild:expires-at` is given: the controller
/// tags at launch, so only something else launches without one.
pub const UNTIMED_GRACE: Duration = Duration::from_secs(600);

/// Where a build's heartbeat is read for one of its instances: a trusted instance's in the
/// ledger, an untrusted one's (tagged `spotbuild:trust = untrusted`) in its untrusted part.
/// So what an untrusted controller writes never decides about a trusted build's instances.
pub fn beat_key(trust: Option<&str>, build_id: &str) -> String {
    match trust {
        Some("untrusted") => format!("untrusted/{build_id}"),
        _ => build_id.to_string(),
    }
}

/// What counts as dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Also terminate what was launched longer ago than this.
    pub older_than: Option<Duration>,
    /// A running build that has not beaten for this long is dead (its controller was
    /// killed). `None`: heartbeats are not read (no ledger).
    pub heartbeat_window: Option<Duration>,
}

fn ago(now: SystemTime, t: SystemTime) -> String {
    humantime::format_duration(Duration::from_secs(now.duration_since(t).unwrap_or_default().as_secs())).to_string()
}

/// Terminate a spotbuild instance when its `spotbuild:expires-at` has passed, or it has
/// none that spotbuild could have written (missing, unreadable, or more than
/// [`MAX_LIFETIME`] after launch) and was launched [`UNTIMED_GRACE`] ago; when its build's
/// heartbeat says the build is over, or stopped beating `heartbeat_window` ago; or (with
/// `older_than`) when it was launched longer ago than that. Instances without the build-id
/// tag are never touched; instances already ending are left alone. `beats` are the
/// heartbeats of the instances' builds, by [`beat_key`].
pub fn decide(instances: &[Observed], beats: &BTreeMap<String, Beat>, now: SystemTime, rules: Rules) -> Decision {
    let mut d = Decision::default();
    for o in instances {
        let Some(build_id) = o.tags.get(tags::BUILD_ID) else {
            continue;
        };
        if o.ending() {
            continue;
        }
        let expires_raw = o.tags.get(tags::EXPIRES_AT).cloned();
        let age = o.launched_at.and_then(|t| now.duration_since(t).ok());
        let expires = expires_raw
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .filter(|e| o.launched_at.is_none_or(|l| e.duration_since(l).map_or(true, |d| d <= MAX_LIFETIME)));
        let verdict = |reason: String| Verdict {
            instance_id: o.instance_id.clone(),
            build_id: Some(build_id.clone()),
            project: o.tags.get(tags::PROJECT).cloned(),
            expires_at: expires_raw.clone(),
            reason,
        };
        let key = beat_key(o.tags.get(tags::TRUST).map(String::as_str), build_id);
        let beat = rules.heartbeat_window.and(beats.get(&key));
        let last_beat = beat.and_then(Beat::at);
        let stale = match (rules.heartbeat_window, last_beat) {
            (Some(window), Some(at)) => now.duration_since(at).is_ok_and(|quiet| quiet > window),
            _ => false,
        };
        if let Some(e) = expires.filter(|e| *e <= now) {
            d.terminate.push(verdict(format!("expired {} ago", ago(now, e))));
        } else if let (None, Some(age)) = (expires, age.filter(|a| *a > UNTIMED_GRACE)) {
            d.terminate.push(verdict(format!(
                "no {} tag spotbuild could have written, and launched {} ago",
                tags::EXPIRES_AT,
                humantime::format_duration(Duration::from_secs(age.as_secs()))
            )));
        } else if let (true, Some(at)) = (beat.is_some_and(|b| b.ended), last_beat) {
            d.terminate.push(verdict(format!("its build ended {} ago", ago(now, at))));
        } else if let (true, Some(b), Some(at)) = (stale, beat, last_beat) {
            d.terminate.push(verdict(format!(
                "its build stopped beating {} ago (heartbeat window {})",
                ago(now, at),
                humantime::format_duration(rules.heartbeat_window.unwrap_or_default())
            )));
            if !d.abandoned.iter().any(|(k, _)| *k == key) {
                d.abandoned.push((key.clone(), b.clone()));
            }
        } else if let (Some(limit), Some(age)) = (rules.older_than, age.filter(|a| rules.older_than.is_some_and(|l| *a > l))) {
            d.terminate.push(verdict(format!(
                "running for {}, longer than --older-than {}",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(limit)
            )));
        } else {
            let heartbeat = match (rules.heartbeat_window, last_beat) {
                (Some(_), Some(at)) => format!("its build beat {} ago", ago(now, at)),
                (Some(_), None) => "its build has no heartbeat in this ledger".to_string(),
                (None, _) => "no ledger to read heartbeats from".to_string(),
            };
            let until = match expires {
                Some(e) => format!("expires in {}", humantime::format_duration(Duration::from_secs(e.duration_since(now).unwrap_or_default().as_secs()))),
                None => format!("no valid {} tag; reaped {} after launch", tags::EXPIRES_AT, humantime::format_duration(UNTIMED_GRACE)),
            };
            d.keep.push(verdict(format!("{heartbeat}; {until}")));
        }
    }
    d
}

/// How long a launch template may exist before it counts as left behind (a launch in
/// flight has one for a moment).
pub const TEMPLATE_GRACE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateVerdict {
    pub template_id: String,
    pub name: String,
    pub build_id: Option<String>,
    pub reason: String,
}

/// spotbuild's launch templates to delete: those older than [`TEMPLATE_GRACE`], and those
/// whose build is over or dead. Each holds a host private key in its user data.
pub fn orphaned_templates(templates: &[Template], beats: &BTreeMap<String, Beat>, now: SystemTime, rules: Rules) -> Vec<TemplateVerdict> {
    let mut out = Vec::new();
    for t in templates {
        let Some(build_id) = &t.build_id else { continue };
        // Templates carry no level here: only the trusted part speaks for them.
        let beat = rules.heartbeat_window.and(beats.get(build_id));
        let quiet = beat.and_then(Beat::at).and_then(|at| now.duration_since(at).ok());
        let age = t.created_at.and_then(|c| now.duration_since(c).ok());
        let reason = if beat.is_some_and(|b| b.ended) {
            Some("its build is over".to_string())
        } else if let (Some(window), Some(q)) = (rules.heartbeat_window, quiet) {
            (q > window).then(|| format!("its build stopped beating {} ago", humantime::format_duration(Duration::from_secs(q.as_secs()))))
        } else {
            None
        };
        let reason = reason.or_else(|| {
            age.filter(|a| *a > TEMPLATE_GRACE)
                .map(|a| format!("left behind {} ago (a launch needs one for seconds)", humantime::format_duration(Duration::from_secs(a.as_secs()))))
        });
        if let Some(reason) = reason {
            out.push(TemplateVerdict {
                template_id: t.id.clone(),
                name: t.name.clone(),
                build_id: t.build_id.clone(),
                reason,
            });
        }
    }
    out
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

    const EXPIRY_ONLY: Rules = Rules {
        older_than: None,
        heartbeat_window: None,
    };

    fn beat(build: &str, at: SystemTime, ended: bool) -> (String, Beat) {
        (
            build.to_string(),
            Beat {
                build_id: build.into(),
                at: rfc(at),
                started_at: rfc(at),
                ended,
            },
        )
    }

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
        let d = decide(&list, &BTreeMap::new(), now, EXPIRY_ONLY);
        let ids = |v: &[Verdict]| v.iter().map(|x| x.instance_id.clone()).collect::<Vec<_>>();
        // An instance with no expiry spotbuild could have written is given ten minutes.
        assert_eq!(ids(&d.terminate), ["i-expired", "i-untimed"]);
        assert_eq!(ids(&d.keep), ["i-fresh"]);
        assert!(d.terminate[0].reason.starts_with("expired 16m"), "{}", d.terminate[0].reason);

        let rules = Rules {
            older_than: Some(Duration::from_secs(3600)),
            heartbeat_window: None,
        };
        let d = decide(&list, &BTreeMap::new(), now, rules);
        assert_eq!(ids(&d.terminate), ["i-expired", "i-untimed"], "--older-than reaps by age too, never i-foreign");

        // Launched a minute ago without an expiry, or with one years away: the grace, then gone.
        let far = rfc(at(9_940) + Duration::from_secs(365 * 86_400));
        let young = vec![
            instance("i-new-untimed", &[(tags::BUILD_ID, "b5".into())], InstanceState::Running, at(9_940)),
            instance("i-forever", &[(tags::BUILD_ID, "b6".into()), (tags::EXPIRES_AT, far.clone())], InstanceState::Running, at(9_000)),
        ];
        let d = decide(&young, &BTreeMap::new(), now, EXPIRY_ONLY);
        assert_eq!(ids(&d.keep), ["i-new-untimed"]);
        assert_eq!(ids(&d.terminate), ["i-forever"]);
        assert!(d.terminate[0].reason.starts_with("no spotbuild:expires-at tag spotbuild could have written"), "{}", d.terminate[0].reason);
    }

    #[test]
    fn a_build_whose_heartbeat_stopped_or_ended_loses_its_instances() {
        let now = at(10_000);
        let window = Duration::from_secs(600);
        let rules = Rules {
            older_than: None,
            heartbeat_window: Some(window),
        };
        let fresh_expiry = rfc(at(20_000));
        let tagged = |id: &str, build: &str| instance(id, &[(tags::BUILD_ID, build.into()), (tags::EXPIRES_AT, fresh_expiry.clone())], InstanceState::Running, at(0));
        let list = vec![
            tagged("i-beating", "b-alive"),
            tagged("i-killed", "b-killed"),
            tagged("i-over", "b-over"),
            tagged("i-unknown", "b-elsewhere"),
            tagged("i-killed-2", "b-killed"),
        ];
        let beats: BTreeMap<String, Beat> = [
            beat("b-alive", at(9_700), false),
            beat("b-killed", at(9_000), false),
            beat("b-over", at(9_990), true),
        ]
        .into_iter()
        .collect();
        let d = decide(&list, &beats, now, rules);
        let ids = |v: &[Verdict]| v.iter().map(|x| x.instance_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&d.terminate), ["i-killed", "i-over", "i-killed-2"]);
        assert!(d.terminate[0].reason.starts_with("its build stopped beating 16m 40s ago"), "{}", d.terminate[0].reason);
        assert!(d.terminate[1].reason.starts_with("its build ended"), "{}", d.terminate[1].reason);
        assert_eq!(ids(&d.keep), ["i-beating", "i-unknown"]);
        assert!(d.keep[1].reason.contains("no heartbeat in this ledger"), "{}", d.keep[1].reason);
        assert_eq!(d.abandoned.iter().map(|(_, b)| b.build_id.as_str()).collect::<Vec<_>>(), ["b-killed"], "once per build");
        // An untrusted instance reads only the untrusted part: a trusted build's heartbeat
        // says nothing of it, and an untrusted part's beat says nothing of a trusted one's.
        let untrusted = instance("i-pr", &[(tags::BUILD_ID, "b-alive".into()), (tags::TRUST, "untrusted".into()), (tags::EXPIRES_AT, fresh_expiry.clone())], InstanceState::Running, at(0));
        let forged: BTreeMap<String, Beat> = [(beat_key(Some("untrusted"), "b-alive"), beats["b-alive"].clone()), ("b-killed".to_string(), beats["b-killed"].clone())]
            .into_iter()
            .map(|(k, mut b)| {
                b.ended = k.starts_with("untrusted/");
                (k, b)
            })
            .collect();
        let d = decide(&[untrusted, tagged("i-trusted", "b-alive")], &forged, now, rules);
        assert_eq!(ids(&d.terminate), ["i-pr"], "an untrusted beat ends only the untrusted instance");
        assert_eq!(ids(&d.keep), ["i-trusted"]);
        // Without a ledger the heartbeats say nothing.
        let d = decide(&list, &beats, now, EXPIRY_ONLY);
        assert!(d.terminate.is_empty());
    }

    #[test]
    fn templates_are_deleted_when_old_or_when_their_build_is_over() {
        let now = at(10_000);
        let rules = Rules {
            older_than: None,
            heartbeat_window: Some(Duration::from_secs(600)),
        };
        let t = |name: &str, build: Option<&str>, created: u64| Template {
            id: format!("lt-{name}"),
            name: name.into(),
            build_id: build.map(String::from),
            created_at: Some(at(created)),
        };
        let templates = vec![t("in-flight", Some("b-alive"), 9_990), t("old", Some("b-alive"), 9_000), t("over", Some("b-over"), 9_990), t("foreign", None, 0)];
        let beats: BTreeMap<String, Beat> = [beat("b-alive", at(9_990), false), beat("b-over", at(9_995), true)].into_iter().collect();
        let got: Vec<String> = orphaned_templates(&templates, &beats, now, rules).into_iter().map(|v| v.name).collect();
        assert_eq!(got, ["old", "over"]);
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
