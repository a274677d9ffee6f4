//! keel-raft: Raft between keel nodes.
//!
//! This crate owns the peer protocol: the binary messages (`wire`), the
//! HTTP/2 + mutual-TLS transport on both ends (`client`, `server`), the
//! certificate identities that decide who may speak on the peer port
//! (`tls`), and the accept loop both ports share (`serve`). It re-exports
//! the Raft type configuration declared in `keel-storage`.
//!
//! It must never accept a Raft message from anything but a cluster node
//! whose certificate names the node id it claims.
//!
//! Without the default `transport` feature only `wire` and `hooks` are
//! built (no RocksDB, no HTTP, no TLS): that is what the fuzz targets use.

#[cfg(feature = "transport")]
pub mod client;
#[cfg(feature = "transport")]
pub mod failover;
pub mod hooks;
#[cfg(feature = "transport")]
pub mod serve;
#[cfg(feature = "transport")]
pub mod server;
#[cfg(feature = "transport")]
pub mod tls;
pub mod wire;

pub use keel_storage::KeelNode;
pub use keel_storage::NodeId;
pub use keel_storage::TypeConfig;

/// The Raft node type keel runs.
#[cfg(feature = "transport")]
pub type Raft = openraft::Raft<TypeConfig, keel_storage::StateMachineStore>;
