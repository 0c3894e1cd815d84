//! The AWS adapter for [`Cloud`]: EC2 Fleet (`instant`) launches from a per-launch launch
//! template, with every pool as an override. Thin: it builds requests, and turns answers
//! and errors into domain types, keeping EC2's error codes.
//!
//! Launch calls use a client with SDK retries off: a capacity error must move on quickly,
//! and throttling is retried by the policy (`cloud::launch`), which knows why.

use std::time::Duration;

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetLaunchTemplateSpecificationRequest, FleetType, InstanceLifecycle, InstanceStateName, InstanceType,
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateHttpTokensState,
    LaunchTemplateIamInstanceProfileSpecificationRequest, LaunchTemplateInstanceMetadataEndpointState,
    LaunchTemplateInstanceMetadataOptionsRequest, LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData,
    ResourceType, ShutdownBehavior, SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification,
    TargetCapacitySpecificationRequest, VolumeType,
};
use base64::Engine;
use futures::future::BoxFuture;

use super::{tags, Cloud, CloudFailure, FailureKind, Image, InstanceState, LaunchSpec, Launched, Market, Observed, Pool};

/// Where the root volume is attached; the usual name on Amazon Linux and Debian/Ubuntu
/// images built with Packer's amazon-ebs.
pub const ROOT_DEVICE: &str = "/dev/xvda";

pub struct AwsCloud {
    /// For launches: no SDK retries.
    launch: aws_sdk_ec2::Client,
    /// For everything else: the SDK's standard retries.
    ec2: aws_sdk_ec2::Client,
}

/// The standard AWS configuration (environment, profile, instance role), with an optional
/// region and endpoint (or `AWS_ENDPOINT_URL`) pointing it elsewhere, e.g. at the local farm.
/// Every AWS client spotbuild makes starts here.
pub async fn sdk_config(region: Option<String>, endpoint: Option<String>) -> aws_config::SdkConfig {
    let mut loader = aws_config::from_env();
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r));
    }
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}

impl AwsCloud {
    /// From [`sdk_config`].
    pub async fn from_env(region: Option<String>, endpoint: Option<String>) -> AwsCloud {
        AwsCloud::new(&sdk_config(region, endpoint).await)
    }

    /// From ready-made clients: `launch` should have SDK retries off.
    pub fn from_clients(launch: aws_sdk_ec2::Client, ec2: aws_sdk_ec2::Client) -> AwsCloud {
        AwsCloud { launch, ec2 }
    }

    pub fn new(config: &aws_config::SdkConfig) -> AwsCloud {
        let launch = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(config)
                .retry_config(RetryConfig::disabled())
                .build(),
        );
        AwsCloud {
            launch,
            ec2: aws_sdk_ec2::Client::new(config),
        }
    }

    /// Open and active spot requests (the reaper decides which are spotbuild's).
    pub async fn list_spot_requests(&self) -> Result<Vec<super::reap::SpotRequest>, CloudFailure> {
        let out = self
            .ec2
            .describe_spot_instance_requests()
            .filters(
                Filter::builder()
                    .name("state")
                    .set_values(Some(vec!["open".to_string(), "active".to_string()]))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| failure(&e, None))?;
        Ok(out
            .spot_instance_requests()
            .iter()
            .map(|r| super::reap::SpotRequest {
                id: r.spot_instance_request_id().unwrap_or_default().to_string(),
                instance_id: r.instance_id().map(String::from),
                created_at: r.create_time().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                tags: r.tags().iter().filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string()))).collect(),
            })
            .collect())
    }

    pub async fn cancel_spot_requests(&self, ids: &[String]) -> Result<(), CloudFailure> {
        if ids.is_empty() {
            return Ok(());
        }
        self.ec2
            .cancel_spot_instance_requests()
            .set_spot_instance_request_ids(Some(ids.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| failure(&e, None))
    }

    /// Every instance carrying spotbuild's build-id tag (terminated ones too, which EC2
    /// lists for a while: the reaper matches spot requests to them).
    pub async fn list_spotbuild_instances(&self) -> Result<Vec<Observed>, CloudFailure> {
        let mut out = Vec::new();
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(Filter::builder().name("tag-key").values(tags::BUILD_ID).build())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(
                        ["pending", "running", "stopping", "stopped", "shutting-down", "terminated"].map(String::from).to_vec(),
                    ))
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| failure(&e, None))?;
            for r in page.reservations() {
                out.extend(r.instances().iter().map(observed));
            }
        }
        Ok(out)
    }
}

