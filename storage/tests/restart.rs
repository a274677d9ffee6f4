//! A node killed with entries applied that its state machine never made
//! durable. Applies write no RocksDB WAL (the Raft log holds the entries),
//! so after the kill the state machine is back at its last flush, and
//! openraft's start-up re-applies the committed tail from the log. The
//! stored applied index must match the stored data, also after a flush
//! RocksDB started by itself when the data's memtable filled (without
//! atomic flushes the data would be stored past the index, and the re-apply
//! would count those puts twice), and the re-apply must bring back every
//! committed entry exactly once.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use keel_storage::NoHooks;
use openraft::StorageHelper;
use openraft::entry::RaftEntry;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use tempfile::TempDir;

/// Entries applied and covered by the snapshot (flushed by its build).
const SNAPSHOT_AT: u64 = 12;
/// Entries committed (stored with the append after it) and applied: enough
/// 32 KiB values for RocksDB to flush the state machine's memtables by
/// itself on the way (at 64 MiB), a flush no snapshot asked for.
const COMMITTED: u64 = 3_000;
/// Entries in the log.
const LAST: u64 = 3_010;
/// Bytes per value.
const VALUE_SIZE: usize = 32 << 10;
/// Entries per log append and per applied batch.
const BATCH: u64 = 100;
/// Keys the puts cycle through, so that each key is written several times.
const KEYS: u64 = 7;

const DIR_VAR: &str = "KEEL_TEST_RESTART_DIR";

fn key(i: u64) -> String {
    format!("kv/{}", i % KEYS)
}

fn value(i: u64) -> Vec<u8> {
    let mut v = format!("value {i} ").into_bytes();
    v.resize(VALUE_SIZE, b'.');
    v
}

/// Entry `i`: a blank entry at 0, where a cluster's log starts, then puts.
fn entry(i: u64) -> keel_storage::types::Entry {
    match i {
        0 => keel_storage::types::Entry::new_blank(common::log_id(0)),
        _ => common::put(i, &key(i), &value(i)),
    }
}

/// Run by [`applied_and_aborted`] in a child process: logs `LAST` puts,
/// marks `COMMITTED` of them committed, applies them, building a snapshot
/// after `SNAPSHOT_AT`, then aborts with everything open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by the other tests"]
async fn apply_then_abort() {
    let dir = PathBuf::from(std::env::var_os(DIR_VAR).expect("the data directory"));
    let mut s = keel_storage::open(&dir, "restart", Arc::new(NoHooks))
        .await
        .expect("open storage");
    append_flushed(&mut s.log, 0..=COMMITTED).await;
    s.log
        .save_committed(Some(common::log_id(COMMITTED)))
        .await
        .expect("save committed");
    // The committed index is stored with the next append.
    append_flushed(&mut s.log, COMMITTED + 1..=LAST).await;
    apply(&mut s.state_machine, 0..=SNAPSHOT_AT).await;
    let snap = s
        .state_machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build a snapshot");
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(SNAPSHOT_AT));
    let after_snapshot = (0..1_000)
        .find_map(|_| data_tables(&dir))
        .expect("the manifest read after the snapshot");
    apply(&mut s.state_machine, SNAPSHOT_AT + 1..=COMMITTED).await;
    assert_eq!(s.reader.applied_index(), COMMITTED);
    // RocksDB flushes a full memtable in the background: wait until its
    // table file is in the manifest, so that the kill comes after a flush
    // nobody asked for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while data_tables(&dir).is_none_or(|n| n <= after_snapshot) {
        assert!(std::time::Instant::now() < deadline, "RocksDB never flushed by itself");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    std::process::abort();
}

/// Table files of the state machine's `data` column family that its
/// manifest holds (a flush in progress has none there yet): read from a
/// read-only open of the live generation, beside the open database. `None`
/// when the open lost a race with RocksDB removing a file it had listed.
fn data_tables(dir: &std::path::Path) -> Option<usize> {
    let db = rocksdb::DB::open_cf_for_read_only(
        &rocksdb::Options::default(),
        dir.join("sm/gen-0"),
        ["data", "meta"],
        false,
    )
    .ok()?;
    let files = db.live_files().ok()?;
    Some(files.iter().filter(|f| f.column_family_name == "data").count())
}

