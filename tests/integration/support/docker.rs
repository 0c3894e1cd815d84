//! Docker on this machine, for the tests that build: a guard that removes what a test's
//! builds left behind, and content unique to one run (BuildKit's cache is machine-wide).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::services::Registry;

pub const BUSYBOX: &str = "/bin/busybox";

/// Debian's arm64 busybox, unpacked by `make test` (scripts/fetch-arm64-busybox) and never
/// run here: a real arm64 binary for images built on this x86_64 machine.
pub fn arm64_busybox() -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/arm64/busybox");
    assert!(
        path.is_file(),
        "{} is missing: `make test` fetches it (scripts/fetch-arm64-busybox {})",
        path.display(),
        path.display()
    );
    path
}

/// What one test's builds leave in the engine, removed when dropped (also on failure):
/// every image tagged for (or pulled from) the test's registry, the images built on them,
/// and the containers of any of these. A container holds its image: a test job's
/// container outlives a killed `docker run` client (a host of the local farm that goes
/// away takes only its own processes along), and `docker rmi -f` cannot remove an image a
/// running container uses.
///
/// Untagged images (the classic builder's intermediates, an image whose tag moved on, what
/// a cancelled build had finished) name no registry, so nothing tells one test's from
/// another's while tests run in parallel: removing them at one test's end could pull an
/// image from under a build still running. They are removed when the last live guard
/// drops: every untagged image that appeared since the first of those guards was made.
///
/// Docker can also finish a build or pull after the client that asked for it died (a host
/// of the local farm killed mid-build): its image then appears after its test's guard
/// dropped. So when the last live guard drops, every image of a loopback registry (only
/// tests use those) that appeared since the first guard is removed too, in a few passes a
/// moment apart.
pub struct Images(String);

/// The guards alive in this process, and what images there were before the first.
struct Live {
    guards: usize,
    before: Vec<String>,
}

static LIVE: Mutex<Live> = Mutex::new(Live { guards: 0, before: Vec::new() });

/// How many times, and how far apart, the last guard looks for late images.
const LATE_PASSES: (usize, std::time::Duration) = (4, std::time::Duration::from_secs(2));

/// Every image id, tagged or not.
fn all_images() -> Vec<String> {
    docker_out(&["images", "-a", "-q", "--no-trunc"]).lines().map(String::from).collect()
}

/// Images of a loopback registry (`127.0.0.1:PORT/…`, `localhost:PORT/…`).
fn loopback_images() -> Vec<String> {
    docker_out(&["images", "--no-trunc", "--format", "{{.Repository}} {{.ID}}"])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(repo, _)| is_loopback(repo))
        .map(|(_, id)| id.to_string())
        .collect()
}

fn is_loopback(name: &str) -> bool {
    name.starts_with("127.0.0.1:") || name.starts_with("localhost:")
}

fn live() -> std::sync::MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

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
        let mut live = live();
        if live.guards == 0 {
            live.before = all_images();
        }
        live.guards += 1;
        Images(host.to_string())
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let prefix = format!("{}/", self.0);
        // A second look a moment later: a build whose client died may still be finishing.
        for pass in 0..2 {
            if pass > 0 {
                std::thread::sleep(LATE_PASSES.1);
            }
            let mine: Vec<String> = docker_out(&["images", "--no-trunc", "--format", "{{.Repository}} {{.ID}}"])
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(repo, _)| repo.starts_with(&prefix))
                .map(|(_, id)| id.to_string())
                .collect();
            remove(mine, |r| r.starts_with(&prefix));
        }
        // Held while removing, so that no test starts a build meanwhile.
        let mut live = live();
        live.guards -= 1;
        if live.guards == 0 {
            let before = std::mem::take(&mut live.before);
            remove(dangling().into_iter().filter(|id| !before.contains(id)).collect(), |_| false);
            for pass in 0..LATE_PASSES.0 {
                if pass > 0 {
                    std::thread::sleep(LATE_PASSES.1);
                }
                let late: Vec<String> = loopback_images().into_iter().filter(|id| !before.contains(id)).collect();
                remove(late, is_loopback);
            }
        }
    }
}

/// Removes the images `ids` and the images built on them, with the containers of any of
/// them. An image that also carries a name `ours` rejects is only untagged from the names
/// `ours` accepts, and one carrying only such names is left alone: it is someone else's.
fn remove(mut ids: Vec<String>, ours: impl Fn(&str) -> bool) {
    if ids.is_empty() {
        return;
    }
    // Id, parent, names (tags and digests) of every image.
    let all: Vec<String> = docker_out(&["images", "-a", "-q", "--no-trunc"]).lines().map(String::from).collect();
    let mut args = vec!["image", "inspect", "--format", "{{.Id}} {{.Parent}}{{range .RepoTags}} {{.}}{{end}}{{range .RepoDigests}} {{.}}{{end}}"];
    args.extend(all.iter().map(String::as_str));
    let images: Vec<(String, String, Vec<String>)> = docker_out(&args)
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.to_string(), f.next()?.to_string(), f.map(String::from).collect()))
        })
        .collect();
    let mut grew = true;
    while grew {
        grew = false;
        for (id, parent, _) in &images {
            if !parent.is_empty() && ids.contains(parent) && !ids.contains(id) {
                ids.push(id.clone());
                grew = true;
            }
        }
    }
    // (what to remove: an image id or one of its names, the image it frees)
    let mut targets: Vec<(String, String)> = Vec::new();
    for (id, _, names) in images.iter().filter(|(id, _, _)| ids.contains(id)) {
        if names.iter().all(|n| ours(n)) {
            targets.push((id.clone(), id.clone()));
        } else {
            targets.extend(names.iter().filter(|n| ours(n)).map(|n| (n.clone(), String::new())));
        }
    }
    let freed: Vec<&String> = targets.iter().map(|(_, id)| id).filter(|id| !id.is_empty()).collect();
    let containers: Vec<String> = docker_out(&["ps", "-a", "-q", "--no-trunc"]).lines().map(String::from).collect();
    if !containers.is_empty() && !freed.is_empty() {
        let mut args = vec!["container", "inspect", "--format", "{{.Id}} {{.Image}}"];
        args.extend(containers.iter().map(String::as_str));
        let doomed: Vec<String> = docker_out(&args)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, image)| freed.iter().any(|id| *id == image))
            .map(|(c, _)| c.to_string())
            .collect();
        if !doomed.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&doomed).output();
        }
    }
    // A parent cannot go before its children: retry what is left until nothing moves. An
    // image goes by its id (-f: all its names with it); a name is only untagged.
    let mut left: Vec<(String, bool)> = targets.into_iter().map(|(t, id)| (t, !id.is_empty())).collect();
    left.sort();
    left.dedup();
    while !left.is_empty() {
        let failed: Vec<(String, bool)> = left
            .iter()
            .filter(|(t, by_id)| {
                let args: &[&str] = if *by_id { &["rmi", "-f", t] } else { &["rmi", t] };
                Command::new("docker").args(args).output().map(|o| !o.status.success()).unwrap_or(true)
            })
            .cloned()
            .collect();
        if failed.len() == left.len() {
            break;
        }
        left = failed;
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

