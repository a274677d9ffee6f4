//! Log entries and a fresh state machine for the state machine's tests.

use std::sync::Arc;

use keel_storage::NoHooks;
use keel_storage::model::Command;
use keel_storage::model::Request;
use keel_storage::state_machine::StateMachineStore;
use keel_storage::types::Entry;
use keel_storage::types::LogId;
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use tempfile::TempDir;

/// A state machine on RocksDB in a new temporary directory of cluster
/// `name` (the directory goes when the `TempDir` is dropped).
pub async fn state_machine(name: &str) -> (TempDir, StateMachineStore) {
    let td = TempDir::new().expect("temp dir");
    let s = keel_storage::open(td.path(), name, Arc::new(NoHooks))
        .await
        .expect("open storage");
    (td, s.state_machine)
}

/// The log id of an entry of term 1, leader 1, at `index`.
pub fn log_id(index: u64) -> LogId {
    LogId::new(LeaderId { term: 1, node_id: 1 }, index)
}

/// An entry at `index` that puts `value` under `key`.
pub fn put(index: u64, key: &str, value: &[u8]) -> Entry {
    Entry::new_normal(
        log_id(index),
        Request {
            time_ms: 0,
            idempotency_key: None,
            command: Command::Put {
                key: key.to_string(),
                value: value.to_vec(),
                expect: None,
            },
        },
    )
}
