//! Log entries for the state machine's tests.

use keel_storage::model::Command;
use keel_storage::model::Request;
use keel_storage::types::Entry;
use keel_storage::types::LogId;
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;

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
