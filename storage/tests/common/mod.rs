//! Log entries, a fresh state machine and a flushed append, for the
//! storage tests (each test file uses some of them).
#![allow(dead_code)]

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

/// Appends `entries` to `log` in one call and waits (at most 60 s) for the
/// flush to be reported.
pub async fn append_and_wait(log: &mut keel_storage::LogStore, entries: Vec<Entry>) {
    use openraft::storage::IOFlushed;
    use openraft::storage::RaftLogStorage;
    use openraft::type_config::TypeConfigExt;
    let (tx, rx) = keel_storage::TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.expect("append");
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(60), rx)
        .await
        .expect("the flush is reported");
    assert!(matches!(flushed, Ok(Ok(()))), "flushed: {flushed:?}");
}
