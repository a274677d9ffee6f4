//! Observation points the stores report to, so the binary can export metrics
//! without this crate knowing about Prometheus or HTTP.

use std::time::Duration;

/// Receives timings and sizes from the stores. Implementations must be cheap:
/// they are called on the write path.
pub trait StorageHooks: Send + Sync + 'static {
    /// One fsync (a synced write or a WAL flush) took `elapsed`.
    fn fsync(&self, elapsed: Duration) {
        let _ = elapsed;
    }
    /// One group commit covered `appends` append calls.
    fn append_batch(&self, appends: usize) {
        let _ = appends;
    }
    /// A batch of `entries` log entries was applied in `elapsed`.
    fn apply(&self, entries: usize, elapsed: Duration) {
        let _ = (entries, elapsed);
    }
    /// A snapshot was built (`ok`) or failed, taking `elapsed`, `bytes` long.
    fn snapshot_built(&self, ok: bool, elapsed: Duration, bytes: u64) {
        let _ = (ok, elapsed, bytes);
    }
    /// A snapshot was installed (`ok`) or refused/failed, taking `elapsed`.
    fn snapshot_installed(&self, ok: bool, elapsed: Duration) {
        let _ = (ok, elapsed);
    }
}

/// Hooks that record nothing.
pub struct NoHooks;

impl StorageHooks for NoHooks {}
