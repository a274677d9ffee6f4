//! The log's reused write-ahead log files, with RocksDB itself, after a
//! process that was killed: every entry comes back, damage in the middle of
//! a file stops the open, and a last record cut short by a crash is dropped
//! with nothing else, and cut off its file, so that later starts do not
//! read it as damage.
//!
//! A clean close truncates a reused file to its records, so the files are
//! made by a child process (this test binary, running the ignored test
//! `fill_then_abort`) that aborts with the database open, as a killed node
//! leaves them.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use keel_storage::LogStore;
use keel_storage::NoHooks;
use keel_storage::TypeConfig;
use keel_storage::wal_check;
use openraft::RaftLogReader;
use openraft::entry::RaftEntry;
use openraft::storage::RaftLogStorage;
use openraft::testing::blank_ent;
use tempfile::TempDir;

/// Entries per append, and appends: some 6 MiB of write-ahead log, more
/// than `WAL_TOTAL_BYTES`, so that files are reused.
const BATCH: u64 = 500;
const APPENDS: u64 = 500;
const LAST: u64 = BATCH * APPENDS;

const DIR_VAR: &str = "KEEL_TEST_WAL_DIR";

/// Run by [`filled_and_aborted`] in a child process: appends `APPENDS`
/// batches of blank entries to the log in `$KEEL_TEST_WAL_DIR`, each
/// flushed, then aborts with the log open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by the other tests"]
async fn fill_then_abort() {
    let dir = PathBuf::from(std::env::var_os(DIR_VAR).expect("the log directory"));
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("open the log");
    for b in 0..APPENDS {
        append_flushed(&mut log, b * BATCH + 1..=(b + 1) * BATCH).await;
    }
    std::process::abort();
}

/// Appends blank entries at `indexes` in one batch and waits for the flush.
async fn append_flushed(log: &mut LogStore, indexes: std::ops::RangeInclusive<u64>) {
    let entries: Vec<keel_storage::types::Entry> = indexes.map(|i| blank_ent::<TypeConfig>(1, 1, i)).collect();
    common::append_and_wait(log, entries).await;
}

/// A log directory left by a process killed after `LAST` flushed entries.
fn filled_and_aborted() -> (TempDir, PathBuf) {
    let td = TempDir::new().expect("temp dir");
    let dir = td.path().join("log");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["fill_then_abort", "--exact", "--ignored", "--nocapture"])
        .env(DIR_VAR, &dir)
        .status()
        .expect("run the child");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "the child aborts after filling: {status:?}");
    (td, dir)
}

async fn indexes(log: &mut LogStore, upto: u64) -> Vec<u64> {
    let mut reader = log.get_log_reader().await;
    let got = reader.try_get_log_entries(1..upto + 1).await.expect("read");
    got.iter().map(|e| e.index()).collect()
}

/// The write-ahead log files of `dir`, oldest first, each with its scan.
fn wal_files(dir: &Path) -> Vec<(PathBuf, wal_check::FileScan)> {
    wal_check::wal_files(dir)
        .unwrap()
        .into_iter()
        .map(|(n, p)| {
            let s = wal_check::scan(&std::fs::read(&p).unwrap(), n);
            (p, s)
        })
        .collect()
}

/// Changes the last bytes of the last record in the newest file holding
/// records, as a crash in the middle of that write leaves a reused file.
/// Returns the file, its scan before, and its bytes and scan after.
fn tear_newest_record(dir: &Path) -> (PathBuf, wal_check::FileScan, Vec<u8>, wal_check::FileScan) {
    let (number, path, before) = wal_check::wal_files(dir)
        .unwrap()
        .into_iter()
        .rev()
        .map(|(n, p)| {
            let s = wal_check::scan(&std::fs::read(&p).unwrap(), n);
            (n, p, s)
        })
        .find(|(_, _, s)| s.records > 0)
        .expect("a file with records");
    let mut torn = std::fs::read(&path).unwrap();
    for b in &mut torn[before.end_at - 5..before.end_at] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &torn).unwrap();
    let after = wal_check::scan(&torn, number);
    (path, before, torn, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_comes_back_from_reused_log_files() {
    let (_td, dir) = filled_and_aborted();
    let last = LAST;
    let report = wal_check::check_dir(&dir).expect("no damage");
    assert!(
        report.recycled >= 1,
        "no write-ahead log file was reused: {report:?}, {:?}",
        wal_files(&dir)
    );
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    assert_eq!(indexes(&mut log, last).await, (1..=last).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_in_a_reused_file_stops_the_open() {
    let (_td, dir) = filled_and_aborted();
    // A reused file with at least three blocks of its own records: a byte
    // inside its second block's first record.
    const BLOCK: usize = 32 * 1024;
    let (path, _) = wal_files(&dir)
        .into_iter()
        .find(|(_, s)| s.recycled && s.end_at > 3 * BLOCK)
        .expect("a reused file with three blocks of records");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[BLOCK + 100] ^= 0x08;
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(&dir, Arc::new(NoHooks)).err().expect("the open fails");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("corrupt write-ahead log"), "{msg}");
    assert!(msg.contains(path.file_name().unwrap().to_str().unwrap()), "{msg}");
    // The files are as they were: nothing was replayed or removed.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_record_cut_short_loses_only_that_append() {
    let (_td, dir) = filled_and_aborted();
    let last = LAST;
    let (_, s, _, _) = tear_newest_record(&dir);
    assert!(s.recycled, "the newest file was reused: {s:?}");
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    let got = indexes(&mut log, last).await;
    let n = got.len() as u64;
    assert_eq!(got, (1..=n).collect::<Vec<_>>(), "the entries left are a prefix");
    assert!(
        n < last && n >= last - BATCH,
        "kept {n} of {last}: more than the last append was lost, or nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_does_not_stop_a_start_after_the_log_moved_on() {
    let (td, dir) = filled_and_aborted();
    let (path, _, torn, after) = tear_newest_record(&dir);
    let end = after.end_at;
    // A second name for the file, to see what the open leaves of it after
    // RocksDB has deleted the first.
    let kept_name = td.path().join("torn.log");
    std::fs::hard_link(&path, &kept_name).unwrap();
    // The start after the crash drops the torn write, cutting it off its
    // file, and the log goes on in a newer file.
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("reopen the log");
    assert_eq!(
        std::fs::read(&kept_name).unwrap(),
        torn[..end],
        "the torn record is cut off"
    );
    let kept = indexes(&mut log, LAST).await.len() as u64;
    append_flushed(&mut log, kept + 1..=kept + BATCH).await;
    drop(log);
    // A power loss then brings the old file back, as it was on disk before
    // RocksDB deleted or reused it (that deletion is not synced). Had it
    // stayed torn, it would read as damage next to the newer file.
    std::fs::write(&path, &torn).unwrap();
    let err = LogStore::open(&dir, Arc::new(NoHooks))
        .err()
        .expect("a torn file beside newer records");
    assert!(err.to_string().contains("newer log file"), "{err}");
    std::fs::write(&path, std::fs::read(&kept_name).unwrap()).unwrap();
    let mut log = LogStore::open(&dir, Arc::new(NoHooks)).expect("the cut file is clean");
    let got = indexes(&mut log, kept + BATCH).await;
    assert_eq!(got, (1..=kept + BATCH).collect::<Vec<_>>());
}
