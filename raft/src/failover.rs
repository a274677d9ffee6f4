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
//!
//! Unless that request lost on the log: a voter whose log is longer than a
//! fast-failover candidate's refuses it without changing its vote (Raft's
//! up-to-date rule), and the candidate cannot win. The ranks up to and
//! including the refused one are then spent, so the refusing voter counts
//! its wait from the refusal as if the rank after the refused one were
//! first ([`wait_ranks`]): the next survivor in line campaigns at once
//! instead of waiting out its stagger while nobody else will. Voters with
//! the same longer log come after it in the same order, so they still
//! campaign one at a time. The rule only ever shortens a wait; who may win
//! is unchanged.
//!
//! A leader whose process is started again at once (a supervisor
//! restarting it) defeats the probe: its port accepts again before the
//! followers look, so they wait out their lease, some three election
//! timeouts of failed writes. The restarted process does not take its old
//! term back (a stale read hazard, see `enable_leader_restore` in the
//! node's Raft settings) but it knows it led: its stored vote is its own
//! committed one. It tells the other voters that this leadership passes
//! to itself, as a transfer, and campaigns at once
//! ([`campaign_after_restart`]). The followers hold their lease for that
//! very leader, which is the one giving it up. Every other rule applies:
//! if the cluster has moved to a newer term meanwhile, the followers
//! ignore the transfer and the pre-vote fails, disturbing no one.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use keel_storage::NodeId;
use keel_storage::types::KeelNode;
use keel_storage::types::Vote;
use openraft::ServerState;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::TransferLeaderRequest;
use openraft::type_config::async_runtime::watch::WatchReceiver;

use crate::Raft;
use crate::client::NetworkFactory;
use crate::client::PeerPool;

/// Heartbeat intervals without an append from the leader before its port
/// is probed.
pub const SILENT_HEARTBEATS: u32 = 3;
/// Heartbeat intervals each rank waits after the one before it.
pub const STAGGER_HEARTBEATS: u32 = 5;
/// Longest wait for the probe's TCP handshake. A dead process's port
/// refuses at once; anything slower is not proof of death.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// When this node last heard an append (heartbeat or entries) from a peer.
/// Only a leader sends appends, so this is the leader's last contact. It
/// also keeps the last fast-failover candidate this node refused for a
/// shorter log.
#[derive(Debug)]
pub struct LeaderContact {
    base: Instant,
    last_ms: AtomicU64,
    /// When (ms since `base`, 0 = never) a candidate was refused for its log.
    refused_ms: AtomicU64,
    refused_candidate: AtomicU64,
    refused: tokio::sync::Notify,
}

impl Default for LeaderContact {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            refused_ms: AtomicU64::new(0),
            refused_candidate: AtomicU64::new(0),
            refused: tokio::sync::Notify::new(),
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

    /// Records that this node refused `candidate`'s leadership-transfer
    /// election because the candidate's log is shorter than its own, and
    /// wakes a survivor waiting its turn.
    pub fn refused_shorter_log(&self, candidate: NodeId) {
        let ms = (self.base.elapsed().as_millis() as u64).max(1);
        self.refused_candidate.store(candidate, Ordering::Relaxed);
        self.refused_ms.store(ms, Ordering::Release);
        self.refused.notify_waiters();
    }

    /// The candidate refused for a shorter log since the leader's last
    /// append, and when.
    fn refused_since_contact(&self) -> Option<(NodeId, Instant)> {
        let at = self.refused_ms.load(Ordering::Acquire);
        if at == 0 || at <= self.last_ms.load(Ordering::Relaxed) {
            return None;
        }
        let candidate = self.refused_candidate.load(Ordering::Relaxed);
        Some((candidate, self.base + Duration::from_millis(at)))
    }
}

