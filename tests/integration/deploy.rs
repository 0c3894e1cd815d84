//! `spotbuild deploy` between two real registries on loopback: the build registry, and a
//! deploy registry behind basic auth and a proxy that counts every blob sent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::support::registry_proxy::{random_layer, Pusher, RegistryProxy};
use crate::support::repo::TestRepo;
use crate::support::services::Registry;
use crate::support::{spotbuild, Run};

const USER: &str = "deployer";
const PASSWORD: &str = "d3ploy-s3cret";

/// Appends what each hook saw to $DEPLOY_HOOK_LOG; fails when $DEPLOY_FAIL_DIR/<project> exists.
const HOOK: &str = r#"echo "$SPOTBUILD_PROJECT $SPOTBUILD_ENV $SPOTBUILD_COMMIT $SPOTBUILD_IMAGE $PWD $FROM_MANIFEST ${SERVICES:-}" >> "$DEPLOY_HOOK_LOG"; test ! -e "$DEPLOY_FAIL_DIR/$SPOTBUILD_PROJECT""#;

struct Setup {
    repo: TestRepo,
    build: Registry,
    _deploy: Registry,
    proxy: RegistryProxy,
    src: Pusher,
    dst: Pusher,
    scratch: tempfile::TempDir,
    /// The bytes of each project's first layer, shared by all its images.
    base_layers: BTreeMap<String, Vec<u8>>,
}

impl Setup {
    fn new() -> Setup {
        let repo = TestRepo::new();
        let hook = json!({"command": ["sh", "-c", HOOK], "env": {"FROM_MANIFEST": "yes"}});
        repo.manifest(json!({
            "base": {"buildDir": "base", "deploy": hook},
            "api": {"buildDir": "api", "dependencies": ["base"], "tests": {"unit": {"command": ["true"]}}, "deploy": hook},
            "web": {"buildDir": "web", "tests": {"unit": {"command": ["true"]}}, "deploy": hook},
            "multi": {"buildDir": "multi"},
        }));
        for p in ["base", "api", "web", "multi"] {
            repo.write(format!("{p}/Dockerfile"), "FROM scratch\n");
            repo.write(format!("{p}/src.txt"), "1\n");
        }
        repo.commit("four projects");
        let build = Registry::start();
        let deploy = Registry::start();
        let proxy = RegistryProxy::start(&deploy.host(), Some((USER, PASSWORD)));
        let src = Pusher::new(&build.host(), None);
        let dst = Pusher::new(&proxy.host(), Some((USER, PASSWORD)));
        let base_layers = ["base", "api", "web"].iter().map(|p| (p.to_string(), random_layer(300_000))).collect();
        Setup {
            repo,
            build,
            _deploy: deploy,
            proxy,
            src,
            dst,
            scratch: tempfile::tempdir().unwrap(),
            base_layers,
        }
    }

    fn hashes(&self) -> BTreeMap<String, String> {
        self.repo.hashes()
    }

    /// Builds `project` at its current hash (shared first layer, a new second one), and
    /// passes its tests unless `untested`. Returns its blobs.
    fn publish(&self, project: &str, untested: bool) -> Vec<String> {
        let hash = &self.hashes()[project];
        let tag = format!("cache-{hash}");
        if project == "multi" {
            let (_, _, blobs) = self.src.index("multi", &tag, &["amd64", "arm64"]);
            return blobs;
        }
        let fresh = random_layer(200_000);
        let (_, blobs) = self.src.image(project, &tag, &[&self.base_layers[project], &fresh], "amd64");
        if !untested && project != "base" {
            self.src.retag(project, &tag, &format!("{tag}-unit"));
        }
        blobs
    }

    fn deploy(&self, args: &[&str]) -> Run {
        let mut cmd = spotbuild(self.repo.path());
        cmd.arg("deploy")
            .args(args)
            .args(["--registry", &self.build.host(), "--to", &self.proxy.host()])
            .arg("--ledger")
            .arg(self.scratch.path().join("ledger.sqlite"))
            .env("SPOTBUILD_DEPLOY_REGISTRY_USERNAME", USER)
            .env("SPOTBUILD_DEPLOY_REGISTRY_PASSWORD", PASSWORD)
            .env("DEPLOY_HOOK_LOG", self.hook_log())
            .env("DEPLOY_FAIL_DIR", self.scratch.path());
        Run::of(&mut cmd)
    }

