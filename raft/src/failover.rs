//! Fast failover when the leader's process is gone.
//!
//! Raft's usual path after a leader dies is slow by design: a follower
//! waits out the leader lease (openraft: `election_timeout_max`) and then a
//! randomized election timeout before it campaigns, and every voter refuses
//! votes while its own lease runs. That protects a healthy leader from
//! disruption when the network is merely slow or cut, where nobody can
//! tell a dead leader from a silent one.
//!
//! A crashed process is different: its host's kernel refuses connections
//! to the port it listened on. So each voter watches its leader's
//! heartbeats; after [`SILENT_HEARTBEATS`] heartbeat intervals with no
//! append from it, it tries a TCP connection to the leader's peer port.
//! Only a refused connection (`ECONNREFUSED`: nothing listens there) counts
//! as proof of death. A timeout, an unreachable network, or an accepted
//! connection (a paused process's socket still accepts) leaves the normal
//! path in charge.
//!
//! On proof, the follower starts an election marked as a leadership
//! transfer from the dead leader (`TransferLeaderRequest` addressed to
//! itself): voters grant it even though their lease still runs (Raft
//! dissertation §4.2.3; openraft's `leadership_transfer` vote flag). Every
//! other election rule (term, log up to date, one vote per term) applies
//! unchanged, so this changes when an election may start, never who may
//! win it. Reads are unaffected: keel's linearizable reads confirm
//! leadership with a quorum (ReadIndex), not with a lease.
//!
//! Split votes are avoided by rank: the surviving voters, ordered by id,
//! wait `rank ×` [`STAGGER_HEARTBEATS`] heartbeats before campaigning, and
//! campaign only if their vote is still the dead leader's. A vote request
//! from a lower rank changes that vote first.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use keel_storage::NodeId;
use openraft::ServerState;
use openraft::raft::TransferLeaderRequest;
use openraft::type_config::async_runtime::watch::WatchReceiver;

use crate::Raft;

/// Heartbeat intervals without an append from the leader before its port
/// is probed.
pub const SILENT_HEARTBEATS: u32 = 3;
/// Heartbeat intervals each rank waits after the one before it.
pub const STAGGER_HEARTBEATS: u32 = 5;
/// Longest wait for the probe's TCP handshake. A dead process's port
/// refuses at once; anything slower is not proof of death.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// When this node last heard an append (heartbeat or entries) from a peer.
/// Only a leader sends appends, so this is the leader's last contact.
#[derive(Debug)]
pub struct LeaderContact {
    base: Instant,
    last_ms: AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl LeaderContact {
    /// Records an append from the leader, now.
    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the last append (since start if none came yet).
    pub fn silent_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// What the probe of a silent leader's peer port found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Nothing listens there: the process is gone.
    Refused,
    /// Something accepted, or the answer did not come in time, or the
    /// network refused to route: not proof of anything.
    Inconclusive,
}

/// Tries one TCP connection to `addr` (`host:port`).
pub async fn probe(addr: &str) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        _ => Probe::Inconclusive,
    }
}

/// This node's place in the order in which surviving voters campaign:
/// 0 for the lowest id among the voters other than `leader`. `None` when
/// this node is not a voter (a learner never campaigns).
pub fn rank(me: NodeId, leader: NodeId, voters: impl IntoIterator<Item = NodeId>) -> Option<u32> {
    let mut survivors: Vec<NodeId> = voters.into_iter().filter(|v| *v != leader).collect();
    survivors.sort_unstable();
    survivors.iter().position(|v| *v == me).map(|p| p as u32)
}

/// A follower's view of its leader, taken from the Raft metrics.
struct Following {
    leader: NodeId,
    leader_addr: String,
    vote: <crate::TypeConfig as openraft::RaftTypeConfig>::Vote,
    rank: u32,
}

fn following(raft: &Raft, me: NodeId) -> Option<Following> {
    let m = raft.metrics();
    let m = m.borrow_watched();
    if m.state != ServerState::Follower {
        return None;
    }
    let leader = m.current_leader.filter(|l| *l != me)?;
    let membership = m.membership_config.membership();
    let leader_addr = membership.get_node(&leader)?.raft_addr.clone();
    let rank = rank(me, leader, membership.voter_ids())?;
    Some(Following {
        leader,
        leader_addr,
        vote: m.vote,
        rank,
    })
}

/// Runs until `stop` turns true: watches the leader and campaigns at once
/// when its process is proven gone (see the module documentation).
pub async fn watch_leader(
    raft: Raft,
    me: NodeId,
    contact: Arc<LeaderContact>,
    heartbeat: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let silent_limit = heartbeat * SILENT_HEARTBEATS;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A leader that is alive but slow to send heartbeats (a busy machine)
    // is probed once per silent period, not at every tick.
    let mut next_probe = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if contact.silent_for() < silent_limit || Instant::now() < next_probe {
            continue;
        }
        let Some(seen) = following(&raft, me) else { continue };
        if probe(&seen.leader_addr).await != Probe::Refused {
            next_probe = Instant::now() + silent_limit;
            continue;
        }
        tracing::info!(
            leader = seen.leader,
            addr = %seen.leader_addr,
            rank = seen.rank,
            "leader's peer port refuses connections: its process is gone"
        );
        let wait = heartbeat * STAGGER_HEARTBEATS * seen.rank;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Campaign only if nothing moved meanwhile: still a follower of the
        // same leader under the same vote (a lower rank's vote request, or a
        // new leader's append, changes that), and still silent.
        let Some(now) = following(&raft, me) else { continue };
        if now.leader != seen.leader || now.vote != seen.vote || contact.silent_for() < silent_limit {
            continue;
        }
        tracing::info!(
            leader = seen.leader,
            "starting an election at once, as a transfer from the dead leader"
        );
        let req = TransferLeaderRequest::new(seen.vote, me, None);
        if let Err(e) = raft.handle_transfer_leader(req).await {
            tracing::warn!(error = %e, "could not start the election");
            return;
        }
        // The usual timers take over if this campaign fails; give it time
        // to finish before looking again.
        tokio::select! {
            _ = tokio::time::sleep(heartbeat * (SILENT_HEARTBEATS + 1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survivors_campaign_in_id_order_and_learners_never() {
        assert_eq!(rank(2, 1, [1, 2, 3]), Some(0));
        assert_eq!(rank(3, 1, [1, 2, 3]), Some(1));
        assert_eq!(rank(1, 3, [3, 1, 2]), Some(0));
        assert_eq!(rank(5, 2, [1, 2, 3, 4, 5]), Some(3));
        assert_eq!(rank(4, 1, [1, 2, 3]), None);
    }

    #[test]
    fn contact_tracks_the_last_append() {
        let c = LeaderContact::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.silent_for() >= Duration::from_millis(30));
        c.touch();
        assert!(c.silent_for() < Duration::from_millis(30));
    }

    #[tokio::test]
    async fn only_a_refused_connection_is_proof_of_death() {
        // A port bound and listened on: accepted.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().to_string();
        assert_eq!(probe(&open).await, Probe::Inconclusive);
        // The same port after its listener is gone: refused.
        drop(l);
        assert_eq!(probe(&open).await, Probe::Refused);
        // A name that does not resolve is not proof.
        assert_eq!(probe("no-such-host.invalid:1").await, Probe::Inconclusive);
    }
}
