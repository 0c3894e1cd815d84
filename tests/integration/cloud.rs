//! The EC2 layer against the AWS emulator, with the fault proxy in front for what the
//! emulator cannot do. Only the EC2 API is exercised: nothing connects to an instance.
//! Every test ends by asserting that no instance it launched is still running.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::{Filter, Tag, TagSpecification, ResourceType, InstanceType};
use serde_json::Value;
use spotbuild::cloud::aws::AwsCloud;
use spotbuild::cloud::breaker::Breaker;
use spotbuild::cloud::launch::{launch, LaunchError, ThrottleRetry};
use spotbuild::cloud::{tags, Cloud, Image, LaunchSpec, Market, MarketPolicy, Pool};

use crate::support::fault_proxy::{Fault, FaultProxy};
use crate::support::services::{runtime, sdk_config, Moto};
use crate::support::{spotbuild, Run};

const FAST: ThrottleRetry = ThrottleRetry {
    times: 3,
    first_delay: Duration::from_millis(50),
};

/// The emulator, the proxy in front of it, a client through the proxy, and a default
/// subnet and image to launch with.
struct Farm {
    _moto: Moto,
    proxy: FaultProxy,
    ec2: aws_sdk_ec2::Client,
    cloud: AwsCloud,
    subnet: String,
    image: String,
}

/// Starts the services (synchronously: their fixtures block), then connects on `rt`.
fn farm(rt: &tokio::runtime::Runtime) -> Farm {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    let (config, ec2, subnet, image) = rt.block_on(async {
        let config = sdk_config(&proxy.endpoint()).await;
        let ec2 = aws_sdk_ec2::Client::new(&config);
        let subnet = ec2.describe_subnets().send().await.unwrap().subnets()[0].subnet_id().unwrap().to_string();
        let image = ec2.describe_images().send().await.unwrap().images()[0].image_id().unwrap().to_string();
        (config, ec2, subnet, image)
    });
    Farm {
        // Verification is bounded short here: an id EC2 never lists is waited for that long.
        cloud: AwsCloud::with_bounds(&config, Duration::from_secs(30), Duration::from_secs(4)),
        _moto: moto,
        proxy,
        ec2,
        subnet,
        image,
    }
}

impl Farm {
    fn spec(&self, build_id: &str, expires_in: i64) -> LaunchSpec {
        let now = SystemTime::now();
        let expires_at = if expires_in >= 0 {
            now + Duration::from_secs(expires_in as u64)
        } else {
            now - Duration::from_secs((-expires_in) as u64)
        };
        LaunchSpec {
            build_id: build_id.into(),
            attempt: 1,
            projects: vec!["api".into()],
            trust: spotbuild::trust::Level::Trusted,
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            owner: Some("https://ci.example/job/1".into()),
            expires_at,
            arch: spotbuild::platform::Arch::X86_64,
            image: Image::Id(self.image.clone()),
            instance_profile: None,
            security_groups: vec![],
            root_volume_gb: 200,
            pools: ["m7a.16xlarge", "c7a.16xlarge"]
                .map(|t| Pool {
                    instance_type: t.into(),
                    subnet: self.subnet.clone(),
                })
                .to_vec(),
            prioritized: false,
            max_spot_price_per_vcpu_hour: Some(0.05),
            user_data: "#!/bin/sh\necho hi\n".into(),
            extra_tags: BTreeMap::from([("team".to_string(), "platform".to_string())]),
        }
    }

    /// Instances with this build id that are pending or running.
    async fn alive(&self, build_id: &str) -> Vec<String> {
        let out = self
            .ec2
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{}", tags::BUILD_ID)).values(build_id).build())
            .filters(Filter::builder().name("instance-state-name").values("pending").values("running").build())
            .send()
            .await
            .unwrap();
        out.reservations().iter().flat_map(|r| r.instances()).filter_map(|i| i.instance_id().map(String::from)).collect()
    }
}

