//! The AWS adapter for [`Cloud`]: EC2 Fleet (`instant`) launches from a per-launch launch
//! template, with every pool as an override. Thin: it builds requests, and turns answers
//! and errors into domain types, keeping EC2's error codes.
//!
//! Launch calls use a client with SDK retries off: a capacity error must move on quickly,
//! and throttling is retried by the policy (`cloud::launch`), which knows why.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetOnDemandAllocationStrategy, OnDemandOptionsRequest,
    FleetLaunchTemplateSpecificationRequest, FleetType, InstanceLifecycle, InstanceLifecycleType, InstanceStateName,
    InstanceType, LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType, ShutdownBehavior,
    SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification, TargetCapacitySpecificationRequest, VolumeType,
};
use base64::Engine;
use futures::future::BoxFuture;

use super::{
    tags, Cloud, CloudFailure, FailureKind, Image, InstanceState, LaunchSpec, Launched, Market, Observed, Pool, Template,
    NOT_FOUND,
};

/// Where the root volume is attached; the usual name on Amazon Linux and Debian/Ubuntu
/// images built with Packer's amazon-ebs.
pub const ROOT_DEVICE: &str = "/dev/xvda";
/// Default bound on one launch call (CreateLaunchTemplate, CreateFleet); `[cloud]
/// launch_call_timeout`. Past it the launch is ambiguous and is looked for by its tags.
pub const LAUNCH_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long termination is verified, waiting out ids EC2 does not list yet (eventual
/// consistency right after a launch) and instances not yet shutting down.
pub const TERMINATE_VERIFY_TIMEOUT: Duration = Duration::from_secs(90);
/// Between verification rounds: doubling from the first, up to the second.
const VERIFY_POLL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(5));
/// What a template that already exists is reported as (a retried launch made it).
const TEMPLATE_EXISTS: &str = "InvalidLaunchTemplateName.AlreadyExistsException";

pub struct AwsCloud {
    /// For launches: no SDK retries, and each call bounded.
    launch: aws_sdk_ec2::Client,
    /// For everything else: the SDK's standard retries.
    ec2: aws_sdk_ec2::Client,
    verify_timeout: Duration,
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
    /// From [`sdk_config`], with the default bounds.
    pub async fn from_env(region: Option<String>, endpoint: Option<String>) -> AwsCloud {
        AwsCloud::new(&sdk_config(region, endpoint).await)
    }

    /// From [`sdk_config`] and `[cloud]`: its region, endpoint and launch call bound.
    pub async fn from_settings(cfg: &crate::settings::CloudConfig) -> AwsCloud {
        let config = sdk_config(cfg.region.clone(), cfg.endpoint.clone()).await;
        AwsCloud::with_bounds(&config, cfg.launch_call_timeout, TERMINATE_VERIFY_TIMEOUT)
    }

    /// From ready-made clients: `launch` should have SDK retries off.
    pub fn from_clients(launch: aws_sdk_ec2::Client, ec2: aws_sdk_ec2::Client) -> AwsCloud {
        AwsCloud {
            launch,
            ec2,
            verify_timeout: TERMINATE_VERIFY_TIMEOUT,
        }
    }

    pub fn new(config: &aws_config::SdkConfig) -> AwsCloud {
        AwsCloud::with_bounds(config, LAUNCH_CALL_TIMEOUT, TERMINATE_VERIFY_TIMEOUT)
    }

