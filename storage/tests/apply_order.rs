//! The order of an apply on the event loop: a batch that no client waits
//! on (a follower's) gives way to the tasks already woken and to the tasks
//! they wake, so that a follower's answer to the leader goes out before the
//! apply of the commit that came with it. Without the yields the test fails:
//! the state machine's worker, woken first, would apply first.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use openraft::storage::RaftStateMachine;
use tokio::sync::Notify;

#[tokio::test(flavor = "current_thread")]
async fn a_batch_no_client_waits_on_is_applied_after_the_woken_tasks_and_the_ones_they_wake() {
    let (_dir, mut sm) = common::state_machine("order").await;
    let reader = sm.reader();
    let handler = Arc::new(Notify::new());
    let connection = Arc::new(Notify::new());
    // The applied index the last task in the chain saw.
    let seen = Arc::new(AtomicU64::new(u64::MAX));
    // The append's handler, woken before the apply starts, wakes the
    // connection task; the connection task stands for the answer's write.
    let first = tokio::spawn({
        let (handler, connection) = (handler.clone(), connection.clone());
        async move {
            handler.notified().await;
            connection.notify_one();
        }
    });
    let second = tokio::spawn({
        let (connection, seen, reader) = (connection.clone(), seen.clone(), reader.clone());
        async move {
            connection.notified().await;
            seen.store(reader.applied_index(), Ordering::SeqCst);
        }
    });
    // Both tasks park on their notifications.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // The state machine's worker is woken first, then the handler: the
    // order in which a follower's Raft core wakes them when an append that
    // carries a commit index is on disk.
    let entry = common::put(1, "kv/1", b"v");
    let apply = tokio::spawn(async move {
        sm.apply(futures::stream::iter([Ok::<_, std::io::Error>((entry, None))]))
            .await
            .expect("apply");
    });
    handler.notify_one();
    apply.await.expect("apply task");
    assert_eq!(reader.applied_index(), 1, "the batch was applied");
    first.await.expect("handler task");
    second.await.expect("connection task");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the chain of woken tasks ran before the apply (1: it ran after it)"
    );
}
