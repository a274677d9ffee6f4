//! Snapshots end to end, with real `keel` processes: catching up a follower
//! whose log was compacted away, resumable and verified transfers, crashes
//! at every install step (failpoints), corrupt snapshots, the admin trigger,
//! and backup / restore into a new cluster.
//!
//! The catch-up test writes 200,000 records (about a minute on 2 cores);
//! `KEEL_CATCHUP_RECORDS=N` changes that for a quicker local run.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use common::TestCluster;
use common::WAIT;
use common::strip_ansi;
use futures::StreamExt;
use serde_json::Value;
use serde_json::json;

fn catchup_records() -> usize {
    std::env::var("KEEL_CATCHUP_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// Starts node `id` like [`TestCluster::spawn`], with extra environment.
fn spawn_env(c: &TestCluster, id: u64, env: &[(&str, &str)]) {
    let p = &c.nodes[&id];
    let mut slot = p.child.lock().unwrap();
    assert!(slot.is_none(), "node {id} is already running");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.log())
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&p.config)
        .args(&c.extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    *slot = Some(cmd.spawn().expect("spawn keel"));
}

/// Waits until node `id`'s process exits by itself; returns its status.
async fn wait_exit(c: &TestCluster, id: u64) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        {
            let mut slot = c.nodes[&id].child.lock().unwrap();
            let st = slot.as_mut().expect("node running").try_wait().unwrap();
            if let Some(st) = st {
                *slot = None;
                return st;
            }
        }
        if start.elapsed() > WAIT * 2 {
            eprintln!("--- node {id} log ---\n{}", c.log_tail(id));
            panic!("node {id} did not exit within {:?}", WAIT * 2);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines of node `id`'s log containing `needle`, without terminal colours.
fn log_lines(c: &TestCluster, id: u64, needle: &str) -> Vec<String> {
    let raw = std::fs::read_to_string(c.nodes[&id].log()).unwrap_or_default();
    strip_ansi(&raw)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The value of `name=` in a log line (up to the next space).
fn field(line: &str, name: &str) -> Option<String> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    Some(line[at..].split(' ').next().unwrap_or("").to_string())
}

fn num(line: &str, name: &str) -> u64 {
    field(line, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {name} in {line:?}"))
}

/// Writes `n` records `prefix/<i>` through node `via`, `inflight` at a time,
/// each value about `size` bytes; returns how long it took.
async fn write_many(c: &TestCluster, via: u64, prefix: &str, n: usize, inflight: usize, size: usize) -> Duration {
    let start = Instant::now();
    let failures = AtomicU64::new(0);
    futures::stream::iter(0..n)
        .for_each_concurrent(inflight, |i| {
            let (c, failures) = (&c, &failures);
            async move {
                let body = json!({"n": i, "pad": noise(i as u64, size)});
                for _ in 0..5 {
                    match c.put(via, &format!("{prefix}/{i:07}"), &body).await {
                        Ok(r) if r.status == 200 || r.status == 201 => return,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                failures.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    assert_eq!(failures.load(Ordering::Relaxed), 0, "writes failed");
    start.elapsed()
}

/// `len` hex digits that differ from record to record, so that snapshots
/// do not shrink to nothing under LZ4.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap()
        })
        .collect()
}

/// `POST /admin/snapshot` on node `id`.
async fn trigger(c: &TestCluster, id: u64) -> Value {
    let r = c
        .admin
        .post(c.url(id, "/admin/snapshot"))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("trigger");
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "trigger on node {id}: {status} {body}");
    body
}

fn others(c: &TestCluster, not: u64) -> Vec<u64> {
    c.nodes.keys().copied().filter(|id| *id != not).collect()
}

/// Stops `follower`, writes `n` records, and makes the leader snapshot and
/// purge its log past where the follower stopped: the follower can only
/// catch up by snapshot.
async fn lag_behind(c: &TestCluster, leader: u64, follower: u64, prefix: &str, n: usize, size: usize) {
    let stopped_at = c.status(follower).await.map(|s| s.last_log_index).unwrap_or(0);
    c.kill(follower);
    let took = write_many(c, leader, prefix, n, 64, size).await;
    eprintln!(
        "wrote {n} records in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    let t = trigger(c, leader).await;
    // The purge follows the snapshot asynchronously.
    c.wait_until(&format!("leader purges past {stopped_at} after {t}"), || async {
        c.status(leader).await.is_some_and(|s| s.purged_index > stopped_at)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_catches_up_by_snapshot_after_many_writes() {
    let n = catchup_records();
    let c = TestCluster::start_with(3, &["--snapshot-every=5000", "--keep-after-snapshot=1000"]);
    let leader = c.wait_leader().await;
    let follower = others(&c, leader)[0];
    c.wait_applied(&[follower], 1).await;
    lag_behind(&c, leader, follower, "bulk", n, 100).await;
    let start = Instant::now();
    c.spawn(follower);
    let target = c.status(leader).await.unwrap().applied_index;
    c.wait_applied(&[follower], target).await;
    let h = c.assert_converged(&[1, 2, 3]).await;
    eprintln!("follower caught up in {:.1} s: {h}", start.elapsed().as_secs_f64());
    assert!(h["records"].as_u64().unwrap() >= n as u64);
    let installed = log_lines(&c, follower, "snapshot installed");
    assert!(!installed.is_empty(), "node {follower} never installed a snapshot");
    let sent = log_lines(&c, leader, "snapshot sent");
    let last = sent.last().expect("the leader logged the transfer");
    eprintln!("{last}\n{}", installed.last().unwrap());
    assert_eq!(field(last, "target").as_deref(), Some(follower.to_string().as_str()));
    // Spot check through the API: the follower serves the data.
    let r = c.get(follower, &format!("bulk/{:07}", n - 1), true).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["value"]["n"], json!(n - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trigger_builds_a_snapshot_and_purge_stays_behind_it() {
    let c = TestCluster::start_with(3, &["--snapshot-every=100000", "--keep-after-snapshot=50"]);
    let leader = c.wait_leader().await;
    write_many(&c, leader, "t", 300, 16, 10).await;
    let applied = c.status(leader).await.unwrap().applied_index;
    // Clients may not; admins may.
    let r = c.client.post(c.url(leader, "/admin/snapshot")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let t = trigger(&c, leader).await;
    let snap = t["snapshot"]["index"].as_u64().unwrap();
    let purged = t["purged_index"].as_u64();
    assert!(snap >= applied, "{t}");
    // Only what the durable snapshot covers is purged, minus the entries kept.
    assert!(purged.is_none_or(|p| p + 50 <= snap), "{t}");
    let file = c.nodes[&leader].data_dir().join("snapshots");
    let files: Vec<String> = std::fs::read_dir(&file)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".snap"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(&format!("{snap:020}-")), "{files:?}");

    // The CLI does the same.
    let out = keel_cli(&c, &["snapshot", "trigger", "--endpoint", &c.url(leader, "")]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["snapshot"]["index"].as_u64().unwrap() >= snap, "{v}");
}

/// Runs the `keel` CLI with the test cluster's admin certificate; returns stdout.
fn keel_cli(c: &TestCluster, args: &[&str]) -> String {
    let out = keel_cli_raw(c, args);
    assert!(
        out.status.success(),
        "keel {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keel_cli_raw(c: &TestCluster, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(args);
    if args.contains(&"--endpoint") {
        cmd.arg("--ca")
            .arg(c.certs.join("ca.pem"))
            .arg("--cert")
            .arg(c.certs.join("admin-dev.pem"))
            .arg("--key")
            .arg(c.certs.join("admin-dev-key.pem"));
    }
    cmd.output().expect("run keel")
}

/// Path of the newest `.snap` file of node `id`.
fn stored_snapshot(c: &TestCluster, id: u64) -> std::path::PathBuf {
    let dir = c.nodes[&id].data_dir().join("snapshots");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    v.sort();
    v.pop()
        .unwrap_or_else(|| panic!("node {id} has no snapshot in {}", dir.display()))
}

/// Flips one bit in the middle of a file, in place (same inode).
fn flip_bit_in_middle(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// Restarts `follower` and waits until all nodes agree on the state.
async fn rejoin_and_converge(c: &TestCluster, leader: u64, follower: u64) -> Value {
    if !c.nodes[&follower].is_running() {
        c.spawn(follower);
    }
    let target = c.status(leader).await.unwrap().applied_index;
    c.wait_applied(&[follower], target).await;
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    c.assert_converged(&ids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_at_any_install_step_leaves_a_node_that_recovers_and_catches_up() {
    let c = TestCluster::start_with(3, &["--snapshot-every=2000", "--keep-after-snapshot=100"]);
    let _logs = KeepLogsOnFailure(&c, "crash");
    let leader = c.wait_leader().await;
    let follower = others(&c, leader)[0];
    // About 4 MiB of state: snapshots of several 1 MiB chunks.
    write_many(&c, leader, "base", 8_000, 64, 500).await;
    rejoin_and_converge(&c, leader, follower).await;
    let points = [
        ("snap-recv-chunk", "2*off->return"),
        ("snap-verified", "return"),
        ("snap-before-switch", "return"),
        ("snap-before-dir-fsync", "return"),
        ("snap-after-dir-fsync", "return"),
        ("snap-after-switch", "return"),
        ("log-before-purge", "return"),
    ];
    for (round, (name, action)) in points.iter().enumerate() {
        lag_behind(&c, leader, follower, &format!("r{round}"), 2_500, 50).await;
        spawn_env(&c, follower, &[("FAILPOINTS", &format!("{name}={action}"))]);
        let st = wait_exit(&c, follower).await;
        assert_eq!(st.signal(), Some(6), "{name}: expected an abort, got {st:?}");
        let fired = log_lines(&c, follower, &format!("failpoint {name} fired"));
        assert!(!fired.is_empty(), "{name} never fired");
        let start = Instant::now();
        let h = rejoin_and_converge(&c, leader, follower).await;
        eprintln!(
            "crash at {name}: recovered and converged in {:.1} s at {h}",
            start.elapsed().as_secs_f64()
        );
        // One live generation, named by CURRENT.
        let sm = c.nodes[&follower].data_dir().join("sm");
        let current = std::fs::read_to_string(sm.join("CURRENT")).unwrap();
        assert!(sm.join(current.trim()).is_dir(), "{name}: CURRENT names {current:?}");
    }
    // After the crash right after the first chunks, the next transfer resumed.
    let resumed = log_lines(&c, follower, "snapshot transfer resumed");
    assert!(
        !resumed.is_empty(),
        "no transfer resumed after the crash in the middle of one"
    );
}

/// A 3-node cluster whose nodes all run with `FAILPOINTS=spec`. Keep enough
/// log after snapshots that only a stopped follower needs one (a live one
/// lagging behind during the writes would use up the failpoint).
fn start_with_failpoints(extra: &[&str], spec: &str) -> TestCluster {
    let c = TestCluster::prepare(3, extra);
    for id in 1..=3 {
        spawn_env(&c, id, &[("FAILPOINTS", spec)]);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bit_flipped_in_transit_is_rejected_and_only_the_bad_part_resent() {
    // The sender corrupts the sixth 256 KiB piece it sends, once.
    let c = start_with_failpoints(
        &["--snapshot-every=2000", "--keep-after-snapshot=3000"],
        "snap-send-corrupt=5*off->1*return",
    );
    let _logs = KeepLogsOnFailure(&c, "transit");
    let leader = c.wait_leader().await;
    let follower = others(&c, leader)[0];
    c.wait_applied(&[follower], 1).await;
    lag_behind(&c, leader, follower, "t", 8_000, 500).await;
    let len = std::fs::metadata(stored_snapshot(&c, leader)).unwrap().len();
    assert!(
        len > 6 * (256 << 10),
        "snapshot of {len} bytes is too small for this test"
    );
    rejoin_and_converge(&c, leader, follower).await;
    let rejected = log_lines(&c, follower, "snapshot data rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].contains("corrupt"), "{rejected:?}");
    let resend_from = num(&rejected[0], "resend_from");
    let line = log_lines(&c, leader, "snapshot sent").pop().expect("snapshot sent");
    let received = log_lines(&c, follower, "snapshot received").pop().unwrap();
    eprintln!("{}\n{line}\n{received}", rejected[0]);
    assert_eq!(num(&line, "resends"), 1, "{line}");
    // The chunks before the bad one were kept: the resend started at the end
    // of the last verified chunk, past the first one, and carried only the rest.
    let file = num(&line, "file_bytes");
    assert!(
        resend_from > 1 << 19 && resend_from < 6 * (256 << 10),
        "{}",
        rejected[0]
    );
    assert_eq!(num(&received, "resumed_from"), resend_from, "{received}");
    assert_eq!(num(&received, "received_bytes"), file - resend_from, "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_broken_off_resumes_where_it_stopped() {
    // The sender breaks the stream off after its eighth 256 KiB piece, once.
    let c = start_with_failpoints(
        &["--snapshot-every=2000", "--keep-after-snapshot=3000"],
        "snap-send-cut=7*off->1*return",
    );
    let _logs = KeepLogsOnFailure(&c, "cut");
    let leader = c.wait_leader().await;
    let follower = others(&c, leader)[0];
    c.wait_applied(&[follower], 1).await;
    lag_behind(&c, leader, follower, "t", 8_000, 500).await;
    rejoin_and_converge(&c, leader, follower).await;
    let line = log_lines(&c, leader, "snapshot sent").pop().expect("snapshot sent");
    let received = log_lines(&c, follower, "snapshot received").pop().unwrap();
    let interrupted = log_lines(&c, follower, "snapshot transfer interrupted");
    eprintln!("{line}\n{received}\n{interrupted:?}");
    assert_eq!(interrupted.len(), 1, "{interrupted:?}");
    assert_eq!(num(&line, "attempts"), 2, "{line}");
    let (file, sent_bytes) = (num(&line, "file_bytes"), num(&line, "sent_bytes"));
    let resumed_from = num(&received, "resumed_from");
    // Everything up to the last complete chunk before the cut was kept.
    assert!(resumed_from > 1 << 20 && resumed_from <= 8 * (256 << 10), "{received}");
    // Bytes counted: the first attempt's 2 MiB plus the rest, not two files.
    assert_eq!(sent_bytes, 8 * (256 << 10) + (file - resumed_from), "{line}");
    assert_eq!(num(&received, "received_bytes"), file - resumed_from, "{received}");
}

/// Copies the nodes' logs to `<temp dir>/keel-test-logs/<name>/` when the
/// test fails (the cluster's own directory is deleted).
struct KeepLogsOnFailure<'a>(&'a TestCluster, &'static str);

impl Drop for KeepLogsOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let dir = std::env::temp_dir().join("keel-test-logs").join(self.1);
        let _ = std::fs::create_dir_all(&dir);
        for (id, p) in &self.0.nodes {
            let _ = std::fs::copy(p.log(), dir.join(format!("node-{id}.log")));
        }
        eprintln!("node logs kept in {}", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_stored_snapshot_is_never_sent_or_saved() {
    let c = TestCluster::start_with(3, &["--snapshot-every=2000", "--keep-after-snapshot=100"]);
    let _logs = KeepLogsOnFailure(&c, "stored");
    let leader = c.wait_leader().await;
    let follower = others(&c, leader)[0];
    c.wait_applied(&[follower], 1).await;
    lag_behind(&c, leader, follower, "s", 6_000, 500).await;
    let stored = stored_snapshot(&c, leader);
    flip_bit_in_middle(&stored);
    // Offline check: inspect refuses it.
    let out = keel_cli_raw(&c, &["snapshot", "inspect", stored.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed verification") && err.contains("corrupt"), "{err}");

    // Sending: the leader's own check catches it before the bad chunk goes
    // out; it sets the file aside, builds a new snapshot and sends that.
    rejoin_and_converge(&c, leader, follower).await;
    let caught = log_lines(&c, leader, "failed verification");
    assert!(!caught.is_empty(), "the leader never noticed the corrupt file");
    assert!(log_lines(&c, follower, "snapshot data rejected").is_empty());
    let dir = c.nodes[&leader].data_dir().join("snapshots");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".snap.corrupt")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with(".snap")), "{names:?}");

    // Saving: the download is refused (503) rather than served, then works.
    let stored = stored_snapshot(&c, leader);
    flip_bit_in_middle(&stored);
    let backup = c.root.path().join("backup.snap");
    let endpoint = c.url(leader, "");
    let out = keel_cli_raw(
        &c,
        &[
            "snapshot",
            "save",
            backup.to_str().unwrap(),
            "--no-trigger",
            "--endpoint",
            &endpoint,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("503") && err.contains("snapshot_corrupt"), "{err}");
    assert!(!backup.exists());
    keel_cli(
        &c,
        &["snapshot", "save", backup.to_str().unwrap(), "--endpoint", &endpoint],
    );
    keel_cli(&c, &["snapshot", "inspect", backup.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_then_restore_into_a_new_cluster_gives_the_same_state() {
    let a = TestCluster::start_with(3, &["--snapshot-every=3000"]);
    let _logs = KeepLogsOnFailure(&a, "backup");
    let leader = a.wait_leader().await;
    write_many(&a, leader, "b", 5_000, 64, 200).await;
    // Overwrites and deletes too: revisions and tombstones must survive.
    for i in 0..50 {
        a.put(leader, &format!("b/{i:07}"), &json!({"v": 2})).await.unwrap();
        let r = a
            .client
            .delete(a.url(leader, &format!("/v1/kv/b/{:07}", 100 + i)))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let before = a.assert_converged(&[1, 2, 3]).await;
    let kept = a.get(leader, "b/0000007", false).await.unwrap();

    // Back up from a follower, with the CLI as an operator would.
    let follower = others(&a, leader)[0];
    let keep = tempfile::tempdir().unwrap();
    let backup = keep.path().join("backup.snap");
    let endpoint = a.url(follower, "");
    let out = keel_cli_raw(
        &a,
        &["snapshot", "save", backup.to_str().unwrap(), "--endpoint", &endpoint],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("100.0%") && progress.contains("saved"), "{progress}");
    let info: Value = serde_json::from_str(&keel_cli(
        &a,
        &["snapshot", "inspect", "--json", backup.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(info["cluster"], json!(a.cluster_name));
    assert_eq!(info["records"], before["records"]);
    assert_eq!(info["last_log_id"]["index"], before["applied_index"]);
    assert_eq!(info["membership"]["voters"], json!([1, 2, 3]));
    drop(_logs);
    drop(a);

    // A new cluster: other name, CA, addresses. Nodes 1 and 2 (a majority,
    // the lowest id among them) are seeded from the backup; node 3 starts
    // empty and gets the state by snapshot.
    let b = TestCluster::prepare(3, &[]);
    let _logs = KeepLogsOnFailure(&b, "restore");
    let members = b
        .extra_args
        .iter()
        .find_map(|a| a.strip_prefix("--initial-members="))
        .unwrap()
        .to_string();
    let restore = |id: u64, extra: &[&str]| {
        let cfg = b.nodes[&id].config.to_str().unwrap().to_string();
        let mut args = vec!["snapshot", "restore", backup.to_str().unwrap(), "--config", &cfg];
        args.extend_from_slice(extra);
        keel_cli_raw(&b, &args)
    };
    // Only a member of the new cluster may be seeded.
    let bad_node = restore(1, &["--initial-members", &members, "--node-id", "9"]);
    assert!(!bad_node.status.success());
    for id in [1, 2] {
        let out = restore(id, &["--initial-members", &members]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Never over an existing data directory.
    assert!(!restore(1, &["--initial-members", &members]).status.success());
    for id in 1..=3 {
        b.spawn(id);
    }
    let leader_b = b.wait_leader().await;
    let target = before["applied_index"].as_u64().unwrap();
    b.wait_applied(&[1, 2, 3], target).await;
    let after = b.assert_converged(&[1, 2, 3]).await;
    assert_eq!(after["hash"], before["hash"], "{before} vs {after}");
    assert_eq!(after["records"], before["records"]);
    assert!(after["applied_index"].as_u64().unwrap() >= target);
    // The data reads back with its revision, and the new cluster takes writes.
    let r = b.get(leader_b, "b/0000007", false).await.unwrap();
    assert_eq!((r.status, &r.body), (200, &kept.body));
    let w = b.put(leader_b, "after-restore", &json!(1)).await.unwrap();
    assert_eq!(w.status, 201, "{w:?}");
    let s = b.status(leader_b).await.unwrap();
    assert_eq!(s.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(s.members[0].raft_addr, b.nodes[&1].raft_addr);
}
