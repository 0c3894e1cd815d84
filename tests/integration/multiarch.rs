//! Per-architecture images joined in one index (`spotbuild manifest create`), against a
//! real registry on loopback.

use serde_json::{json, Value};

use crate::support::registry_proxy::{random_layer, Pusher};
use crate::support::repo::TestRepo;
use crate::support::services::Registry;
use crate::support::{spotbuild, Run};

#[test]
fn manifest_create_joins_every_arch_and_names_a_missing_one() {
    let repo = TestRepo::new();
    repo.manifest(json!({"app": {"buildDir": "app", "multiarch": "host"}}));
    repo.write("app/Dockerfile", "FROM scratch\n");
    repo.commit("app");
    let hash = repo.hashes()["app"].clone();
    let registry = Registry::start();
    let push = Pusher::new(&registry.host(), None);
    let create = |extra: &[&str]| Run::of(spotbuild(repo.path()).args(["manifest", "create", "app", "--registry", &registry.host()]).args(extra));

    let (amd64, _) = push.image("app", &format!("cache-{hash}-x86_64"), &[&random_layer(1000)], "amd64");
    let missing = create(&[]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("no arm64 image") && missing.stderr.contains(&format!("cache-{hash}-arm64")), "{}", missing.stderr);
    assert_eq!(push.digest("app", &format!("cache-{hash}")), None, "nothing was written");

    let (arm64, _) = push.image("app", &format!("cache-{hash}-arm64"), &[&random_layer(1000)], "arm64");
    let made = create(&["--json"]).json();
    assert_eq!(made["unchanged"], false);
    let (media_type, body) = push.manifest("app", &format!("cache-{hash}")).unwrap();
    assert_eq!(media_type, "application/vnd.oci.image.index.v1+json");
    let index: Value = serde_json::from_slice(&body).unwrap();
    let platforms: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["platform"]["architecture"].as_str().unwrap().to_string(), m["digest"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(platforms, [("amd64".to_string(), amd64), ("arm64".to_string(), arm64)]);
    assert_eq!(made["digest"].as_str(), push.digest("app", &format!("cache-{hash}")).as_deref());

    // Again: the same index, nothing written.
    let again = create(&["--json"]).json();
    assert_eq!(again["unchanged"], true);
    assert_eq!(again["digest"], made["digest"]);

    // The Aztec-shaped script says the same.
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-system/scripts");
    let mut script = std::process::Command::new(scripts.join("create_ecr_manifest"));
    crate::support::outside_ci(&mut script);
    script
        .arg("app")
        .current_dir(repo.path())
        .env("SPOTBUILD", env!("CARGO_BIN_EXE_spotbuild"))
        .env("SPOTBUILD_REGISTRY", registry.host())
        .env_remove("COMMIT_HASH")
        .env_remove("SPOTBUILD_CONFIG");
    let run = Run::of(&mut script);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("already is"), "{}", run.stdout);
}
