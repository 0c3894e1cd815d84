//! Linux network plumbing for the local farm: a bridge whose address is the emulated
//! subnet's gateway, and per-instance network namespaces attached to it by veth pairs.
//! Everything is done with iproute2 (`ip`), as root; names carry the farm's prefix so a
//! farm only ever removes what it made.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
#[error("failed to {what}: {message}")]
pub struct NetError {
    pub what: String,
    pub message: String,
}

fn ip(args: &[&str], what: &str) -> Result<(), NetError> {
    let out = Command::new("ip").args(args).output().map_err(|e| NetError {
        what: what.to_string(),
        message: format!("could not run `ip`: {e}"),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError {
            what: what.to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn create_bridge(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    ip(&["link", "add", name, "type", "bridge"], &format!("create bridge {name}"))?;
    ip(&["addr", "add", &format!("{gateway}/{prefix}"), "dev", name], &format!("address bridge {name}"))?;
    ip(&["link", "set", name, "up"], &format!("bring up bridge {name}"))
}

pub fn delete_link(name: &str) {
    let _ = ip(&["link", "del", name], "delete link");
}

/// A namespace attached to `bridge` with `address/prefix` on its veth end, loopback up,
/// and the metadata address 169.254.169.254 on loopback (served by the farm).
pub fn create_host(ns: &str, bridge: &str, veth: (&str, &str), address: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    let (outer, inner) = veth;
    ip(&["netns", "add", ns], &format!("create namespace {ns}"))?;
    let steps: [(&[&str], &str); 7] = [
        (&["link", "add", outer, "type", "veth", "peer", "name", inner], "create veth pair"),
        (&["link", "set", outer, "master", bridge, "up"], "attach veth to the bridge"),
        (&["link", "set", inner, "netns", ns], "move veth into the namespace"),
        (&["-n", ns, "addr", "add", &format!("{address}/{prefix}"), "dev", inner], "address the host"),
        (&["-n", ns, "link", "set", inner, "up"], "bring up the host's link"),
        (&["-n", ns, "link", "set", "lo", "up"], "bring up the host's loopback"),
        (&["-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"], "add the metadata address"),
    ];
    for (args, what) in steps {
        if let Err(e) = ip(args, what) {
            delete_host(ns, outer);
            return Err(e);
        }
    }
    Ok(())
}

/// Kills every process in the namespace, then removes it (its veth goes with it).
pub fn delete_host(ns: &str, outer_veth: &str) {
    for _ in 0..20 {
        let pids = pids_in(ns);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) on processes inside a namespace this farm created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = ip(&["netns", "del", ns], "delete namespace");
    // Deleting the namespace takes its veth pair along; the outer end is removed here only
    // for a host that failed before its inner end was moved in.
    if !outer_veth.is_empty() && link_exists(outer_veth) {
        delete_link(outer_veth);
    }
}

/// The processes living in a namespace.
pub fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Namespaces whose names start with `prefix` (left over by a farm that was killed).
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(prefix))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// A listening socket bound inside namespace `ns`. The socket keeps its namespace for
/// life, so the farm (in the root namespace) serves connections made inside the host.
pub fn listen_in(ns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path)?;
            // SAFETY: setns(2) on this short-lived thread only; it ends right after binding.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the binding thread panicked")))
    })
}
