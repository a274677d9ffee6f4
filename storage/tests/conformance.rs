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

/// The same suite with the log told its node id (999, a leader the suite
/// never names): every entry the suite appends then comes from another
/// leader, so the follower's paths are checked: a single entry synced
/// inside `append`, several entries group-committed.
struct FollowerBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for FollowerBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let (td, log, sm) = Builder.build().await?;
        Ok((td, log.with_local_node(999), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_for_a_follower() {
    Suite::test_all(FollowerBuilder)
        .await
        .expect("storage conformance suite");
}

/// Records the name of the thread that reports each fsync: the caller's
/// for a sync inside `append`, `keel-log-fsync` for a group commit.
#[derive(Default)]
struct FsyncThreads(std::sync::Mutex<Vec<String>>);

impl keel_storage::StorageHooks for FsyncThreads {
    fn fsync(&self, _elapsed: std::time::Duration) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.0.lock().unwrap().push(name);
    }
}

/// A single entry another leader created is reported flushed before
/// `append` returns, synced by the caller; several entries in one append
/// (a loaded leader's batch) and an entry this node created go to the
/// group-commit thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_single_entry_append_is_flushed_when_it_returns() {
    use openraft::entry::RaftEntry;
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::IOFlushed;
    use openraft::storage::RaftLogStorage;
    use openraft::testing::blank_ent;
    use openraft::type_config::TypeConfigExt;

    let td = TempDir::new().expect("temp dir");
    let threads = Arc::new(FsyncThreads::default());
    let mut log = LogStore::open(&td.path().join("log"), threads.clone())
        .expect("open the log")
        .with_local_node(1);
    let entry = |leader: u64, index: u64| {
        let e: keel_storage::types::Entry = blank_ent::<TypeConfig>(1, leader, index);
        assert_eq!(
            e.log_id().leader_id,
            LeaderId {
                term: 1,
                node_id: leader
            }
        );
        e
    };
    let quiet = || std::thread::sleep(keel_storage::log_store::IDLE_BEFORE_INLINE_SYNC * 2);
    let syncs = || threads.0.lock().unwrap().clone();

    quiet();
    let (tx, rx) = TypeConfig::oneshot();
    log.append([entry(2, 1)], IOFlushed::signal(tx)).await.expect("append");
    // A zero timeout still polls the receiver once: it must be ready now.
    let now = tokio::time::timeout(std::time::Duration::ZERO, rx).await;
    assert!(
        matches!(now, Ok(Ok(Ok(())))),
        "an entry from leader 2 is synced before append returns: {now:?}"
    );
    let me = std::thread::current().name().unwrap_or("?").to_string();
    assert_eq!(syncs(), vec![me.clone()], "synced by the caller");

    quiet();
    let (tx, rx) = TypeConfig::oneshot();
    log.append([entry(2, 2), entry(2, 3)], IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
        .await
        .expect("the group-commit thread reports the flush");
    assert!(matches!(flushed, Ok(Ok(()))), "two entries flushed: {flushed:?}");
    assert_eq!(
        syncs(),
        vec![me.clone(), "keel-log-fsync".to_string()],
        "an append of two entries is group-committed"
    );

    quiet();
    let (tx, rx) = TypeConfig::oneshot();
    log.append([entry(1, 4)], IOFlushed::signal(tx)).await.expect("append");
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
        .await
        .expect("the group-commit thread reports the flush");
    assert!(matches!(flushed, Ok(Ok(()))), "own entry flushed: {flushed:?}");
    assert_eq!(syncs().last().map(String::as_str), Some("keel-log-fsync"));

    let mut reader = log.get_log_reader().await;
    use openraft::RaftLogReader;
    let read = reader.try_get_log_entries(1..5).await.expect("read back");
    assert_eq!(read.iter().map(|e| e.index()).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
}

/// Appends blank entries of `term` at `indexes` as this node's own (the
/// group-commit path) and waits until they are reported flushed.
async fn append_flushed(log: &mut LogStore, term: u64, indexes: std::ops::Range<u64>) {
    use openraft::storage::IOFlushed;
    use openraft::storage::RaftLogStorage;
    use openraft::testing::blank_ent;
    use openraft::type_config::TypeConfigExt;

    let (tx, rx) = TypeConfig::oneshot();
    let entries: Vec<keel_storage::types::Entry> = indexes.map(|i| blank_ent::<TypeConfig>(term, 1, i)).collect();
    log.append(entries, IOFlushed::signal(tx)).await.expect("append");
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
        .await
        .expect("the group-commit thread reports the flush");
    assert!(matches!(flushed, Ok(Ok(()))), "flushed: {flushed:?}");
}

/// The commit index is written with the next append, not on its own: read
/// back at once it is the newest, and after a restart it is the newest one
/// an append carried (never one past the log's end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_index_rides_with_the_next_append() {
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::RaftLogStorage;

    let td = TempDir::new().expect("temp dir");
    let dir = td.path().join("log");
    let id = |index: u64| keel_storage::types::LogId::new(LeaderId { term: 1, node_id: 1 }, index);
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("open the log");
    append_flushed(&mut log, 1, 1..2).await;
    append_flushed(&mut log, 1, 2..3).await;
    log.save_committed(Some(id(1))).await.expect("save committed");
    log.save_committed(Some(id(2))).await.expect("save committed");
    log.save_committed(Some(id(1)))
        .await
        .expect("an older commit index is ignored");
    assert_eq!(log.read_committed().await.expect("read"), Some(id(2)));
    drop(log);

    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    assert_eq!(
        log.read_committed().await.expect("read"),
        None,
        "no append carried the commit index yet"
    );
    log.save_committed(Some(id(2))).await.expect("save committed");
    append_flushed(&mut log, 1, 3..4).await;
    log.save_committed(Some(id(3))).await.expect("save committed");
    drop(log);

    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    assert_eq!(log.read_committed().await.expect("read"), Some(id(2)));
}

/// Reads answered from the recently appended entries agree with the
/// database's after appends, a truncation, a re-append and a purge: the
/// same reads after a restart (nothing held in memory) give the same entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_entries_read_the_same_as_the_database() {
    use openraft::RaftLogReader;
    use openraft::entry::RaftEntry;
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::RaftLogStorage;

    let td = TempDir::new().expect("temp dir");
    let dir = td.path().join("log");
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("open the log");
    let id = |term: u64, index: u64| keel_storage::types::LogId::new(LeaderId { term, node_id: 1 }, index);
    append_flushed(&mut log, 1, 1..6).await;
    log.truncate_after(Some(id(1, 3))).await.expect("truncate");
    // Between the truncation and the next append, the cut entries are gone
    // from memory as from disk.
    let cut = log
        .get_log_reader()
        .await
        .try_get_log_entries(1..6)
        .await
        .expect("read");
    assert_eq!(cut.iter().map(|e| e.index()).collect::<Vec<_>>(), vec![1, 2, 3]);
    append_flushed(&mut log, 2, 4..9).await;
    log.purge(id(1, 2)).await.expect("purge");

    let ranges = [3..9, 3..4, 5..9, 8..9, 1..9, 3..10, 9..12, 4..4];
    let read_all = async |log: &mut LogStore| {
        let mut reader = log.get_log_reader().await;
        let mut out = Vec::new();
        for r in ranges.clone() {
            let got = reader.try_get_log_entries(r.clone()).await.expect("read");
            out.push(
                got.iter()
                    .map(|e| (e.log_id().leader_id.term, e.index()))
                    .collect::<Vec<_>>(),
            );
        }
        out
    };
    let warm = read_all(&mut log).await;
    assert_eq!(warm[0], vec![(1, 3), (2, 4), (2, 5), (2, 6), (2, 7), (2, 8)]);
    assert!(warm[6].is_empty() && warm[7].is_empty());
    drop(log);
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    assert_eq!(read_all(&mut log).await, warm);
}
