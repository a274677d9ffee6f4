//! The node as the API layer sees it: propose a command, make a read
//! linearizable, describe the cluster. Any node serves any request: a
//! follower forwards writes to the leader and asks it for a read index.
//!
//! Retries happen only where they cannot apply a write twice: when the
//! request never reached a leader, or a leader refused it before appending
//! (openraft's `ForwardToLeader`). A write whose outcome is unknown is
//! reported as such (503, `outcome_unknown`), never silently retried.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use keel_raft::Raft;
use keel_raft::client::PeerError;
use keel_raft::client::PeerPool;
use keel_raft::wire;
use keel_storage::StateReader;
use keel_storage::model::Command;
use keel_storage::model::Request;
use keel_storage::model::Response;
use openraft::ReadPolicy;
use openraft::ServerState;
use openraft::errors::ClientWriteError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use serde::Serialize;
use tokio::sync::watch;

use crate::error::ApiError;

/// Shared handle on the local node.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    raft: Raft,
    reader: StateReader,
    pool: PeerPool,
    forwarder: crate::forwarder::Forwarder,
    timeout: Duration,
    /// True once shutdown began: `/readyz` fails first.
    stopping: watch::Sender<bool>,
}

/// A member as `/status` reports it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MemberView {
    /// Node id.
    pub id: u64,
    /// `voter` or `learner`.
    pub role: String,
    /// Client API address.
    pub api_addr: String,
    /// Peer address.
    pub raft_addr: String,
}

/// The body of `GET /status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatusView {
    /// This node's id.
    pub node_id: u64,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader_id: Option<u64>,
    /// Index of the last log entry.
    pub last_log_index: u64,
    /// Index of the last committed entry known here.
    pub commit_index: u64,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Last index the newest snapshot covers (0: none yet).
    #[serde(default)]
    pub snapshot_index: u64,
    /// Last index purged from the log (0: none); entries up to it are only
    /// in the snapshot.
    #[serde(default)]
    pub purged_index: u64,
    /// Members of the current membership config.
    pub members: Vec<MemberView>,
}

