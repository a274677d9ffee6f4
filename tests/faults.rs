//! The fault-injection suite: real clusters, each node in its own network
//! namespace, recorded concurrent clients, faults, and a linearizability
//! check afterwards (see `tests/fault/`).
//!
//! Each scenario prints a `RESULT` line: operations checked, faults
//! injected, acknowledged writes lost and the verdict (also appended to
//! `$KEEL_FAULT_REPORT` when set). The default set is the bounded smoke set
//! run by `scripts/test.sh`; `KEEL_FAULTS=long` makes every scenario run
//! more rounds with longer faults.
//!
//! Fault durations are held with sleeps on purpose (a fault lasts as long
//! as the scenario says); every wait for the cluster polls a condition.
//! Needs root (network namespaces).

mod common;
mod fault;

use std::time::Duration;
use std::time::Instant;

use fault::run::Workload;
use fault::run::assert_clean;
use reqwest::Method;
use serde_json::json;

/// Holds a fault (or a quiet period) for `d`.
async fn hold(d: Duration) {
    tokio::time::sleep(d).await;
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if fault::long() { s * 3.0 } else { s })
}

fn rounds(n: usize) -> usize {
    if fault::long() { n * 4 } else { n }
}

/// Waits until the running nodes agree on a leader other than `old`;
/// returns it and how long it took.
async fn wait_new_leader(c: &common::TestCluster, old: u64) -> (u64, Duration) {
    let t = Instant::now();
    let l = c
        .wait_until_value(&format!("a leader other than {old}"), || async {
            let mut seen = None;
            for id in c.running() {
                let s = c.status(id).await?;
                let l = s.leader_id.filter(|&l| l != old)?;
                if seen.is_some_and(|x| x != l) {
                    return None;
                }
                seen = Some(l);
            }
            seen
        })
        .await;
    (l, t.elapsed())
}

