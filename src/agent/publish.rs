//! Getting builds into the registry: docker's credentials (this binary is its credential
//! helper, so no password is written to disk), the push of `cache-<hash>` and the stage
//! images, and the branch tags that move to them by manifest copy.

use std::path::Path;

use super::build::Image;
use super::docker::Docker;
use super::events::Events;
use super::job::CheckedJob;
use super::step::{Step, StepStatus};
use crate::errors::error_chain;
use crate::registry::auth::{Authenticator, Basic};
use crate::registry::Client;
use crate::settings::RegistryConfig;

/// Name under which docker finds this binary as its credential helper.
pub const CREDENTIAL_HELPER: &str = "docker-credential-spotbuild";
pub const CREDENTIAL_USERNAME_ENV: &str = "SPOTBUILD_CREDENTIAL_USERNAME";
pub const CREDENTIAL_SECRET_ENV: &str = "SPOTBUILD_CREDENTIAL_SECRET";

/// What the project steps work with: the detected docker client, set up with the job's
/// registry credentials, and a registry client for moving tags, when one could be made.
pub struct Tools {
    pub docker: Docker,
    pub client: Option<Client>,
}

/// Makes the registry client and gives `docker` the job's credentials. Docker gets them from
/// this binary acting as its credential helper, which reads them from the environment:
/// nothing is written to disk. Trouble with credentials is a warning: a registry may not
/// need them.
pub async fn prepare(mut docker: Docker, cx: &CheckedJob, events: &Events) -> Tools {
    let reg = &cx.job.registry;
    let basic = match (&reg.username, &reg.password) {
        (Some(u), Some(p)) => Some(Basic {
            username: u.clone(),
            password: p.clone(),
        }),
        _ => {
            let region = cx.registry.ecr_region().or_else(|| reg.region.clone());
            match Authenticator::new(reg.auth, region) {
                Ok(a) => match a.basic().await {
                    Ok(b) => b,
                    Err(e) => {
                        events.say("agent", format!("warning: no registry credentials: {}", error_chain(&e))).await;
                        None
                    }
                },
                Err(_) => None,
            }
        }
    };
    // A token fetched here (ECR's) is as secret as a password given in the job.
    if let Some(b) = &basic {
        events.add_secrets(&[b.password.clone(), b.header().trim_start_matches("Basic ").to_string()]);
    }
    let auth = Authenticator::with_basic(basic.clone());
    let client = Client::new(cx.registry.clone(), &RegistryConfig::default(), auth).ok();
    let Some(basic) = basic else {
        return Tools { docker, client };
    };
    let dir = cx.job.workdir.join("docker-config");
    let bin = dir.join("bin");
    if let Err(e) = write_docker_config(&dir, &bin, &cx.registry.host).await {
        events.say("agent", format!("warning: failed to set up docker credentials: {e}")).await;
        return Tools { docker, client };
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    docker.env = vec![
        ("DOCKER_CONFIG".into(), dir.display().to_string()),
        ("PATH".into(), path),
        (CREDENTIAL_USERNAME_ENV.into(), basic.username),
        (CREDENTIAL_SECRET_ENV.into(), basic.password),
    ];
    Tools { docker, client }
}

/// A docker config in `dir` that sends `host`'s credentials to the helper, and the helper
/// (a link to this binary) in `bin`.
async fn write_docker_config(dir: &Path, bin: &Path, host: &str) -> std::io::Result<()> {
    tokio::fs::create_dir_all(bin).await?;
    let helper = bin.join(CREDENTIAL_HELPER);
    let _ = tokio::fs::remove_file(&helper).await;
    tokio::fs::symlink(std::env::current_exe()?, &helper).await?;
    let config = serde_json::json!({ "credHelpers": { host: "spotbuild" } });
    tokio::fs::write(dir.join("config.json"), config.to_string()).await
}

/// Pushes `image` (`cache-<hash>`) and its `stages`, then points the branch's tags at them by
/// manifest copy within `repository`.
///
/// `cache-<hash>` is immutable where the registry enforces it (the Terraform module's
/// repositories): when another job has pushed it already (same inputs), that image stands
/// and this one is not pushed; a push refused because it appeared meanwhile counts as done.
///
/// `pushed`: the build pushed the image itself (a buildx build of several platforms); only
/// its stages and branch tags are left.
pub async fn push(step: &Step, tools: &Tools, repository: &str, image: &Image, stages: &[Image], pushed: bool) -> StepStatus {
    let there = pushed || exists(tools, repository, &image.tag).await;
    if pushed {
        step.say(format!("{} was pushed by the build (every platform, as one index)", image.tag)).await;
    } else if there {
        step.say(format!("{} is already in the registry (another job built the same inputs): kept", image.tag)).await;
    }
    let to_push: Vec<&Image> = std::iter::once(image).filter(|_| !there).chain(stages).collect();
    let pushed = push_images(step, &tools.docker, to_push.iter().map(|i| i.reference.as_str())).await;
    if !pushed.passed() {
        let raced = !there && exists(tools, repository, &image.tag).await;
        if !raced {
            return pushed;
        }
        step.say(format!("{} appeared while this job pushed it: the registry's copy stands", image.tag)).await;
    }
    let all: Vec<&Image> = std::iter::once(image).chain(stages).collect();
    let Some(client) = &tools.client else {
        step.say(format!("warning: no registry client; {} not moved", image.branch_tag)).await;
        return StepStatus::Passed;
    };
    for i in all {
        match client.copy_tag(repository, &i.tag, &i.branch_tag).await {
            Ok(()) => step.say(format!("{} now points at {}", i.branch_tag, i.tag)).await,
            // The build itself is safely stored; a stale branch tag only costs cache hits.
            Err(e) => step.say(format!("warning: failed to move {}: {}", i.branch_tag, error_chain(&e))).await,
        }
    }
    StepStatus::Passed
}

/// Whether `repository` has `tag` (not known: no).
async fn exists(tools: &Tools, repository: &str, tag: &str) -> bool {
    match &tools.client {
        Some(c) => c.has_tag(repository, tag).await.unwrap_or(false),
        None => false,
    }
}

/// Pushes `images` in order, stopping at the first that fails.
pub async fn push_images<'a>(step: &Step, docker: &Docker, images: impl IntoIterator<Item = &'a str>) -> StepStatus {
    for image in images {
        let pushed = step.run(docker.push(image)).await;
        if !pushed.passed() {
            return pushed;
        }
    }
    StepStatus::Passed
}

/// `docker-credential-spotbuild get`: answers docker with the credentials the agent put in
/// the environment. `store`, `erase` and `list` do nothing: nothing is ever kept.
pub fn credential_helper(action: Option<&str>) -> i32 {
    use std::io::Read;
    let mut server = String::new();
    let _ = std::io::stdin().read_to_string(&mut server);
    match action {
        Some("get") => {
            let (Ok(user), Ok(secret)) = (std::env::var(CREDENTIAL_USERNAME_ENV), std::env::var(CREDENTIAL_SECRET_ENV)) else {
                println!("credentials not found in native keychain");
                return 1;
            };
            let answer = serde_json::json!({ "ServerURL": server.trim(), "Username": user, "Secret": secret });
            println!("{answer}");
            0
        }
        Some("list") => {
            println!("{{}}");
            0
        }
        Some("store") | Some("erase") => 0,
        _ => {
            eprintln!("usage: {CREDENTIAL_HELPER} get|store|erase|list");
            2
        }
    }
}