    fn hook_log(&self) -> std::path::PathBuf {
        self.scratch.path().join("hooks.log")
    }

    fn hooks_run(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.hook_log()).unwrap_or_default();
        std::fs::remove_file(self.hook_log()).ok();
        text.lines().map(String::from).collect()
    }

    fn fail_hook(&self, project: &str, fail: bool) {
        let marker = self.scratch.path().join(project);
        if fail {
            std::fs::write(marker, "").unwrap();
        } else {
            std::fs::remove_file(marker).ok();
        }
    }
}

fn actions(report: &Value) -> BTreeMap<String, String> {
    report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["project"].as_str().unwrap().to_string(), p["action"].as_str().unwrap().to_string()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

fn deploy_rows(ledger: &Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let mut stmt = conn.prepare("SELECT project, entry FROM deploys ORDER BY at, project").unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|r| {
            let (p, e) = r.unwrap();
            let e: Value = serde_json::from_str(&e).unwrap();
            (p, e["action"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn a_red_graph_is_refused_and_a_green_one_promotes_only_what_changed() {
    let s = Setup::new();
    for p in ["base", "api", "multi"] {
        s.publish(p, false);
    }
    s.publish("web", true);

    // Red: web's test has not passed. Refused, listed, and nothing reached the deploy registry.
    let red = s.deploy(&["--all", "--env", "staging"]);
    assert_eq!(red.code, 8, "{}\n{}", red.stdout, red.stderr);
    assert!(red.stderr.contains("web test unit"), "{}", red.stderr);
    assert!(s.proxy.counts().requests.is_empty(), "the gate touched the deploy registry: {:?}", s.proxy.counts().requests);

    // Green, after a dry run that shows the plan and changes nothing.
    let web_tag = format!("cache-{}", s.hashes()["web"]);
    s.src.retag("web", &web_tag, &format!("{web_tag}-unit"));
    let dry = s.deploy(&["--all", "--env", "staging", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}\n{}", dry.stdout, dry.stderr);
    assert!(dry.stdout.contains("dry run: nothing was changed") && dry.stdout.contains("would deploy"), "{}", dry.stdout);
    assert!(dry.stdout.contains("would run: sh -c"), "{}", dry.stdout);
    assert!(s.proxy.counts().uploads.is_empty() && s.hooks_run().is_empty());
    assert!(s.proxy.counts().requests.iter().all(|r| r.starts_with("GET") || r.starts_with("HEAD")), "{:?}", s.proxy.counts().requests);

    let green = s.deploy(&["--all", "--env", "staging", "--json"]);
    let report = green.json();
    let commit = s.repo.head();
    assert_eq!(
        actions(&report),
        map(&[("api", "deployed"), ("base", "deployed"), ("multi", "deployed"), ("web", "deployed")])
    );
    for (project, hash) in s.hashes() {
        let digest = s.src.digest(&project, &format!("cache-{hash}")).unwrap();
        for tag in [commit.as_str(), "staging", "deployed-staging"] {
            assert_eq!(s.dst.digest(&project, tag).as_deref(), Some(digest.as_str()), "{project}:{tag}");
        }
    }
    // The manifest list arrived whole: the index and both platforms' images and blobs.
    let multi = s.hashes()["multi"].clone();
    let (media_type, index) = s.dst.manifest("multi", "staging").unwrap();
    assert_eq!(media_type, "application/vnd.oci.image.index.v1+json");
    let index: Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    for child in index["manifests"].as_array().unwrap() {
        let d = child["digest"].as_str().unwrap();
        let (_, body) = s.dst.manifest("multi", d).expect("a child of the index");
        let m: Value = serde_json::from_slice(&body).unwrap();
        for layer in m["layers"].as_array().unwrap() {
            assert!(s.dst.has_blob("multi", layer["digest"].as_str().unwrap()));
        }
    }
    let multi_row = report["projects"].as_array().unwrap().iter().find(|p| p["project"] == "multi").unwrap();
    assert_eq!(multi_row["platforms"], json!(["linux/amd64", "linux/arm64"]));
    assert_eq!(s.src.digest("multi", &format!("cache-{multi}")), s.dst.digest("multi", "staging"));
    // Hooks ran in dependency order (base before api), with their variables, in their dirs.
    let hooks = s.hooks_run();
    assert_eq!(hooks.len(), 3, "{hooks:?}");
    let order: Vec<&str> = hooks.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert!(order.iter().position(|p| *p == "base") < order.iter().position(|p| *p == "api"), "{order:?}");
    let api = hooks.iter().find(|l| l.starts_with("api ")).unwrap();
    let api_digest = s.src.digest("api", &format!("cache-{}", s.hashes()["api"])).unwrap();
    assert!(api.contains(&format!("api staging {commit} {}/api@{api_digest}", s.proxy.host())), "{api}");
    assert!(api.trim_end().ends_with("/api yes"), "{api}");
    assert_eq!(deploy_rows(&s.scratch.path().join("ledger.sqlite")).len(), 4);

    // A rerun with no change: every project unchanged, and nothing sent.
    s.proxy.reset();
    let again = s.deploy(&["--all", "--env", "staging", "--json"]).json();
    assert!(actions(&again).values().all(|a| a == "unchanged"), "{again}");
    assert!(s.proxy.counts().uploads.is_empty() && s.proxy.counts().bytes == 0);
    assert!(s.proxy.counts().requests.iter().all(|r| !r.contains("/blobs/")), "{:?}", s.proxy.counts().requests);
    assert!(s.hooks_run().is_empty());

    // One project changes: only it is promoted, and only its new layer and config are sent.
    s.repo.write("web/src.txt", "2\n");
    s.repo.commit("web changes");
    let web_blobs = s.publish("web", false);
    s.proxy.reset();
    let one = s.deploy(&["--all", "--env", "staging", "--json"]).json();
    assert_eq!(
        actions(&one),
        map(&[("api", "unchanged"), ("base", "unchanged"), ("multi", "unchanged"), ("web", "deployed")])
    );
    let sent: BTreeSet<String> = s.proxy.counts().uploads.keys().cloned().collect();
    let shared = crate::support::registry_proxy::sha(&s.base_layers["web"]);
    let new: BTreeSet<String> = web_blobs.into_iter().filter(|b| *b != shared).collect();
    assert_eq!(sent, new, "only the new layer and config travel");
    assert_eq!(s.hooks_run().len(), 1);

    // A failing hook: base fails, so api (which depends on it) is skipped, web (independent)
    // still deploys; base's deployed-staging stays where it was.
    s.repo.write("base/src.txt", "3\n");
    s.repo.write("web/src.txt", "3\n");
    s.repo.commit("base and web change");
    let before = s.dst.digest("base", "deployed-staging");
    for p in ["base", "api", "web"] {
        s.publish(p, false);
    }
    s.fail_hook("base", true);
    let failed = s.deploy(&["--all", "--env", "staging", "--json"]);
    assert_eq!(failed.code, 1, "{}\n{}", failed.stdout, failed.stderr);
    let report: Value = serde_json::from_str(&failed.stdout).unwrap();
    assert_eq!(
        actions(&report),
        map(&[("api", "skipped"), ("base", "failed"), ("multi", "unchanged"), ("web", "deployed")])
    );
    assert_eq!(s.dst.digest("base", "deployed-staging"), before, "a failed hook moved deployed-staging");
    let ran: Vec<String> = s.hooks_run().iter().map(|l| l.split(' ').next().unwrap().to_string()).collect();
    assert_eq!(ran, ["base", "web"], "the independent hook ran; the dependent one did not");

    // Fixed, a rerun finishes the job without sending a blob again.
    s.fail_hook("base", false);
    s.proxy.reset();
    let fixed = s.deploy(&["--all", "--env", "staging", "--json"]).json();
    assert_eq!(
        actions(&fixed),
        map(&[("api", "deployed"), ("base", "deployed"), ("multi", "unchanged"), ("web", "unchanged")])
    );
    assert!(s.proxy.counts().uploads.is_empty(), "{:?}", s.proxy.counts().uploads);
    let ledger = deploy_rows(&s.scratch.path().join("ledger.sqlite"));
    assert!(ledger.iter().any(|(p, a)| p == "base" && a == "failed"), "{ledger:?}");
}

#[test]
fn an_interrupted_copy_resumes_without_sending_a_blob_twice() {
    let s = Setup::new();
    let mut all = BTreeSet::new();
    for p in ["base", "api", "web", "multi"] {
        all.extend(s.publish(p, false));
    }
    s.proxy.allow_uploads(Some(4));
    let cut = s.deploy(&["--all", "--env", "prod"]);
    assert_eq!(cut.code, 5, "{}\n{}", cut.stdout, cut.stderr);
    let first: BTreeMap<String, usize> = s.proxy.counts().uploads.clone();
    assert!(!first.is_empty() && first.len() < all.len(), "{first:?}\n{}", cut.stderr);
    for (p, hash) in s.hashes() {
        assert!(s.dst.digest(&p, "deployed-prod").is_none() || s.dst.digest(&p, "deployed-prod") == s.src.digest(&p, &format!("cache-{hash}")));
    }

    s.proxy.allow_uploads(None);
    let resumed = s.deploy(&["--all", "--env", "prod", "--json"]).json();
    assert!(actions(&resumed).values().all(|a| a == "deployed" || a == "unchanged"), "{resumed}");
    let counts = s.proxy.counts();
    let sent: BTreeSet<String> = counts.uploads.keys().cloned().collect();
    assert_eq!(sent, all, "every blob arrived: {:?}\n{}", counts.requests, cut.stderr);
    assert!(counts.uploads.values().all(|&n| n == 1), "a blob was sent twice: {:?}", counts.uploads);
    drop(counts);
    for (p, hash) in s.hashes() {
        assert_eq!(s.dst.digest(&p, "deployed-prod"), s.src.digest(&p, &format!("cache-{hash}")), "{p}");
    }
}

#[test]
fn deploy_refuses_bad_environments_untrusted_refs_and_tags_that_contradict_version() {
    let s = Setup::new();
    for p in ["base", "api", "web", "multi"] {
        s.publish(p, false);
    }
    let bad = s.deploy(&["--all", "--env", "cache-x"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let none = s.deploy(&["--env", "staging"]);
    assert_eq!(none.code, 2, "{}", none.stderr);

    s.repo.git(&["checkout", "-q", "-b", "feature"]);
    let untrusted = s.deploy(&["--all", "--env", "staging"]);
    assert_eq!(untrusted.code, 2, "{}", untrusted.stderr);
    assert!(untrusted.stderr.contains("trusted"), "{}", untrusted.stderr);
    s.repo.git(&["checkout", "-q", "main"]);

    // A release tag must name the VERSION file's version; the right one becomes an image tag.
    s.repo.write("VERSION", "1.2.3\n");
    s.repo.commit("version");
    for p in ["base", "api", "web", "multi"] {
        s.publish(p, false);
    }
    s.repo.git(&["tag", "v1.2.4"]);
    let wrong = s.deploy(&["web", "--env", "staging"]);
    assert_eq!(wrong.code, 3, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("VERSION"), "{}", wrong.stderr);
    assert!(s.proxy.counts().uploads.is_empty());
    s.repo.git(&["tag", "-d", "v1.2.4"]);
    s.repo.git(&["tag", "v1.2.3"]);
    let right = s.deploy(&["web", "--env", "staging", "--json"]).json();
    assert_eq!(actions(&right), map(&[("web", "deployed")]));
    assert_eq!(s.dst.digest("web", "v1.2.3"), s.dst.digest("web", "deployed-staging"));
}

/// The Aztec-shaped `deploy_ecr`, `deploy` and `deploy_global` of the build-system folder.
#[test]
fn aztec_shaped_deploy_scripts_map_onto_deploy() {
    let s = Setup::new();
    for p in ["base", "api", "web", "multi"] {
        s.publish(p, false);
    }
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-system/scripts");
    let script = |cmd: &str, deploy_tag: Option<&str>| -> Run {
        let mut c = std::process::Command::new("bash");
        crate::support::outside_ci(&mut c);
        c.args(["-eo", "pipefail", "-c", cmd])
            .current_dir(s.repo.path())
            .env("PATH", format!("{}:{}", scripts.display(), std::env::var("PATH").unwrap()))
            .env("SPOTBUILD", env!("CARGO_BIN_EXE_spotbuild"))
            .env("SPOTBUILD_REGISTRY", s.build.host())
            .env("ECR_DEPLOY_URL", s.proxy.host())
            .env("SPOTBUILD_DEPLOY_REGISTRY_USERNAME", USER)
            .env("SPOTBUILD_DEPLOY_REGISTRY_PASSWORD", PASSWORD)
            .env("SPOTBUILD_LEDGER", "off")
            .env("DEPLOY_HOOK_LOG", s.hook_log())
            .env("DEPLOY_FAIL_DIR", s.scratch.path())
            .env_remove("SPOTBUILD_CONFIG")
            .env_remove("COMMIT_HASH");
        match deploy_tag {
            Some(t) => c.env("DEPLOY_TAG", t),
            None => c.env_remove("DEPLOY_TAG"),
        };
        Run::of(&mut c)
    };
    assert_eq!(script("deploy_ecr web", None).code, 2, "DEPLOY_TAG is required");

    // deploy_ecr: copied and tagged, no hook, deployed-<env> untouched.
    let ecr = script("deploy_ecr web", Some("staging"));
    assert_eq!(ecr.code, 0, "{ecr:?}");
    let digest = s.src.digest("web", &format!("cache-{}", s.hashes()["web"]));
    assert_eq!(s.dst.digest("web", "staging"), digest);
    assert_eq!(s.dst.digest("web", &s.repo.head()), digest);
    assert_eq!(s.dst.digest("web", "deployed-staging"), None);
    assert!(s.hooks_run().is_empty());

    // deploy: the hook runs (seeing SERVICES), then deployed-<env> moves.
    let deploy = script("deploy web web-svc", Some("staging"));
    assert_eq!(deploy.code, 0, "{deploy:?}");
    assert_eq!(s.dst.digest("web", "deployed-staging"), digest);
    let hooks = s.hooks_run();
    assert!(hooks.len() == 1 && hooks[0].ends_with(" web-svc"), "{hooks:?}");
    // deploy_global: nothing changed since, so nothing runs.
    let global = script("deploy_global web", Some("staging"));
    assert_eq!(global.code, 0, "{global:?}");
    assert!(global.stdout.contains("unchanged"), "{}", global.stdout);
    assert!(s.hooks_run().is_empty());
}

/// Without `--to`, the deploy registry is the build registry: a manifest copy, no blob moves.
#[test]
fn within_one_registry_a_deploy_is_a_manifest_copy() {
    let s = Setup::new();
    for p in ["base", "api", "web", "multi"] {
        s.publish(p, false);
    }
    let front = RegistryProxy::start(&s.build.host(), None);
    let mut cmd = spotbuild(s.repo.path());
    cmd.args(["deploy", "--all", "--env", "qa", "--json", "--registry", &front.host(), "--ledger", "off"])
        .env("DEPLOY_HOOK_LOG", s.hook_log())
        .env("DEPLOY_FAIL_DIR", s.scratch.path());
    let report = Run::of(&mut cmd).json();
    assert!(actions(&report).values().all(|a| a == "deployed"), "{report}");
    let counts = front.counts();
    assert!(counts.requests.iter().all(|r| !r.contains("/blobs/uploads/")), "a blob moved: {:?}", counts.requests);
    drop(counts);
    for (p, hash) in s.hashes() {
        let digest = s.src.digest(&p, &format!("cache-{hash}"));
        assert_eq!(s.src.digest(&p, "deployed-qa"), digest, "{p}");
        assert_eq!(s.src.digest(&p, "qa"), digest, "{p}");
    }
}