/// Staggers (of [`STAGGER_HEARTBEATS`]) a survivor of rank `rank` still
/// waits, counted from the refusal of the candidate of rank `refused` for
/// a shorter log: the ranks up to `refused` are spent. A refusal of a
/// candidate that does not rank before this node changes nothing.
pub fn wait_ranks(rank: u32, refused: Option<u32>) -> u32 {
    match refused {
        Some(r) if r < rank => rank - r - 1,
        _ => rank,
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
    voters: Vec<NodeId>,
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
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let rank = rank(me, leader, voters.iter().copied())?;
    Some(Following {
        leader,
        leader_addr,
        vote: m.vote,
        voters,
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
        if !wait_turn(&contact, &seen, heartbeat * STAGGER_HEARTBEATS, &mut stop).await {
            return;
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

/// Whether a node whose log stored `vote` led the cluster when its process
/// stopped: a committed vote for itself.
pub fn led_before_restart(vote: &Vote, me: NodeId) -> bool {
    vote.committed && vote.leader_id.node_id == me
}

/// Longest wait for a peer's answer to the restarted leader's transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts an election at once on a node that led the cluster under `led`
/// (its stored, committed vote) before its process was restarted (see the
/// module documentation).
///
/// First each other voter is told, through the peer RPC openraft's own
/// leadership transfer uses, that the leader of `led` hands its leadership
/// to this node. A voter whose vote is still `led` drops its lease for it;
/// any other voter ignores the message. Then this node campaigns, with a
/// pre-vote: if a quorum would not grant it (the cluster has moved on),
/// the term stays as it is. openraft's own transfer call does not fit here:
/// it compares the flushed vote, still the committed one, with the vote
/// openraft restarted the node with, which is not.
pub async fn campaign_after_restart(raft: &Raft, pool: PeerPool, me: NodeId, led: Vote) {
    let peers: Vec<(NodeId, KeelNode)> = {
        let m = raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|id| id == me) {
            return;
        }
        membership
            .voter_ids()
            .filter(|id| *id != me)
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
            .collect()
    };
    tracing::info!(vote = %led, "this node led before its restart: starting an election at once");
    let mut factory = NetworkFactory::new(pool);
    let req = TransferLeaderRequest::new(led, me, None);
    let mut calls = Vec::new();
    for (id, node) in &peers {
        let mut net = factory.new_client(*id, node).await;
        let req = req.clone();
        calls.push(async move {
            let r = net.transfer_leader(req, RPCOption::new(TRANSFER_TIMEOUT)).await;
            if let Err(e) = r {
                tracing::info!(peer = id, error = %e, "the transfer did not reach a peer");
            }
        });
    }
    futures::future::join_all(calls).await;
    if let Err(e) = raft.trigger().elect(true).await {
        tracing::warn!(error = %e, "could not start the election");
    }
}

/// Waits this survivor's turn: `rank` staggers from now, or fewer from
/// the refusal of a lower-ranked candidate for a shorter log (see
/// [`wait_ranks`]). False when `stop` turned true.
async fn wait_turn(
    contact: &LeaderContact,
    seen: &Following,
    stagger: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut until = Instant::now() + stagger * seen.rank;
    loop {
        // Registered before the check, so a refusal between the two wakes it.
        let refused = contact.refused.notified();
        tokio::pin!(refused);
        refused.as_mut().enable();
        if let Some((candidate, at)) = contact.refused_since_contact() {
            let r = rank(candidate, seen.leader, seen.voters.iter().copied());
            let left = wait_ranks(seen.rank, r);
            if left < seen.rank && at + stagger * left < until {
                until = at + stagger * left;
                tracing::info!(
                    candidate,
                    "refused a candidate with a shorter log: its turn and those before it are spent"
                );
            }
        }
        if Instant::now() >= until {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => return true,
            _ = &mut refused => {}
            _ = stop.wait_for(|s| *s) => return false,
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
    fn only_a_committed_vote_for_itself_means_it_led() {
        assert!(!led_before_restart(&Vote::new(4, 2), 2), "a candidate's own vote");
        let led = Vote::new_committed(4, 2);
        assert!(led_before_restart(&led, 2));
        assert!(!led_before_restart(&led, 3), "another node's leadership");
    }

    #[test]
    fn a_refused_lower_rank_spends_the_turns_up_to_its_own() {
        // Three voters, survivors ranked 0 and 1: rank 1 refusing rank 0
        // goes at once.
        assert_eq!(wait_ranks(1, Some(0)), 0);
        // Five voters: rank 3 refusing rank 1 waits one turn (rank 2's).
        assert_eq!(wait_ranks(3, Some(1)), 1);
        // No refusal, or a refused candidate that ranks after this node
        // (or is not a survivor): the full wait.
        assert_eq!(wait_ranks(2, None), 2);
        assert_eq!(wait_ranks(1, Some(2)), 1);
        assert_eq!(wait_ranks(0, Some(0)), 0);
    }

    #[test]
    fn a_refusal_counts_only_after_the_leaders_last_append() {
        let c = LeaderContact::default();
        assert!(c.refused_since_contact().is_none());
        std::thread::sleep(Duration::from_millis(5));
        c.refused_shorter_log(2);
        let (candidate, _) = c.refused_since_contact().expect("refusal after the last append");
        assert_eq!(candidate, 2);
        // The leader (a live one) is heard from again: the refusal is old.
        std::thread::sleep(Duration::from_millis(5));
        c.touch();
        assert!(c.refused_since_contact().is_none());
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
