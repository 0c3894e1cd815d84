//! The build step of one project: its Dockerfile pinned to the exact images of the projects
//! it is built `FROM`, a pure [`plan`] of which named stages are built as images of their
//! own and which cache sources every build reads and writes, and [`build`], which carries
//! the plan out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::docker::{BuildSpec, BuilderKind, Docker, LayerCount};
use super::dockerfile::{self, Stage};
use super::exec::{self, Stopped};
use super::job::CheckedJob;
use super::step::{Step, StepStatus};
use crate::manifest::Multiarch;
use crate::platform::Arch;
use crate::protocol::JobProject;

/// The tag a branch's newest build carries (a cache source for the next build).
pub fn branch_tag(branch: &str) -> String {
    let slug: String = branch
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let slug = slug.trim_matches(['-', '.']);
    let mut tag = format!("branch-{slug}");
    tag.truncate(120);
    tag
}

/// An image a build tags, and the tag that moves to it once it is pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `host/repository:tag`.
    pub reference: String,
    pub tag: String,
    /// The tag the branch's newest build of this image carries.
    pub branch_tag: String,
}

/// A named stage built on its own, before the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageBuild {
    /// The stage's name in the Dockerfile (`--target`).
    pub target: String,
    pub image: Image,
    pub cache_from: Vec<String>,
}

/// The build of the image itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuild {
    pub image: Image,
    /// Images whose (inline) cache the build may reuse.
    pub cache_from: Vec<String>,
    /// Buildx registry caches to read, and the one to write.
    pub cache_refs_from: Vec<String>,
    pub cache_ref_to: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// Built in order, before the image.
    pub stages: Vec<StageBuild>,
    pub image: ImageBuild,
}

/// Plans the build of `repo:tag` (`repo` is `host/repository`) from a Dockerfile with
impl BuildPlan {
    /// Also reads the main branch's newest builds in `repo` (an untrusted build's trusted
    /// namespace, which it may read but never write), after its own sources.
    pub fn read_main_branch_of(&mut self, repo: &str, main_branch: &str) {
        let main = branch_tag(main_branch);
        for s in &mut self.stages {
            let stage_tag = s.image.tag.split("-cache-").next().unwrap_or_default().to_string();
            s.cache_from.push(format!("{repo}:{stage_tag}-{main}"));
        }
        let stages: Vec<String> = self.stages.iter().filter_map(|s| s.cache_from.last().cloned()).collect();
        self.image.cache_from.extend(stages);
        self.image.cache_from.push(format!("{repo}:{main}"));
        self.image.cache_refs_from.push(format!("{repo}:buildcache-{main}"));
    }
}

/// `stages`, for a build of `branch`. The cache sources are the newest builds of the
/// branch, then of the main branch.
pub fn plan(stages: &[Stage], builder: BuilderKind, repo: &str, tag: &str, branch: &str, main_branch: &str) -> BuildPlan {
    let branch = branch_tag(branch);
    let main = branch_tag(main_branch);
    let mut cache_tags = vec![branch.clone()];
    if main != branch {
        cache_tags.push(main);
    }
    let mut stage_builds = Vec::new();
    // Inline cache holds only the final stage: named stages are built and pushed as images
    // of their own, so a fresh machine can reuse them. Buildx's registry cache holds every
    // stage already (mode=max).
    if builder != BuilderKind::Buildx {
        for stage in stages.iter().take(stages.len().saturating_sub(1)) {
            let Some(name) = &stage.name else { continue };
            let slug = branch_tag(name).trim_start_matches("branch-").to_string();
            // Named by content, never by branch: a cache source must not be an image this
            // job has just tagged locally (its inline cache names blobs that are nowhere
            // yet, which BuildKit 20.10 reports as "failed to compute cache key").
            stage_builds.push(StageBuild {
                target: name.clone(),
                image: Image {
                    reference: format!("{repo}:stage-{slug}-{tag}"),
                    tag: format!("stage-{slug}-{tag}"),
                    branch_tag: format!("stage-{slug}-{branch}"),
                },
                cache_from: cache_tags.iter().map(|t| format!("{repo}:stage-{slug}-{t}")).collect(),
            });
        }
    }
    let mut cache_from: Vec<String> = stage_builds.iter().flat_map(|s| s.cache_from.iter().cloned()).collect();
    cache_from.extend(cache_tags.iter().map(|t| format!("{repo}:{t}")));
    BuildPlan {
        image: ImageBuild {
            image: Image {
                reference: format!("{repo}:{tag}"),
                tag: tag.to_string(),
                branch_tag: branch.clone(),
            },
            cache_from,
            cache_refs_from: cache_tags.iter().map(|t| format!("{repo}:buildcache-{t}")).collect(),
            cache_ref_to: format!("{repo}:buildcache-{branch}"),
        },
        stages: stage_builds,
    }
}

