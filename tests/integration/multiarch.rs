//! Per-architecture images joined in one index (`spotbuild manifest create`), against a
//! real registry on loopback.

use serde_json::{json, Value};

use crate::support::docker::{arm64_busybox, docker_required, unique, Images, BUSYBOX};
use crate::support::registry_proxy::{random_layer, Pusher};
use crate::support::repo::TestRepo;
use crate::support::services::Registry;
use crate::support::{spotbuild, Run};

/// (architecture, digest) of each image an index names.
fn platforms_of(index: &[u8]) -> Vec<(String, String)> {
    let index: Value = serde_json::from_slice(index).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["platform"]["architecture"].as_str().unwrap().to_string(), m["digest"].as_str().unwrap().to_string()))
        .collect()
}

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
    let platforms = platforms_of(&body);
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

/// A project with `multiarch: host` whose image copies the busybox of its architecture
/// (the classic builder gets TARGETARCH from spotbuild), and one without.
fn two_arch_repo() -> TestRepo {
    let repo = TestRepo::new();
    repo.manifest(json!({
        "base": {"buildDir": "base", "multiarch": "host"},
        "app": {"buildDir": "app", "multiarch": "host", "dependencies": ["base", "tool"]},
        "tool": {"buildDir": "tool"},
        "lone": {"buildDir": "lone"}
    }));
    repo.write("base/Dockerfile", "FROM scratch\nCOPY base.txt /base.txt\n");
    repo.write("base/base.txt", &format!("base {}\n", unique()));
    repo.write("app/Dockerfile", "FROM base\nARG TARGETARCH\nCOPY busybox-${TARGETARCH} /bin/busybox\nCOPY stamp /stamp\n");
    std::fs::copy(arm64_busybox(), repo.path().join("app/busybox-arm64")).unwrap();
    std::fs::copy(BUSYBOX, repo.path().join("app/busybox-amd64")).unwrap();
    repo.write("app/stamp", &format!("{}\n", unique()));
    repo.write("tool/Dockerfile", "FROM scratch\nCOPY tool.txt /tool.txt\n");
    repo.write("tool/tool.txt", &format!("tool {}\n", unique()));
    repo.write("lone/Dockerfile", "FROM scratch\nCOPY lone.txt /lone.txt\n");
    repo.write("lone/lone.txt", "lone\n");
    repo.commit("two arches");
    repo
}

