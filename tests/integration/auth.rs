//! Registry authentication and resilience, against scripted registries and the AWS
//! emulator's ECR: basic, bearer challenges, ECR tokens, throttling and server errors.

use serde_json::Value;

use crate::support::fake_registry::{Auth, FakeRegistry};
use crate::support::repo::{standard, TestRepo};
use crate::support::services::Moto;
use crate::support::{spotbuild, Run};

/// `plan --json` of the standard repo's `base` project against `host`, with extra env.
fn plan_base(repo: &TestRepo, host: &str, args: &[&str], env: &[(&str, String)]) -> Run {
    let mut cmd = spotbuild(repo.path());
    cmd.args(["plan", "base", "--json", "--registry", host]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::of(&mut cmd)
}

fn base_tag(repo: &TestRepo) -> String {
    let plan = repo.plan(&["--offline", "--json", "base"]).json();
    plan["projects"][0]["tag"].as_str().unwrap().to_string()
}

fn needs_build(run: &Run) -> Value {
    run.json()["projects"][0]["needs_build"].clone()
}

#[test]
fn basic_auth_is_sent_when_challenged() {
    let repo = standard();
    let tag = base_tag(&repo);
    let registry = FakeRegistry::start(
        Auth::Basic { user: "ci".into(), password: "s3cret".into() },
        &[&format!("base:{tag}")],
    );
    let creds = [
        ("SPOTBUILD_REGISTRY_USERNAME", "ci".to_string()),
        ("SPOTBUILD_REGISTRY_PASSWORD", "s3cret".to_string()),
    ];
    let run = plan_base(&repo, &registry.host(), &[], &creds);
    assert_eq!(needs_build(&run), false, "{run:?}");
    // First try anonymous, then answer the challenge.
    let log = registry.log();
    assert_eq!(log.requests[0].split(' ').next_back(), Some(""), "{:?}", log.requests);
    assert!(log.requests[1].ends_with("Basic"), "{:?}", log.requests);
    assert!(!run.stdout.contains("s3cret") && !run.stderr.contains("s3cret"));
}

#[test]
fn missing_credentials_fail_safe_with_a_reason() {
    let repo = standard();
    let registry = FakeRegistry::start(Auth::Basic { user: "ci".into(), password: "x".into() }, &[]);
    let run = plan_base(&repo, &registry.host(), &[], &[]);
    assert_eq!(needs_build(&run), true);
    let reason = run.json()["projects"][0]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("requires credentials"), "{reason}");
}

#[test]
fn bearer_challenges_fetch_and_reuse_a_token() {
    let repo = standard();
    let tag = base_tag(&repo);
    let registry = FakeRegistry::start(
        Auth::Bearer { login: Some(("robot".into(), "pw".into())) },
        &[&format!("team/base:{tag}")],
    );
    let creds = [
        ("SPOTBUILD_REGISTRY_USERNAME", "robot".to_string()),
        ("SPOTBUILD_REGISTRY_PASSWORD", "pw".to_string()),
    ];
    let host = format!("{}/team", registry.host());
    let mut cmd = spotbuild(repo.path());
    cmd.args(["plan", "--json", "--registry", &host]);
    for (k, v) in &creds {
        cmd.env(k, v);
    }
    let plan = Run::of(&mut cmd).json();
    let base = plan["projects"].as_array().unwrap().iter().find(|p| p["name"] == "base").unwrap();
    assert_eq!(base["needs_build"], false, "{base}");
    // One token per repository scope (4 repositories), reused for later requests; app's two
    // concurrent lookups may both fetch one.
    let log = registry.log();
    assert!((4..=5).contains(&log.token_requests), "{:?}", log.requests);
}

#[test]
fn anonymous_bearer_tokens_work_without_credentials() {
    let repo = standard();
    let tag = base_tag(&repo);
    let registry = FakeRegistry::start(Auth::Bearer { login: None }, &[&format!("base:{tag}")]);
    let run = plan_base(&repo, &registry.host(), &[], &[]);
    assert_eq!(needs_build(&run), false, "{run:?}");
}

#[test]
fn ecr_tokens_come_from_get_authorization_token() {
    let moto = Moto::start();
    let repo = standard();
    let tag = base_tag(&repo);
    // moto's token for the default account decodes to AWS:123456789012-auth-token.
    let registry = FakeRegistry::start(
        Auth::Basic { user: "AWS".into(), password: "123456789012-auth-token".into() },
        &[&format!("base:{tag}")],
    );
    let env = [
        ("AWS_ENDPOINT_URL", moto.endpoint()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ];
    let run = plan_base(&repo, &registry.host(), &["--registry-auth", "ecr"], &env);
    assert_eq!(needs_build(&run), false, "{run:?}");
    // ECR gets credentials on the first request: no anonymous round trip.
    let log = registry.log();
    assert!(log.requests.iter().all(|r| r.ends_with("Basic")), "{:?}", log.requests);
}

#[test]
fn ecr_without_aws_credentials_fails_safe_with_the_cause() {
    let repo = standard();
    let registry = FakeRegistry::start(Auth::None, &[]);
    let port = crate::support::services::free_port();
    let env = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_MAX_ATTEMPTS", "1".to_string()),
    ];
    let run = plan_base(&repo, &registry.host(), &["--registry-auth", "ecr"], &env);
    let plan = run.json();
    assert_eq!(plan["projects"][0]["needs_build"], true);
    assert!(
        plan["projects"][0]["reason"].as_str().unwrap().contains("ECR authorization token"),
        "{plan}"
    );
}

#[test]
fn throttling_and_server_errors_are_retried() {
    let repo = standard();
    let tag = base_tag(&repo);
    let registry = FakeRegistry::start(Auth::None, &[&format!("base:{tag}")]);
    registry.fail_next(2, 429);
    let run = plan_base(&repo, &registry.host(), &[], &[]);
    assert_eq!(needs_build(&run), false, "{run:?}");
    assert_eq!(registry.log().requests.len(), 3);
}

#[test]
fn persistent_server_errors_give_up_and_fail_safe() {
    let repo = standard();
    let tag = base_tag(&repo);
    let registry = FakeRegistry::start(Auth::None, &[&format!("base:{tag}")]);
    registry.fail_next(100, 503);
    let run = plan_base(&repo, &registry.host(), &[], &[]);
    let plan = run.json();
    assert_eq!(plan["projects"][0]["needs_build"], true);
    assert!(plan["projects"][0]["reason"].as_str().unwrap().contains("HTTP 503"), "{plan}");
    // The default is 3 retries: 4 requests in all, never unbounded.
    assert_eq!(registry.log().requests.len(), 4);
}