/// What a build step made.
#[derive(Debug)]
pub enum Built {
    /// The image, and every stage before it.
    Passed { image: Image, stages: Vec<Image>, layers: (u32, u32) },
    /// The build failed or was stopped; the stages it finished are still worth keeping.
    Failed {
        status: StepStatus,
        stages: Vec<Image>,
        /// Counted once the image's own build ran.
        layers: Option<(u32, u32)>,
    },
}

impl Built {
    pub fn status(&self) -> StepStatus {
        match self {
            Built::Passed { .. } => StepStatus::Passed,
            Built::Failed { status, .. } => status.clone(),
        }
    }

    /// (cached, total) layers.
    pub fn layers(&self) -> Option<(u32, u32)> {
        match self {
            Built::Passed { layers, .. } => Some(*layers),
            Built::Failed { layers, .. } => *layers,
        }
    }
}

/// Builds project `p`: each planned stage first (so it can be cached on its own), then the
/// image.
pub async fn build(step: &Step, docker: &Docker, cx: &CheckedJob, p: &JobProject) -> Built {
    let errored = || Built::Failed {
        status: StepStatus::Errored,
        stages: Vec::new(),
        layers: None,
    };
    let text = match tokio::fs::read_to_string(cx.src.join(&p.dockerfile)).await {
        Ok(t) => t,
        Err(e) => {
            step.say(format!("error: failed to read {}: {e}", p.dockerfile)).await;
            return errored();
        }
    };
    let images: BTreeMap<String, String> = cx.job.projects.iter().map(|q| (q.name.clone(), cx.existing(q))).collect();
    let (pinned, changes) = dockerfile::pin(&text, &images);
    for (from, to) in &changes {
        step.say(format!("FROM {from} pinned to {to}")).await;
    }
    let dir = cx.job.workdir.join("dockerfiles");
    let dockerfile = dir.join(format!("{}.Dockerfile", p.name));
    let written = match tokio::fs::create_dir_all(&dir).await {
        Ok(()) => tokio::fs::write(&dockerfile, &pinned).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        step.say(format!("error: failed to write {}: {e}", dockerfile.display())).await;
        return errored();
    }

    let platforms = match platforms(p, docker.kind) {
        Ok(platforms) => platforms,
        Err(why) => {
            step.say(format!("error: {why}")).await;
            return errored();
        }
    };
    // A per-arch image's cache sources are its own arch's: branch tags carry it too.
    let (branch, main_branch) = match (p.multiarch, p.arch) {
        (Multiarch::Host, Some(arch)) => (format!("{}-{arch}", cx.branch()), format!("{}-{arch}", cx.job.main_branch)),
        _ => (cx.branch().to_string(), cx.job.main_branch.clone()),
    };
    if !platforms.is_empty() {
        step.say(format!("building for {}", platforms.join(", "))).await;
    }
    let mut plan = plan(&dockerfile::stages(&pinned), docker.kind, &cx.repo(&p.name), &p.tag, &branch, &main_branch);
    if let Some(trusted) = cx.trusted_repo(&p.name) {
        plan.read_main_branch_of(&trusted, &main_branch);
    }
    let counter = Arc::new(Mutex::new(LayerCount::default()));
    let observer: exec::Observer = {
        let c = counter.clone();
        Arc::new(Mutex::new(move |line: &str| c.lock().expect("not poisoned").observe(line)))
    };
    let mut build_args = p.build_args.clone();
    if docker.kind == BuilderKind::Classic {
        // BuildKit sets the platform ARGs itself; the classic builder does not, and
        // multi-arch Dockerfiles read them (`COPY bin/${TARGETARCH} …`).
        if let Some(arch) = p.arch {
            for (k, v) in [("TARGETARCH", arch.oci().to_string()), ("TARGETOS", "linux".into()), ("TARGETPLATFORM", arch.docker_platform())] {
                build_args.entry(k.to_string()).or_insert(v);
            }
        }
    }
    let base = BuildSpec {
        context: cx.src.join(&p.build_dir),
        dockerfile,
        build_args,
        push: p.multiarch == Multiarch::Buildx,
        platforms,
        ..Default::default()
    };
    let mut stages = Vec::new();
    for stage in plan.stages {
        let spec = BuildSpec {
            image: stage.image.reference.clone(),
            target: Some(stage.target),
            cache_from: stage.cache_from,
            ..base.clone()
        };
        let s = build_once(step, docker, &spec, &observer).await;
        counter.lock().expect("not poisoned").next_invocation();
        if !s.ok() {
            return Built::Failed {
                status: StepStatus::from(&s),
                stages,
                layers: None,
            };
        }
        stages.push(stage.image);
    }
    let ImageBuild {
        image,
        cache_from,
        cache_refs_from,
        cache_ref_to,
    } = plan.image;
    let spec = BuildSpec {
        image: image.reference.clone(),
        cache_from,
        cache_refs_from,
        cache_ref_to: Some(cache_ref_to),
        ..base
    };
    let s = build_once(step, docker, &spec, &observer).await;
    let layers = counter.lock().expect("not poisoned").counts();
    match StepStatus::from(&s) {
        StepStatus::Passed => Built::Passed { image, stages, layers },
        status => Built::Failed {
            status,
            stages,
            layers: Some(layers),
        },
    }
}

