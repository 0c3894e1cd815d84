//! The attempt's first two actions: launch one instance with fresh keys and its price
//! recorded, then wait for EC2 to report it running.

use std::time::{Duration, SystemTime};

use super::attempt::{Observation, Phase};
use super::driver::{AccessKeys, Attempt, Held, Launched, Running};
use crate::cloud::breaker::{self, Breaker, BreakerSettings};
use crate::cloud::launch::{self, ThrottleRetry, WaitError};
use crate::cloud::userdata::UserData;
use crate::cloud::{LaunchSpec, Market, MarketPolicy};
use crate::errors::error_chain;
use crate::transport::keys;

/// How often a booting instance is described.
const RUNNING_POLL: Duration = Duration::from_millis(500);

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
        let image = cfg.image().ok_or_else(|| Observation::Fatal("no [cloud] ami is set".into()))?;
        let spec = LaunchSpec {
            build_id: g.build_id.clone(),
            project: g.project.clone(),
            commit: g.commit.clone(),
            owner: g.owner.clone(),
            expires_at: SystemTime::now() + cfg.ttl,
            image,
            instance_profile: cfg.instance_profile.clone(),
            security_groups: cfg.security_groups.clone(),
            root_volume_gb: cfg.root_volume_gb,
            pools: cfg.pools(),
            max_spot_price_per_vcpu_hour: cfg.max_spot_price_per_vcpu_hour,
            user_data,
            extra_tags: cfg.tags.clone(),
        };
        let breaker = breaker::state(self.interruptions, SystemTime::now(), BreakerSettings::default());
        if let Breaker::Open { until, .. } = breaker {
            self.say(Phase::Launching, format!("spot breaker open until {}: on-demand only", humantime::format_rfc3339_seconds(until)));
        }
        self.say(Phase::Launching, format!("requesting one instance from {} pools ({})", spec.pools.len(), market_label(g.market)));
        let report = match launch::launch(g.cloud, &spec, g.market, breaker, ThrottleRetry::default()).await {
            Ok(r) => r,
            Err(e) => {
                let mut msg = e.to_string();
                if let Some(h) = e.hint() {
                    msg.push_str(&format!(" (hint: {h})"));
                }
                return Err(Observation::LaunchFailed(msg));
            }
        };
        let l = report.launched;
        // Listed before anything else can fail.
        g.teardown.add(&l.instance_id);
        let region = cfg.region.clone().unwrap_or_else(|| "us-east-1".into());
        let on_demand = crate::cloud::prices::on_demand_hourly(&region, &l.pool.instance_type);
        // The pool's spot price at launch: what a spot attempt pays, and what an on-demand
        // fallback is compared with.
        let spot = match &l.availability_zone {
            Some(az) => g.cloud.spot_price(&l.pool.instance_type, az).await.ok().flatten(),
            None => None,
        };
        let rental = &mut self.record.rental;
        rental.on_demand_hourly = on_demand;
        rental.spot_reference_hourly = if l.market == Market::OnDemand { spot } else { None };
        rental.hourly_price = match l.market {
            Market::OnDemand => on_demand,
            Market::Spot => spot,
        };
        rental.instance_id = Some(l.instance_id.clone());
        rental.instance_type = Some(l.pool.instance_type.clone());
        rental.availability_zone = l.availability_zone.clone();
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

    pub(super) async fn wait_running(&mut self, l: Launched) -> (Held, Observation) {
        let id = l.instance.instance_id.clone();
        let limit = self.g.settings.cloud.running_timeout;
        self.say(Phase::Booting, format!("waiting for {id} to run (up to {})", humantime::format_duration(limit)));
        match launch::wait_running(self.g.cloud, &id, limit, RUNNING_POLL).await {
            Ok((seen, after)) => {
                let address = seen.private_ip.clone().or_else(|| l.instance.private_ip.clone());
                let observation = match &address {
                    Some(a) => {
                        self.say(Phase::Booting, format!("{id} running at {a} after {:.1}s", after.as_secs_f64()));
                        Observation::Running
                    }
                    None => Observation::StepFailed(format!("{id} has no private address")),
                };
                (Held::Running(Running { launched: l, address }), observation)
            }
            Err(WaitError::Ended { reason, .. }) => {
                let interrupted = reason.as_deref().is_some_and(|r| r.starts_with("Server.SpotInstance"));
                (Held::Launched(l), Observation::InstanceEnded { interrupted })
            }
            Err(e) => (Held::Launched(l), Observation::StepFailed(e.to_string())),
        }
    }
}

fn market_label(m: MarketPolicy) -> &'static str {
    match m {
        MarketPolicy::Spot => "spot only",
        MarketPolicy::OnDemand => "on-demand only",
        MarketPolicy::SpotThenOnDemand => "spot, then on-demand",
    }
}
