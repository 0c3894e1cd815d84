//! The local farm runs as root and gives no one root: its emulator and control API answer
//! only the farm's key and token, hosts log in and run commands only as the non-root build
//! user whatever the user data says, and builds run over SSM as well as SSH.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::farm::{events, farm_repo, record, PASSING_TEST};
use crate::support::docker::docker_required;
use crate::support::farm::LocalFarm;
use crate::support::services::runtime;
use crate::support::Run;

/// An SSM client signing with `key` at the farm's door.
async fn ssm(farm: &LocalFarm, key: (&str, &str)) -> aws_sdk_ssm::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(farm.ec2_endpoint())
        .region(aws_sdk_ssm::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(key.0, key.1, None, None, "test"))
        .load()
        .await;
    aws_sdk_ssm::Client::new(&config)
}

/// Runs `script` on `instance` through the farm's SSM endpoint; (status, stdout).
async fn run_command(client: &aws_sdk_ssm::Client, instance: &str, script: &str) -> (String, String) {
    let sent = client
        .send_command()
        .instance_ids(instance)
        .document_name("AWS-RunShellScript")
        .parameters("commands", vec![script.to_string()])
        .send()
        .await
        .unwrap();
    let id = sent.command().unwrap().command_id().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inv = client.get_command_invocation().command_id(&id).instance_id(instance).send().await.unwrap();
        let status = inv.status().unwrap().as_str().to_string();
        if status != "InProgress" && status != "Pending" {
            return (status, inv.standard_output_content().unwrap_or_default().to_string());
        }
        assert!(Instant::now() < deadline, "the command did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Launches an instance in the farm straight through its EC2 API, with `user_data`.
fn launch(farm: &LocalFarm, user_data: &str) -> String {
    runtime().block_on(async {
        let ec2 = farm.ec2().await;
        let out = ec2
            .run_instances()
            .image_id(farm.state["ami"].as_str().unwrap())
            .subnet_id(farm.state["subnet_id"].as_str().unwrap())
            .instance_type(aws_sdk_ec2::types::InstanceType::M7a16xlarge)
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .send()
            .await
            .unwrap();
        out.instances()[0].instance_id().unwrap().to_string()
    })
}

fn host(farm: &LocalFarm, instance: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(h) = farm.hosts().into_iter().find(|h| h["instance_id"] == instance) {
            return h;
        }
        assert!(Instant::now() < deadline, "no host for {instance}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_farm_answers_only_its_owner_and_hosts_never_run_as_root() {
    let farm = LocalFarm::start();

    // The state file holds the key and the token: the owner's alone.
    let state = farm.dir.path().join("farm.json");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);

    // Without the key, the emulator is out of reach: unsigned, signed with another key, or
    // with the farm's key id (it travels in presigned URLs) but not its secret.
    let (key_id, secret) = farm.key();
    let (status, denied) = runtime().block_on(async {
        let unsigned = reqwest::Client::new().post(farm.ec2_endpoint()).body("Action=DescribeInstances&Version=2016-11-15").send().await.unwrap().status();
        let mut denied = Vec::new();
        for (id, secret) in [("AKIAANYONE", "anything"), (key_id.as_str(), "not the secret")] {
            let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .endpoint_url(farm.ec2_endpoint())
                .region(aws_sdk_ec2::config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_ec2::config::Credentials::new(id, secret, None, None, "test"))
                .load()
                .await;
            denied.push(aws_sdk_ec2::Client::new(&config).describe_instances().send().await.is_err());
        }
        (unsigned, denied)
    });
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN);
    assert_eq!(denied, [true, true], "another key, or the key id without its secret, is refused");
    // No service log is readable by anyone but the farm's owner.
    for log in ["moto.log", "registry.log"] {
        let mode = std::fs::metadata(farm.dir.path().join(log)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{log}");
    }
    // Without the token, the control API is out of reach.
    let control = runtime().block_on(async { reqwest::get(format!("{}/hosts", farm.state["control"].as_str().unwrap())).await.unwrap().status() });
    assert_eq!(control, reqwest::StatusCode::UNAUTHORIZED);
    // `farm status --json` does not print the secrets.
    let status = Run::of(Command::new(env!("CARGO_BIN_EXE_spotbuild")).args(["farm", "--dir"]).arg(farm.dir.path()).args(["status", "--json"]));
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(!status.stdout.contains(farm.state["token"].as_str().unwrap()) && !status.stdout.contains(&farm.key().1), "{}", status.stdout);

    // User data asking for root, or for a login other than the build user, boots a host
    // without sshd: the key in it logs in nowhere.
    let host_key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----\n";
    let rendered = spotbuild::cloud::userdata::UserData {
        ttl: Duration::from_secs(600),
        user: "spotbuild",
        authorized_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 attacker",
        host_private_key: host_key,
    }
    .render()
    .unwrap();
    let as_root = launch(&farm, &rendered.replace("spotbuild", "root"));
    let as_other = launch(&farm, &rendered.replace("spotbuild", "nobody"));
    for id in [&as_root, &as_other] {
        assert!(host(&farm, id)["sshd_pid"].is_null(), "{id} runs sshd: {:?}", farm.hosts());
    }

    // Commands (SSM's) run as the build user, with the Docker socket's group, never root.
    let (status, out) = runtime().block_on(async {
        let client = ssm(&farm, (&key_id, &secret)).await;
        run_command(&client, &as_root, "id -un; id -u; id -G").await
    });
    assert_eq!(status, "Success", "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], farm.state["user"].as_str().unwrap());
    assert_ne!(lines[1], "0");
    let docker_gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata("/var/run/docker.sock").unwrap());
    assert!(lines[2].split_whitespace().any(|g| g == docker_gid.to_string()), "{out}");
    // A host reaches S3 only for the transport bucket, through its own door.
    let (status, out) = runtime().block_on(async {
        let client = ssm(&farm, (&key_id, &secret)).await;
        let port = farm.ec2_endpoint().rsplit(':').next().unwrap().to_string();
        run_command(&client, &as_root, &format!("busybox wget -q -O- 'http://127.0.0.1:{port}/?Action=DescribeInstances' 2>&1 || true")).await
    });
    assert_eq!(status, "Success");
    assert!(out.contains("403") && !out.contains("reservationSet"), "a host reached EC2: {out}");

    runtime().block_on(async {
        let ec2 = farm.ec2().await;
        ec2.terminate_instances().instance_ids(&as_root).instance_ids(&as_other).send().await.unwrap();
    });
    farm.assert_nothing_left();
}

#[test]
fn over_ssm_a_build_runs_end_to_end_through_the_controller() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = farm_repo(None, PASSING_TEST);
    let run = Run::of(farm.spotbuild(repo.path()).arg("--config").arg(farm.config_ssm()).args(["build", "--all", "--json"]));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("ssm i-"), "the SSM transport connected: {}", run.stdout);
    assert!(!run.stdout.contains("ssh spotbuild@"), "{}", run.stdout);
    let ev = events(&run.stdout);
    assert_eq!(record(&ev)["result"], "success");
    // The test job's log came back through the bucket.
    assert!(run.stdout.contains("api unit tests: 3 passed"), "{}", run.stdout);
    farm.assert_nothing_left();
    // Nothing of the build is left in the transport bucket.
    let left = runtime().block_on(async {
        let (key_id, secret) = farm.key();
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(farm.ec2_endpoint())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(key_id, secret, None, None, "test"))
            .load()
            .await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build());
        s3.list_objects_v2().bucket(farm.state["transport_bucket"].as_str().unwrap()).send().await.unwrap().key_count().unwrap_or(0)
    });
    assert_eq!(left, 0, "transport objects left behind");
}