/// The `--platform` of project `p`'s build: every architecture in one buildx build for
/// `multiarch: buildx` (only a builder with a docker-container driver can do that), else its
/// architecture when this machine is another one, else none (the machine's own).
pub fn platforms(p: &JobProject, builder: BuilderKind) -> Result<Vec<String>, String> {
    if p.multiarch == Multiarch::Buildx {
        if builder != BuilderKind::Buildx {
            return Err(format!(
                "`{}` has `multiarch: buildx`, which builds every platform in one `docker buildx build`, and this machine has no buildx builder with the docker-container driver (it has the {} builder). Create one with `docker buildx create --driver docker-container --use` (the AMI baked by ami/ has one), or use `multiarch: host` to build natively on each architecture",
                p.name,
                builder.name()
            ));
        }
        return Ok(Arch::ALL.iter().map(|a| a.docker_platform()).collect());
    }
    Ok(match p.arch {
        Some(arch) if Arch::native() != Some(arch) => vec![arch.docker_platform()],
        _ => Vec::new(),
    })
}

async fn build_once(step: &Step, docker: &Docker, spec: &BuildSpec, observer: &exec::Observer) -> Stopped {
    if docker.kind == BuilderKind::Classic {
        // The classic builder only uses cache sources that are present locally.
        for image in &spec.cache_from {
            let _ = step.exec(docker.pull(image), None).await;
        }
    }
    step.exec(docker.build(spec), Some(observer.clone())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &str = "r:5000/t/b";

    fn stages(text: &str) -> Vec<Stage> {
        dockerfile::stages(text)
    }

    fn image(reference: &str, tag: &str, branch_tag: &str) -> Image {
        Image {
            reference: reference.into(),
            tag: tag.into(),
            branch_tag: branch_tag.into(),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn project(multiarch: Multiarch, arch: Option<Arch>) -> JobProject {
        serde_json::from_value(serde_json::json!({
            "name": "app", "hash": "h", "tag": "cache-h", "build": true, "build_dir": "app",
            "dockerfile": "app/Dockerfile", "project_dir": "app", "arch": arch, "multiarch": multiarch
        }))
        .unwrap()
    }

    #[test]
    fn the_platform_follows_the_projects_arch_and_buildx_builds_every_one() {
        let other = if Arch::native() == Some(Arch::Arm64) { Arch::X86_64 } else { Arch::Arm64 };
        assert_eq!(platforms(&project(Multiarch::Host, Some(other)), BuilderKind::Classic), Ok(vec![other.docker_platform()]));
        if let Some(native) = Arch::native() {
            assert_eq!(platforms(&project(Multiarch::Host, Some(native)), BuilderKind::Classic), Ok(Vec::new()), "the machine's own");
        }
        assert_eq!(platforms(&project(Multiarch::None, None), BuilderKind::BuildKit), Ok(Vec::new()));
        assert_eq!(
            platforms(&project(Multiarch::Buildx, None), BuilderKind::Buildx),
            Ok(vec!["linux/amd64".to_string(), "linux/arm64".to_string()])
        );
        let e = platforms(&project(Multiarch::Buildx, None), BuilderKind::BuildKit).unwrap_err();
        assert!(e.contains("docker buildx create --driver docker-container"), "{e}");
        let docker = Docker { program: "docker".into(), kind: BuilderKind::Buildx, env: Vec::new() };
        let spec = BuildSpec { platforms: vec!["linux/amd64".into(), "linux/arm64".into()], push: true, image: "r/app:cache-h".into(), ..Default::default() };
        let args: Vec<String> = docker.build(&spec).as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"--push".to_string()) && !args.contains(&"--load".to_string()), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--platform", "linux/amd64,linux/arm64"]), "{args:?}");
    }

    #[test]
    fn branch_tags_are_valid_tags() {
        assert_eq!(branch_tag("main"), "branch-main");
        assert_eq!(branch_tag("feature/Add_Thing"), "branch-feature-add-thing");
        assert!(branch_tag(&"x".repeat(300)).len() <= 120);
    }

    #[test]
    fn inline_cache_builds_each_named_stage_but_the_last_as_its_own_image() {
        let text = "FROM a AS deps\nFROM deps AS Tools\nFROM scratch\nFROM tools AS final\n";
        for builder in [BuilderKind::BuildKit, BuilderKind::Classic] {
            let plan = plan(&stages(text), builder, REPO, "cache-abc", "feature/x", "main");
            let names: Vec<&str> = plan.stages.iter().map(|s| s.target.as_str()).collect();
            assert_eq!(names, ["deps", "Tools"], "{builder:?}");
            assert_eq!(
                plan.stages[0],
                StageBuild {
                    target: "deps".into(),
                    image: image(&format!("{REPO}:stage-deps-cache-abc"), "stage-deps-cache-abc", "stage-deps-branch-feature-x"),
                    cache_from: strings(&[
                        "r:5000/t/b:stage-deps-branch-feature-x",
                        "r:5000/t/b:stage-deps-branch-main"
                    ]),
                }
            );
            assert_eq!(plan.stages[1].image.tag, "stage-tools-cache-abc");
            assert_eq!(
                plan.image,
                ImageBuild {
                    image: image(&format!("{REPO}:cache-abc"), "cache-abc", "branch-feature-x"),
                    cache_from: strings(&[
                        "r:5000/t/b:stage-deps-branch-feature-x",
                        "r:5000/t/b:stage-deps-branch-main",
                        "r:5000/t/b:stage-tools-branch-feature-x",
                        "r:5000/t/b:stage-tools-branch-main",
                        "r:5000/t/b:branch-feature-x",
                        "r:5000/t/b:branch-main",
                    ]),
                    cache_refs_from: strings(&["r:5000/t/b:buildcache-branch-feature-x", "r:5000/t/b:buildcache-branch-main"]),
                    cache_ref_to: "r:5000/t/b:buildcache-branch-feature-x".into(),
                }
            );
        }
    }

    #[test]
    fn buildx_builds_no_stage_on_its_own() {
        let plan = plan(&stages("FROM a AS deps\nFROM deps AS final\n"), BuilderKind::Buildx, REPO, "cache-abc", "dev", "main");
        assert!(plan.stages.is_empty());
        assert_eq!(plan.image.cache_from, strings(&["r:5000/t/b:branch-dev", "r:5000/t/b:branch-main"]));
        assert_eq!(plan.image.cache_refs_from, strings(&["r:5000/t/b:buildcache-branch-dev", "r:5000/t/b:buildcache-branch-main"]));
        assert_eq!(plan.image.cache_ref_to, "r:5000/t/b:buildcache-branch-dev");
    }

    #[test]
    fn a_build_of_the_main_branch_reads_its_caches_once() {
        let plan = plan(&stages("FROM a AS deps\nFROM deps\n"), BuilderKind::BuildKit, REPO, "cache-abc", "main", "main");
        assert_eq!(plan.stages[0].cache_from, strings(&["r:5000/t/b:stage-deps-branch-main"]));
        assert_eq!(
            plan.image.cache_from,
            strings(&["r:5000/t/b:stage-deps-branch-main", "r:5000/t/b:branch-main"])
        );
        assert_eq!(plan.image.cache_refs_from, strings(&["r:5000/t/b:buildcache-branch-main"]));
        assert_eq!(plan.image.image.branch_tag, "branch-main");
    }

    #[test]
    fn a_dockerfile_without_named_stages_builds_only_the_image() {
        for text in ["FROM a\nCOPY x /x\n", "FROM a\nFROM b\n", "FROM a AS only\n", ""] {
            let plan = plan(&stages(text), BuilderKind::Classic, REPO, "cache-abc", "main", "main");
            assert!(plan.stages.is_empty(), "{text:?}");
            assert_eq!(plan.image.cache_from, strings(&["r:5000/t/b:branch-main"]));
            assert_eq!(plan.image.image.reference, "r:5000/t/b:cache-abc");
        }
    }
}
