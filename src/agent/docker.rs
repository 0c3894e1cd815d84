//! The Docker side of a build: which builder this machine has (detected, not assumed), the
//! commands for building with cache sources, pushing and running tests, and counting how
//! many layers a build took from cache.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use tokio::process::Command;

use crate::protocol::BuilderChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderKind {
    /// `docker buildx` with a builder that can export a registry cache (`mode=max`, every
    /// stage).
    Buildx,
    /// BuildKit through `docker build` with inline cache metadata in each pushed image.
    BuildKit,
    /// The classic builder: cache sources must be pulled first.
    Classic,
}

impl BuilderKind {
    pub fn name(self) -> &'static str {
        match self {
            BuilderKind::Buildx => "buildx",
            BuilderKind::BuildKit => "buildkit",
            BuilderKind::Classic => "classic",
        }
    }
}

/// A docker client and the builder it drives, plus the environment its commands get
/// (a private DOCKER_CONFIG with a credential helper when the job carries credentials).
#[derive(Debug, Clone)]
pub struct Docker {
    pub program: String,
    pub kind: BuilderKind,
    pub env: Vec<(String, String)>,
}

/// What the detection found out about one client.
#[derive(Debug)]
struct Client {
    program: String,
    major: u32,
    buildx: bool,
    registry_cache: bool,
}

async fn probe(program: &str) -> Option<Client> {
    let out = Command::new(program).arg("--version").output().await.ok()?;
    if !out.status.success() {
        return None;
    }
    // "Docker version 20.10.24+dfsg1, build 297e128"
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let buildx = Command::new(program)
        .args(["buildx", "version"])
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false);
    let registry_cache = buildx
        && Command::new(program)
            .args(["buildx", "inspect"])
            .output()
            .await
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                o.status.success()
                    && s.lines().any(|l| {
                        l.starts_with("Driver:") && !l.trim_end().ends_with(" docker")
                    })
            })
            .unwrap_or(false);
    Some(Client {
        program: program.to_string(),
        major,
        buildx,
        registry_cache,
    })
}

/// Why no builder can be used.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no docker client found (tried {})", tried.join(", "))]
    NoClient { tried: Vec<String> },
    #[error("no docker client here supports the `{choice:?}` builder")]
    Unsupported { choice: BuilderChoice },
}

/// Finds the best builder among the candidate clients: buildx with a registry-cache
/// builder, else BuildKit (a client older than 23 has it built in; newer ones need the
/// buildx plugin, even with the default `docker` driver), else classic.
pub async fn detect(choice: BuilderChoice, program: Option<&str>) -> Result<Docker, DetectError> {
    let candidates: Vec<String> = match program {
        Some(p) => vec![p.to_string()],
        None => {
            let mut c = vec!["docker".to_string()];
            if PathBuf::from("/usr/bin/docker").exists() {
                c.push("/usr/bin/docker".into());
            }
            c
        }
    };
    let mut clients = Vec::new();
    for c in &candidates {
        if let Some(found) = probe(c).await {
            clients.push(found);
        }
    }
    if clients.is_empty() {
        return Err(DetectError::NoClient { tried: candidates });
    }
    let pick = |kind: BuilderKind| -> Option<Docker> {
        clients
            .iter()
            .find(|c| match kind {
                BuilderKind::Buildx => c.registry_cache,
                BuilderKind::BuildKit => c.buildx || c.major < 23,
                BuilderKind::Classic => true,
            })
            .map(|c| Docker {
                program: c.program.clone(),
                kind,
                env: Vec::new(),
            })
    };
    let order: &[BuilderKind] = match choice {
        BuilderChoice::Auto => &[BuilderKind::Buildx, BuilderKind::BuildKit, BuilderKind::Classic],
        BuilderChoice::Buildx => &[BuilderKind::Buildx],
        BuilderChoice::Buildkit => &[BuilderKind::BuildKit],
        BuilderChoice::Classic => &[BuilderKind::Classic],
    };
    order
        .iter()
        .find_map(|&k| pick(k))
        .ok_or(DetectError::Unsupported { choice })
}

/// One `docker build` invocation.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    /// Full image reference to tag the result with.
    pub image: String,
    pub target: Option<String>,
    /// Images whose cache may be reused (inline cache or pulled, for the classic builder).
    pub cache_from: Vec<String>,
    /// Buildx registry cache refs to read, and the one to write.
    pub cache_refs_from: Vec<String>,
    pub cache_ref_to: Option<String>,
    pub build_args: BTreeMap<String, String>,
    /// `--platform`: one (`linux/arm64`), or several for one buildx build of an index.
    pub platforms: Vec<String>,
    /// Push from the build (buildx, several platforms: such an image cannot be loaded).
    pub push: bool,
}

impl Docker {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn build(&self, spec: &BuildSpec) -> Command {
        let mut c = self.command();
        match self.kind {
            BuilderKind::Buildx => {
                c.args(["buildx", "build", "--progress=plain", if spec.push { "--push" } else { "--load" }]);
                for r in &spec.cache_refs_from {
                    c.arg("--cache-from").arg(format!("type=registry,ref={r}"));
                }
                if let Some(r) = &spec.cache_ref_to {
                    c.arg("--cache-to").arg(format!("type=registry,ref={r},mode=max"));
                }
            }
            BuilderKind::BuildKit => {
                c.env("DOCKER_BUILDKIT", "1");
                c.args(["build", "--progress=plain", "--build-arg", "BUILDKIT_INLINE_CACHE=1"]);
            }
            BuilderKind::Classic => {
                c.env("DOCKER_BUILDKIT", "0");
                c.arg("build");
            }
        }
        if self.kind != BuilderKind::Buildx {
            for image in &spec.cache_from {
                c.arg("--cache-from").arg(image);
            }
        }
        for (k, v) in &spec.build_args {
            c.arg("--build-arg").arg(format!("{k}={v}"));
        }
        if let Some(t) = &spec.target {
            c.arg("--target").arg(t);
        }
        if !spec.platforms.is_empty() {
            c.arg("--platform").arg(spec.platforms.join(","));
        }
        c.arg("-f").arg(&spec.dockerfile).arg("-t").arg(&spec.image).arg(&spec.context);
        c
    }

