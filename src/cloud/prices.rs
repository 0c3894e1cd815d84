//! On-demand prices from the embedded, dated table `data/ondemand-prices.json` (refreshed by
//! `scripts/refresh-prices`). Spot prices come from the cloud at launch, for the pool used.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::types::TypeName;

#[derive(serde::Deserialize)]
struct Table {
    as_of: String,
    prices: BTreeMap<String, BTreeMap<String, Option<f64>>>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        serde_json::from_str(include_str!("../../data/ondemand-prices.json"))
            .expect("the embedded price table is valid JSON (checked by a unit test)")
    })
}

/// USD per hour on demand for `instance_type` in `region`; `None` when the table does not
/// know it (or the type is not offered there). A size the table does not list is priced
/// from a listed size of its family, in proportion to vCPUs, as AWS prices non-metal sizes
/// of one family (`m7a.48xlarge` = 3 × `m7a.16xlarge`).
pub fn on_demand_hourly(region: &str, instance_type: &str) -> Option<f64> {
    let prices = table().prices.get(region)?;
    if let Some(listed) = prices.get(instance_type) {
        return *listed;
    }
    let name = TypeName::parse(instance_type)?;
    let want = name.vcpus()?;
    prices.iter().find_map(|(t, price)| {
        let other = TypeName::parse(t)?;
        (other.family == name.family).then_some(())?;
        Some((*price)? / f64::from(other.vcpus()?) * f64::from(want))
    })
}

/// When the embedded table was taken (`YYYY-MM`).
pub fn as_of() -> &'static str {
    &table().as_of
}

/// The regions the table covers.
pub fn regions() -> impl Iterator<Item = &'static str> {
    table().prices.keys().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_the_default_pools_in_the_documented_regions() {
        for region in ["us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-west-2", "eu-central-1"] {
            assert!(regions().any(|r| r == region), "{region}");
            for t in ["m7a.16xlarge", "m6a.16xlarge", "c7a.16xlarge", "c6a.16xlarge", "m7i.16xlarge", "c7i.16xlarge"] {
                let p = on_demand_hourly(region, t).unwrap_or_else(|| panic!("{t} in {region}"));
                assert!((1.0..10.0).contains(&p), "{t} in {region}: {p}");
            }
        }
        assert_eq!(on_demand_hourly("us-east-1", "m7a.16xlarge"), Some(3.70944));
        for region in regions() {
            for t in crate::settings::DEFAULT_ARM64_INSTANCE_TYPES {
                let p = on_demand_hourly(region, t).unwrap_or_else(|| panic!("{t} in {region}"));
                assert!((1.0..10.0).contains(&p), "{t} in {region}: {p}");
            }
        }
        assert_eq!(on_demand_hourly("us-east-1", "c7g.16xlarge"), Some(2.32));
        assert_eq!(on_demand_hourly("eu-west-2", "r6a.16xlarge"), None, "not offered there");
        assert_eq!(on_demand_hourly("mars-1", "m7a.16xlarge"), None);
        assert!(as_of().len() == 7);
    }

    #[test]
    fn other_sizes_are_priced_in_proportion_to_vcpus() {
        let p = |t| on_demand_hourly("us-east-1", t).unwrap();
        assert!((p("m7a.48xlarge") - 3.0 * 3.70944).abs() < 1e-9);
        assert!((p("c8g.8xlarge") - 2.55232 / 2.0).abs() < 1e-9);
        assert_eq!(on_demand_hourly("eu-west-2", "r6a.48xlarge"), None, "not offered there at any size");
        assert_eq!(on_demand_hourly("us-east-1", "z1d.12xlarge"), None, "no size of the family is listed");
        assert_eq!(on_demand_hourly("us-east-1", "m7a.metal-48xl"), None, "metal sizes are priced apart");
    }
}
