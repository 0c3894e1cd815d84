//! The attempt's first two actions: launch one instance with fresh keys, then wait for
//! EC2 to report it running and record what it costs.
//!
//! The launch runs as a task of its own: dropping the attempt (a signal, a panic in
//! another group) does not drop it mid-call. The task lists the instance for teardown
//! the moment EC2 names it, notes an ambiguous launch, and deletes the launch template
//! (it holds the host private key) before it ends; teardown waits for it.

use std::time::{Duration, SystemTime};

use super::attempt::{Observation, Phase};
use super::driver::{AccessKeys, Attempt, Held, Launched, Running};
use crate::cloud::breaker::{self, Breaker};
use crate::cloud::launch::{self, ThrottleRetry, WaitError};
use crate::cloud::userdata::UserData;
use crate::cloud::{LaunchSpec, Market, MarketPolicy};
use crate::errors::error_chain;
use crate::transport::keys;

/// How often a booting instance is described.
const RUNNING_POLL: Duration = Duration::from_millis(500);
/// Bound on deleting the launch template once the launch has settled.
const TEMPLATE_DELETE_TIMEOUT: Duration = Duration::from_secs(30);

impl Attempt<'_, '_> {
    /// Makes this attempt's keys, its user data and its launch request, and launches.
    /// `Err` is the observation to report (no instance exists then).
    pub(super) async fn launch(&mut self) -> Result<Launched, Observation> {
        let g = self.g;
        let cfg = &g.settings.cloud;
        let dir = g.attempt_dir(self.n);
        let fatal = |e: &dyn std::error::Error| Observation::Fatal(error_chain(e));
        let client = keys::generate(&dir, "id_ed25519", &format!("spotbuild-{}", g.build_id)).await.map_err(|e| fatal(&e))?;
        let host = keys::generate(&dir, "host_ed25519", &format!("host-{}-{}", g.build_id, self.n)).await.map_err(|e| fatal(&e))?;
        let host_private = host
            .private_pem()
            .await
            .map_err(|e| Observation::Fatal(format!("failed to read the host key: {e}")))?;
        let user_data = UserData {
            ttl: cfg.ttl,
            user: &g.settings.remote.user,
            authorized_key: &client.public,
            host_private_key: &host_private,
        }
        .render()
        .map_err(|e| fatal(&e))?;
        // The private host key is only needed inside the user data.
        let _ = tokio::fs::remove_file(&host.private_path).await;
        let keys = AccessKeys {
            client,
            host_public: host.public,
        };
        let spec = LaunchSpec {
            build_id: g.build_id.clone(),
            attempt: self.n,
            projects: g.projects.clone(),
            trust: g.trust,
            commit: g.commit.clone(),
            owner: g.owner.clone(),
            expires_at: SystemTime::now() + cfg.ttl,
            arch: g.machines.arch,
            image: g.machines.image.clone(),
            instance_profile: cfg.instance_profile.clone(),
            security_groups: cfg.security_groups.clone(),
            root_volume_gb: cfg.root_volume_gb,
            pools: g.machines.pools.clone(),
            prioritized: g.machines.prioritized,
            max_spot_price_per_vcpu_hour: cfg.max_spot_price_per_vcpu_hour,
            user_data,
            extra_tags: cfg.tags.clone(),
        };
        let breaker = breaker::state(self.interruptions, SystemTime::now(), cfg.spot_breaker.settings());
        if let Breaker::Open { until, .. } = breaker {
            self.say(Phase::Launching, format!("spot breaker open until {}: on-demand only", humantime::format_rfc3339_seconds(until)));
        }
        let fitted = spec.tags();
        if !fitted.cut.is_empty() || !fitted.dropped.is_empty() {
            self.say(
                Phase::Launching,
                format!("warning: tags fitted to EC2's limits (values cut: {:?}; tags left out: {:?})", fitted.cut, fitted.dropped),
            );
        }
        let order = if spec.prioritized { ", cheapest per vCPU first" } else { "" };
        self.say(
            Phase::Launching,
            format!("requesting one {} instance from {} pools ({}{order})", spec.arch, spec.pools.len(), market_label(g.market)),
        );
        let report = match self.launch_task(spec, breaker).await {
            Ok(r) => r,
            Err(e) => {
                let mut msg = e.to_string();
                if let Some(h) = e.hint() {
                    msg.push_str(&format!(" (hint: {h})"));
                }
                if e.ambiguous() {
                    msg.push_str("; a request got no answer, so the build's instances are also searched for by tag at teardown");
                }
                return Err(Observation::LaunchFailed(msg));
            }
        };
        let l = report.launched;
        let region = cfg.region.clone().unwrap_or_else(|| "us-east-1".into());
        let rental = &mut self.record.rental;
        rental.on_demand_hourly = crate::cloud::prices::on_demand_hourly(&region, &l.pool.instance_type);
        rental.instance_id = Some(l.instance_id.clone());
        rental.instance_type = Some(l.pool.instance_type.clone());
        rental.market = Some(l.market);
        rental.market_reason = report.why.clone();
        let mut detail = format!("fulfilled {} · {} {} · after {:.1}s", l.instance_id, l.pool, l.market, report.fulfilled_after.as_secs_f64());
        if let Some(why) = &report.why {
            detail.push_str(&format!(" ({why})"));
        }
        self.say(Phase::Launching, detail);
        for f in &l.pool_failures {
            self.say(Phase::Launching, format!("pool failed: {f}"));
        }
        Ok(Launched { instance: l, keys })
    }