#[test]
fn spot_launches_are_tagged_and_terminate_idempotently() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        let spec = f.spec("b-launch", 3600);
        let r = launch(&f.cloud, &spec, MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST).await.unwrap();
        assert_eq!(r.launched.market, Market::Spot);
        assert!(r.tried.is_empty());
        let seen = f.cloud.describe(std::slice::from_ref(&r.launched.instance_id)).await.unwrap();
        let t = &seen[0].tags;
        assert_eq!(t[tags::BUILD_ID], "b-launch");
        assert_eq!(t[tags::PROJECT], "api");
        assert_eq!(t[tags::COMMIT], spec.commit);
        assert_eq!(t[tags::OWNER], "https://ci.example/job/1");
        assert_eq!(t["team"], "platform");
        assert_eq!(t[tags::ATTEMPT], "1");
        assert_eq!(t[tags::TRUST], "trusted");
        assert!(humantime::parse_rfc3339(&t[tags::EXPIRES_AT]).is_ok(), "{}", t[tags::EXPIRES_AT]);
        // Found by its build's tag, as teardown and an ambiguous launch look for it.
        let found = f.cloud.find(&["b-launch".to_string()]).await.unwrap();
        assert_eq!(found.iter().map(|o| o.instance_id.clone()).collect::<Vec<_>>(), [r.launched.instance_id.clone()]);
        assert!(f.cloud.find(&["b-other".to_string()]).await.unwrap().is_empty());
        // The per-launch template is tagged, and deleted by that tag once the launch settled.
        let templates = f.ec2.describe_launch_templates().send().await.unwrap();
        assert_eq!(templates.launch_templates().len(), 1, "{templates:?}");
        let deleted = f.cloud.delete_templates(&["b-launch".to_string()]).await.unwrap();
        assert_eq!(deleted.len(), 1);
        let templates = f.ec2.describe_launch_templates().send().await.unwrap();
        assert!(templates.launch_templates().is_empty(), "{templates:?}");

        // It runs within the bounded wait, and its pool has a spot price.
        let (running, _) = spotbuild::cloud::launch::wait_running(&f.cloud, &r.launched.instance_id, Duration::from_secs(30), Duration::from_millis(200))
            .await
            .unwrap();
        assert!(running.private_ip.is_some());
        let zone = running.availability_zone.clone().expect("the zone is known");
        let price = f.cloud.spot_price(&r.launched.pool.instance_type, &zone).await.unwrap();
        assert!(price.is_none_or(|p| p > 0.0), "{price:?}");

        let ids = vec![r.launched.instance_id.clone()];
        f.cloud.terminate(&ids).await.unwrap();
        f.cloud.terminate(&ids).await.unwrap();
        // An id EC2 never lists is never taken as terminated.
        let e = f.cloud.terminate(&["i-00000000000000000".to_string()]).await.unwrap_err();
        assert!(e.message.contains("EC2 does not list it"), "{e}");
        assert!(f.alive("b-launch").await.is_empty());
    });
}

#[test]
fn when_the_first_pool_has_no_capacity_the_next_is_used() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        f.proxy.inject(
            "CreateFleet",
            None,
            1,
            Fault::FleetPoolFails {
                instance_type: "m7a.16xlarge",
                code: "InsufficientInstanceCapacity",
            },
        );
        let r = launch(&f.cloud, &f.spec("b-pools", 3600), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST)
            .await
            .unwrap();
        assert_eq!(r.launched.market, Market::Spot, "still spot, from another pool");
        assert_eq!(r.launched.pool.instance_type, "c7a.16xlarge");
        assert!(r.tried.is_empty());
        let skipped: Vec<(String, Option<String>)> = r
            .launched
            .pool_failures
            .iter()
            .map(|x| (x.pool.as_ref().unwrap().instance_type.clone(), x.code.clone()))
            .collect();
        assert_eq!(skipped, [("m7a.16xlarge".to_string(), Some("InsufficientInstanceCapacity".to_string()))]);
        f.cloud.terminate(&[r.launched.instance_id]).await.unwrap();
        assert!(f.alive("b-pools").await.is_empty());
    });
}

