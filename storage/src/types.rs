//! The Raft type configuration and the application types that travel in the log.
//!
//! The type configuration is declared here, not in `keel-raft`, because the state
//! machine must name concrete entry payloads; `keel-raft` re-exports it and owns
//! everything that goes on the wire.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

use crate::model::Request;
use crate::model::Response;

openraft::declare_raft_types!(
    /// keel's Raft type configuration: u64 node ids, [`KeelNode`] addresses,
    /// [`Request`] as the log payload and [`Response`] as the apply result.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = KeelNode,
);

/// Node id type used throughout keel.
pub type NodeId = u64;
/// A log id of keel's configuration.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote of keel's configuration.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// A log entry of keel's configuration.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A membership config with its log id, as the state machine stores it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata: last included log id and membership.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A membership config.
pub type Membership = openraft::Membership<NodeId, KeelNode>;

/// The addresses of one cluster member, as recorded in the replicated membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeelNode {
    /// Advertised `host:port` of the peer (Raft) port.
    pub raft_addr: String,
    /// Advertised `host:port` of the client API port.
    pub api_addr: String,
}

impl fmt::Display for KeelNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}
