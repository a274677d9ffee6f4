//! Membership changes and leadership with real `keel` processes: growing
//! and shrinking under writes, leader transfer (and its refusals), the
//! quorum check, graceful hand-off on SIGTERM, a wiped node that must not
//! vote, and quorum-loss recovery with `keel recover --force-new-cluster`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use common::TestCluster;
use reqwest::Method;
use serde_json::Value;
use serde_json::json;

/// What one load run saw.
#[derive(Default)]
struct Outcome {
    acked: BTreeMap<String, Value>,
    /// Failed or unknown writes: (node, reason).
    failed: Vec<(u64, String)>,
    /// Longest time one acknowledged write took.
    max_latency: Duration,
}

/// Bounded writers: each sends at most `max_per_writer` writes, one at a
/// time, to `targets` in turn, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
}

fn start_load(c: &Arc<TestCluster>, prefix: &str, targets: Vec<u64>, writers: usize, max_per_writer: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..writers)
        .map(|w| {
            let (c, stop, targets, prefix) = (c.clone(), stop.clone(), targets.clone(), prefix.to_string());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                for i in 0..max_per_writer {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("{prefix}/w{w}-{i:05}");
                    let value = json!({"w": w, "i": i});
                    let node = targets[(i + w) % targets.len()];
                    let started = Instant::now();
                    match c.put(node, &key, &value).await {
                        Ok(r) if r.status == 201 => {
                            out.max_latency = out.max_latency.max(started.elapsed());
                            out.acked.insert(key, value);
                        }
                        Ok(r) => {
                            out.failed.push((node, format!("{}: {}", r.status, r.body)));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => {
                            out.failed.push((node, e));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                out
            })
        })
        .collect();
    Load { stop, tasks }
}

impl Load {
    async fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Outcome::default();
        for t in self.tasks {
            let o = t.await.unwrap();
            all.acked.extend(o.acked);
            all.failed.extend(o.failed);
            all.max_latency = all.max_latency.max(o.max_latency);
        }
        all
    }
}

/// Waits until `node` has applied `n` more entries than now (the load runs).
async fn wait_progress(c: &TestCluster, node: u64, n: u64) {
    let base = c.status(node).await.map(|s| s.applied_index).unwrap_or(0);
    c.wait_applied(&[node], base + n).await;
}

/// Every acknowledged write must be readable (linearizably) from `node`.
async fn assert_all_present(c: &TestCluster, node: u64, prefix: &str, acked: &BTreeMap<String, Value>) {
    let items = c.list(node, &format!("{prefix}/"), false).await;
    let missing: Vec<&String> = acked.keys().filter(|k| !items.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "node {node} lost {} acknowledged writes, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for (k, v) in acked {
        assert_eq!(&items[k], v, "node {node} has a different value for {k}");
    }
}