/// A CloudFailure from any SDK error, keeping EC2's code.
fn failure<E: ProvideErrorMetadata + std::error::Error>(e: &E, pool: Option<Pool>) -> CloudFailure {
    let code = e.code().unwrap_or("Unknown");
    let message = e
        .message()
        .map(String::from)
        .unwrap_or_else(|| crate::errors::error_chain(e));
    CloudFailure {
        kind: FailureKind::of_code(code),
        code: Some(code.to_string()),
        message,
        pool,
    }
}

/// vCPUs of the common sizes (`large` 2, `xlarge` 4, `Nxlarge` 4N), for per-vCPU price caps.
pub fn vcpus(instance_type: &str) -> Option<u32> {
    let size = instance_type.split('.').nth(1)?;
    match size {
        "large" => Some(2),
        "xlarge" => Some(4),
        s => s.strip_suffix("xlarge")?.parse::<u32>().ok().map(|n| n * 4),
    }
}

fn ec2_tags(spec: &LaunchSpec) -> Vec<Tag> {
    spec.tags()
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn observed(i: &aws_sdk_ec2::types::Instance) -> Observed {
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::Gone,
    };
    Observed {
        instance_id: i.instance_id().unwrap_or_default().to_string(),
        state,
        state_reason: i.state_reason().and_then(|r| r.code()).map(String::from),
        private_ip: i.private_ip_address().map(String::from),
        launched_at: i.launch_time().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        spot_request_id: i.spot_instance_request_id().map(String::from),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect(),
    }
}