#[test]
fn when_every_spot_pool_fails_on_demand_is_used() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        f.proxy.inject(
            "CreateFleet",
            Some("DefaultTargetCapacityType=spot"),
            1,
            Fault::FleetErrors {
                code: "InsufficientInstanceCapacity",
            },
        );
        let r = launch(&f.cloud, &f.spec("b-fallback", 3600), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST)
            .await
            .unwrap();
        assert_eq!(r.launched.market, Market::OnDemand);
        assert_eq!(r.tried.len(), 1);
        assert_eq!(r.tried[0].failures.len(), 2, "one error per pool: {:?}", r.tried);
        let pools: Vec<&str> = r.tried[0].failures.iter().map(|x| x.pool.as_ref().unwrap().instance_type.as_str()).collect();
        assert_eq!(pools, ["m7a.16xlarge", "c7a.16xlarge"]);
        assert!(r.why.as_deref().unwrap().contains("InsufficientInstanceCapacity"));
        f.cloud.terminate(&[r.launched.instance_id]).await.unwrap();
        assert!(f.alive("b-fallback").await.is_empty());
    });
}

#[test]
fn a_permission_error_fails_fast_with_nothing_running() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        f.proxy.inject("CreateFleet", None, 10, Fault::Error { status: 403, code: "UnauthorizedOperation" });
        let started = std::time::Instant::now();
        let e = launch(&f.cloud, &f.spec("b-denied", 3600), MarketPolicy::SpotThenOnDemand, Breaker::Closed, FAST)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let LaunchError::Fatal { failure, .. } = &e else { panic!("{e:?}") };
        assert_eq!(failure.code.as_deref(), Some("UnauthorizedOperation"));
        assert!(e.hint().unwrap().contains("IAM"));
        let fleets = f.proxy.actions().iter().filter(|a| *a == "CreateFleet").count();
        assert_eq!(fleets, 1, "no retry, no on-demand fallback");
        // The launch template was cleaned up too.
        assert!(f.ec2.describe_launch_templates().send().await.unwrap().launch_templates().is_empty());
        assert!(f.alive("b-denied").await.is_empty());
    });
}

#[test]
fn throttling_twice_then_success() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        f.proxy.inject("CreateFleet", None, 2, Fault::Error { status: 503, code: "RequestLimitExceeded" });
        let r = launch(&f.cloud, &f.spec("b-throttled", 3600), MarketPolicy::Spot, Breaker::Closed, FAST).await.unwrap();
        assert_eq!(r.launched.market, Market::Spot);
        let fleets = f.proxy.actions().iter().filter(|a| *a == "CreateFleet").count();
        assert_eq!(fleets, 3);
        f.cloud.terminate(&[r.launched.instance_id]).await.unwrap();
        assert!(f.alive("b-throttled").await.is_empty());
    });
}

