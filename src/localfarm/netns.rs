//! Linux network plumbing for the local farm: a bridge whose address is the emulated
//! subnet's gateway, and per-instance network namespaces attached to it by veth pairs.
//! Everything is done with iproute2 (`ip`), as root; names carry the farm's prefix so a
//! farm only ever removes what it made. Every call is async: the farm makes them from its
//! poll loop and control handlers, which must not stall while `ip` runs.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("failed to {what}: could not run `ip`")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {what}: {stderr}")]
    Ip { what: String, stderr: String },
}

async fn ip(args: &[&str], what: &str) -> Result<(), NetError> {
    let out = Command::new("ip").args(args).output().await.map_err(|source| NetError::Spawn {
        what: what.to_string(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The stdout of `ip args`, empty when it cannot run: callers only look for names in it.
async fn ip_stdout(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub async fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub async fn create_bridge(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    ip(&["link", "add", name, "type", "bridge"], &format!("create bridge {name}")).await?;
    ip(&["addr", "add", &format!("{gateway}/{prefix}"), "dev", name], &format!("address bridge {name}")).await?;
    ip(&["link", "set", name, "up"], &format!("bring up bridge {name}")).await
}

pub async fn delete_link(name: &str) {
    let _ = ip(&["link", "del", name], "delete link").await;
}

/// A namespace attached to `bridge` with `address/prefix` on its veth end, loopback up,
/// and the metadata address 169.254.169.254 on loopback (served by the farm).
pub async fn create_host(ns: &str, bridge: &str, veth: (&str, &str), address: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    let (outer, inner) = veth;
    ip(&["netns", "add", ns], &format!("create namespace {ns}")).await?;
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
        if let Err(e) = ip(args, what).await {
            delete_host(ns, outer).await;
            return Err(e);
        }
    }
    Ok(())
}

/// A namespace with nothing but loopback: what runs in it (the emulator) is reachable only
/// through sockets the farm makes inside it ([`connect_in`]).
pub async fn create_private(ns: &str) -> Result<(), NetError> {
    ip(&["netns", "add", ns], &format!("create namespace {ns}")).await?;
    if let Err(e) = ip(&["-n", ns, "link", "set", "lo", "up"], "bring up the namespace's loopback").await {
        delete_host(ns, "").await;
        return Err(e);
    }
    Ok(())
}

/// Kills every process in the namespace, then removes it (its veth goes with it).
pub async fn delete_host(ns: &str, outer_veth: &str) {
    for _ in 0..20 {
        let pids = pids_in(ns).await;
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) on processes inside a namespace this farm created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = ip(&["netns", "del", ns], "delete namespace").await;
    // Deleting the namespace takes its veth pair along; the outer end is removed here only
    // for a host that failed before its inner end was moved in.
    if !outer_veth.is_empty() && link_exists(outer_veth).await {
        delete_link(outer_veth).await;
    }
}

/// The processes living in a namespace.
pub async fn pids_in(ns: &str) -> Vec<i32> {
    ip_stdout(&["netns", "pids", ns]).await.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Namespaces whose names start with `prefix` (left over by a farm that was killed).
pub async fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    ip_stdout(&["netns", "list"])
        .await
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect()
}

/// Runs `make` on a thread of its own that has entered namespace `ns`: a socket made there
/// keeps that namespace for life. Not the runtime's threads or its blocking pool's: setns(2)
/// changes the calling thread for good, and this one ends right after.
async fn in_namespace<T: Send + 'static>(ns: &str, make: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let made = (|| {
            let f = std::fs::File::open(&path)?;
            // SAFETY: setns(2) on this short-lived thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            make()
        })();
        let _ = tx.send(made);
    });
    rx.await.unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
}

/// A connection to `addr` inside namespace `ns`, made within `timeout`.
pub async fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
    let s = in_namespace(ns, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    tokio::net::TcpStream::from_std(s)
}

/// A listening socket bound inside namespace `ns`. The socket keeps its namespace for
/// life, so the farm (in the root namespace) serves connections made inside the host.
pub async fn listen_in(ns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    in_namespace(ns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .await
}
