//! keel: a Raft-replicated control plane for fleets of LLM inference gateways.
//!
//! This crate is the `keel` binary's library: configuration (`config`), the
//! wiring of a node (`node`), the public and admin HTTP API (`api`, over the
//! narrow [`cluster::Cluster`] handle), certificates (`cert`) and the
//! command-line tools (`cli`, `dev_cluster`). It is the only crate that
//! knows JSON and the public API; Raft transport lives in `keel-raft`,
//! everything on disk in `keel-storage`.

pub mod api;
pub mod bench;
pub mod cert;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control_api;
pub mod dev_cluster;
pub mod disk_check;
pub mod error;
pub mod expiry;
pub mod forwarder;
pub mod ha;
pub mod member_cli;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod observe;
pub mod openapi;
pub mod resource_cli;
pub mod snapshot_api;
pub mod snapshot_cli;
pub mod watch;

/// A file of the source tree, for unit tests that check one. The directory
/// comes from the environment `cargo test` runs them in, so a test binary
/// built from a checkout at another path (one target directory shared by
/// two checkouts) still reads this one; the path compiled in is the
/// fallback.
#[cfg(test)]
pub(crate) fn source_file(rel: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join(rel)
}