#[test]
fn reap_terminates_expired_spotbuild_instances_only() {
    let rt = runtime();
    let f = farm(&rt);
    let (expired, fresh, foreign) = rt.block_on(async {
        let expired = launch(&f.cloud, &f.spec("b-old", -60), MarketPolicy::OnDemand, Breaker::Closed, FAST).await.unwrap();
        let fresh = launch(&f.cloud, &f.spec("b-new", 3600), MarketPolicy::OnDemand, Breaker::Closed, FAST).await.unwrap();
        // An instance spotbuild did not launch, expired-looking name and all.
        let foreign = f
            .ec2
            .run_instances()
            .image_id(&f.image)
            .instance_type(InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("Name").value("database").build())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let foreign = foreign.instances()[0].instance_id().unwrap().to_string();
        (expired.launched.instance_id, fresh.launched.instance_id, foreign)
    });

    let reap = |args: &[&str]| {
        Run::of(
            spotbuild(std::path::Path::new("/"))
                .args(["reap", "--ledger", "off"])
                .args(args)
                .env("AWS_ENDPOINT_URL", f.proxy.endpoint())
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    };
    let dry = reap(&["--dry-run", "--json"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    let v: Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["terminate"][0]["instance_id"], expired.as_str());
    assert_eq!(v["keep"][0]["instance_id"], fresh.as_str());
    assert!(!dry.stdout.contains(&foreign), "never even listed");
    rt.block_on(async { assert_eq!(f.alive("b-old").await, std::slice::from_ref(&expired), "dry run changes nothing") });

    let run = reap(&[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(&format!("terminated {expired}")), "{}", run.stdout);
    assert!(run.stdout.contains("1 instance terminated, 1 kept"), "{}", run.stdout);
    rt.block_on(async {
        assert!(f.alive("b-old").await.is_empty());
        assert_eq!(f.alive("b-new").await, std::slice::from_ref(&fresh));
        let seen = f.cloud.describe(std::slice::from_ref(&foreign)).await.unwrap();
        assert!(!seen[0].ending(), "the foreign instance is untouched");
        // Clean up what this test launched.
        f.cloud.terminate(&[fresh, foreign]).await.unwrap();
        assert!(f.alive("b-new").await.is_empty());
    });
}

#[test]
fn reap_cancels_spot_requests_left_behind_by_spotbuild_only() {
    let rt = runtime();
    let f = farm(&rt);
    let (ours, foreign, foreign_instance) = rt.block_on(async {
        let request = |tagged: bool| {
            let mut r = f
                .ec2
                .request_spot_instances()
                .instance_count(1)
                .launch_specification(
                    aws_sdk_ec2::types::RequestSpotLaunchSpecification::builder()
                        .image_id(&f.image)
                        .instance_type(InstanceType::T3Micro)
                        .subnet_id(&f.subnet)
                        .build(),
                );
            if tagged {
                r = r.tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::SpotInstancesRequest)
                        .tags(Tag::builder().key("spotbuild:build-id").value("b-orphan").build())
                        .build(),
                );
            }
            r.send()
        };
        let ours = request(true).await.unwrap().spot_instance_requests()[0].spot_instance_request_id().unwrap().to_string();
        let foreign = request(false).await.unwrap().spot_instance_requests()[0].spot_instance_request_id().unwrap().to_string();
        // Whatever instances the requests got: ours ends, as after a controller was killed.
        let seen = f.ec2.describe_spot_instance_requests().send().await.unwrap();
        let instance_of = |id: &str| {
            seen.spot_instance_requests().iter().find(|r| r.spot_instance_request_id() == Some(id)).and_then(|r| r.instance_id()).map(String::from)
        };
        if let Some(i) = instance_of(&ours) {
            f.ec2.terminate_instances().instance_ids(i).send().await.unwrap();
        }
        let foreign_instance = instance_of(&foreign);
        (ours, foreign, foreign_instance)
    });
    let run = Run::of(
        spotbuild(std::path::Path::new("/"))
            .args(["reap", "--json", "--ledger", "off"])
            .env("AWS_ENDPOINT_URL", f.proxy.endpoint())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let cancelled: Vec<&str> = v["cancel_requests"].as_array().unwrap().iter().filter_map(|r| r["request_id"].as_str()).collect();
    assert_eq!(cancelled, [ours.as_str()], "{}", run.stdout);
    rt.block_on(async {
        let seen = f.ec2.describe_spot_instance_requests().send().await.unwrap();
        let state = |id: &str| {
            seen.spot_instance_requests().iter().find(|r| r.spot_instance_request_id() == Some(id)).and_then(|r| r.state()).map(|s| s.as_str().to_string())
        };
        // The emulator forgets cancelled requests; EC2 lists them as cancelled for a while.
        assert!(matches!(state(&ours).as_deref(), None | Some("cancelled")), "{:?}", state(&ours));
        assert!(matches!(state(&foreign).as_deref(), Some("open" | "active")), "never a request that is not spotbuild's");
        // Clean up what this test started.
        f.ec2.cancel_spot_instance_requests().spot_instance_request_ids(foreign.clone()).send().await.unwrap();
        if let Some(i) = foreign_instance {
            f.ec2.terminate_instances().instance_ids(i).send().await.unwrap();
        }
    });
}

#[test]
fn reap_without_permission_says_what_it_needs() {
    let rt = runtime();
    let f = farm(&rt);
    f.proxy.inject("DescribeInstances", None, 100, Fault::Error { status: 403, code: "UnauthorizedOperation" });
    let run = Run::of(
        spotbuild(std::path::Path::new("/"))
            .args(["reap", "--ledger", "off"])
            .env("AWS_ENDPOINT_URL", f.proxy.endpoint())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_MAX_ATTEMPTS", "1"),
    );
    assert_eq!(run.code, 7, "{run:?}");
    assert!(run.stderr.contains("UnauthorizedOperation"), "{}", run.stderr);
    assert!(run.stderr.contains("(hint: reap needs ec2:DescribeInstances"), "{}", run.stderr);
}

#[test]
fn launches_ask_for_imdsv2_terminate_on_shutdown_tags_and_price_caps() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        let spec = f.spec("b-shape", 3600);
        let r = launch(&f.cloud, &spec, MarketPolicy::Spot, Breaker::Closed, FAST).await.unwrap();
        let t = f.proxy.params("CreateLaunchTemplate");
        let d = |k: &str| t.get(&format!("LaunchTemplateData.{k}")).map(String::as_str);
        assert_eq!(d("MetadataOptions.HttpTokens"), Some("required"));
        assert_eq!(d("MetadataOptions.HttpPutResponseHopLimit"), Some("1"));
        assert_eq!(d("InstanceInitiatedShutdownBehavior"), Some("terminate"));
        assert_eq!(d("ImageId"), Some(f.image.as_str()));
        let user_data = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, d("UserData").unwrap()).unwrap();
        assert_eq!(user_data, spec.user_data.as_bytes());
        assert_eq!(d("BlockDeviceMapping.1.Ebs.VolumeType"), Some("gp3"));
        assert_eq!(d("BlockDeviceMapping.1.Ebs.VolumeSize"), Some("200"));
        assert_eq!(d("BlockDeviceMapping.1.Ebs.Encrypted"), Some("true"));
        assert_eq!(d("BlockDeviceMapping.1.Ebs.DeleteOnTermination"), Some("true"));
        // Tags on the instance and on its volume, at launch.
        let resource_types: Vec<&str> = (1..=2).filter_map(|i| d(&format!("TagSpecification.{i}.ResourceType"))).collect();
        assert_eq!(resource_types, ["instance", "volume"]);
        for i in 1..=2 {
            let keys: Vec<&str> = (1..=20).filter_map(|j| d(&format!("TagSpecification.{i}.Tag.{j}.Key"))).collect();
            for k in [tags::BUILD_ID, tags::PROJECT, tags::COMMIT, tags::ARCH, tags::EXPIRES_AT, tags::OWNER, "team"] {
                assert!(keys.contains(&k), "{k} missing from {keys:?}");
            }
        }

        let fl = f.proxy.params("CreateFleet");
        assert_eq!(fl["Type"], "instant");
        assert_eq!(fl["SpotOptions.AllocationStrategy"], "price-capacity-optimized");
        assert_eq!(fl["TargetCapacitySpecification.TotalTargetCapacity"], "1");
        assert_eq!(fl["TargetCapacitySpecification.DefaultTargetCapacityType"], "spot");
        assert_eq!(fl["LaunchTemplateConfigs.1.Overrides.1.InstanceType"], "m7a.16xlarge");
        assert_eq!(fl["LaunchTemplateConfigs.1.Overrides.2.InstanceType"], "c7a.16xlarge");
        // 0.05 per vCPU-hour on 64 vCPUs.
        assert_eq!(fl["LaunchTemplateConfigs.1.Overrides.1.MaxPrice"], "3.20000");

        f.cloud.terminate(&[r.launched.instance_id]).await.unwrap();
        assert!(f.alive("b-shape").await.is_empty());
    });
}

