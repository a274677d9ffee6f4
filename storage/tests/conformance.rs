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
