//! What an attempt cost, from its recorded prices and times, by AWS's billing rules.
//!
//! - Instances (Linux): per-second billing with a 60-second minimum.
//! - A spot instance that **EC2** interrupts: "If the Amazon EC2 interrupts the Spot
//!   Instance — Windows and Linux (excluding RHEL and SUSE) — interrupted in the first hour:
//!   No charge; interrupted in any hour after the first hour: Charged for the seconds used."
//!   (Amazon EC2 User Guide, "Billing for interrupted Spot Instances",
//!   <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/billing-for-interrupted-spot-instances.html>.)
//!   An instance that spotbuild terminates is billed for the seconds used, like any other.
//! - EBS gp3 storage: per GB-month, pro rata by the second over a 30-day month (the
//!   worked example on the EBS pricing page), whoever ended the instance.
//! - Savings are against the same seconds (and the same minimum) on demand.

use super::AttemptEntry;
use crate::cloud::Market;

pub const MINIMUM_SECONDS: f64 = 60.0;
pub const FREE_INTERRUPTION_SECONDS: f64 = 3600.0;
/// gp3, USD per GB-month (us-east-1 list price; most regions are within 20 %).
pub const GP3_PER_GB_MONTH: f64 = 0.08;
const SECONDS_PER_MONTH: f64 = 30.0 * 86_400.0;

/// One attempt's cost and what it is compared with. USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct AttemptCost {
    /// The instance, as billed.
    pub instance: f64,
    pub storage: f64,
    pub total: f64,
    /// The same seconds on demand (with the same storage), when the on-demand price is known.
    pub on_demand_equivalent: Option<f64>,
    /// On-demand equivalent minus what was paid (spot attempts; 0 for on-demand).
    pub savings: f64,
    /// For an on-demand attempt with a known spot price: what on-demand cost extra.
    pub fallback_premium: f64,
    /// Paid for an attempt that was interrupted or lost.
    pub wasted: f64,
    /// Paid for the time before the agent ran (launch, boot, connect, ship).
    pub overhead: f64,
    /// False when the attempt has no price (an emulator, an unknown type): counted as 0.
    pub priced: bool,
}

/// Whether EC2 ended this attempt's spot instance (not spotbuild).
pub fn interrupted_by_ec2(a: &AttemptEntry) -> bool {
    a.rental.market == Some(Market::Spot) && a.outcome == "interrupted"
}

/// Instance cost in USD for `seconds` at `hourly`.
pub fn instance_cost(hourly: f64, seconds: f64, ec2_interrupted_spot: bool) -> f64 {
    if ec2_interrupted_spot {
        if seconds < FREE_INTERRUPTION_SECONDS {
            return 0.0;
        }
        return hourly * seconds / 3600.0;
    }
    hourly * seconds.max(MINIMUM_SECONDS) / 3600.0
}

pub fn storage_cost(volume_gb: u32, seconds: f64) -> f64 {
    volume_gb as f64 * GP3_PER_GB_MONTH * seconds / SECONDS_PER_MONTH
}

