//! What the agent tells of this machine while it works: the `hello` (CPUs, memory, instance
//! id, builder), a heartbeat, and the IMDS watch for interruption notices. The background
//! tasks stop when their guards are dropped.

use std::time::Duration;

use tokio::sync::watch;

use super::docker::Docker;
use super::events::Events;
use super::imds::{Imds, Notice};
use crate::protocol::{Event, ImdsSettings};

/// Aborts its task when dropped.
pub struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects to IMDS if the job wants it, and says hello.
pub async fn hello(events: &Events, settings: &ImdsSettings, docker: Option<&Docker>) -> Option<Imds> {
    let mut imds = settings.enabled.then(|| Imds::new(settings.endpoint.clone()));
    let instance_id = match imds.as_mut() {
        Some(i) => i.instance_id().await,
        None => None,
    };
    events
        .emit(Event::Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_bytes: memory_bytes().await,
            instance_id,
            builder: docker.map(|d| d.kind.name().to_string()),
        })
        .await;
    imds
}

/// A `heartbeat` event every `every`, the first one `every` from now.
pub fn heartbeat(events: Events, every: Duration) -> AbortOnDrop<()> {
    AbortOnDrop(tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.tick().await;
        loop {
            t.tick().await;
            events.emit(Event::Heartbeat {}).await;
        }
    }))
}

/// Polls IMDS until a notice that stops the job, which goes to `notices`.
pub fn watch_notices(imds: Imds, settings: &ImdsSettings, events: Events, notices: watch::Sender<Option<Notice>>) -> AbortOnDrop<()> {
    AbortOnDrop(tokio::spawn(imds.watch(
        Duration::from_millis(settings.poll_interval_ms.max(100)),
        settings.stop_on_rebalance,
        events,
        notices,
    )))
}

async fn memory_bytes() -> u64 {
    tokio::fs::read_to_string("/proc/meminfo")
        .await
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
