//! Docker on this machine, for the tests that build: a guard that removes what a test's
//! builds left behind, and content unique to one run (BuildKit's cache is machine-wide).

use std::path::Path;
use std::process::{Command, Stdio};

use super::services::Registry;

pub const BUSYBOX: &str = "/bin/busybox";

/// Removes every local image of one test's registry when dropped, also on failure, with
/// their descendants and the dangling images that appeared meanwhile (the classic builder
/// keeps intermediate images as its cache).
pub struct Images(String, Vec<String>);

pub fn docker_out(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn dangling() -> Vec<String> {
    docker_out(&["images", "-a", "-q", "--no-trunc", "--filter", "dangling=true"])
        .lines()
        .map(String::from)
        .collect()
}

impl Images {
    pub fn of(registry: &Registry) -> Images {
        Images::for_host(&registry.host())
    }

    /// Images pushed to (or built for) the registry at `host`.
    pub fn for_host(host: &str) -> Images {
        Images(host.to_string(), dangling())
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let prefix = format!("{}/", self.0);
        let mut mine: Vec<String> = docker_out(&["images", "--no-trunc", "--format", "{{.Repository}} {{.ID}}"])
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(repo, _)| repo.starts_with(&prefix))
            .map(|(_, id)| id.to_string())
            .collect();
        mine.extend(dangling().into_iter().filter(|id| !self.1.contains(id)));
        if mine.is_empty() {
            return;
        }
        let all: Vec<String> = docker_out(&["images", "-a", "-q", "--no-trunc"]).lines().map(String::from).collect();
        let mut args = vec!["inspect", "--format", "{{.Id}} {{.Parent}}"];
        args.extend(all.iter().map(String::as_str));
        let parents: Vec<(String, String)> = docker_out(&args)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let mut grew = true;
        while grew {
            grew = false;
            for (id, parent) in &parents {
                if !parent.is_empty() && mine.contains(parent) && !mine.contains(id) {
                    mine.push(id.clone());
                    grew = true;
                }
            }
        }
        mine.sort();
        mine.dedup();
        // A parent cannot go before its children: retry what is left until nothing moves.
        for _ in 0..5 {
            let left: Vec<String> = mine
                .iter()
                .filter(|id| Command::new("docker").args(["rmi", "-f", id]).output().map(|o| !o.status.success()).unwrap_or(true))
                .cloned()
                .collect();
            if left.is_empty() || left.len() == mine.len() {
                break;
            }
            mine = left;
        }
    }
}

pub fn docker_required() {
    let ok = Command::new("docker").arg("info").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        ok.map(|s| s.success()).unwrap_or(false),
        "the Docker engine is required for agent tests (`docker info` failed)"
    );
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} is required: `make test` installs busybox-static");
}

/// Text no earlier build on this machine has seen: BuildKit's cache is machine-wide and
/// content-addressed, so a "cold" build must have content of its own.
pub fn unique() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{t}-{}", std::process::id())
}

