//! The state machine on RocksDB: the watch history window (every log entry,
//! blank ones included, forgets the one index that leaves the window), and
//! entries at or below the applied index are never applied twice.

mod common;

use keel_storage::model::HISTORY_KEEP;
use keel_storage::model::history_key;
use keel_storage::types::Entry;
use openraft::entry::RaftEntry;
use openraft::storage::RaftStateMachine;

fn entry(index: u64) -> Entry {
    // Blank entries at two horizons whose records exist.
    if index == HISTORY_KEEP + 2 || index == HISTORY_KEEP + 3 {
        return Entry::new_blank(common::log_id(index));
    }
    common::put(index, &format!("kv/{index}"), b"v")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_window_is_exact_across_blank_entries() {
    let (_dir, mut sm) = common::state_machine("history").await;
    let last = HISTORY_KEEP + 4;
    let mut next = 1;
    while next <= last {
        let upto = (next + 999).min(last);
        let batch: Vec<Result<_, std::io::Error>> = (next..=upto).map(|i| Ok((entry(i), None))).collect();
        sm.apply(futures::stream::iter(batch)).await.expect("apply");
        next = upto + 1;
    }
    let reader = sm.reader();
    assert_eq!(reader.applied_index(), last);
    // Indexes 1..=4 left the window at KEEP+1..=KEEP+4; two of those
    // entries are blank and still forget theirs.
    for i in 1..=4 {
        assert!(reader.get(&history_key(i)).unwrap().is_none(), "history of {i} kept");
    }
    for i in [5, HISTORY_KEEP + 1, last] {
        assert!(reader.get(&history_key(i)).unwrap().is_some(), "history of {i} missing");
    }
    assert!(
        reader.get(&history_key(HISTORY_KEEP + 2)).unwrap().is_none(),
        "a blank entry has no history"
    );
    // A scan of one prefix stops at it, whatever follows.
    let found = reader.list("kv/1", 3).unwrap();
    assert_eq!(found.len(), 3);
    assert!(found.iter().all(|(k, _)| k.starts_with("kv/1")));
    assert!(reader.list("kv/x", 10).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_at_or_below_the_applied_index_is_not_applied_again() {
    let (_dir, mut sm) = common::state_machine("reapply").await;
    let put = |index: u64, value: &[u8]| common::put(index, "kv/k", value);
    let apply =
        |entries: Vec<Entry>| futures::stream::iter(entries.into_iter().map(|e| Ok::<_, std::io::Error>((e, None))));
    sm.apply(apply(vec![put(1, b"1"), put(2, b"2")])).await.expect("apply");
    // Replayed (2) and new (3) in one batch: only 3 takes effect.
    sm.apply(apply(vec![put(2, b"again"), put(3, b"3")]))
        .await
        .expect("apply");
    let reader = sm.reader();
    assert_eq!(reader.applied_index(), 3);
    let o = reader.get("kv/k").unwrap().expect("the object");
    assert_eq!((o.value.as_slice(), o.version, o.revision), (&b"3"[..], 3, 3));
    // Replayed alone: nothing changes.
    sm.apply(apply(vec![put(3, b"again")])).await.expect("apply");
    let o = sm.reader().get("kv/k").unwrap().expect("the object");
    assert_eq!((o.value.as_slice(), o.version), (&b"3"[..], 3));
}
