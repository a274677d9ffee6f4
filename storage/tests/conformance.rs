//! openraft's storage conformance suite, run against keel's RocksDB stores.

use std::sync::Arc;

use keel_storage::LogStore;
use keel_storage::NoHooks;
use keel_storage::StateMachineStore;
use keel_storage::TypeConfig;
use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let td = TempDir::new().expect("temp dir");
        let s = keel_storage::open(td.path(), "conformance", Arc::new(NoHooks))
            .await
            .expect("open storage");
        Ok((td, s.log, s.state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).await.expect("storage conformance suite");
}

/// The purge mark the replication client reads moves with every purge and
/// comes back, from the log's metadata, after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_mark_follows_purges_and_survives_a_restart() {
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::RaftLogStorage;

    let td = TempDir::new().expect("temp dir");
    let dir = td.path().join("log");
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("open the log");
    let mark = log.purged();
    assert_eq!(mark.last(), None, "a new log has purged nothing");
    let upto = keel_storage::types::LogId::new(LeaderId { term: 1, node_id: 1 }, 7);
    log.purge(upto).await.expect("purge");
    assert_eq!(mark.last(), Some(7));
    drop(log);
    let log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    assert_eq!(log.purged().last(), Some(7));
}