#[test]
fn a_fleet_of_mixed_sizes_follows_the_price_per_vcpu_order() {
    let rt = runtime();
    let f = farm(&rt);
    rt.block_on(async {
        let config = spotbuild::settings::Config::parse(
            &format!("[cloud]\nregion = \"us-east-1\"\nsubnets = [\"{}\"]\nsizes = \"at-least\"\nmax_cpus = 192\n", f.subnet),
            std::path::Path::new("spotbuild.toml"),
        )
        .unwrap();
        let machines = config.cloud.machines(spotbuild::platform::Arch::Arm64, spotbuild::settings::CpuWant::Exactly(64)).unwrap();
        let mut spec = f.spec("b-sizes", 3600);
        spec.arch = machines.arch;
        spec.pools = machines.pools.clone();
        spec.prioritized = machines.prioritized;
        assert!(spec.prioritized);
        for market in [MarketPolicy::Spot, MarketPolicy::OnDemand] {
            let r = launch(&f.cloud, &spec, market, Breaker::Closed, FAST).await.unwrap();
            f.cloud.terminate(&[r.launched.instance_id]).await.unwrap();
        }
        let fl = f.proxy.params("CreateFleet");
        assert_eq!(fl["SpotOptions.AllocationStrategy"], "capacity-optimized-prioritized");
        assert_eq!(fl["OnDemandOptions.AllocationStrategy"], "prioritized");
        let overrides: Vec<(String, f64)> = (1..=spec.pools.len())
            .map(|n| {
                let o = |k: &str| fl[&format!("LaunchTemplateConfigs.1.Overrides.{n}.{k}")].clone();
                (o("InstanceType"), o("Priority").parse().unwrap())
            })
            .collect();
        // Cheapest per vCPU first (c7g), every size of the Graviton4 families after its price.
        assert_eq!(overrides[0], ("c7g.16xlarge".to_string(), 0.0), "{overrides:?}");
        assert!(overrides.iter().any(|(t, _)| t == "m8g.48xlarge"), "{overrides:?}");
        assert!(overrides.windows(2).all(|w| w[0].1 < w[1].1), "one priority per type, in order: {overrides:?}");
        assert!(overrides.iter().all(|(t, _)| spotbuild::cloud::types::arch_of(t) == spotbuild::platform::Arch::Arm64));
        assert!(f.alive("b-sizes").await.is_empty());
    });
}