    pub fn push(&self, image: &str) -> Command {
        let mut c = self.command();
        c.args(["push", image]);
        c
    }

    pub fn pull(&self, image: &str) -> Command {
        let mut c = self.command();
        c.args(["pull", image]);
        c
    }

    pub fn run(&self, image: &str, name: &str, command: &[String], cpus: Option<u32>) -> Command {
        let mut c = self.command();
        c.args(["run", "--rm", "--name", name]);
        if let Some(n) = cpus {
            c.arg("--cpus").arg(n.to_string());
        }
        c.arg(image).args(command);
        c
    }

    pub fn remove_container(&self, name: &str) -> Command {
        let mut c = self.command();
        c.args(["rm", "-f", name]);
        c
    }
}

/// Counts the layers a build produced and how many came from cache, from the builder's own
/// progress output. Several invocations (stage builds, then the final build) may feed one
/// counter; each layer counts once, and the invocation that first ran it decides whether it
/// came from cache (a later invocation always finds it cached locally).
#[derive(Debug, Default)]
pub struct LayerCount {
    /// Layer description → (cached, invocation that first saw it), in first-seen order.
    seen: Vec<(String, bool, u32)>,
    index: HashMap<String, usize>,
    invocation: u32,
    /// BuildKit vertex number → description, for the current invocation.
    vertices: HashMap<String, String>,
    /// The classic builder's current step.
    current: Option<String>,
}

impl LayerCount {
    /// Call between invocations: BuildKit numbers vertices afresh each time.
    pub fn next_invocation(&mut self) {
        self.invocation += 1;
        self.vertices.clear();
        self.current = None;
    }

    pub fn observe(&mut self, line: &str) {
        // BuildKit: "#6 [stage-1 2/3] COPY x /x", then maybe "#6 CACHED".
        if let Some(rest) = line.strip_prefix('#') {
            let Some((num, text)) = rest.split_once(' ') else { return };
            if text == "CACHED" {
                if let Some(desc) = self.vertices.get(num).cloned() {
                    self.mark_cached(&desc);
                }
            } else if let Some((label, what)) = text.strip_prefix('[').and_then(|t| t.split_once("] ")) {
                let is_layer = label.split_whitespace().last().is_some_and(|s| {
                    s.split_once('/')
                        .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
                });
                if is_layer && !what.starts_with("FROM ") && !self.vertices.contains_key(num) {
                    let desc = format!("{label}] {what}");
                    self.vertices.insert(num.to_string(), desc.clone());
                    self.add(desc);
                }
            }
            return;
        }
        // Classic: "Step 2/3 : COPY x /x", then " ---> Using cache".
        if let Some((_, what)) = line.strip_prefix("Step ").and_then(|r| r.split_once(" : ")) {
            if what.to_ascii_uppercase().starts_with("FROM ") {
                self.current = None;
            } else {
                self.current = Some(what.to_string());
                self.add(what.to_string());
            }
        } else if line.trim() == "---> Using cache" {
            if let Some(c) = self.current.clone() {
                self.mark_cached(&c);
            }
        }
    }

    fn add(&mut self, desc: String) {
        if !self.index.contains_key(&desc) {
            self.index.insert(desc.clone(), self.seen.len());
            self.seen.push((desc, false, self.invocation));
        }
    }

    fn mark_cached(&mut self, desc: &str) {
        if let Some(&i) = self.index.get(desc) {
            if self.seen[i].2 == self.invocation {
                self.seen[i].1 = true;
            }
        }
    }

    /// (cached, total)
    pub fn counts(&self) -> (u32, u32) {
        let cached = self.seen.iter().filter(|(_, c, _)| *c).count() as u32;
        (cached, self.seen.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_buildkit_layers_and_cache_hits() {
        let mut c = LayerCount::default();
        for l in [
            "#1 [internal] load build definition from Dockerfile",
            "#4 [1/3] FROM r/base:cache-1",
            "#5 [2/3] COPY a /a",
            "#5 CACHED",
            "#6 [3/3] RUN make",
            "#6 DONE 0.1s",
        ] {
            c.observe(l);
        }
        assert_eq!(c.counts(), (1, 2));
    }

    #[test]
    fn counts_classic_layers_and_cache_hits() {
        let mut c = LayerCount::default();
        for l in ["Step 1/3 : FROM scratch", "Step 2/3 : COPY a /a", " ---> Using cache", "Step 3/3 : COPY b /b", " ---> 1234"] {
            c.observe(l);
        }
        assert_eq!(c.counts(), (1, 2));
    }

    #[test]
    fn stage_builds_then_the_final_build_count_each_layer_once() {
        let mut c = LayerCount::default();
        // Stage build: the stage's layer really runs.
        c.observe("#5 [deps 1/1] COPY a /a");
        c.observe("#5 DONE");
        c.next_invocation();
        // Final build: the same layer now cached, plus the final stage's own.
        c.observe("#7 [deps 1/1] COPY a /a");
        c.observe("#7 CACHED");
        c.observe("#8 [stage-1 2/2] COPY b /b");
        assert_eq!(c.counts(), (0, 2));
    }
}