    /// With a bound on each launch call and on verifying a termination.
    pub fn with_bounds(config: &aws_config::SdkConfig, launch_call: Duration, verify: Duration) -> AwsCloud {
        let launch = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(config)
                .retry_config(RetryConfig::disabled())
                .timeout_config(TimeoutConfig::builder().operation_timeout(launch_call).build())
                .build(),
        );
        AwsCloud {
            launch,
            ec2: aws_sdk_ec2::Client::new(config),
            verify_timeout: verify,
        }
    }

    /// Open and active spot requests (the reaper decides which are spotbuild's).
    pub async fn list_spot_requests(&self) -> Result<Vec<super::SpotRequest>, CloudFailure> {
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
            .map(|r| super::SpotRequest {
                id: r.spot_instance_request_id().unwrap_or_default().to_string(),
                instance_id: r.instance_id().map(String::from),
                created_at: r.create_time().and_then(|t| SystemTime::try_from(*t).ok()),
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
        let states = ["pending", "running", "stopping", "stopped", "shutting-down", "terminated"];
        self.instances_where(Filter::builder().name("tag-key").values(tags::BUILD_ID).build(), &states).await
    }

    /// Every launch template carrying spotbuild's build-id tag.
    pub async fn list_templates(&self) -> Result<Vec<Template>, CloudFailure> {
        self.templates_where(Filter::builder().name("tag-key").values(tags::BUILD_ID).build()).await
    }

    /// Deletes launch templates by id; one already gone counts as deleted.
    pub async fn delete_template_ids(&self, ids: &[String]) -> Result<(), CloudFailure> {
        for id in ids {
            match self.ec2.delete_launch_template().launch_template_id(id).send().await {
                Ok(_) => {}
                Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidLaunchTemplateId")) => {}
                Err(e) => return Err(failure(&e, None)),
            }
        }
        Ok(())
    }

    async fn instances_where(&self, filter: Filter, states: &[&str]) -> Result<Vec<Observed>, CloudFailure> {
        let mut out = Vec::new();
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(filter)
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
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

    async fn templates_where(&self, filter: Filter) -> Result<Vec<Template>, CloudFailure> {
        let mut out = Vec::new();
        let mut pages = self.ec2.describe_launch_templates().filters(filter).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| failure(&e, None))?;
            out.extend(page.launch_templates().iter().map(|t| Template {
                id: t.launch_template_id().unwrap_or_default().to_string(),
                name: t.launch_template_name().unwrap_or_default().to_string(),
                build_id: t.tags().iter().find(|x| x.key() == Some(tags::BUILD_ID)).and_then(|x| x.value()).map(String::from),
                created_at: t.create_time().and_then(|c| SystemTime::try_from(*c).ok()),
            }));
        }
        Ok(out)
    }
}

/// A CloudFailure from an SDK error, keeping EC2's code. What reached no answer (a
/// timeout, a dropped connection, an unreadable or 5xx answer) is
/// [`FailureKind::Ambiguous`]: the request may have taken effect.
fn failure<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>, pool: Option<Pool>) -> CloudFailure {
    let why = || crate::errors::error_chain(e);
    let no_answer = match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(d) => !d.is_user(),
        _ => false,
    };
    if no_answer {
        return CloudFailure {
            pool,
            ..CloudFailure::ambiguous(format!("no answer was read: {}", why()))
        };
    }
    let code = e.code().unwrap_or("Unknown");
    let message = e.message().map(String::from).unwrap_or_else(why);
    CloudFailure {
        kind: FailureKind::of_code(code),
        code: Some(code.to_string()),
        message,
        pool,
    }
}

pub use super::types::vcpus;

fn ec2_tags(spec: &LaunchSpec) -> Vec<Tag> {
    let fitted = spec.tags();
    if !fitted.cut.is_empty() || !fitted.dropped.is_empty() {
        tracing::warn!(cut = ?fitted.cut, dropped = ?fitted.dropped, "tags fitted to EC2's limits");
    }
    fitted.tags.into_iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

fn observed(i: &aws_sdk_ec2::types::Instance) -> Observed {
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::NotFound,
    };
    Observed {
        instance_id: i.instance_id().unwrap_or_default().to_string(),
        state,
        state_reason: i.state_reason().and_then(|r| r.code()).map(String::from),
        private_ip: i.private_ip_address().map(String::from),
        launched_at: i.launch_time().and_then(|t| SystemTime::try_from(*t).ok()),
        spot_request_id: i.spot_instance_request_id().map(String::from),
        instance_type: i.instance_type().map(|t| t.as_str().to_string()),
        availability_zone: i.placement().and_then(|p| p.availability_zone()).map(String::from),
        market: Some(match i.instance_lifecycle() {
            Some(InstanceLifecycleType::Spot) => Market::Spot,
            _ => Market::OnDemand,
        }),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect(),
    }
}