/// A ledger entry of a build still running, on attempt 1 on `instance`.
fn running_entry(build_id: &str, instance: &str, started: SystemTime) -> spotbuild::ledger::BuildEntry {
    let at = humantime::format_rfc3339_seconds(started).to_string();
    serde_json::from_value(serde_json::json!({
        "schema": 1, "build_id": build_id, "projects": ["api"], "kind": "build", "commit": "c",
        "branch": null, "ci_job_url": null, "started_at": at, "ended_at": at, "result": "running",
        "region": "us-east-1", "volume_gb": 200,
        "attempts": [{"attempt": 1, "instance_id": instance, "instance_type": "m7a.16xlarge", "market": "on-demand",
                      "hourly_price": 3.7, "started_at": at, "ended_at": at, "outcome": "running", "reason": null, "seconds": {}}]
    }))
    .unwrap()
}

fn beat(build_id: &str, at: SystemTime, started: SystemTime) -> spotbuild::ledger::Beat {
    spotbuild::ledger::Beat {
        build_id: build_id.into(),
        at: humantime::format_rfc3339_seconds(at).to_string(),
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        ended: false,
    }
}

/// A launch template such as a killed controller leaves behind, tagged with its build.
async fn leftover_template(f: &Farm, build_id: &str) -> String {
    let name = format!("spotbuild-{build_id}-a1-spot");
    f.ec2
        .create_launch_template()
        .launch_template_name(&name)
        .launch_template_data(aws_sdk_ec2::types::RequestLaunchTemplateData::builder().image_id(&f.image).build())
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::LaunchTemplate)
                .tags(Tag::builder().key(tags::BUILD_ID).value(build_id).build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    name
}

