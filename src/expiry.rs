//! The leader's expiry sweeper: when a worker lease, a session affinity or
//! an idempotency record has run out on the leader's clock, it proposes one
//! `Expire` command. The command carries the leader's time, so every replica
//! removes exactly the same objects.

use std::time::Duration;

use keel_storage::model::Command;
use keel_storage::model::IDEM_PREFIX;
use keel_storage::model::IDEM_TTL_MS;
use keel_storage::model::control;
use keel_storage::model::from_json;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::cluster::now_ms;

/// True when something in the local state is due to expire at `now`.
fn due(cluster: &Cluster, now: u64) -> std::io::Result<bool> {
    let r = cluster.reader();
    for (_, o) in r.list(control::WORKERS, usize::MAX)? {
        let w: control::Worker = from_json(&o.value)?;
        if w.lease_expires_ms.is_some_and(|t| t <= now) {
            return Ok(true);
        }
    }
    for (_, o) in r.list(control::AFFINITY, usize::MAX)? {
        let a: control::Affinity = from_json(&o.value)?;
        if a.expires_ms <= now {
            return Ok(true);
        }
    }
    for (_, o) in r.list(IDEM_PREFIX, 64)? {
        let v: serde_json::Value = from_json(&o.value)?;
        if v["time_ms"]
            .as_u64()
            .is_some_and(|t| t.saturating_add(IDEM_TTL_MS) <= now)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs until `stop` turns true.
pub async fn run(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let leader = cluster.raft().metrics().borrow_watched().current_leader == Some(cluster.node_id());
        if !leader {
            continue;
        }
        match due(&cluster, now_ms()) {
            Ok(true) => {
                if let Err(e) = cluster.propose(Command::Expire, None).await {
                    tracing::debug!(error = %e.message, "expiry sweep not committed; will retry");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "expiry sweep could not read state"),
        }
    }
}