impl AwsCloud {
    /// Creates this launch's template (once, however often the launch is retried) and
    /// returns its id.
    async fn template(&self, spec: &LaunchSpec, market: Market, instance_tags: &[Tag]) -> Result<String, CloudFailure> {
        let image = match &spec.image {
            Image::Id(id) => id.clone(),
            // EC2 resolves the parameter at launch.
            Image::SsmParameter(p) => format!("resolve:ssm:{p}"),
        };
        let tagged = |kind: ResourceType| {
            LaunchTemplateTagSpecificationRequest::builder()
                .resource_type(kind)
                .set_tags(Some(instance_tags.to_vec()))
                .build()
        };
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
            .tag_specifications(tagged(ResourceType::Instance))
            .tag_specifications(tagged(ResourceType::Volume))
            // Tagged, so that teardown and the reaper may cancel it (the policy allows
            // cancelling tagged requests only).
            .tag_specifications(tagged(ResourceType::SpotInstancesRequest));
        if let Some(profile) = &spec.instance_profile {
            let p = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
            let p = if profile.starts_with("arn:") { p.arn(profile) } else { p.name(profile) };
            data = data.iam_instance_profile(p.build());
        }
        let name = spec.template_name(market);
        let created = self
            .launch
            .create_launch_template()
            .launch_template_name(&name)
            .client_token(spec.client_token(market))
            .launch_template_data(data.build())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::LaunchTemplate)
                    .set_tags(Some(instance_tags.to_vec()))
                    .build(),
            )
            .send()
            .await;
        match created {
            Ok(t) => Ok(t.launch_template().and_then(|t| t.launch_template_id()).unwrap_or_default().to_string()),
            // A retry of a launch whose first answer was lost: the template is there.
            Err(e) if e.code() == Some(TEMPLATE_EXISTS) => {
                let found = self
                    .ec2
                    .describe_launch_templates()
                    .launch_template_names(&name)
                    .send()
                    .await
                    .map_err(|e| failure(&e, None))?;
                Ok(found.launch_templates().first().and_then(|t| t.launch_template_id()).unwrap_or_default().to_string())
            }
            Err(e) => Err(failure(&e, None)),
        }
    }

    async fn launch_once(&self, spec: &LaunchSpec, market: Market) -> Result<Launched, Vec<CloudFailure>> {
        let instance_tags = ec2_tags(spec);
        let template_id = self.template(spec, market, &instance_tags).await.map_err(|f| vec![f])?;
        let result = self.create_fleet(spec, market, &template_id, &instance_tags).await;
        // A clear refusal launched nothing: the template (it holds the host key) goes now.
        // After a success or an ambiguous answer the caller deletes it once the instance is
        // listed for teardown, or once it has looked for one (`Cloud::delete_templates`).
        if let Err(failures) = &result {
            if !failures.iter().any(|f| f.kind == FailureKind::Ambiguous) {
                let _ = self.ec2.delete_launch_template().launch_template_id(&template_id).send().await;
            }
        }
        result
    }

    async fn create_fleet(
        &self,
        spec: &LaunchSpec,
        market: Market,
        template_id: &str,
        instance_tags: &[Tag],
    ) -> Result<Launched, Vec<CloudFailure>> {
        // With `prioritized`, an instance type's rank in the list is its priority (0 first):
        // the same for every subnet, so capacity still decides between zones.
        let mut ranks: Vec<&str> = Vec::new();
        let overrides: Vec<FleetLaunchTemplateOverridesRequest> = spec
            .pools
            .iter()
            .map(|p| {
                let cap = match (market, spec.max_spot_price_per_vcpu_hour, vcpus(&p.instance_type)) {
                    (Market::Spot, Some(per_vcpu), Some(n)) => Some(format!("{:.5}", per_vcpu * n as f64)),
                    _ => None,
                };
                let rank = match ranks.iter().position(|t| *t == p.instance_type) {
                    Some(r) => r,
                    None => {
                        ranks.push(&p.instance_type);
                        ranks.len() - 1
                    }
                };
                FleetLaunchTemplateOverridesRequest::builder()
                    .instance_type(InstanceType::from(p.instance_type.as_str()))
                    .subnet_id(&p.subnet)
                    .set_max_price(cap)
                    .set_priority(spec.prioritized.then_some(rank as f64))
                    .build()
            })
            .collect();
        let (spot_strategy, on_demand_strategy) = if spec.prioritized {
            (SpotAllocationStrategy::CapacityOptimizedPrioritized, FleetOnDemandAllocationStrategy::Prioritized)
        } else {
            (SpotAllocationStrategy::PriceCapacityOptimized, FleetOnDemandAllocationStrategy::LowestPrice)
        };
        let capacity = match market {
            Market::Spot => DefaultTargetCapacityType::Spot,
            Market::OnDemand => DefaultTargetCapacityType::OnDemand,
        };
        let out = self
            .launch
            .create_fleet()
            .r#type(FleetType::Instant)
            .client_token(spec.client_token(market))
            .target_capacity_specification(
                TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(1)
                    .default_target_capacity_type(capacity)
                    .build(),
            )
            .spot_options(SpotOptionsRequest::builder().allocation_strategy(spot_strategy).build())
            .on_demand_options(OnDemandOptionsRequest::builder().allocation_strategy(on_demand_strategy).build())
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
        // Returned as soon as EC2 names the instance: the caller lists it for teardown
        // before anything else is asked (where it landed comes with the wait for running).
        if let Some(instance) = out.instances().iter().find(|i| !i.instance_ids().is_empty()) {
            let pool = pool_of(instance.launch_template_and_overrides()).unwrap_or_else(|| Pool {
                instance_type: instance.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                subnet: spec.pools.first().map(|p| p.subnet.clone()).unwrap_or_default(),
            });
            let market = match instance.lifecycle() {
                Some(InstanceLifecycle::Spot) => Market::Spot,
                Some(InstanceLifecycle::OnDemand) => Market::OnDemand,
                _ => market,
            };
            return Ok(Launched {
                instance_id: instance.instance_ids()[0].clone(),
                pool,
                market,
                pool_failures: failures,
            });
        }
        Err(if failures.is_empty() {
            vec![CloudFailure::new("UnfulfillableCapacity", "the fleet launched nothing and gave no reason", None)]
        } else {
            failures
        })
    }

    /// Asks EC2 to terminate `ids`. Ids it does not know are asked one at a time, so that
    /// one unknown id does not hide the others; what it accepted is returned.
    async fn ask_terminate(&self, ids: &[String]) -> Result<Vec<String>, CloudFailure> {
        match self.ec2.terminate_instances().set_instance_ids(Some(ids.to_vec())).send().await {
            Ok(_) => return Ok(ids.to_vec()),
            Err(e) if e.code() == Some(NOT_FOUND) => {}
            Err(e) => return Err(failure(&e, None)),
        }
        let mut accepted = Vec::new();
        for id in ids {
            match self.ec2.terminate_instances().instance_ids(id).send().await {
                Ok(_) => accepted.push(id.clone()),
                // Not listed yet (or no more): asked again next round.
                Err(e) if e.code() == Some(NOT_FOUND) => {}
                Err(e) => return Err(failure(&e, None)),
            }
        }
        Ok(accepted)
    }

    async fn terminate_all(&self, ids: &[String]) -> Result<(), CloudFailure> {
        let deadline = tokio::time::Instant::now() + self.verify_timeout;
        let mut delay = VERIFY_POLL.0;
        let mut pending: Vec<String> = ids.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let mut asked: BTreeSet<String> = BTreeSet::new();
        let mut cancelled: BTreeSet<String> = BTreeSet::new();
        while !pending.is_empty() {
            let unasked: Vec<String> = pending.iter().filter(|id| !asked.contains(*id)).cloned().collect();
            if !unasked.is_empty() {
                asked.extend(self.ask_terminate(&unasked).await?);
            }
            let seen = self.describe_all(&pending).await?;
            // Best effort: a request whose instance is gone no longer bills.
            let requests: Vec<String> = seen.iter().filter_map(|o| o.spot_request_id.clone()).filter(|r| !cancelled.contains(r)).collect();
            if !requests.is_empty() {
                let _ = self.cancel_spot_requests(&requests).await;
                cancelled.extend(requests);
            }
            pending.retain(|id| !seen.iter().any(|o| &o.instance_id == id && o.ending()));
            if pending.is_empty() {
                break;
            }
            if tokio::time::Instant::now() + delay > deadline {
                let left: Vec<String> = pending
                    .iter()
                    .map(|id| match seen.iter().find(|o| &o.instance_id == id).map(|o| o.state) {
                        Some(InstanceState::NotFound) | None => format!("{id} (EC2 does not list it)"),
                        Some(state) => format!("{id} ({state:?})"),
                    })
                    .collect();
                return Err(CloudFailure {
                    kind: FailureKind::Other,
                    code: None,
                    message: format!("not seen terminating within {}s: {}", self.verify_timeout.as_secs(), left.join(", ")),
                    pool: None,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(VERIFY_POLL.1);
        }
        Ok(())
    }

    /// One [`Observed`] per id. An id EC2 does not know fails the whole call, so on that
    /// error each id is described alone.
    async fn describe_all(&self, ids: &[String]) -> Result<Vec<Observed>, CloudFailure> {
        let mut seen = match self.ec2.describe_instances().set_instance_ids(Some(ids.to_vec())).send().await {
            Ok(out) => out.reservations().iter().flat_map(|r| r.instances()).map(observed).collect::<Vec<_>>(),
            Err(e) if e.code() == Some(NOT_FOUND) && ids.len() > 1 => {
                let mut seen = Vec::new();
                for id in ids {
                    seen.extend(Box::pin(self.describe_all(std::slice::from_ref(id))).await?);
                }
                seen
            }
            Err(e) if e.code() == Some(NOT_FOUND) => Vec::new(),
            Err(e) => return Err(failure(&e, None)),
        };
        for id in ids {
            if !seen.iter().any(|o| &o.instance_id == id) {
                seen.push(Observed::not_found(id));
            }
        }
        Ok(seen)
    }

    async fn find_tagged(&self, build_ids: &[String]) -> Result<Vec<Observed>, CloudFailure> {
        if build_ids.is_empty() {
            return Ok(Vec::new());
        }
        let filter = Filter::builder().name(format!("tag:{}", tags::BUILD_ID)).set_values(Some(build_ids.to_vec())).build();
        self.instances_where(filter, &["pending", "running", "stopping", "stopped", "shutting-down"]).await
    }

    async fn delete_tagged_templates(&self, build_ids: &[String]) -> Result<Vec<String>, CloudFailure> {
        if build_ids.is_empty() {
            return Ok(Vec::new());
        }
        let filter = Filter::builder().name(format!("tag:{}", tags::BUILD_ID)).set_values(Some(build_ids.to_vec())).build();
        let found = self.templates_where(filter).await?;
        let ids: Vec<String> = found.iter().map(|t| t.id.clone()).collect();
        self.delete_template_ids(&ids).await?;
        Ok(found.into_iter().map(|t| t.name).collect())
    }
}

impl Cloud for AwsCloud {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec, market: Market) -> BoxFuture<'a, Result<Launched, Vec<CloudFailure>>> {
        Box::pin(self.launch_once(spec, market))
    }

    fn describe<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
        Box::pin(self.describe_all(instance_ids))
    }

    fn find<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<Observed>, CloudFailure>> {
        Box::pin(self.find_tagged(build_ids))
    }

    fn terminate<'a>(&'a self, instance_ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudFailure>> {
        Box::pin(self.terminate_all(instance_ids))
    }

    fn delete_templates<'a>(&'a self, build_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, CloudFailure>> {
        Box::pin(self.delete_tagged_templates(build_ids))
    }

    fn spot_price<'a>(&'a self, instance_type: &'a str, zone: &'a str) -> BoxFuture<'a, Result<Option<f64>, CloudFailure>> {
        Box::pin(async move {
            let out = self
                .ec2
                .describe_spot_price_history()
                .instance_types(InstanceType::from(instance_type))
                .availability_zone(zone)
                .product_descriptions("Linux/UNIX")
                .start_time(aws_sdk_ec2::primitives::DateTime::from(SystemTime::now()))
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
                    && tag_types == [ResourceType::Instance, ResourceType::Volume, ResourceType::SpotInstancesRequest]
                    && r.client_token() == Some("b1-a1-spot")
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
                    && r.client_token() == Some("b1-a1-spot")
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
        let delete = mock!(Client::delete_launch_template).then_output(|| DeleteLaunchTemplateOutput::builder().build());
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&template, &fleet, &delete]);
        let cloud = AwsCloud::from_clients(client.clone(), client);

        let launched = cloud.launch(&crate::cloud::test_spec(), Market::Spot).await.unwrap();
        assert_eq!(launched.instance_id, "i-2");
        assert_eq!(launched.pool.instance_type, "c7a.16xlarge");
        assert_eq!(launched.market, Market::Spot);
        assert_eq!(launched.pool_failures.len(), 1);
        assert_eq!(launched.pool_failures[0].kind, FailureKind::Capacity);
        assert_eq!(launched.pool_failures[0].pool.as_ref().unwrap().instance_type, "m7a.16xlarge");
        // Nothing is asked between the fleet's answer and the caller listing the instance
        // for teardown; the caller deletes the template after that.
        assert_eq!((template.num_calls(), fleet.num_calls(), delete.num_calls()), (1, 1, 0));
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

    fn template_ok() -> aws_smithy_mocks::Rule {
        mock!(Client::create_launch_template).then_output(|| {
            CreateLaunchTemplateOutput::builder()
                .launch_template(LaunchTemplate::builder().launch_template_id("lt-1").build())
                .build()
        })
    }

    /// A 5xx from CreateFleet may hide a launch that happened: it is ambiguous, and the
    /// template stays until the caller has looked for the instance by its tags.
    #[tokio::test]
    async fn a_fleet_answer_that_is_a_5xx_is_ambiguous_and_keeps_the_template() {
        let template = template_ok();
        let body = "<Response><Errors><Error><Code>Unavailable</Code><Message>try later</Message></Error></Errors></Response>";
        let fleet = mock!(Client::create_fleet).sequence().http_status(503, Some(body.to_string())).repeatedly().build();
        let delete = mock!(Client::delete_launch_template).then_output(|| DeleteLaunchTemplateOutput::builder().build());
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&template, &fleet, &delete]);
        let cloud = AwsCloud::from_clients(client.clone(), client);
        let failures = cloud.launch(&crate::cloud::test_spec(), Market::Spot).await.unwrap_err();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].kind, FailureKind::Ambiguous, "{failures:?}");
        assert_eq!(delete.num_calls(), 0);
    }

    fn not_found_error() -> aws_sdk_ec2::error::ErrorMetadata {
        aws_sdk_ec2::error::ErrorMetadata::builder().code(NOT_FOUND).message("The instance ID 'i-1' does not exist").build()
    }

    fn described(state: InstanceStateName) -> DescribeInstancesOutput {
        DescribeInstancesOutput::builder()
            .reservations(
                Reservation::builder()
                    .instances(
                        Instance::builder()
                            .instance_id("i-1")
                            .state(aws_sdk_ec2::types::InstanceState::builder().name(state).build())
                            .placement(Placement::builder().availability_zone("us-east-1b").build())
                            .build(),
                    )
                    .build(),
            )
            .build()
    }

    /// Right after a launch EC2 may not list the instance yet: NotFound on terminate and on
    /// describe is waited out, and the instance is terminated once EC2 knows it.
    #[tokio::test(start_paused = true)]
    async fn not_found_right_after_a_launch_is_waited_out_not_taken_as_terminated() {
        use aws_sdk_ec2::operation::terminate_instances::{TerminateInstancesError, TerminateInstancesOutput};
        use aws_sdk_ec2::operation::describe_instances::DescribeInstancesError;
        let terminate = mock!(Client::terminate_instances)
            .sequence()
            .error(|| TerminateInstancesError::generic(not_found_error()))
            .times(2)
            .output(|| TerminateInstancesOutput::builder().build())
            .repeatedly()
            .build();
        let describe = mock!(Client::describe_instances)
            .sequence()
            .error(|| DescribeInstancesError::generic(not_found_error()))
            .times(2)
            .output(|| described(InstanceStateName::ShuttingDown))
            .repeatedly()
            .build();
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&terminate, &describe]);
        let cloud = AwsCloud::from_clients(client.clone(), client);
        cloud.terminate(&["i-1".to_string()]).await.unwrap();
        assert_eq!(terminate.num_calls(), 3, "asked again until EC2 knew it");
        assert!(describe.num_calls() >= 3);
    }

    /// An id EC2 never lists is reported as not terminated, never as done.
    #[tokio::test(start_paused = true)]
    async fn an_instance_never_listed_is_not_confirmed_terminated() {
        use aws_sdk_ec2::operation::terminate_instances::TerminateInstancesError;
        use aws_sdk_ec2::operation::describe_instances::DescribeInstancesError;
        let terminate = mock!(Client::terminate_instances).then_error(|| TerminateInstancesError::generic(not_found_error()));
        let describe = mock!(Client::describe_instances).then_error(|| DescribeInstancesError::generic(not_found_error()));
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&terminate, &describe]);
        let cloud = AwsCloud::from_clients(client.clone(), client);
        let err = cloud.terminate(&["i-1".to_string()]).await.unwrap_err();
        assert!(err.message.contains("i-1 (EC2 does not list it)"), "{err}");
    }

    /// One unknown id in a batch does not hide the others: they are terminated one by one.
    #[tokio::test(start_paused = true)]
    async fn a_batch_with_an_unknown_id_is_terminated_one_by_one() {
        use aws_sdk_ec2::operation::terminate_instances::{TerminateInstancesError, TerminateInstancesOutput};
        let terminate = mock!(Client::terminate_instances)
            .match_requests(|r| r.instance_ids().len() == 2)
            .then_error(|| TerminateInstancesError::generic(not_found_error()));
        let terminate_one = mock!(Client::terminate_instances)
            .match_requests(|r| r.instance_ids() == ["i-1"])
            .then_output(|| TerminateInstancesOutput::builder().build());
        let describe = mock!(Client::describe_instances)
            .match_requests(|r| r.instance_ids() == ["i-1"])
            .then_output(|| described(InstanceStateName::ShuttingDown));
        let unknown = mock!(Client::terminate_instances)
            .match_requests(|r| r.instance_ids() == ["i-unknown"])
            .then_error(|| TerminateInstancesError::generic(not_found_error()));
        let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&terminate, &terminate_one, &describe, &unknown]);
        let cloud = AwsCloud::from_clients(client.clone(), client);
        let ids = ["i-1".to_string(), "i-unknown".to_string()];
        let accepted = cloud.ask_terminate(&ids).await.unwrap();
        assert_eq!(accepted, ["i-1"]);
    }
}