impl AwsCloud {
    async fn launch_once(&self, spec: &LaunchSpec, market: Market) -> Result<Launched, Vec<CloudFailure>> {
        let image = match &spec.image {
            Image::Id(id) => id.clone(),
            // EC2 resolves the parameter at launch.
            Image::SsmParameter(p) => format!("resolve:ssm:{p}"),
        };
        let instance_tags = ec2_tags(spec);
        let mut data = RequestLaunchTemplateData::builder()
            .image_id(image)
            .set_security_group_ids((!spec.security_groups.is_empty()).then(|| spec.security_groups.clone()))
            .block_device_mappings(
                LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name(ROOT_DEVICE)
                    .ebs(
                        LaunchTemplateEbsBlockDeviceRequest::builder()
                            .volume_size(spec.root_volume_gb as i32)
                            .volume_type(VolumeType::Gp3)
                            .encrypted(true)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .metadata_options(
                LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .tag_specifications(
                LaunchTemplateTagSpecificationRequest::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(instance_tags.clone()))
                    .build(),
            )
            .tag_specifications(
                LaunchTemplateTagSpecificationRequest::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(instance_tags.clone()))
                    .build(),
            );
        if let Some(profile) = &spec.instance_profile {
            let p = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
            let p = if profile.starts_with("arn:") { p.arn(profile) } else { p.name(profile) };
            data = data.iam_instance_profile(p.build());
        }
        let name = format!("spotbuild-{}-{}-{}", spec.build_id, market, std::process::id());
        let template = self
            .launch
            .create_launch_template()
            .launch_template_name(&name)
            .launch_template_data(data.build())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::LaunchTemplate)
                    .set_tags(Some(instance_tags.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| vec![failure(&e, None)])?;
        let template_id = template
            .launch_template()
            .and_then(|t| t.launch_template_id())
            .unwrap_or_default()
            .to_string();

        let result = self.create_fleet(spec, market, &template_id, &instance_tags).await;
        // The template served this launch only.
        let _ = self.ec2.delete_launch_template().launch_template_id(&template_id).send().await;
        result
    }

    async fn create_fleet(
        &self,
        spec: &LaunchSpec,
        market: Market,
        template_id: &str,
        instance_tags: &[Tag],
    ) -> Result<Launched, Vec<CloudFailure>> {
        let overrides: Vec<FleetLaunchTemplateOverridesRequest> = spec
            .pools
            .iter()
            .map(|p| {
                let cap = match (market, spec.max_spot_price_per_vcpu_hour, vcpus(&p.instance_type)) {
                    (Market::Spot, Some(per_vcpu), Some(n)) => Some(format!("{:.5}", per_vcpu * n as f64)),
                    _ => None,
                };
                FleetLaunchTemplateOverridesRequest::builder()
                    .instance_type(InstanceType::from(p.instance_type.as_str()))
                    .subnet_id(&p.subnet)
                    .set_max_price(cap)
                    .build()
            })
            .collect();
        let capacity = match market {
            Market::Spot => DefaultTargetCapacityType::Spot,
            Market::OnDemand => DefaultTargetCapacityType::OnDemand,
        };
        let out = self
            .launch
            .create_fleet()
            .r#type(FleetType::Instant)
            .target_capacity_specification(
                TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(1)
                    .default_target_capacity_type(capacity)
                    .build(),
            )
            .spot_options(
                SpotOptionsRequest::builder()
                    .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                    .build(),
            )
            .launch_template_configs(
                FleetLaunchTemplateConfigRequest::builder()
                    .launch_template_specification(
                        FleetLaunchTemplateSpecificationRequest::builder()
                            .launch_template_id(template_id)
                            .version("$Latest")
                            .build(),
                    )
                    .set_overrides(Some(overrides))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Fleet)
                    .set_tags(Some(instance_tags.to_vec()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| vec![failure(&e, None)])?;

        let pool_of = |o: Option<&aws_sdk_ec2::types::LaunchTemplateAndOverridesResponse>| {
            o.and_then(|x| x.overrides()).map(|ov| Pool {
                instance_type: ov.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                subnet: ov.subnet_id().unwrap_or_default().to_string(),
            })
        };
        let failures: Vec<CloudFailure> = out
            .errors()
            .iter()
            .map(|e| {
                CloudFailure::new(
                    e.error_code().unwrap_or("Unknown"),
                    e.error_message().unwrap_or_default(),
                    pool_of(e.launch_template_and_overrides()),
                )
            })
            .collect();
        if let Some(instance) = out.instances().iter().find(|i| !i.instance_ids().is_empty()) {
            let id = instance.instance_ids()[0].clone();
            let pool = pool_of(instance.launch_template_and_overrides()).unwrap_or_else(|| Pool {
                instance_type: instance.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                subnet: spec.pools.first().map(|p| p.subnet.clone()).unwrap_or_default(),
            });
            let market = match instance.lifecycle() {
                Some(InstanceLifecycle::Spot) => Market::Spot,
                Some(InstanceLifecycle::OnDemand) => Market::OnDemand,
                _ => market,
            };
            // Where it landed and the spot request to cancel at teardown.
            let details = self.ec2.describe_instances().instance_ids(&id).send().await.ok();
            let inst = details
                .as_ref()
                .and_then(|d| d.reservations().first())
                .and_then(|r| r.instances().first());
            return Ok(Launched {
                instance_id: id,
                pool,
                availability_zone: inst.and_then(|i| i.placement()).and_then(|p| p.availability_zone()).map(String::from),
                market,
                private_ip: inst.and_then(|i| i.private_ip_address()).map(String::from),
                spot_request_id: inst.and_then(|i| i.spot_instance_request_id()).map(String::from),
                pool_failures: failures,
            });
        }
        Err(if failures.is_empty() {
            vec![CloudFailure::new("UnfulfillableCapacity", "the fleet launched nothing and gave no reason", None)]
        } else {
            failures
        })
    }

    async fn terminate_all(&self, ids: &[String]) -> Result<(), CloudFailure> {
        if ids.is_empty() {
            return Ok(());
        }
        match self.ec2.terminate_instances().set_instance_ids(Some(ids.to_vec())).send().await {
            Ok(_) => {}
            // Already gone: terminate is idempotent.
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => {}
            Err(e) => return Err(failure(&e, None)),
        }
        // One describe per round: the first also names the spot requests to cancel.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut first = true;
        loop {
            let seen = self.describe_all(ids).await?;
            if std::mem::take(&mut first) {
                let requests: Vec<String> = seen.iter().filter_map(|o| o.spot_request_id.clone()).collect();
                if !requests.is_empty() {
                    // Best effort: a request whose instance is gone no longer bills.
                    let _ = self
                        .ec2
                        .cancel_spot_instance_requests()
                        .set_spot_instance_request_ids(Some(requests))
                        .send()
                        .await;
                }
            }
            // Verify: every instance is seen ending or gone, within a bounded wait.
            if seen.iter().all(|o| o.ending()) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let alive: Vec<&str> = seen.iter().filter(|o| !o.ending()).map(|o| o.instance_id.as_str()).collect();
                return Err(CloudFailure {
                    kind: FailureKind::Other,
                    code: None,
                    message: format!("still not terminating after 60 s: {}", alive.join(", ")),
                    pool: None,
                });
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn describe_all(&self, ids: &[String]) -> Result<Vec<Observed>, CloudFailure> {
        let out = match self.ec2.describe_instances().set_instance_ids(Some(ids.to_vec())).send().await {
            Ok(o) => o,
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => {
                return Ok(ids.iter().map(|id| Observed::gone(id)).collect())
            }
            Err(e) => return Err(failure(&e, None)),
        };
        let mut seen: Vec<Observed> = out.reservations().iter().flat_map(|r| r.instances()).map(observed).collect();
        for id in ids {
            if !seen.iter().any(|o| &o.instance_id == id) {
                seen.push(Observed::gone(id));
            }
        }
        Ok(seen)
    }
}

impl Cloud for AwsCloud {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec, market: Market) -> BoxFuture<'a, Result<Launched, Vec<CloudFailure>>> {
        Box::pin(self.launch_once(spec, market))
    }

    fn describe<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
        Box::pin(self.describe_all(instance_ids))
    }

    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>> {
        Box::pin(self.terminate_all(instance_ids))
    }

    fn spot_price<'a>(&'a self, instance_type: &'a str, zone: &'a str) -> BoxFuture<'a, Result<Option<f64>, CloudFailure>> {
        Box::pin(async move {
            let out = self
                .ec2
                .describe_spot_price_history()
                .instance_types(InstanceType::from(instance_type))
                .availability_zone(zone)
                .product_descriptions("Linux/UNIX")
                .start_time(aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now()))
                .send()
                .await
                .map_err(|e| failure(&e, None))?;
            // The newest record for this pool.
            Ok(out
                .spot_price_history()
                .iter()
                .filter(|p| p.availability_zone().is_none_or(|z| z == zone))
                .max_by_key(|p| p.timestamp().map(|t| t.secs()))
                .and_then(|p| p.spot_price())
                .and_then(|p| p.parse::<f64>().ok()))
        })
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::operation::create_fleet::CreateFleetOutput;
    use aws_sdk_ec2::operation::create_launch_template::CreateLaunchTemplateOutput;
    use aws_sdk_ec2::operation::delete_launch_template::DeleteLaunchTemplateOutput;
    use aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput;
    use aws_sdk_ec2::types::{
        CreateFleetError, CreateFleetInstance, FleetLaunchTemplateOverrides, Instance, LaunchTemplate,
        LaunchTemplateAndOverridesResponse, Placement, Reservation,
    };
    use aws_sdk_ec2::Client;
    use aws_smithy_mocks::{mock, mock_client, RuleMode};

    use super::*;

    #[test]
    fn vcpus_follow_the_size_name() {
        assert_eq!(vcpus("m7a.16xlarge"), Some(64));
        assert_eq!(vcpus("c6a.xlarge"), Some(4));
        assert_eq!(vcpus("r6a.large"), Some(2));
        assert_eq!(vcpus("m7i.metal-48xl"), None);
    }

    fn overrides(t: &str) -> LaunchTemplateAndOverridesResponse {
        LaunchTemplateAndOverridesResponse::builder()
            .overrides(
                FleetLaunchTemplateOverrides::builder()
                    .instance_type(InstanceType::from(t))
                    .subnet_id("subnet-1")
                    .build(),
            )
            .build()
    }

    /// One pool short of capacity, the other fulfilled, in a single EC2 Fleet answer (moto
    /// cannot produce this); and the launch template asks for exactly what we require.
    #[tokio::test]
    async fn partial_fulfilment_keeps_the_failed_pool_and_the_request_is_exact() {
        let template = mock!(Client::create_launch_template)
            .match_requests(|r| {
                let Some(d) = r.launch_template_data() else { return false };
                let md = d.metadata_options();
                let tag_types: Vec<_> = d.tag_specifications().iter().filter_map(|t| t.resource_type().cloned()).collect();
                d.image_id() == Some("resolve:ssm:/spotbuild/ami")
                    && md.and_then(|m| m.http_tokens()) == Some(&LaunchTemplateHttpTokensState::Required)
                    && md.and_then(|m| m.http_put_response_hop_limit()) == Some(1)
                    && d.instance_initiated_shutdown_behavior() == Some(&ShutdownBehavior::Terminate)
                    && d.iam_instance_profile().and_then(|p| p.name()) == Some("spotbuild-instance")
                    && tag_types == [ResourceType::Instance, ResourceType::Volume]
                    && d.tag_specifications()[0].tags().iter().any(|t| {
                        t.key() == Some(tags::EXPIRES_AT) && t.value() == Some("2027-01-15T08:00:00Z")
                    })
            })
            .then_output(|| {
                CreateLaunchTemplateOutput::builder()
                    .launch_template(LaunchTemplate::builder().launch_template_id("lt-1").build())
                    .build()
            });
        let fleet = mock!(Client::create_fleet)
            .match_requests(|r| {
                let config = &r.launch_template_configs()[0];
                r.r#type() == Some(&FleetType::Instant)
                    && config.launch_template_specification().and_then(|s| s.launch_template_id()) == Some("lt-1")
                    && config.overrides().len() == 2
                    && config.overrides().iter().all(|o| o.max_price() == Some("3.20000"))
                    && r.spot_options().and_then(|o| o.allocation_strategy())
                        == Some(&SpotAllocationStrategy::PriceCapacityOptimized)
            })
            .then_output(|| {
                CreateFleetOutput::builder()
                    .instances(
                        CreateFleetInstance::builder()
                            .instance_ids("i-2")
                            .lifecycle(InstanceLifecycle::Spot)
                            .launch_template_and_overrides(overrides("c7a.16xlarge"))
                            .build(),
                    )
                    .errors(
                        CreateFleetError::builder()
                            .error_code("InsufficientInstanceCapacity")
                            .error_message("no capacity")
                            .launch_template_and_overrides(overrides("m7a.16xlarge"))
                            .build(),
                    )
                    .build()
            });
        let describe = mock!(Client::describe_instances).then_output(|| {
            DescribeInstancesOutput::builder()
                .reservations(
                    Reservation::builder()
                        .instances(
                            Instance::builder()
                                .instance_id("i-2")
                                .placement(Placement::builder().availability_zone("us-east-1b").build())
                                .private_ip_address("10.0.0.7")
                                .spot_instance_request_id("sir-1")
                                .build(),
                        )
                        .build(),
                )
                .build()
        });
        let delete = mock!(Client::delete_launch_template).then_output(|| DeleteLaunchTemplateOutput::builder().build());
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&template, &fleet, &describe, &delete]);
        let cloud = AwsCloud::from_clients(client.clone(), client);

        let launched = cloud.launch(&crate::cloud::test_spec(), Market::Spot).await.unwrap();
        assert_eq!(launched.instance_id, "i-2");
        assert_eq!(launched.pool.instance_type, "c7a.16xlarge");
        assert_eq!(launched.market, Market::Spot);
        assert_eq!(launched.availability_zone.as_deref(), Some("us-east-1b"));
        assert_eq!(launched.spot_request_id.as_deref(), Some("sir-1"));
        assert_eq!(launched.pool_failures.len(), 1);
        assert_eq!(launched.pool_failures[0].kind, FailureKind::Capacity);
        assert_eq!(launched.pool_failures[0].pool.as_ref().unwrap().instance_type, "m7a.16xlarge");
        assert_eq!((template.num_calls(), fleet.num_calls(), delete.num_calls()), (1, 1, 1));
    }

    /// A fleet that launched nothing reports one classified failure per pool.
    #[tokio::test]
    async fn an_empty_fleet_reports_every_pool() {
        let template = mock!(Client::create_launch_template).then_output(|| {
            CreateLaunchTemplateOutput::builder()
                .launch_template(LaunchTemplate::builder().launch_template_id("lt-1").build())
                .build()
        });
        let fleet = mock!(Client::create_fleet).then_output(|| {
            CreateFleetOutput::builder()
                .errors(
                    CreateFleetError::builder()
                        .error_code("InsufficientInstanceCapacity")
                        .launch_template_and_overrides(overrides("m7a.16xlarge"))
                        .build(),
                )
                .errors(
                    CreateFleetError::builder()
                        .error_code("SpotMaxPriceTooLow")
                        .launch_template_and_overrides(overrides("c7a.16xlarge"))
                        .build(),
                )
                .build()
        });
        let delete = mock!(Client::delete_launch_template).then_output(|| DeleteLaunchTemplateOutput::builder().build());
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&template, &fleet, &delete]);
        let cloud = AwsCloud::from_clients(client.clone(), client);
        let failures = cloud.launch(&crate::cloud::test_spec(), Market::Spot).await.unwrap_err();
        let kinds: Vec<_> = failures.iter().map(|f| (f.kind, f.pool.as_ref().unwrap().instance_type.clone())).collect();
        assert_eq!(
            kinds,
            [
                (FailureKind::Capacity, "m7a.16xlarge".to_string()),
                (FailureKind::Price, "c7a.16xlarge".to_string())
            ]
        );
        assert_eq!(delete.num_calls(), 1, "the template is removed on failure too");
    }
}
