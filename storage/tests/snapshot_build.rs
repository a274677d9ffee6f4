//! A snapshot that is built is handed to Raft as an open file, read later
//! (sent to a follower, say). A newer snapshot may be published the moment
//! this one is, and publishing removes the older files, so the build opens
//! its file before it publishes it. The test removes the published file at
//! that very moment (the failpoint `snap-build-published`): a build that
//! opened its file only after publishing it would fail here.
#![cfg(feature = "failpoints")]

mod common;

use openraft::storage::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_snapshot_stays_readable_when_a_newer_one_replaces_it_at_once() {
    let (td, mut sm) = common::state_machine("build").await;
    let entries: Vec<_> = (1..=20u64)
        .map(|i| Ok::<_, std::io::Error>((common::put(i, &format!("kv/{i}"), b"value"), None)))
        .collect();
    sm.apply(futures::stream::iter(entries)).await.expect("apply");
    let dir = td.path().join("snapshots");
    let removed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = removed.clone();
    keel_storage::failpoints::on_pass("snap-build-published", move || {
        for e in std::fs::read_dir(&dir).expect("the snapshot directory") {
            let p = e.expect("an entry").path();
            if p.extension().is_some_and(|x| x == "snap") {
                std::fs::remove_file(&p).expect("remove the published file");
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.expect("the build succeeds");
    assert_eq!(
        removed.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the point was passed"
    );
    assert!(!snap.snapshot.path.exists());
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(20));
    let (header, _) = keel_storage::snapshot::transfer::identify(&snap.snapshot.file).expect("still readable");
    assert_eq!(header.last_index, 20);
}