#[test]
fn reap_ends_builds_whose_heartbeat_stopped_sweeps_their_templates_and_marks_them_abandoned() {
    use spotbuild::ledger::LedgerStore;
    let rt = runtime();
    let f = farm(&rt);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let now = SystemTime::now();
    let started = now - Duration::from_secs(1800);
    let (dead, alive, template) = rt.block_on(async {
        let dead = launch(&f.cloud, &f.spec("b-dead", 3600), MarketPolicy::OnDemand, Breaker::Closed, FAST).await.unwrap().launched.instance_id;
        let alive = launch(&f.cloud, &f.spec("b-alive", 3600), MarketPolicy::OnDemand, Breaker::Closed, FAST).await.unwrap().launched.instance_id;
        let template = leftover_template(&f, "b-dead").await;
        let ledger = spotbuild::ledger::sqlite::SqliteLedger::open(&path).unwrap();
        ledger.put(&running_entry("b-dead", &dead, started)).await.unwrap();
        ledger.beat(&beat("b-dead", now - Duration::from_secs(1200), started)).await.unwrap();
        ledger.put(&running_entry("b-alive", &alive, started)).await.unwrap();
        ledger.beat(&beat("b-alive", now, started)).await.unwrap();
        (dead, alive, template)
    });
    let reap = || {
        Run::of(
            spotbuild(std::path::Path::new("/"))
                .args(["reap", "--json", "--heartbeat-window", "10m", "--ledger"])
                .arg(&path)
                .env("AWS_ENDPOINT_URL", f.proxy.endpoint())
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        )
    };
    let run = reap();
    assert_eq!(run.code, 0, "{run:?}");
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let ids = |k: &str| v[k].as_array().unwrap().iter().map(|x| x["instance_id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(ids("terminate"), [dead.clone()], "{}", run.stdout);
    assert_eq!(ids("keep"), [alive.clone()], "{}", run.stdout);
    assert!(v["terminate"][0]["reason"].as_str().unwrap().starts_with("its build stopped beating 20m"), "{}", run.stdout);
    // The launch's own template (the policy alone leaves it to its caller) and the leftover.
    let templates: Vec<&str> = v["delete_templates"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(templates, ["spotbuild-b-dead-a1-on-demand", template.as_str()], "{}", run.stdout);
    assert_eq!(v["abandoned_builds"], serde_json::json!(["b-dead"]));
    rt.block_on(async {
        assert!(f.alive("b-dead").await.is_empty());
        assert_eq!(f.alive("b-alive").await, std::slice::from_ref(&alive));
        let ledger = spotbuild::ledger::sqlite::SqliteLedger::open(&path).unwrap();
        let started = humantime::format_rfc3339_seconds(started).to_string();
        let entry = ledger.get("b-dead", &started).await.unwrap().unwrap();
        assert_eq!(entry.result, "abandoned");
        assert_eq!(entry.attempts[0].outcome, "abandoned");
        assert_eq!(ledger.get("b-alive", &started).await.unwrap().unwrap().result, "running");
        let templates = f.ec2.describe_launch_templates().send().await.unwrap();
        let left: Vec<&str> = templates.launch_templates().iter().filter_map(|t| t.launch_template_name()).collect();
        assert_eq!(left, ["spotbuild-b-alive-a1-on-demand"], "the live build's is kept");
    });
    // A second pass has nothing left to do.
    let again = reap();
    let v: Value = serde_json::from_str(&again.stdout).unwrap();
    assert!(v["terminate"].as_array().unwrap().is_empty() && v["abandoned_builds"].as_array().unwrap().is_empty(), "{}", again.stdout);
    rt.block_on(async {
        f.cloud.terminate(&[alive]).await.unwrap();
        f.cloud.delete_templates(&["b-alive".to_string()]).await.unwrap();
    });
}

/// A stand-in for the Lambda runtime API: one scheduled event, then no more (the next
/// request waits until the function is stopped); the function's answer is kept.
struct RuntimeApi {
    server: Option<crate::support::server::TestServer>,
    answer: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>,
}

impl RuntimeApi {
    fn start() -> RuntimeApi {
        use axum::extract::{Path, State};
        use axum::routing::{get, post};
        type Answer = std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>;
        let answer: Answer = Default::default();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let next = move || {
            let served = served.clone();
            async move {
                if served.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                let deadline = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() + 120_000;
                (
                    [
                        ("lambda-runtime-aws-request-id", "req-1".to_string()),
                        ("lambda-runtime-deadline-ms", deadline.to_string()),
                        ("lambda-runtime-invoked-function-arn", "arn:aws:lambda:us-east-1:123456789012:function:spotbuild-reaper".to_string()),
                        ("content-type", "application/json".to_string()),
                    ],
                    r#"{"version":"0","id":"e1","detail-type":"Scheduled Event","source":"aws.events","time":"2026-12-05T18:00:00Z","region":"us-east-1","resources":[],"detail":{}}"#,
                )
            }
        };
        let keep = |kind: &'static str| {
            move |State(answer): State<Answer>, Path(id): Path<String>, body: String| async move {
                *answer.lock().unwrap() = Some((format!("{kind} {id}"), body));
                axum::http::StatusCode::ACCEPTED
            }
        };
        let app = axum::Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(keep("response")))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(keep("error")))
            .with_state(answer.clone());
        RuntimeApi {
            server: Some(crate::support::server::TestServer::start(app)),
            answer,
        }
    }
}