/// Promotes learner `id` through the current leader, retrying while it
/// lags or leadership moves, within [`common::WAIT`].
async fn promote_when_caught_up(c: &common::TestCluster, id: u64) {
    let start = Instant::now();
    loop {
        let l = c.wait_leader().await;
        let r = c
            .admin_call(l, Method::POST, &format!("/admin/members/{id}/promote"), None)
            .await;
        if r.as_ref().is_ok_and(|r| r.status == 200) {
            return;
        }
        assert!(start.elapsed() < common::WAIT, "promoting {id}: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn follower_of(c: &common::TestCluster, leader: u64) -> u64 {
    *c.nodes.keys().find(|&&id| id != leader).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_of_the_leader_a_follower_and_every_node() {
    let nc = fault::start(3, &[], &[]);
    let c = &nc.c;
    let mut w = Workload::start(c, "crashes", &[1, 2, 3], 6).await;
    hold(secs(2.0)).await;
    for _ in 0..rounds(1) {
        let l = c.wait_leader().await;
        c.kill(l);
        w.fault(&format!("kill -9 leader {l}"));
        let (nl, took) = wait_new_leader(c, l).await;
        eprintln!(
            "[crashes] node {nl} leads {:.1} s after the leader was killed",
            took.as_secs_f64()
        );
        hold(secs(1.0)).await;
        c.spawn(l);
        let l = c.wait_leader().await;
        let f = follower_of(c, l);
        c.kill(f);
        w.fault(&format!("kill -9 follower {f}"));
        hold(secs(3.0)).await;
        c.spawn(f);
        hold(secs(2.0)).await;
        for id in 1..=3 {
            c.kill(id);
        }
        w.fault("kill -9 every node");
        hold(secs(1.0)).await;
        for id in 1..=3 {
            c.spawn(id);
        }
        c.wait_leader().await;
        hold(secs(2.0)).await;
    }
    let o = w.finish(c).await;
    assert_clean("crashes", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_paused_past_the_election_timeout() {
    let nc = fault::start(3, &[], &[]);
    let c = &nc.c;
    let mut w = Workload::start(c, "pause", &[1, 2, 3], 6).await;
    hold(secs(2.0)).await;
    for _ in 0..rounds(2) {
        let l = c.wait_leader().await;
        let pid = c.nodes[&l].pid().unwrap();
        common::signal(pid, nix::sys::signal::Signal::SIGSTOP);
        w.fault(&format!("SIGSTOP leader {l} (election timeout 1-2 s)"));
        hold(secs(5.0)).await;
        common::signal(pid, nix::sys::signal::Signal::SIGCONT);
        hold(secs(3.0)).await;
    }
    let o = w.finish(c).await;
    assert_clean("pause", &o);
}

/// Fast failover when the first survivor in line has the shorter log: it
/// campaigns first and must lose (the other survivor's log is longer and
/// refuses it). The refusing survivor then campaigns at once instead of
/// waiting out its turn (`raft/src/failover.rs`, `wait_ranks`).
///
/// The leader's appends to the first survivor are dropped (its peer port
/// only, so that survivor can still probe the leader's port and see the
/// kill), writes commit through the other survivor, then the leader is
/// killed. Heartbeat 400 ms: the second survivor's own turn would come
/// 2 s (5 heartbeats) after it finds the leader dead, while the first
/// campaigns within one probe period (1.2 s) of the kill; the election
/// timeout (5–8 s) keeps the usual path out of the way. The new leader
/// must be the second survivor, its log must show that the refusal
/// started its turn, and nothing acknowledged may be lost. How long the
/// failover takes is for the benchmark (bench/README.md), not this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_survivor_that_refuses_a_shorter_log_campaigns_without_waiting_its_turn() {
    let nc = fault::start(
        3,
        &[
            "--heartbeat-ms",
            "400",
            "--election-timeout-min-ms",
            "5000",
            "--election-timeout-max-ms",
            "8000",
        ],
        &[],
    );
    let c = &nc.c;
    let old = c.wait_leader().await;
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let (first, second) = (survivors[0], survivors[1]);
    for i in 0..5 {
        let r = c.put(old, &format!("before/{i}"), &json!(i)).await.unwrap();
        assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
    }
    let commit = c.status(old).await.unwrap().commit_index;
    c.wait_applied(&[1, 2, 3], commit).await;

    nc.net.cut_to_port(old, first, fault::RAFT_PORT);
    for i in 0..20 {
        let r = c.put(old, &format!("during/{i}"), &json!(i)).await.unwrap();
        assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
    }
    let commit = c.status(old).await.unwrap().commit_index;
    c.wait_applied(&[second], commit).await;
    let lagging = c.status(first).await.unwrap().last_log_index;
    assert!(
        lagging < commit,
        "the premise: node {first} must lack entries (its log ends at {lagging}, the commit is at {commit})"
    );

    c.kill(old);
    let (new, took) = wait_new_leader(c, old).await;
    eprintln!(
        "[lagging survivor] node {new} leads {:.1} s after the kill",
        took.as_secs_f64()
    );
    assert_eq!(new, second, "only the survivor with the whole log can win");
    let first_log = common::strip_ansi(&c.log_tail(first));
    assert!(
        first_log.contains("starting an election at once"),
        "node {first}, first in line, did not campaign:\n{first_log}"
    );
    let second_log = common::strip_ansi(&c.log_tail(second));
    assert!(
        second_log.contains("refused a candidate with a shorter log"),
        "node {second} did not take its turn from the refusal:\n{second_log}"
    );

    // Nothing acknowledged is lost, and the lagging node catches up.
    let r = c.put(first, "after", &json!("x")).await.unwrap();
    assert!(
        r.status == 200 || r.status == 201,
        "write through {first}: {:?}",
        r.body
    );
    for i in 0..20 {
        let r = c.get(first, &format!("during/{i}"), false).await.unwrap();
        assert_eq!(r.status, 200, "during/{i} lost: {:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_isolating_the_leader_one_way_and_flapping() {
    let nc = fault::start(3, &[], &[]);
    let (c, net) = (&nc.c, &nc.net);
    let mut w = Workload::start(c, "partitions", &[1, 2, 3], 6).await;
    hold(secs(2.0)).await;
    // The leader alone in a minority.
    let l = c.wait_leader().await;
    net.isolate(l);
    w.fault(&format!("leader {l} isolated"));
    hold(secs(6.0)).await;
    net.heal();
    hold(secs(3.0)).await;
    // One way: the leader's messages to one follower are lost, the
    // follower's to the leader arrive.
    let l = c.wait_leader().await;
    let f = follower_of(c, l);
    net.cut_one_way(l, f);
    w.fault(&format!("one-way: {l} -> {f} dropped"));
    hold(secs(5.0)).await;
    net.heal();
    hold(secs(2.0)).await;
    // Flapping: a different node cut off every 1.5 s.
    let mut x = 0x2545_F491_u64;
    for i in 0..rounds(6) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let victim = 1 + x % 3;
        net.isolate(victim);
        w.fault(&format!("flap {i}: node {victim} isolated"));
        hold(secs(1.5)).await;
        net.heal();
        hold(Duration::from_millis(500)).await;
    }
    let o = w.finish(c).await;
    assert_clean("partitions", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_split_and_membership_changed_during_a_partition() {
    let nc = fault::start(5, &[], &[]);
    let (c, net) = (&nc.c, &nc.net);
    let mut w = Workload::start(c, "split5", &[1, 2, 3, 4, 5], 8).await;
    hold(secs(2.0)).await;
    // Majority/minority: the leader and one follower against three.
    let l = c.wait_leader().await;
    let others: Vec<u64> = (1..=5).filter(|&i| i != l).collect();
    let minority = [l, others[0]];
    let majority = &others[1..];
    net.partition(&minority, majority);
    w.fault(&format!("split {minority:?} | {majority:?}"));
    hold(secs(6.0)).await;
    net.heal();
    hold(secs(3.0)).await;
    // A membership change while a node is cut off: remove a reachable
    // voter, then add it back as a learner and promote it, all while
    // another node stays isolated.
    let l = c.wait_leader().await;
    let rest: Vec<u64> = (1..=5).filter(|&i| i != l).collect();
    let (cut, moved) = (rest[0], rest[1]);
    net.isolate(cut);
    w.fault(&format!("node {cut} isolated during membership changes"));
    let r = c
        .admin_call(l, Method::DELETE, &format!("/admin/members/{moved}"), None)
        .await
        .expect("remove a member");
    assert_eq!(r.status, 200, "remove {moved}: {:?}", r.body);
    w.fault(&format!("node {moved} removed"));
    let p = &c.nodes[&moved];
    let add = json!({"id": moved, "raft_addr": p.raft_addr, "api_addr": p.api_addr});
    let start = Instant::now();
    loop {
        let l = c.wait_leader().await;
        let r = c.admin_call(l, Method::POST, "/admin/members", Some(add.clone())).await;
        if let Ok(r) = &r
            && (r.status == 200 || r.status == 201)
        {
            break;
        }
        assert!(start.elapsed() < common::WAIT, "adding {moved} back: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    promote_when_caught_up(c, moved).await;
    w.fault(&format!("node {moved} added back and promoted"));
    net.heal();
    let o = w.finish(c).await;
    assert_clean("split5", &o);
    let s = c.status(l).await.unwrap();
    assert_eq!(
        s.members.iter().filter(|m| m.role == "voter").count(),
        5,
        "{:?}",
        s.members
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_cut_off_while_the_log_is_compacted_catches_up_by_snapshot() {
    let nc = fault::start(3, &["--snapshot-every=200", "--keep-after-snapshot=20"], &[]);
    let (c, net) = (&nc.c, &nc.net);
    let mut w = Workload::start(c, "snapshot-cut", &[1, 2, 3], 6).await;
    hold(secs(2.0)).await;
    let l = c.wait_leader().await;
    let f = follower_of(c, l);
    let before = c.status(f).await.unwrap().last_log_index;
    net.isolate(f);
    w.fault(&format!("follower {f} isolated while the log is compacted"));
    // Enough entries that the leader's log moves well past the follower.
    for i in 0..600u32 {
        let _ = c.put(l, &format!("bulk/{i}"), &json!(i)).await;
    }
    let r = c
        .admin_call(l, Method::POST, "/admin/snapshot", None)
        .await
        .expect("trigger a snapshot");
    assert_eq!(r.status, 200, "{:?}", r.body);
    c.wait_until("the leader purges past the cut-off follower", || async {
        c.status(l).await.is_some_and(|s| s.purged_index > before + 1)
    })
    .await;
    let purged = c.status(l).await.unwrap().purged_index;
    net.heal();
    c.wait_until("the follower installs a snapshot", || async {
        c.status(f).await.is_some_and(|s| s.snapshot_index >= purged)
    })
    .await;
    let o = w.finish(c).await;
    assert_clean("snapshot-cut", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_lossy_links_between_nodes() {
    let nc = fault::start_proxied(3, &[]).await;
    let c = &nc.c;
    let mut w = Workload::start(c, "lossy", &[1, 2, 3], 6).await;
    hold(secs(2.0)).await;
    nc.impair.set(40, 5);
    w.fault("every peer link: up to 40 ms per chunk, 0.5% of chunks cut the connection");
    hold(secs(8.0)).await;
    nc.impair.set(400, 30);
    w.fault("every peer link: up to 400 ms per chunk, 3% of chunks cut the connection");
    hold(secs(5.0)).await;
    nc.impair.set(0, 0);
    let cuts = nc.impair.cuts.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("[lossy] {cuts} connections cut by the proxies");
    let o = w.finish(c).await;
    assert_clean("lossy", &o);
    assert!(
        cuts > 0,
        "the proxies never cut a connection: the scenario tested nothing"
    );
}

/// Flips one bit in the middle of the largest write-ahead log file of the
/// node's Raft log; returns the file.
fn flip_bit_in_log(c: &common::TestCluster, id: u64) -> std::path::PathBuf {
    let dir = c.nodes[&id].data_dir().join("log");
    let wal = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a write-ahead log file");
    let mut bytes = std::fs::read(&wal).unwrap();
    assert!(bytes.len() > 4096, "{} holds only {} bytes", wal.display(), bytes.len());
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&wal, bytes).unwrap();
    wal
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_bit_in_a_stored_log_is_never_silently_truncated() {
    let nc = fault::start(3, &[], &[]);
    let c = &nc.c;
    let mut w = Workload::start(c, "bitflip", &[1, 2, 3], 6).await;
    hold(secs(4.0)).await;
    let l = c.wait_leader().await;
    let f = follower_of(c, l);
    let before = c.status(f).await.unwrap().last_log_index;
    c.kill(f);
    let wal = flip_bit_in_log(c, f);
    w.fault(&format!(
        "node {f}: a bit flipped in {}",
        wal.file_name().unwrap().to_string_lossy()
    ));
    c.spawn(f);
    // Either the node refuses to start, naming the corruption, or it runs
    // with every entry it had.
    let refused = c
        .wait_until_value("node restarts or refuses", || async {
            if let Some(st) = c.exited(f) {
                return Some(Some(st));
            }
            c.status(f).await.map(|s| {
                assert!(
                    s.last_log_index >= before,
                    "node {f} came back with its log truncated: {} < {before}",
                    s.last_log_index
                );
                None
            })
        })
        .await;
    if let Some(st) = refused {
        assert!(!st.success(), "node {f} exited with {st:?}");
        let log = std::fs::read_to_string(c.nodes[&f].log()).unwrap();
        assert!(
            log.to_lowercase().contains("corrupt"),
            "node {f} exited without naming the corruption:\n{}",
            c.log_tail(f)
        );
        c.kill(f);
        eprintln!("[bitflip] node {f} refused to start: {st:?}; replacing it from the leader");
        // The operator's way back: remove the member, wipe it, add it again.
        let l = c.wait_leader().await;
        let r = c
            .admin_call(l, Method::DELETE, &format!("/admin/members/{f}"), None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        c.wipe(f);
        let p = &c.nodes[&f];
        let add = json!({"id": f, "raft_addr": p.raft_addr, "api_addr": p.api_addr});
        let r = c
            .admin_call(l, Method::POST, "/admin/members", Some(add))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        c.spawn(f);
        promote_when_caught_up(c, f).await;
        w.fault(&format!("node {f} removed, wiped, added back"));
    }
    let o = w.finish(c).await;
    assert_clean("bitflip", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_restarted_with_its_old_id_cannot_elect_a_leader() {
    let nc = fault::start(3, &[], &[]);
    let c = &nc.c;
    let mut w = Workload::start(c, "wiped", &[1, 2, 3], 6).await;
    hold(secs(3.0)).await;
    let l = c.wait_leader().await;
    let f = follower_of(c, l);
    let g = (1..=3).find(|&i| i != l && i != f).unwrap();
    c.kill(f);
    c.wipe(f);
    c.spawn(f);
    w.fault(&format!("node {f} wiped and restarted with its old id"));
    hold(secs(2.0)).await;
    // Without the old leader, the node with data cannot win: the wiped one
    // refuses to vote for it. No leader may appear among the two.
    c.kill(l);
    w.fault(&format!("leader {l} killed"));
    let until = Instant::now() + secs(6.0);
    while Instant::now() < until {
        for id in [f, g] {
            if let Some(s) = c.status(id).await {
                assert!(
                    s.role != "leader",
                    "node {id} became leader in term {} with a wiped peer's vote",
                    s.term
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.spawn(l);
    let o = w.finish(c).await;
    assert_clean("wiped", &o);
}

/// The checker can fail: a build whose linearizable reads skip ReadIndex
/// (the `read-skip-read-index` failpoint, test builds only) serves stale
/// reads from a leader cut off in a minority, and the suite must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_suite_catches_a_broken_build_that_serves_reads_without_read_index() {
    let nc = fault::start(3, &[], &[("FAILPOINTS", "read-skip-read-index=return")]);
    let (c, net) = (&nc.c, &nc.net);
    let mut w = Workload::start(c, "broken-reads", &[1, 2, 3], 6).await;
    hold(secs(2.0)).await;
    let l = c.wait_leader().await;
    net.isolate(l);
    w.fault(&format!("leader {l} isolated"));
    hold(secs(8.0)).await;
    net.heal();
    let o = w.finish(c).await;
    assert!(
        o.verdicts.values().any(|v| *v == fault::lin::Verdict::Illegal),
        "the checker missed stale reads from a build without ReadIndex: {:?}",
        o.verdicts
    );
    eprintln!("[broken-reads] caught, as it must be: {:?}", o.verdicts);
}