/// Milliseconds since the Unix epoch on this node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Role name of an openraft server state.
pub fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Cluster {
    /// Wraps the node's parts.
    pub fn new(node_id: u64, raft: Raft, reader: StateReader, pool: PeerPool, timeout: Duration) -> Self {
        let (stopping, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                node_id,
                raft,
                reader,
                forwarder: crate::forwarder::Forwarder::start(pool.clone()),
                pool,
                timeout,
                stopping,
            }),
        }
    }

    /// The Raft node.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Read access to applied state.
    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Marks the node as shutting down (readiness fails from now on).
    pub fn begin_shutdown(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// True once shutdown began.
    pub fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    /// Resolves once shutdown began (e.g. `POST /ha/shutdown`).
    pub async fn shutdown_requested(&self) {
        let _ = self.inner.stopping.subscribe().wait_for(|s| *s).await;
    }

    /// Connections to the other nodes.
    pub fn pool(&self) -> &PeerPool {
        &self.inner.pool
    }

    /// The client request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Waits until some leader is known, up to `deadline`.
    async fn leader(&self, deadline: Instant) -> Result<u64, ApiError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let m = self
            .inner
            .raft
            .wait(Some(remaining))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|_| {
                ApiError::unavailable(
                    "no_leader",
                    format!(
                        "no leader elected within {} ms; retry later",
                        self.inner.timeout.as_millis()
                    ),
                )
            })?;
        Ok(m.current_leader.expect("waited for a leader"))
    }

    fn raft_addr_of(&self, id: u64) -> Option<String> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.raft_addr.clone())
    }

    /// Proposes `command` through the leader and returns the log index it
    /// was applied at and the state machine's response.
    pub async fn propose(
        &self,
        command: Command,
        idempotency_key: Option<String>,
    ) -> Result<(u64, Response), ApiError> {
        let res = self.propose_inner(command, idempotency_key).await;
        crate::metrics::get().proposal(&res);
        res
    }

    async fn propose_inner(
        &self,
        command: Command,
        idempotency_key: Option<String>,
    ) -> Result<(u64, Response), ApiError> {
        let req = Request {
            time_ms: now_ms(),
            idempotency_key,
            command,
        };
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            let leader = self.leader(deadline).await?;
            if leader == self.inner.node_id {
                let remaining = deadline.saturating_duration_since(Instant::now());
                // A leader cut off from its quorum would wait forever for the
                // commit; the deadline turns that into a clear 503.
                match tokio::time::timeout(remaining, self.inner.raft.client_write(req.clone())).await {
                    Err(_) => return Err(outcome_unknown("not committed before the request timeout")),
                    Ok(Ok(r)) => return Ok((r.log_id.index, r.data)),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                    Ok(Err(e)) => return Err(outcome_unknown(e)),
                }
            } else {
                // A node that knows the leader's id before it has applied
                // the membership naming its address, or whose leader was just
                // removed from the membership (it steps down soon), waits.
                if let Some(addr) = self.raft_addr_of(leader) {
                    match self.inner.forwarder.forward(leader, &addr, req.clone(), deadline).await {
                        Ok(wire::ForwardReply::Applied { index, response }) => return Ok((index, response)),
                        Ok(wire::ForwardReply::NotLeader { .. }) => {}
                        Ok(wire::ForwardReply::Failed(m)) => return Err(outcome_unknown(m)),
                        // Never sent: safe to try again.
                        Err(PeerError::Unreachable { .. }) => {}
                        Err(e @ PeerError::Failed { .. }) => return Err(outcome_unknown(e)),
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ApiError::unavailable(
                    "no_leader",
                    "the leader changed repeatedly and the write was not accepted; retry later",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns once local reads reflect every write acknowledged before this
    /// call (ReadIndex, through the leader when this node is a follower).
    pub async fn linearize(&self) -> Result<(), ApiError> {
        // A deliberately broken variant for the fault suite (failpoint
        // builds only): answer from local state without a read index, so
        // the suite can show that its checker catches stale reads.
        if keel_storage::failpoints::flag_point("read-skip-read-index").is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + self.inner.timeout;
        let too_slow = || ApiError::unavailable("read_timeout", "could not confirm a linearizable read in time");
        loop {
            let leader = self.leader(deadline).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if leader == self.inner.node_id {
                match tokio::time::timeout(remaining, self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await
                {
                    Err(_) => return Err(too_slow()),
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_)))) => {}
                    Ok(Err(e)) => return Err(ApiError::unavailable("no_quorum", e.to_string())),
                }
            } else if let Some(addr) = self.raft_addr_of(leader) {
                match self
                    .inner
                    .pool
                    .call(leader, &addr, wire::PATH_READ_INDEX, &(), remaining)
                    .await
                {
                    Ok(wire::ReadIndexReply::Ready { index }) => {
                        let mut w = self.inner.reader.watch_applied();
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        return match tokio::time::timeout(remaining, w.wait_for(|a| *a >= index)).await {
                            Ok(Ok(_)) => Ok(()),
                            _ => Err(too_slow()),
                        };
                    }
                    Ok(wire::ReadIndexReply::NotLeader { .. }) | Err(PeerError::Unreachable { .. }) => {}
                    Ok(wire::ReadIndexReply::Failed(m)) => return Err(ApiError::unavailable("no_quorum", m)),
                    Err(e) => return Err(ApiError::unavailable("leader_unreachable", e.to_string())),
                }
            }
            if Instant::now() >= deadline {
                return Err(too_slow());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node's view of itself and the cluster.
    pub fn status(&self) -> StatusView {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| MemberView {
                id: *id,
                role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                api_addr: n.api_addr.clone(),
                raft_addr: n.raft_addr.clone(),
            })
            .collect();
        StatusView {
            node_id: self.inner.node_id,
            role: role_name(m.state).into(),
            term: m.current_term,
            leader_id: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.local_committed.as_ref().map(|l| l.index).unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.as_ref().map(|l| l.index).unwrap_or(0),
            members,
        }
    }
}

fn outcome_unknown(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(
        "outcome_unknown",
        format!("the write may or may not have been applied (leadership changed or a peer failed mid-request): {e}"),
    )
}