#[test]
fn an_arm64_image_builds_here_and_the_per_arch_images_join_in_one_index() {
    docker_required();
    let repo = two_arch_repo();
    let hashes = repo.hashes();
    let (app, tool, base) = (hashes["app"].clone(), hashes["tool"].clone(), hashes["base"].clone());
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let url = format!("{}/t", registry.host());
    let push = Pusher::new(&registry.host(), None);
    let run = |args: &[&str]| Run::of(spotbuild(repo.path()).args(args).args(["--registry", &url]));

    // The arm64 plan: app under its arm64 tag, tool (x86_64 only) as what app is built
    // from; lone is not an arm64 build's business.
    let plan = run(&["plan", "--arch", "arm64", "--json"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan = plan.json();
    let projects: Vec<(&str, &str, &str)> = plan["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["tag"].as_str().unwrap(), p["arch"].as_str().unwrap_or("-")))
        .collect();
    let (app_arm, app_x86) = (format!("cache-{app}-arm64"), format!("cache-{app}-x86_64"));
    assert_eq!(
        projects,
        [("base", &*format!("cache-{base}-arm64"), "arm64"), ("tool", &*format!("cache-{tool}"), "x86_64"), ("app", app_arm.as_str(), "arm64")],
        "dependency order"
    );
    let table = run(&["plan", "--arch", "arm64"]);
    assert!(table.stdout.contains("app (arm64)") && table.stderr.contains("builds only for x86_64: its x86_64 image is used"), "{table:?}");
    let refused = run(&["plan", "--arch", "arm64", "lone"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("`lone` builds only for x86_64") && refused.stderr.contains("hint:"), "{}", refused.stderr);

    // Built here, on x86_64, for arm64 (`--platform linux/arm64`: the image only copies).
    let arm = run(&["build", "--local", "--arch", "arm64", "app", "--json"]);
    assert_eq!(arm.code, 0, "{}\n{}", arm.stdout, arm.stderr);
    assert!(arm.stdout.contains("building for linux/arm64"), "{}", arm.stdout);
    // `FROM base` is pinned to base's arm64 image.
    assert!(arm.stdout.contains(&format!("FROM base pinned to {url}/base:cache-{base}-arm64")), "{}", arm.stdout);
    let config_of = |tag: &str| -> Value {
        let (_, body) = push.manifest("t/app", tag).unwrap_or_else(|| panic!("no {tag}"));
        let m: Value = serde_json::from_slice(&body).unwrap();
        serde_json::from_slice(&push.blob_bytes("t/app", m["config"]["digest"].as_str().unwrap())).unwrap()
    };
    assert_eq!(config_of(&app_arm)["architecture"], "arm64");
    assert_eq!(push.digest("t/app", &format!("cache-{app}")), None, "no single-image tag for a per-arch project");

    // One arch is not enough for the index.
    let missing = Run::of(spotbuild(repo.path()).args(["manifest", "create", "app", "--registry", &url]));
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("no x86_64 image") && missing.stderr.contains(&app_x86), "{}", missing.stderr);

    // The x86_64 build: app under its x86_64 tag (tool is there already).
    let x86 = run(&["build", "--local", "app", "--json"]);
    assert_eq!(x86.code, 0, "{}\n{}", x86.stdout, x86.stderr);
    assert_eq!(config_of(&app_x86)["architecture"], "amd64");
    let built: Vec<&str> = x86.stdout.lines().filter(|l| l.contains("\"step_start\"") && l.contains(":build\"")).collect();
    assert_eq!(built.len(), 2, "base and app for x86_64, tool is there already: {built:?}");
    assert!(x86.stdout.contains(&format!("FROM base pinned to {url}/base:cache-{base}-x86_64")), "{}", x86.stdout);

    // Deploy wants the index, not one arch's image.
    let deploy = |extra: &[&str]| Run::of(spotbuild(repo.path()).args(["deploy", "app", "--closure-only", "--env", "staging", "--registry", &url]).args(extra));
    let refused = deploy(&["--dry-run"]);
    assert_eq!(refused.code, 8, "{refused:?}");
    assert!(refused.stderr.contains("spotbuild manifest create app"), "{}", refused.stderr);

    let made = Run::of(spotbuild(repo.path()).args(["manifest", "create", "app", "--json", "--registry", &url]));
    assert_eq!(made.code, 0, "{made:?}");
    let index_tag = format!("cache-{app}");
    let (status, media_type) = push.head_index("t/app", &index_tag);
    assert_eq!(status, 200);
    assert!(
        ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"].contains(&media_type.as_str()),
        "{media_type}"
    );
    let (_, body) = push.manifest("t/app", &index_tag).unwrap();
    let platforms = platforms_of(&body);
    assert_eq!(
        platforms,
        [
            ("amd64".to_string(), push.digest("t/app", &app_x86).unwrap()),
            ("arm64".to_string(), push.digest("t/app", &app_arm).unwrap())
        ]
    );
    // Deploy promotes the index with its children, once base has its index too.
    let base_index = Run::of(spotbuild(repo.path()).args(["manifest", "create", "base", "--registry", &url]));
    assert_eq!(base_index.code, 0, "{base_index:?}");
    let deployed = deploy(&["--json"]);
    assert_eq!(deployed.code, 0, "{deployed:?}");
    assert_eq!(push.digest("t/app", "staging"), push.digest("t/app", &index_tag), "{}", deployed.stdout);

    // Both arches built, so both plans are satisfied.
    for arch in ["x86_64", "arm64"] {
        let p = run(&["plan", "--arch", arch, "app", "--json"]).json();
        assert!(p["projects"].as_array().unwrap().iter().all(|p| p["needs_build"] == false), "{arch}: {p:#}");
    }
}

#[test]
fn multiarch_buildx_without_a_buildx_builder_says_so_and_builds_nothing() {
    docker_required();
    let repo = TestRepo::new();
    repo.manifest(json!({"both": {"buildDir": "both", "multiarch": "buildx"}}));
    repo.write("both/Dockerfile", "FROM scratch\nCOPY f /f\n");
    repo.write("both/f", &format!("{}\n", unique()));
    repo.commit("buildx");
    let registry = Registry::start();
    let _images = Images::of(&registry);
    let url = format!("{}/t", registry.host());
    let run = Run::of(spotbuild(repo.path()).args(["build", "--local", "--builder", "classic", "--registry", &url]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("`both` has `multiarch: buildx`") && run.stdout.contains("docker buildx create --driver docker-container"),
        "{}",
        run.stdout
    );
    let push = Pusher::new(&registry.host(), None);
    assert_eq!(push.digest("t/both", &format!("cache-{}", repo.hashes()["both"])), None);
}

#[test]
fn the_drop_in_scripts_pass_the_architecture_on() {
    let dir = tempfile::tempdir().unwrap();
    // Stands in for spotbuild: says what it was asked.
    let fake = dir.path().join("spotbuild");
    std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-system/scripts");
    let run = |script: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(scripts.join(script));
        crate::support::outside_ci(&mut cmd);
        Run::of(cmd.args(args).env("SPOTBUILD", &fake).env_remove("COMMIT_HASH"))
    };
    let native = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "x86_64",
    };
    for (args, arch) in [(&["api", "64"][..], "x86_64"), (&["api", "64", "arm64"], "arm64"), (&["api", "64", "aarch64"], "arm64"), (&["api", "64", "amd64"], "x86_64"), (&["api", "64", "host"], native)] {
        let r = run("cond_spot_run_build", args);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout.trim(), format!("build --arch {arch} --cpus 64 api"), "{args:?}");
    }
    let r = run("build", &["api", "false", "arm64"]);
    assert_eq!(r.stdout.trim(), "build --arch arm64 --local api");
    let bad = run("cond_spot_run_build", &["api", "64", "riscv64"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("unknown architecture `riscv64`"), "{}", bad.stderr);
}
