//! The data layout record: a new directory gets this build's layout, a
//! directory from before the record existed is taken as layout 1, and a
//! directory of a newer layout (a downgrade) is refused by name instead of
//! being misread.

use std::sync::Arc;

use keel_storage::DATA_LAYOUT;
use keel_storage::NoHooks;
use keel_storage::OpenError;
use keel_storage::log_store::LogStore;

async fn open(dir: &std::path::Path) -> Result<keel_storage::Storage, OpenError> {
    keel_storage::open(dir, "layout", Arc::new(NoHooks)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_directory_records_this_builds_layout() {
    let td = tempfile::tempdir().unwrap();
    let s = open(td.path()).await.expect("open a new directory");
    assert_eq!(s.log.data_layout().unwrap(), Some(DATA_LAYOUT));
    drop(s);
    let s = open(td.path()).await.expect("reopen");
    assert_eq!(s.log.data_layout().unwrap(), Some(DATA_LAYOUT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_without_the_record_is_layout_one() {
    let td = tempfile::tempdir().unwrap();
    // What a build from before the record wrote: the log with its cluster
    // name and nothing about the layout.
    let log = LogStore::open(&td.path().join("log"), Arc::new(NoHooks)).unwrap();
    log.set_cluster_name("layout").await.unwrap();
    assert_eq!(log.data_layout().unwrap(), None);
    drop(log);
    let s = open(td.path()).await.expect("open a directory of an older build");
    assert_eq!(s.log.data_layout().unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_a_newer_layout_is_refused() {
    let td = tempfile::tempdir().unwrap();
    let s = open(td.path()).await.expect("open a new directory");
    s.log.set_data_layout(DATA_LAYOUT + 1).await.unwrap();
    drop(s);
    let err = match open(td.path()).await {
        Ok(_) => panic!("a newer layout was opened"),
        Err(e) => e,
    };
    match &err {
        OpenError::NewerLayout { found, supported, .. } => {
            assert_eq!((*found, *supported), (DATA_LAYOUT + 1, DATA_LAYOUT));
        }
        other => panic!("expected NewerLayout, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("newer keel") && msg.contains(&format!("layout {}", DATA_LAYOUT + 1)),
        "{msg}"
    );
}