#[test]
fn the_reaper_runs_as_a_lambda_function_against_the_runtime_api() {
    let rt = runtime();
    let f = farm(&rt);
    let expired = rt.block_on(async { launch(&f.cloud, &f.spec("b-lambda", -60), MarketPolicy::OnDemand, Breaker::Closed, FAST).await.unwrap().launched.instance_id });
    let api = RuntimeApi::start();
    // provided.al2023 runs the function's `bootstrap`: the spotbuild binary by that name.
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_spotbuild"), &bootstrap).unwrap();
    let mut child = std::process::Command::new(&bootstrap)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{}", api.server.as_ref().unwrap().port))
        .env("AWS_LAMBDA_FUNCTION_NAME", "spotbuild-reaper")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "stream")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/spotbuild-reaper")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SPOTBUILD_EC2_ENDPOINT", f.proxy.endpoint())
        .env("SPOTBUILD_LEDGER", "off")
        .env("SPOTBUILD_REAP_HEARTBEAT_WINDOW", "10m")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let answer = loop {
        if let Some(a) = api.answer.lock().unwrap().clone() {
            break Some(a);
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // It waits for the next event now: stopped by its PID, as Lambda would freeze it.
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let (kind, body) = answer.unwrap_or_else(|| panic!("no answer from the function:\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(kind, "response req-1", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["terminate"][0]["instance_id"], expired.as_str(), "{body}");
    rt.block_on(async { assert!(f.alive("b-lambda").await.is_empty()) });
    drop(api);
}
