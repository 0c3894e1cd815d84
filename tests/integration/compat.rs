//! The Aztec build-system's CircleCI steps, unchanged, over `scripts/build-system` on the
//! local farm: `setup_env` per CI job, `cond_spot_run_build`, `cond_spot_run_tests` with a
//! project's own `scripts/run_tests`, skips that rent nothing, and failures that fail the
//! step through `| tee`; and `build --all` building every healthy project past a stale
//! entry.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::farm::tags;
use crate::support::docker::{docker_required, unique, BUSYBOX};
use crate::support::farm::LocalFarm;
use crate::support::repo::TestRepo;
use crate::support::Run;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-system/scripts")
}

/// `base` <- `api`, whose `scripts/run_tests` checks that the image is on the host and
/// fails on `fail`; and a stale entry whose Dockerfile has gone, as real manifests have.
fn ci_repo() -> TestRepo {
    let repo = TestRepo::new();
    let id = unique();
    repo.write("base/Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\n");
    std::fs::copy(BUSYBOX, repo.path().join("base/busybox")).unwrap();
    repo.write("api/Dockerfile", "FROM base\nCOPY src /app\n");
    repo.write("api/src/main.txt", &format!("api {id}\n"));
    repo.write_executable(
        "api/scripts/run_tests",
        "#!/bin/sh\nset -e\necho \"run_tests: $*\"\ndocker image inspect \"$IMAGE_URI\" >/dev/null\n\
         echo \"image available: $IMAGE_URI\"\nif [ \"$1\" = fail ]; then echo 'e2e: expected 2, got 3'; exit 1; fi\n",
    );
    repo.write("web/Dockerfile", "FROM base\nCOPY index.html /site/\n");
    repo.write("web/index.html", &format!("<p>{id}</p>\n"));
    repo.manifest(json!({
        "base": {"buildDir": "base"},
        "api": {"buildDir": "api", "dependencies": ["base", ""]},
        "web": {"buildDir": "web", "dependencies": ["base"]},
        "coinbase-exporter": {"buildDir": "coinbase-exporter"}
    }));
    repo.commit("initial");
    repo
}

/// One CI step: `bash -eo pipefail -c CMD` (as CircleCI runs it), with the job's BASH_ENV.
fn step(farm: &LocalFarm, repo: &TestRepo, bash_env: &Path, cmd: &str) -> Run {
    Run::of(
        farm.env(&mut Command::new("bash"))
            .args(["-eo", "pipefail", "-c", cmd])
            .current_dir(repo.path())
            .env("BASH_ENV", bash_env)
            .env("TEST_LOGS_DIR", farm.dir.path().join("test-logs"))
            .env_remove("JOB_NAME")
            .env_remove("CIRCLE_JOB"),
    )
}