/// Waits until every node in `ids` names the same leader in a term above
/// `after_term`; returns it.
async fn wait_new_leader(c: &TestCluster, ids: &[u64], after_term: u64) -> u64 {
    let start = Instant::now();
    loop {
        let mut seen = Vec::new();
        for id in ids {
            seen.push(c.status(*id).await.map(|s| (s.leader_id, s.term)));
        }
        if let Some(Some((Some(l), t))) = seen.first()
            && *t > after_term
            && ids.contains(l)
            && seen.iter().all(|x| *x == Some((Some(*l), *t)))
        {
            return *l;
        }
        assert!(start.elapsed() < common::WAIT, "no new leader among {ids:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn member(members: &Value, id: u64) -> Option<&Value> {
    members["members"].as_array().unwrap().iter().find(|m| m["id"] == id)
}

fn voters(members: &Value) -> Vec<u64> {
    members["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// Repeats an admin call while it answers `retry_code` (e.g. a learner still
/// catching up); returns the first other answer.
async fn admin_until(c: &TestCluster, via: u64, method: Method, path: &str, retry_code: &str) -> common::Reply {
    let start = Instant::now();
    loop {
        let r = c.admin_call(via, method.clone(), path, None).await.expect("admin call");
        if r.body["error"]["code"] != retry_code {
            return r;
        }
        assert!(
            start.elapsed() < common::WAIT,
            "{path} kept answering {retry_code}: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_three_to_five_and_shrink_back_under_writes_loses_nothing() {
    let mut c = TestCluster::prepare(3, &[]);
    c.prepare_joiner(4);
    c.prepare_joiner(5);
    for id in 1..=3 {
        c.spawn(id);
    }
    let c = Arc::new(c);
    c.wait_leader().await;

    // Writes go to nodes 2 and 3, which stay members throughout.
    let load = start_load(&c, "grow", vec![2, 3], 4, 5000);
    wait_progress(&c, 2, 100).await;

    // Node 4 the operator's way: add as a learner through a follower-or-leader,
    // start it, promote it once caught up.
    let api4 = c.nodes[&4].api_addr.clone();
    let raft4 = c.nodes[&4].raft_addr.clone();
    let add = json!({"id": 4, "raft_addr": raft4, "api_addr": api4});
    let r = c
        .admin_call(2, Method::POST, "/admin/members", Some(add.clone()))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
    // The same call again changes nothing.
    let r = c
        .admin_call(3, Method::POST, "/admin/members", Some(add))
        .await
        .unwrap();
    assert_eq!((r.status, &r.body["changed"]), (200, &json!(false)), "{:?}", r.body);
    c.spawn(4);
    // A learner is not ready (it must not receive gateway traffic yet).
    c.wait_until("node 4 runs as a learner", || async {
        c.status(4).await.is_some_and(|s| s.role == "learner")
    })
    .await;
    let ready = c.client.get(c.url(4, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "a learner must not be ready");
    let r = admin_until(&c, 3, Method::POST, "/admin/members/4/promote", "learner_lagging").await;
    assert_eq!(r.status, 200, "promote 4: {:?}", r.body);
    assert_eq!(r.body["role"], "voter");

    // Node 5 joins by itself and asks to be promoted.
    let join_url = format!("--join=https://{}", c.nodes[&3].api_addr);
    c.spawn_with(5, &[&join_url, "--auto-promote"]);
    c.wait_until("node 5 becomes a voter", || async {
        c.admin_call(1, Method::GET, "/admin/members", None)
            .await
            .map(|r| r.status == 200 && voters(&r.body).contains(&5))
            .unwrap_or(false)
    })
    .await;
    wait_progress(&c, 5, 100).await;
    let m = c.members(4).await;
    assert_eq!(voters(&m), vec![1, 2, 3, 4, 5], "{m}");
    assert_eq!(m["joint"], false);
    for id in 1..=5 {
        assert_eq!(member(&m, id).unwrap()["reachable"], true, "{m}");
    }

    // A change based on an outdated membership is refused.
    let tag = m["membership_log_id"].as_str().unwrap().to_string();
    let stale = c
        .admin
        .delete(c.url(2, "/admin/members/5"))
        .header("if-match", "1-1-1")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 409);
    let body: Value = stale.json().await.unwrap();
    assert_eq!(body["error"]["code"], "membership_changed", "{body}");

    // Shrink 5 -> 3: remove node 5 (with the right If-Match), then node 1.
    let r = c
        .admin
        .delete(c.url(2, "/admin/members/5"))
        .header("if-match", format!("\"{tag}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let r = c.admin_call(3, Method::DELETE, "/admin/members/1", None).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c.admin_call(3, Method::DELETE, "/admin/members/1", None).await.unwrap();
    assert_eq!((r.status, &r.body["changed"]), (200, &json!(false)), "{:?}", r.body);

    let leader = c.wait_leader_among(&[2, 3, 4]).await;
    wait_progress(&c, 2, 100).await;
    let out = load.finish().await;
    eprintln!(
        "grow/shrink: {} writes acknowledged, {} failed or unknown, slowest acknowledged write {:?}",
        out.acked.len(),
        out.failed.len(),
        out.max_latency
    );
    for f in out.failed.iter().take(5) {
        eprintln!("  failed: {f:?}");
    }
    assert!(out.acked.len() >= 300, "too little progress: {}", out.acked.len());
    let m = c.members(leader).await;
    assert_eq!(voters(&m), vec![2, 3, 4], "{m}");
    assert_eq!(m["members"].as_array().unwrap().len(), 3, "removed nodes are gone: {m}");
    for id in [2, 3, 4] {
        assert_all_present(&c, id, "grow", &out.acked).await;
    }
    c.assert_converged(&[2, 3, 4]).await;

    // The removed nodes 1 and 5 still run; they must not disturb the
    // cluster: no new term, same leader, over three election timeouts.
    let term = c.status(leader).await.unwrap().term;
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        for id in [2, 3, 4] {
            let s = c.status(id).await.expect("status");
            assert_eq!(
                (s.term, s.leader_id),
                (term, Some(leader)),
                "node {id}: a removed node disturbed the cluster"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.put(2, "after", &json!(1)).await.unwrap().status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_leader_under_load_moves_leadership_without_a_failed_write() {
    let c = Arc::new(TestCluster::start(3));
    let old = c.wait_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let to = followers[0];

    // Writes to every node, the leader included.
    let load = start_load(&c, "xfer", vec![1, 2, 3], 6, 5000);
    wait_progress(&c, to, 200).await;
    // Asked through the other follower: relayed to the leader.
    let started = Instant::now();
    let r = c
        .admin_call(
            followers[1],
            Method::POST,
            "/admin/transfer-leader",
            Some(json!({"to": to})),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["leader_id"], to);
    assert_eq!(r.body["previous_leader_id"], old);
    assert_eq!(c.wait_leader().await, to);
    wait_progress(&c, to, 200).await;

    // Back again with the CLI, letting keel pick the target (the most
    // caught-up voter).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["leader", "transfer", "--endpoint"])
        .arg(format!("https://{}", c.nodes[&old].api_addr))
        .arg("--ca")
        .arg(c.certs.join("ca.pem"))
        .arg("--cert")
        .arg(c.certs.join("admin-dev.pem"))
        .arg("--key")
        .arg(c.certs.join("admin-dev-key.pem"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("from node {to} to node")), "{stdout}");
    let third = c.wait_leader().await;
    assert_ne!(third, to);
    wait_progress(&c, third, 200).await;

    let out = load.finish().await;
    eprintln!(
        "transfer under load: leader {old} -> {to} answered in {took:?} (old leader refused writes for {} ms), \
         then -> {third}; {} writes acknowledged, {} failed, slowest acknowledged write {:?}",
        r.body["elapsed_ms"],
        out.acked.len(),
        out.failed.len(),
        out.max_latency
    );
    assert!(
        out.failed.is_empty(),
        "writes failed during the transfers: {:?}",
        out.failed
    );
    for id in 1..=3 {
        assert_all_present(&c, id, "xfer", &out.acked).await;
    }
    c.assert_converged(&[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_to_an_unreachable_node_or_a_learner_is_refused_and_writes_never_stop() {
    let mut c = TestCluster::prepare(3, &[]);
    c.prepare_joiner(4);
    for id in 1..=3 {
        c.spawn(id);
    }
    let c = Arc::new(c);
    let leader = c.wait_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (down, up) = (followers[0], followers[1]);

    // A learner that never started: not a transfer target, and too far
    // behind to be promoted.
    let add = json!({"id": 4, "raft_addr": c.nodes[&4].raft_addr, "api_addr": c.nodes[&4].api_addr});
    let r = c
        .admin_call(up, Method::POST, "/admin/members", Some(add))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
    for i in 0..20 {
        assert_eq!(c.put(up, &format!("pre/{i}"), &json!(i)).await.unwrap().status, 201);
    }
    let r = c
        .admin_call(up, Method::POST, "/admin/transfer-leader", Some(json!({"to": 4})))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("target_is_learner")),
        "{:?}",
        r.body
    );
    let r = c
        .admin_call(up, Method::POST, "/admin/members/4/promote", None)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("learner_lagging")),
        "{:?}",
        r.body
    );
    assert!(r.body["error"]["lag"].as_u64().unwrap() > 20, "{:?}", r.body);
    let r = c
        .admin_call(up, Method::POST, "/admin/transfer-leader", Some(json!({"to": 9})))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("target_not_member")),
        "{:?}",
        r.body
    );

    c.kill(down);
    c.wait_until("the leader sees the killed node as unreachable", || async {
        let m = c.members(leader).await;
        member(&m, down).unwrap()["reachable"] == false
    })
    .await;
    let load = start_load(&c, "unreach", vec![leader, up], 4, 5000);
    wait_progress(&c, up, 100).await;
    let r = c
        .admin_call(up, Method::POST, "/admin/transfer-leader", Some(json!({"to": down})))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("target_unreachable")),
        "{:?}",
        r.body
    );
    // Nothing started: the leader stays and writes keep flowing.
    wait_progress(&c, up, 200).await;
    assert_eq!(c.wait_leader_among(&[leader, up]).await, leader);
    let out = load.finish().await;
    eprintln!(
        "refused transfer: {} writes acknowledged, {} failed, slowest acknowledged write {:?}",
        out.acked.len(),
        out.failed.len(),
        out.max_latency
    );
    assert!(out.failed.is_empty(), "writes failed: {:?}", out.failed);
    assert!(
        out.max_latency < Duration::from_secs(1),
        "writes stalled for {:?}",
        out.max_latency
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_target_mid_transfer_leaves_a_leader_within_two_election_timeouts() {
    let c = Arc::new(TestCluster::start(3));
    let old = c.wait_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let (target, other) = (followers[0], followers[1]);
    let load = start_load(&c, "midxfer", vec![old, other], 4, 5000);
    wait_progress(&c, other, 100).await;

    // Freeze the target so that it cannot take over, start the transfer
    // while the leader still counts it as reachable, then kill it.
    let pid = c.nodes[&target].pid().unwrap();
    let transfer = {
        let mut attempt = 0;
        loop {
            attempt += 1;
            common::signal(pid, nix::sys::signal::Signal::SIGSTOP);
            let c2 = c.clone();
            let task = tokio::spawn(async move {
                c2.admin_call(old, Method::POST, "/admin/transfer-leader", Some(json!({"to": target})))
                    .await
                    .unwrap()
            });
            // The refusal comes at once; an accepted transfer waits for
            // the target (which cannot answer).
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !task.is_finished() {
                break task;
            }
            let r = task.await.unwrap();
            common::signal(pid, nix::sys::signal::Signal::SIGCONT);
            assert!(attempt < 5, "the transfer never started: {:?}", r.body);
            c.wait_until("the target answers again", || async {
                member(&c.members(old).await, target).unwrap()["reachable"] == true
            })
            .await;
        }
    };
    let term = c.status(old).await.unwrap().term;
    c.kill(target);
    let killed = Instant::now();
    let new = wait_new_leader(&c, &[old, other], term).await;
    let recovered = killed.elapsed();
    let r = transfer.await.unwrap();
    assert_eq!(r.status, 503, "the transfer cannot have succeeded: {:?}", r.body);
    wait_progress(&c, other, 100).await;
    let out = load.finish().await;
    eprintln!(
        "target {target} killed mid-transfer: node {new} leads {recovered:?} after the kill; transfer answered {} {}; \
         {} writes acknowledged, {} failed or unknown, slowest acknowledged write {:?}",
        r.status,
        r.body["error"]["code"],
        out.acked.len(),
        out.failed.len(),
        out.max_latency
    );
    // Two election timeouts of 2 s (the configured maximum).
    assert!(
        recovered < Duration::from_secs(4),
        "no leader within two election timeouts: {recovered:?}"
    );
    for id in [old, other] {
        assert_all_present(&c, id, "midxfer", &out.acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_check_refuses_removing_a_voter_while_another_is_down_and_force_overrides() {
    let c = Arc::new(TestCluster::start(3));
    let leader = c.wait_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (down, other) = (followers[0], followers[1]);
    assert_eq!(c.put(leader, "q/1", &json!(1)).await.unwrap().status, 201);

    c.kill(down);
    c.wait_until("the leader sees the killed node as unreachable", || async {
        member(&c.members(leader).await, down).unwrap()["reachable"] == false
    })
    .await;
    // Removing the live follower would leave {leader, down}: one of two up.
    let r = c
        .admin_call(other, Method::DELETE, &format!("/admin/members/{other}"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "quorum_at_risk", "{:?}", r.body);
    assert_eq!(r.body["error"]["needed"], 2, "{:?}", r.body);
    assert_eq!(voters(&c.members(leader).await).len(), 3, "nothing changed");
    // The same through the CLI: refused with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["member", "remove", &other.to_string(), "--endpoint"])
        .arg(format!("https://{}", c.nodes[&leader].api_addr))
        .arg("--ca")
        .arg(c.certs.join("ca.pem"))
        .arg("--cert")
        .arg(c.certs.join("admin-dev.pem"))
        .arg("--key")
        .arg(c.certs.join("admin-dev-key.pem"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && stderr.contains("quorum_at_risk"), "{stderr}");
    // A client (non-admin) certificate may not change the membership.
    let r = c
        .client
        .delete(c.url(other, &format!("/admin/members/{other}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // force=true overrides the check. The new configuration {leader, down}
    // cannot commit until the down node is back, so bring it back.
    let forced = {
        let c = c.clone();
        tokio::spawn(async move {
            c.admin_call(
                leader,
                Method::DELETE,
                &format!("/admin/members/{other}?force=true"),
                None,
            )
            .await
            .unwrap()
        })
    };
    c.wait_until("the forced change is under way (joint configuration)", || async {
        c.members(leader).await["joint"] == true
    })
    .await;
    c.spawn(down);
    let r = forced.await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let l = c.wait_leader_among(&[leader, down]).await;
    let m = c.members(l).await;
    let mut v = voters(&m);
    v.sort();
    let mut want = vec![leader, down];
    want.sort();
    assert_eq!(v, want, "{m}");
    let got = c.get(down, "q/1", false).await.unwrap();
    assert_eq!(got.body["value"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_cannot_vote_until_removed_and_added_again() {
    let c = Arc::new(TestCluster::start(3));
    let leader = c.wait_leader().await;
    // Wipe a follower other than node 1 (the initializer).
    let wiped = (2..=3).rev().find(|i| *i != leader).unwrap();
    let survivor = (1..=3).find(|i| *i != leader && *i != wiped).unwrap();
    for i in 0..100 {
        assert_eq!(
            c.put(leader, &format!("wipe/{i:03}"), &json!(i)).await.unwrap().status,
            201
        );
    }
    c.wait_applied(&[wiped], c.status(leader).await.unwrap().commit_index)
        .await;
    c.kill(wiped);
    c.wipe(wiped);
    c.spawn(wiped);
    // The leader keeps serving (a follower whose log went backwards must not
    // bring it down) and never replicates into the wiped node's empty log.
    c.wait_until("the leader sees the wiped node as unreachable", || async {
        member(&c.members(leader).await, wiped).unwrap()["reachable"] == false
    })
    .await;
    for i in 100..120 {
        assert_eq!(
            c.put(leader, &format!("wipe/{i:03}"), &json!(i)).await.unwrap().status,
            201
        );
    }
    assert!(c.exited(leader).is_none(), "the leader died:\n{}", c.log_tail(leader));
    assert_eq!(c.status(wiped).await.unwrap().last_log_index, 0);

    // Without the leader, the survivor needs the wiped node's vote: it must
    // not get it. No leader for three election timeouts.
    let term = c.status(survivor).await.unwrap().term;
    c.kill(leader);
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        for id in [survivor, wiped] {
            let s = c.status(id).await.expect("status");
            assert!(
                s.role != "leader",
                "node {id} became leader with the wiped node's vote: {s:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.status(wiped).await.unwrap().last_log_index, 0);
    // The survivor saw the leader's port refuse connections and tried one
    // immediate election (term + 1, refused by the wiped node); after that,
    // pre-vote keeps it from raising the term at every election timeout.
    let s = c.status(survivor).await.unwrap();
    assert!(
        s.term <= term + 1,
        "pre-vote keeps the term from rising after the one immediate election: {s:?}"
    );

    // The old leader returns: a leader again, every write still there.
    c.spawn(leader);
    let l = c.wait_leader_among(&[leader, survivor]).await;
    let items = c.list(l, "wipe/", false).await;
    assert_eq!(items.len(), 120);

    // Remove the wiped node, then let it join again from scratch.
    let r = c
        .admin_call(l, Method::DELETE, &format!("/admin/members/{wiped}"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    c.kill(wiped);
    c.wipe(wiped);
    let join_url = format!("--join=https://{}", c.nodes[&l].api_addr);
    c.spawn_with(wiped, &[&join_url, "--auto-promote"]);
    c.wait_until("the re-added node becomes a voter", || async {
        voters(&c.members(l).await).contains(&wiped)
    })
    .await;
    assert_eq!(c.list(wiped, "wipe/", false).await.len(), 120);
    c.assert_converged(&[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_new_cluster_on_the_last_survivor_keeps_its_writes_and_grows_back_to_three() {
    let mut c = TestCluster::prepare(3, &[]);
    c.prepare_joiner(4);
    c.prepare_joiner(5);
    for id in 1..=3 {
        c.spawn(id);
    }
    let c = Arc::new(c);
    c.wait_leader().await;
    let load = start_load(&c, "fnc", vec![1, 2, 3], 4, 5000);
    wait_progress(&c, 1, 300).await;
    // Lose two nodes and their data mid-load.
    c.kill(2);
    c.kill(3);
    let out = load.finish().await;
    c.wipe(2);
    c.wipe(3);
    // What the survivor holds (applied) before recovery.
    let had = c.list(1, "fnc/", true).await;
    eprintln!(
        "survivor holds {} of {} acknowledged writes ({} failed or unknown once quorum was lost)",
        had.len(),
        out.acked.len(),
        out.failed.len()
    );
    assert!(had.len() >= 300, "{}", had.len());
    c.kill(1);

    let run = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["recover", "--force-new-cluster", "--config"])
        .arg(&c.nodes[&1].config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("only member"), "{stdout}");
    // Running it without --force-new-cluster does nothing.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["recover", "--config"])
        .arg(&c.nodes[&1].config)
        .output()
        .unwrap();
    assert!(!run.status.success());

    c.spawn(1);
    c.wait_until("node 1 leads its one-node cluster", || async {
        c.status(1).await.is_some_and(|s| s.role == "leader")
    })
    .await;
    let m = c.members(1).await;
    assert_eq!(voters(&m), vec![1], "{m}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["member", "list", "--endpoint"])
        .arg(format!("https://{}", c.nodes[&1].api_addr))
        .arg("--ca")
        .arg(c.certs.join("ca.pem"))
        .arg("--cert")
        .arg(c.certs.join("admin-dev.pem"))
        .arg("--key")
        .arg(c.certs.join("admin-dev-key.pem"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        listing.lines().any(|l| l.starts_with("1 ") && l.contains("leader")) && listing.lines().count() == 3,
        "{listing}"
    );
    let now = c.list(1, "fnc/", false).await;
    for (k, v) in &had {
        assert_eq!(now.get(k), Some(v), "the survivor lost {k}");
    }
    assert_eq!(c.put(1, "fnc-after", &json!(1)).await.unwrap().status, 201);

    // Grow back to three with new nodes joining.
    let join_url = format!("--join=https://{}", c.nodes[&1].api_addr);
    c.spawn_with(4, &[&join_url, "--auto-promote"]);
    c.spawn_with(5, &[&join_url, "--auto-promote"]);
    c.wait_until("nodes 4 and 5 become voters", || async {
        voters(&c.members(1).await) == vec![1, 4, 5]
    })
    .await;
    for id in [4, 5] {
        let got = c.list(id, "fnc/", false).await;
        assert_eq!(got.len(), now.len(), "node {id}");
        for (k, v) in &had {
            assert_eq!(got.get(k), Some(v), "node {id} lacks {k}");
        }
    }
    c.assert_converged(&[1, 4, 5]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_and_ha_shutdown_hand_off_leadership_before_exiting() {
    let c = Arc::new(TestCluster::start(3));
    let first = c.wait_leader().await;
    let rest: Vec<u64> = (1..=3).filter(|i| *i != first).collect();
    // Writes go to the nodes that stay up.
    let load = start_load(&c, "handoff", rest.clone(), 4, 5000);
    wait_progress(&c, rest[0], 100).await;
    let term = c.status(rest[0]).await.unwrap().term;
    let started = Instant::now();
    let status = c.terminate(first);
    let stopped = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    let second = wait_new_leader(&c, &rest, term).await;
    let handoff = started.elapsed();
    assert!(
        c.log_tail(first).contains("leadership handed off"),
        "{}",
        c.log_tail(first)
    );
    wait_progress(&c, second, 100).await;
    let out = load.finish().await;
    eprintln!(
        "SIGTERM on leader {first}: node {second} leads {handoff:?} later (process exited after {stopped:?}); \
         {} writes acknowledged, {} failed, slowest acknowledged write {:?}",
        out.acked.len(),
        out.failed.len(),
        out.max_latency
    );
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    // No election timeout was waited for.
    assert!(out.max_latency < Duration::from_secs(1), "{:?}", out.max_latency);

    // The same over the API: POST /ha/shutdown to the new leader.
    c.spawn(first);
    c.wait_ready(first).await;
    let term = c.status(second).await.unwrap().term;
    let r = c.admin_call(second, Method::POST, "/ha/shutdown", None).await.unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != second).collect();
    let third = wait_new_leader(&c, &survivors, term).await;
    c.wait_until("the node exits after /ha/shutdown", || async {
        c.exited(second).is_some()
    })
    .await;
    assert!(c.exited(second).unwrap().success());
    assert_eq!(c.put(third, "after", &json!(1)).await.unwrap().status, 201);
}

/// One logical write of the rolling-restart clients: retried with the same
/// idempotency key on 503 and connection errors until acknowledged.
struct Retried {
    /// The attempts of the slowest write: (node, outcome, time since its first attempt).
    slowest: Vec<(u64, String, Duration)>,
    acked: Vec<(String, Instant)>,
    failed: Vec<String>,
    max_stall: Duration,
    retries: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_under_load_has_no_client_visible_failure_and_no_duplicate() {
    let c = Arc::new(TestCluster::start(3));
    c.wait_leader().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = 8;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Retried {
                    slowest: Vec::new(),
                    acked: Vec::new(),
                    failed: Vec::new(),
                    max_stall: Duration::ZERO,
                    retries: 0,
                };
                for i in 0..20_000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("roll/w{w}-{i:05}");
                    let first = Instant::now();
                    let mut attempt = 0usize;
                    let mut attempts = Vec::new();
                    loop {
                        let node = 1 + ((w + i + attempt) % 3) as u64;
                        let res = c
                            .client
                            .put(c.url(node, &format!("/v1/kv/{key}")))
                            .header("idempotency-key", &key)
                            .timeout(Duration::from_secs(10))
                            .json(&json!({"w": w, "i": i}))
                            .send()
                            .await;
                        attempts.push((
                            node,
                            match &res {
                                Ok(r) => r.status().to_string(),
                                Err(e) => format!("{e:?}").chars().take(200).collect(),
                            },
                            first.elapsed(),
                        ));
                        let retry = match res {
                            Ok(r) if r.status() == 201 => {
                                out.acked.push((key.clone(), Instant::now()));
                                break;
                            }
                            Ok(r) if r.status() == 503 => {
                                let body = r.text().await.unwrap_or_default();
                                if let Some(a) = attempts.last_mut() {
                                    a.1.push_str(&format!(" {}", body.chars().take(200).collect::<String>()));
                                }
                                true
                            }
                            Ok(r) => {
                                let s = r.status();
                                out.failed.push(format!(
                                    "{key} via node {node}: {s}: {}",
                                    r.text().await.unwrap_or_default()
                                ));
                                break;
                            }
                            Err(_) => true,
                        };
                        assert!(retry);
                        attempt += 1;
                        out.retries += 1;
                        if first.elapsed() > Duration::from_secs(30) {
                            out.failed.push(format!("{key}: not acknowledged within 30 s"));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if first.elapsed() > out.max_stall {
                        out.max_stall = first.elapsed();
                        out.slowest = attempts;
                    }
                }
                out
            })
        })
        .collect();

    // Restart every node in turn: SIGTERM, start again, wait until ready
    // and caught up.
    wait_progress(&c, 1, 300).await;
    for id in 1..=3 {
        let was_leader = c.status(id).await.is_some_and(|s| s.role == "leader");
        let status = c.terminate(id);
        assert!(
            status.success(),
            "node {id} exited with {status:?}:\n{}",
            c.log_tail(id)
        );
        c.spawn(id);
        c.wait_ready(id).await;
        let leader = c.wait_leader().await;
        let commit = c.status(leader).await.unwrap().commit_index;
        c.wait_applied(&[id], commit).await;
        eprintln!("node {id} restarted (was leader: {was_leader}); leader now {leader}");
        wait_progress(&c, id, 300).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<(String, Instant)> = Vec::new();
    let mut failed = Vec::new();
    let (mut max_stall, mut retries, mut slowest) = (Duration::ZERO, 0, Vec::new());
    for t in tasks {
        let o = t.await.unwrap();
        acked.extend(o.acked);
        failed.extend(o.failed);
        if o.max_stall > max_stall {
            max_stall = o.max_stall;
            slowest = o.slowest;
        }
        retries += o.retries;
    }
    for a in slowest.iter().rev().take(8) {
        eprintln!("  slowest write attempt: {a:?}");
    }
    let elapsed = started.elapsed();
    // The longest time no client got any acknowledgement.
    let mut times: Vec<Instant> = acked.iter().map(|(_, t)| *t).collect();
    times.sort();
    let max_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    eprintln!(
        "rolling restart: {} writes acknowledged in {elapsed:?} ({:.0}/s), {} client-visible failures, {retries} \
         retries; longest single write (with retries) {max_stall:?}; longest time without any acknowledgement \
         {max_gap:?}",
        acked.len(),
        acked.len() as f64 / elapsed.as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "client-visible failures: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(acked.len() >= 1000, "too little load: {}", acked.len());

    // Every write applied exactly once: present, and at version 1.
    let leader = c.wait_leader().await;
    let mut listed: BTreeMap<String, u64> = BTreeMap::new();
    for w in 0..writers {
        let r = c
            .client
            .get(c.url(leader, &format!("/v1/kv?prefix=roll/w{w}-&limit=10000")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        let items = body["items"].as_array().unwrap();
        assert!(items.len() < 10_000, "writer {w} wrote more than one page");
        for o in items {
            listed.insert(o["key"].as_str().unwrap().to_string(), o["version"].as_u64().unwrap());
        }
    }
    for (k, _) in &acked {
        assert_eq!(listed.get(k), Some(&1), "{k} missing or applied more than once");
    }
    let dup: Vec<_> = listed.iter().filter(|(_, v)| **v != 1).collect();
    assert!(dup.is_empty(), "duplicate applies: {:?}", &dup[..dup.len().min(5)]);
    c.assert_converged(&[1, 2, 3]).await;
}
