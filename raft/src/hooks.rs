//! Observation points of the peer network, so the binary can export RPC
//! metrics without this crate knowing about Prometheus.

use std::time::Duration;

use keel_storage::NodeId;

/// Receives one call per peer RPC. Must be cheap.
pub trait NetHooks: Send + Sync + 'static {
    /// An RPC on `path` to `peer` finished after `elapsed`, successfully or not.
    fn rpc(&self, path: &'static str, peer: NodeId, elapsed: Duration, ok: bool) {
        let _ = (path, peer, elapsed, ok);
    }
    /// `bytes` of snapshot data were sent (`sent`) or received.
    fn snapshot_bytes(&self, sent: bool, bytes: u64) {
        let _ = (sent, bytes);
    }
}

/// Hooks that record nothing.
pub struct NoNetHooks;

impl NetHooks for NoNetHooks {}