async fn append_flushed(log: &mut keel_storage::log_store::LogStore, indexes: std::ops::RangeInclusive<u64>) {
    for first in indexes.clone().step_by(BATCH as usize) {
        let last = (first + BATCH - 1).min(*indexes.end());
        common::append_and_wait(log, (first..=last).map(entry).collect()).await;
    }
}

async fn apply(sm: &mut keel_storage::state_machine::StateMachineStore, indexes: std::ops::RangeInclusive<u64>) {
    for first in indexes.clone().step_by(BATCH as usize) {
        let last = (first + BATCH - 1).min(*indexes.end());
        let entries: Vec<Result<_, std::io::Error>> = (first..=last).map(|i| Ok((entry(i), None))).collect();
        sm.apply(futures::stream::iter(entries)).await.expect("apply");
    }
}

/// A data directory left by a process killed after applying `COMMITTED`.
fn applied_and_aborted() -> TempDir {
    let td = TempDir::new().expect("temp dir");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["apply_then_abort", "--exact", "--ignored", "--nocapture"])
        .env(DIR_VAR, td.path())
        .status()
        .expect("run the child");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "the child aborts after applying: {status:?}");
    td
}

/// Asserts that the objects are exactly those of puts `1..=upto`.
fn assert_state_after(reader: &keel_storage::state_machine::StateReader, upto: u64) {
    for k in 0..KEYS {
        let writes: Vec<u64> = (1..=upto).filter(|i| i % KEYS == k).collect();
        let got = reader.get(&format!("kv/{k}")).expect("read");
        match writes.last() {
            None => assert!(got.is_none(), "kv/{k} exists before its first put: {got:?}"),
            Some(&last) => {
                let o = got.unwrap_or_else(|| panic!("kv/{k} is missing after {upto} entries"));
                assert_eq!(o.value, value(last), "kv/{k}");
                assert_eq!(o.revision, last, "kv/{k}");
                assert_eq!(o.create_revision, writes[0], "kv/{k}");
                assert_eq!(o.version, writes.len() as u64, "kv/{k}: each put counted once");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_re_applies_what_its_state_machine_had_not_flushed() {
    let td = applied_and_aborted();
    let mut s = keel_storage::open(td.path(), "restart", Arc::new(NoHooks))
        .await
        .expect("reopen storage");
    // Back at the state machine's last flush: the snapshot build's, or one
    // RocksDB made when a memtable filled. The applies after it were in
    // memory only, and the stored data agrees with the stored index.
    let (applied, _) = s.state_machine.applied_state().await.expect("applied state");
    let flushed = applied.map(|l| l.index).expect("an applied index");
    eprintln!("state machine stored up to entry {flushed} of {COMMITTED}");
    assert_state_after(&s.reader, flushed);
    assert!(
        flushed > SNAPSHOT_AT && flushed < COMMITTED,
        "RocksDB flushed by itself after the snapshot ({SNAPSHOT_AT}), not everything ({COMMITTED}): {flushed}"
    );
    // What a node does at start: re-apply the committed tail from the log.
    let state = StorageHelper::new(&mut s.log, &mut s.state_machine)
        .with_id(1)
        .get_initial_state()
        .await
        .expect("initial state");
    assert_eq!(state.local_committed().map(|l| l.index), Some(COMMITTED));
    assert_eq!(s.reader.applied_index(), COMMITTED);
    assert_state_after(&s.reader, COMMITTED);
    // Entries past the stored commit index stay in the log for the leader
    // to commit; nothing of them is applied.
    assert!(s.reader.get(&key(COMMITTED + 1)).unwrap().unwrap().revision <= COMMITTED);
}