    /// Runs the launch policy in a task of its own (see the module's notes).
    async fn launch_task(&self, spec: LaunchSpec, breaker: Breaker) -> Result<launch::Report, launch::LaunchError> {
        let g = self.g;
        let in_flight = g.teardown.launching();
        let (cloud, teardown, market) = (g.cloud.clone(), g.teardown.clone(), g.market);
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let result = launch::launch(&*cloud, &spec, market, breaker, ThrottleRetry::default()).await;
            match &result {
                Ok(r) => teardown.add(&r.launched.instance_id),
                Err(e) if e.ambiguous() => teardown.maybe_launched(),
                Err(_) => {}
            }
            let ids = [spec.build_id.clone()];
            let _ = tokio::time::timeout(TEMPLATE_DELETE_TIMEOUT, cloud.delete_templates(&ids)).await;
            result
        });
        match task.await {
            Ok(result) => result,
            // The policy panicked (a bug): the same bug here.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    pub(super) async fn wait_running(&mut self, l: Launched) -> (Held, Observation) {
        let id = l.instance.instance_id.clone();
        let limit = self.g.settings.cloud.running_timeout;
        self.say(Phase::Booting, format!("waiting for {id} to run (up to {})", humantime::format_duration(limit)));
        match launch::wait_running(&*self.g.cloud, &id, limit, RUNNING_POLL).await {
            Ok((seen, after)) => {
                self.price(&l, seen.availability_zone.as_deref()).await;
                match seen.private_ip.clone() {
                    Some(address) => {
                        self.say(Phase::Booting, format!("{id} running at {address} after {:.1}s", after.as_secs_f64()));
                        (Held::Running(Running { launched: l, address }), Observation::Running)
                    }
                    None => (Held::Launched(l), Observation::StepFailed(format!("{id} has no private address"))),
                }
            }
            Err(WaitError::Ended { reason, .. }) => {
                let interrupted = reason.as_deref().is_some_and(|r| r.starts_with("Server.SpotInstance"));
                (Held::Launched(l), Observation::InstanceEnded { interrupted })
            }
            Err(e) => (Held::Launched(l), Observation::StepFailed(e.to_string())),
        }
    }

    /// Records where the instance landed and its pool's spot price: what a spot attempt
    /// pays, and what an on-demand fallback is compared with.
    async fn price(&mut self, l: &Launched, zone: Option<&str>) {
        let spot = match zone {
            Some(az) => self.g.cloud.spot_price(&l.instance.pool.instance_type, az).await.ok().flatten(),
            None => None,
        };
        let rental = &mut self.record.rental;
        rental.availability_zone = zone.map(String::from);
        rental.spot_reference_hourly = if l.instance.market == Market::OnDemand { spot } else { None };
        rental.hourly_price = match l.instance.market {
            Market::OnDemand => rental.on_demand_hourly,
            Market::Spot => spot,
        };
    }
}

fn market_label(m: MarketPolicy) -> &'static str {
    match m {
        MarketPolicy::Spot => "spot only",
        MarketPolicy::OnDemand => "on-demand only",
        MarketPolicy::SpotThenOnDemand => "spot, then on-demand",
    }
}