pub fn attempt_cost(a: &AttemptEntry, volume_gb: u32) -> AttemptCost {
    // An attempt that never got an instance cost nothing.
    if a.rental.instance_id.is_none() {
        return AttemptCost { priced: true, ..Default::default() };
    }
    let seconds = a.instance_seconds();
    let by_ec2 = interrupted_by_ec2(a);
    let storage = storage_cost(volume_gb, seconds);
    let instance = a.rental.hourly_price.map(|p| instance_cost(p, seconds, by_ec2));
    let total = instance.unwrap_or(0.0) + storage;
    let on_demand_equivalent = a.rental.on_demand_hourly.map(|p| instance_cost(p, seconds, false) + storage);
    let savings = match (a.rental.market, on_demand_equivalent, instance) {
        (Some(Market::Spot), Some(od), Some(_)) => od - total,
        _ => 0.0,
    };
    let fallback_premium = match (a.rental.market, a.rental.hourly_price, a.rental.spot_reference_hourly) {
        (Some(Market::OnDemand), Some(od), Some(spot)) => instance_cost(od, seconds, false) - instance_cost(spot, seconds, false),
        _ => 0.0,
    };
    let wasted = if matches!(a.outcome.as_str(), "interrupted" | "lost") { total } else { 0.0 };
    let before_work: f64 = ["launching", "booting", "connecting", "shipping"]
        .iter()
        .filter_map(|k| a.seconds.get(*k))
        .sum();
    let overhead = if seconds > 0.0 { total * (before_work / seconds).min(1.0) } else { 0.0 };
    AttemptCost {
        instance: instance.unwrap_or(0.0),
        storage,
        total,
        on_demand_equivalent,
        savings,
        fallback_premium,
        wasted,
        overhead,
        priced: instance.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn attempt(market: Market, price: f64, od: f64, seconds: u64, outcome: &str) -> AttemptEntry {
        let start = humantime::parse_rfc3339("2026-11-02T10:00:00Z").unwrap();
        AttemptEntry {
            attempt: 1,
            rental: crate::ledger::Rental {
                instance_id: Some("i-1".into()),
                instance_type: Some("m7a.16xlarge".into()),
                availability_zone: Some("us-east-1a".into()),
                market: Some(market),
                hourly_price: Some(price),
                on_demand_hourly: Some(od),
                spot_reference_hourly: None,
                market_reason: None,
            },
            started_at: humantime::format_rfc3339(start).to_string(),
            ended_at: humantime::format_rfc3339(start + std::time::Duration::from_secs(seconds)).to_string(),
            outcome: outcome.into(),
            reason: None,
            seconds: BTreeMap::new(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_short_attempt_pays_the_60_second_minimum() {
        let c = attempt_cost(&attempt(Market::OnDemand, 3.6, 3.6, 10, "success"), 0);
        assert!(close(c.instance, 0.06), "{c:?}");
        let c = attempt_cost(&attempt(Market::OnDemand, 3.6, 3.6, 60, "success"), 0);
        assert!(close(c.instance, 0.06));
    }

    #[test]
    fn past_the_minimum_every_second_counts() {
        let c = attempt_cost(&attempt(Market::Spot, 1.8, 3.6, 61, "success"), 0);
        assert!(close(c.instance, 1.8 * 61.0 / 3600.0), "{c:?}");
        let c2 = attempt_cost(&attempt(Market::Spot, 1.8, 3.6, 62, "success"), 0);
        assert!(close(c2.instance - c.instance, 1.8 / 3600.0), "one more second, one second's price");
        assert!(close(c.savings, (3.6 - 1.8) * 61.0 / 3600.0));
    }

    #[test]
    fn a_spot_instance_ec2_interrupts_in_its_first_hour_is_free_but_its_volume_is_not() {
        let c = attempt_cost(&attempt(Market::Spot, 1.8, 3.6, 1800, "interrupted"), 200);
        assert_eq!(c.instance, 0.0);
        let volume = 200.0 * 0.08 * 1800.0 / (30.0 * 86400.0);
        assert!(close(c.storage, volume));
        assert!(close(c.wasted, volume), "what an interrupted attempt paid is waste");
        // After the first hour, the seconds used (no rounding up).
        let c = attempt_cost(&attempt(Market::Spot, 1.8, 3.6, 5400, "interrupted"), 0);
        assert!(close(c.instance, 1.8 * 1.5));
        // A lost host is not EC2's doing: billed like any other.
        let c = attempt_cost(&attempt(Market::Spot, 1.8, 3.6, 30, "lost"), 0);
        assert!(close(c.instance, 0.03));
        assert!(close(c.wasted, 0.03));
    }

    #[test]
    fn mixed_markets_save_on_spot_and_pay_a_premium_on_fallback() {
        let spot = attempt_cost(&attempt(Market::Spot, 1.0, 3.0, 3600, "success"), 0);
        assert!(close(spot.savings, 2.0));
        assert_eq!(spot.fallback_premium, 0.0);
        let mut od = attempt(Market::OnDemand, 3.0, 3.0, 1800, "success");
        od.rental.spot_reference_hourly = Some(1.0);
        let od = attempt_cost(&od, 0);
        assert_eq!(od.savings, 0.0, "on demand saves nothing");
        assert!(close(od.fallback_premium, 1.0));
    }

    #[test]
    fn overhead_is_the_share_of_time_before_the_agent_ran() {
        let mut a = attempt(Market::OnDemand, 3.6, 3.6, 100, "success");
        a.seconds.insert("launching".into(), 10.0);
        a.seconds.insert("booting".into(), 15.0);
        a.seconds.insert("running".into(), 75.0);
        let c = attempt_cost(&a, 0);
        assert!(close(c.overhead, c.total * 0.25));
    }

    #[test]
    fn an_attempt_without_an_instance_or_a_price_costs_nothing_and_says_so() {
        let mut a = attempt(Market::Spot, 1.0, 3.0, 100, "error");
        a.rental.instance_id = None;
        assert_eq!(attempt_cost(&a, 200).total, 0.0);
        let mut a = attempt(Market::Spot, 1.0, 3.0, 100, "success");
        a.rental.hourly_price = None;
        assert!(!attempt_cost(&a, 0).priced);
    }
}