#[test]
fn circleci_steps_of_the_aztec_build_system_run_unchanged() {
    docker_required();
    let farm = LocalFarm::start();
    let repo = ci_repo();
    let sha = repo.head();
    // Two CI jobs, each with its own environment, as CircleCI gives each job.
    let env_of = |job: &str| -> PathBuf {
        let env = farm.dir.path().join(format!("{job}.env"));
        let setup = scripts().join("setup_env");
        let run = step(&farm, &repo, &env, &format!("{} {sha} '' {job} https://example.invalid/repo.git main", setup.display()));
        assert_eq!(run.code, 0, "{run:?}");
        env
    };
    let (account, token, failing) = (env_of("e2e-account"), env_of("e2e-token"), env_of("e2e-failing"));
    let hash = crate::support::repo::hashes_of(&Run::of(crate::support::spotbuild(repo.path()).args(["plan", "--offline", "--json"])).stdout.parse::<serde_json::Value>().unwrap())["api"].clone();

    // The build, on a rented host: the stale entry does not stand in the way.
    let build = step(&farm, &repo, &account, "cond_spot_run_build api 64 | tee build.log");
    assert_eq!(build.code, 0, "{build:?}");
    assert!(tags(&farm.registry(), "api").contains(&format!("cache-{hash}")), "api was pushed");
    let launched = farm.all_instances();
    // The registry questions the scripts ask.
    assert_eq!(step(&farm, &repo, &account, &format!("image_exists api cache-{hash}")).code, 0);
    assert_eq!(step(&farm, &repo, &account, "image_exists api cache-0000").code, 1);
    let up_to_date = step(&farm, &repo, &account, &format!("check_rebuild cache-{hash} api"));
    assert_eq!(up_to_date.code, 0, "{up_to_date:?}");
    assert!(up_to_date.stdout.contains("No rebuild required."), "{}", up_to_date.stdout);
    assert_eq!(step(&farm, &repo, &account, &format!("check_rebuild cache-{hash}-e2e api")).code, 1);

    // Two jobs with different arguments: both run, each with its own success tag.
    let a = step(&farm, &repo, &account, "cond_spot_run_tests api ./src/e2e_account.test.ts | tee a.log");
    assert_eq!(a.code, 0, "{a:?}");
    assert!(a.stdout.contains("run_tests: ./src/e2e_account.test.ts"), "{}", a.stdout);
    assert!(a.stdout.contains(&format!("image available: {}/farm/api:cache-{hash}", farm.registry())), "{}", a.stdout);
    let b = step(&farm, &repo, &token, "cond_spot_run_tests api ./src/e2e_token.test.ts | tee b.log");
    assert_eq!(b.code, 0, "{b:?}");
    assert!(b.stdout.contains("run_tests: ./src/e2e_token.test.ts"), "{}", b.stdout);
    assert_eq!(farm.all_instances(), launched + 2, "each ran on a machine of its own");
    let passed: Vec<String> = tags(&farm.registry(), "api").into_iter().filter(|t| t.starts_with(&format!("cache-{hash}-e2e-"))).collect();
    assert_eq!(passed.len(), 2, "{passed:?}");
    assert!(passed.iter().any(|t| t.starts_with(&format!("cache-{hash}-e2e-account-"))), "{passed:?}");
    assert!(passed.iter().any(|t| t.starts_with(&format!("cache-{hash}-e2e-token-"))), "{passed:?}");
    // The step's log is kept where the original kept it.
    let log = std::fs::read_to_string(farm.dir.path().join("test-logs/e2e-account.log")).unwrap();
    assert!(log.contains("run_tests: ./src/e2e_account.test.ts"), "{log}");

    // A rerun of the first job at this content rents nothing.
    let again = step(&farm, &repo, &account, "cond_spot_run_tests api ./src/e2e_account.test.ts | tee a2.log");
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("skipped: api e2e-account already passed"), "{}", again.stdout);
    let rebuild = step(&farm, &repo, &account, "cond_spot_run_build api 64");
    assert_eq!(rebuild.code, 0, "{rebuild:?}");
    assert_eq!(farm.all_instances(), launched + 2, "no launch for what already passed or was built");

    // A failing run_tests fails the step through `| tee`, with its output, and tags nothing.
    let fail = step(&farm, &repo, &failing, &format!("{}/cond_spot_run_test api 64 scripts/run_tests fail | tee fail.log", scripts().display()));
    assert_eq!(fail.code, 1, "{fail:?}");
    let shown = std::fs::read_to_string(repo.path().join("fail.log")).unwrap();
    assert!(shown.contains("e2e: expected 2, got 3"), "{shown}");
    assert!(!tags(&farm.registry(), "api").iter().any(|t| t.starts_with(&format!("cache-{hash}-e2e-failing-"))), "no tag for a failure");

    // Building everything builds every healthy project (web is left), and exits 3 for
    // the stale entry, which it names.
    let all = Run::of(farm.spotbuild(repo.path()).args(["build", "--all"]));
    assert_eq!(all.code, 3, "{all:?}");
    assert!(all.stderr.contains("error: project `coinbase-exporter`: Dockerfile `coinbase-exporter/Dockerfile` does not exist"), "{}", all.stderr);
    assert!(all.stdout.contains("web:build"), "{}", all.stdout);
    assert!(!all.stdout.contains("api:build"), "api was built already: {}", all.stdout);
    farm.assert_nothing_left();
}
