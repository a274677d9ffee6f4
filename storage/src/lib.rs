//! keel-storage: the Raft log and the replicated state machine on RocksDB.
//!
//! This crate owns everything keel keeps on disk: the log (`log_store`), the
//! state machine (`state_machine`, whose logic is the pure functions in
//! `model`), and snapshots (`snapshot`). It knows nothing of HTTP, JSON APIs
//! or the network: it is driven by openraft and read by the API layer through
//! [`StateReader`].
//!
//! Data directory layout:
//! - `log/`: RocksDB with the Raft log, vote, purge marker and cluster name;
//! - `sm/CURRENT` and `sm/gen-<n>/`: the state machine generations;
//! - `snapshots/`: the newest snapshot file and `incoming/` transfers.
//!
//! Everything that touches RocksDB is behind the default `rocksdb` feature;
//! without it the crate is only its pure parts (apply logic, types, codecs,
//! the snapshot file format), which the fuzz targets in `fuzz/` build.

pub mod codec;
pub mod failpoints;
pub mod fsutil;
pub mod hooks;
#[cfg(feature = "rocksdb")]
pub mod log_store;
pub mod model;
pub mod snapshot;
#[cfg(feature = "rocksdb")]
pub mod state_machine;
pub mod types;
pub mod wal_check;

#[cfg(feature = "rocksdb")]
use std::io;
#[cfg(feature = "rocksdb")]
use std::path::Path;
#[cfg(feature = "rocksdb")]
use std::sync::Arc;

pub use hooks::NoHooks;
pub use hooks::StorageHooks;
#[cfg(feature = "rocksdb")]
pub use log_store::LogStore;
pub use snapshot::SnapshotFile;
#[cfg(feature = "rocksdb")]
pub use state_machine::StateHash;
#[cfg(feature = "rocksdb")]
pub use state_machine::StateMachineStore;
#[cfg(feature = "rocksdb")]
pub use state_machine::StateReader;
pub use types::KeelNode;
pub use types::NodeId;
pub use types::TypeConfig;

/// Errors opening a data directory.
#[cfg(feature = "rocksdb")]
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory was created by another cluster.
    #[error(
        "data directory {dir} belongs to cluster {found:?}, but this node is configured for cluster {expected:?}; \
         point it at an empty data directory or fix `cluster_name`"
    )]
    ClusterMismatch {
        /// The data directory.
        dir: String,
        /// The cluster name recorded in it.
        found: String,
        /// The configured cluster name.
        expected: String,
    },
    /// The data directory was written in a data layout this build does not
    /// know: by a newer keel, so this is a downgrade.
    #[error(
        "data directory {dir} has data layout {found}, written by a newer keel; this build reads layout \
         {supported}. Run a build that reads layout {found}, or restore a snapshot into an empty data directory"
    )]
    NewerLayout {
        /// The data directory.
        dir: String,
        /// The layout recorded in it.
        found: u32,
        /// The newest layout this build reads.
        supported: u32,
    },
    /// An I/O or RocksDB failure.
    #[error("opening data directory {dir}: {source}")]
    Io {
        /// The data directory.
        dir: String,
        /// The cause.
        source: io::Error,
    },
}

/// The stores of one node.
#[cfg(feature = "rocksdb")]
pub struct Storage {
    /// The Raft log.
    pub log: LogStore,
    /// The state machine.
    pub state_machine: StateMachineStore,
    /// Read access to the applied state.
    pub reader: StateReader,
}

/// The layout of a data directory (the log's and the state machine's column
/// families, keys and encodings) that this build writes and reads. A change
/// that an older build would misread raises it; a build refuses a directory
/// with a newer layout instead of misreading it, so a downgrade fails at
/// start with a clear error ([`OpenError::NewerLayout`]).
pub const DATA_LAYOUT: u32 = 1;

/// Opens (creating if needed, with mode 0700) the data directory of a node of
/// cluster `cluster_name`. Refuses a directory recorded for another cluster,
/// or written in a newer data layout ([`DATA_LAYOUT`]).
#[cfg(feature = "rocksdb")]
pub async fn open(data_dir: &Path, cluster_name: &str, hooks: Arc<dyn StorageHooks>) -> Result<Storage, OpenError> {
    let io_err = |source| OpenError::Io {
        dir: data_dir.display().to_string(),
        source,
    };
    fsutil::create_private_dir(data_dir).map_err(io_err)?;
    let log = LogStore::open(&data_dir.join("log"), hooks.clone()).map_err(io_err)?;
    match log.cluster_name().map_err(io_err)? {
        Some(found) if found != cluster_name => {
            return Err(OpenError::ClusterMismatch {
                dir: data_dir.display().to_string(),
                found,
                expected: cluster_name.to_string(),
            });
        }
        Some(_) => {}
        None => log.set_cluster_name(cluster_name).await.map_err(io_err)?,
    }
    match log.data_layout().map_err(io_err)? {
        Some(found) if found > DATA_LAYOUT => {
            return Err(OpenError::NewerLayout {
                dir: data_dir.display().to_string(),
                found,
                supported: DATA_LAYOUT,
            });
        }
        Some(_) => {}
        // A new directory, or one written before the layout was recorded
        // (layout 1).
        None => log.set_data_layout(DATA_LAYOUT).await.map_err(io_err)?,
    }
    let state_machine = StateMachineStore::open(data_dir, cluster_name, hooks).map_err(io_err)?;
    let reader = state_machine.reader();
    Ok(Storage {
        log,
        state_machine,
        reader,
    })
}
