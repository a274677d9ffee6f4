//! Metrics, probes and the /ha views on live clusters of real `keel`
//! processes: the exposition passes `promtool check metrics`, the leader's
//! per-peer replication lag follows a stopped follower, roles and terms move
//! with a leader kill, and `/readyz` fails during shutdown and on a node cut
//! off in a minority.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use common::TestCluster;
use common::WAIT;
use common::promtool_path;
use serde_json::Value;
use serde_json::json;

/// One sample line of the exposition: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.find('{') {
                Some(i) => (&series[..i], &series[i + 1..series.len() - 1]),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").expect("label k=\"v\"");
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().expect("numeric value"),
            }
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

async fn scrape_text(c: &TestCluster, id: u64) -> Option<String> {
    let r = c
        .client
        .get(c.url(id, "/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    assert_eq!(r.status(), 200, "GET /metrics on node {id}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    r.text().await.ok()
}

async fn scrape(c: &TestCluster, id: u64) -> Vec<Sample> {
    parse(&scrape_text(c, id).await.expect("scrape"))
}

/// Polls `f` on node `id`'s metrics until it returns `Some`.
async fn wait_metrics<T>(c: &TestCluster, id: u64, what: &str, f: impl Fn(&[Sample]) -> Option<T>) -> T {
    let start = Instant::now();
    let mut last = Vec::new();
    loop {
        if let Some(text) = scrape_text(c, id).await {
            last = parse(&text);
            if let Some(t) = f(&last) {
                return t;
            }
        }
        if start.elapsed() > WAIT {
            let shown: Vec<_> = last.iter().filter(|s| s.name.starts_with("raft_")).collect();
            panic!("node {id}: {what} not seen within {WAIT:?}; last raft samples: {shown:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new(promtool_path())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn readyz(c: &TestCluster, id: u64) -> Result<(u16, Value), String> {
    let r = c
        .client
        .get(c.url(id, "/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn wait_ready(c: &TestCluster, ids: &[u64]) {
    let start = Instant::now();
    for id in ids {
        loop {
            match readyz(c, *id).await {
                Ok((200, _)) => break,
                other => assert!(
                    start.elapsed() < WAIT,
                    "node {id} not ready within {WAIT:?}: {other:?}\n{}",
                    c.log_tail(*id)
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits until node `id` answers /readyz with 503; returns the reason.
async fn wait_not_ready(c: &TestCluster, id: u64) -> String {
    let start = Instant::now();
    loop {
        if let Ok((503, body)) = readyz(c, id).await {
            assert_eq!(body["ready"], false);
            return body["reason"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            start.elapsed() < WAIT,
            "node {id} still ready {WAIT:?} after losing its majority\n{}",
            c.log_tail(id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn no_client_cert(ca_dir: &Path) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_dir.join("ca.pem")).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder().use_preconfigured_tls(cfg).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_cluster_metrics_pass_promtool_and_describe_the_cluster() {
    let c = TestCluster::start(3);
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    for i in 0..20 {
        let r = c.put(follower, &format!("k{i}"), &json!(i)).await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    // A failed precondition is still a committed proposal, answered 409.
    let r = c.put_with(follower, "k0", &json!(0), ("If-None-Match", "*")).await;
    assert_eq!(r.status, 409);
    c.wait_applied(&[1, 2, 3], c.status(leader).await.unwrap().last_log_index)
        .await;

    for id in 1..=3 {
        let text = scrape_text(&c, id).await.unwrap();
        promtool_check_metrics(&text);
        // What Prometheus itself asks for: OpenMetrics, the same samples.
        let om = c
            .client
            .get(c.url(id, "/metrics"))
            .header(
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )
            .send()
            .await
            .unwrap();
        assert!(
            om.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let om = om.text().await.unwrap();
        assert!(
            om.ends_with("# EOF\n") && om.contains("# TYPE raft_leader_changes counter\nraft_leader_changes_total ")
        );
        let s = parse(&text);
        let role = if id == leader { "leader" } else { "follower" };
        assert_eq!(value(&s, "raft_role", &[("role", role)]), Some(1.0), "node {id}");
        assert_eq!(value(&s, "raft_role", &[("role", "candidate")]), Some(0.0));
        assert_eq!(value(&s, "raft_leader_id", &[]), Some(leader as f64));
        assert!(value(&s, "raft_term", &[]).unwrap() >= 1.0);
        assert!(value(&s, "raft_last_applied_index", &[]).unwrap() >= 21.0);
        assert_eq!(value(&s, "raft_voters", &[]), Some(3.0));
        assert_eq!(
            value(
                &s,
                "keel_node_info",
                &[("node_id", &id.to_string()), ("cluster", &c.cluster_name)]
            ),
            Some(1.0)
        );
        assert!(value(&s, "keel_storage_fsync_duration_seconds_count", &[]).unwrap() > 0.0);
        assert!(value(&s, "keel_storage_apply_duration_seconds_count", &[]).unwrap() > 0.0);
        assert_eq!(value(&s, "keel_watchers", &[]), Some(0.0));
    }
    // Sampled every 0.5 s: wait for the first samples that need time.
    for id in 1..=3 {
        wait_metrics(&c, id, "has_leader and ready", |s| {
            (value(s, "raft_has_leader", &[]) == Some(1.0) && value(s, "keel_ready", &[]) == Some(1.0)).then_some(())
        })
        .await;
        // State sizes are counted every 10 s.
        wait_metrics(&c, id, "20 kv objects", |s| {
            (value(s, "keel_state_objects", &[("kind", "kv")]) == Some(20.0)).then_some(())
        })
        .await;
    }

    let s = scrape(&c, leader).await;
    for peer in (1..=3).filter(|p| *p != leader) {
        let p = peer.to_string();
        assert!(
            value(&s, "raft_replication_lag_entries", &[("peer", &p)]).is_some(),
            "{p}"
        );
        assert!(value(&s, "raft_replication_lag_seconds", &[("peer", &p)]).is_some());
        assert!(value(&s, "raft_peer_last_ack_age_seconds", &[("peer", &p)]).unwrap() < 5.0);
    }
    assert!(value(&s, "keel_state_objects", &[("kind", "workers")]) == Some(0.0));
    let f = scrape(&c, follower).await;
    assert!(
        value(&f, "raft_replication_lag_entries", &[]).is_none(),
        "followers export no lag"
    );
    // Proposals were counted where they were proposed, 409 included.
    assert_eq!(value(&f, "raft_proposals_committed_total", &[]), Some(21.0));
    assert_eq!(
        value(
            &f,
            "keel_http_requests_total",
            &[("route", "/v1/kv/{*key}"), ("method", "PUT"), ("status", "201")]
        ),
        Some(20.0)
    );
    assert_eq!(
        value(
            &f,
            "keel_http_requests_total",
            &[("route", "/v1/kv/{*key}"), ("method", "PUT"), ("status", "409")]
        ),
        Some(1.0)
    );
    // The follower forwarded its writes (one at a time, so one batch each):
    // forward-writes RPCs to the leader were timed.
    assert!(
        value(
            &f,
            "raft_rpc_duration_seconds_count",
            &[("rpc", "forward-writes"), ("peer", &leader.to_string())]
        )
        .unwrap()
            >= 21.0
    );

    // /metrics and /ha need a certificate; probes do not.
    let anon = no_client_cert(&c.certs);
    for path in ["/metrics", "/ha/status", "/ha/health"] {
        let r = anon.get(c.url(leader, path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    assert_eq!(anon.get(c.url(leader, "/readyz")).send().await.unwrap().status(), 200);
    let r = c.client.post(c.url(leader, "/ha/shutdown")).send().await.unwrap();
    assert_eq!(r.status(), 403, "a client certificate may not shut a node down");

    // /ha/status from the leader: every member ALIVE (heard from within an
    // election timeout: polled, the machine may be busy), counts of the store.
    let start = Instant::now();
    let st = loop {
        let st: Value = c
            .client
            .get(c.url(leader, "/ha/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if st["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "ALIVE") {
            break st;
        }
        assert!(start.elapsed() < WAIT, "not every member ALIVE: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st["node_count"], 3, "{st}");
    assert_eq!(st["node_name"], format!("node-{leader}"));
    assert_eq!(st["view"], "leader");
    assert_eq!(st["store"]["kv"], 20);
    for n in st["nodes"].as_array().unwrap() {
        assert_eq!(n["status"], "ALIVE", "{st}");
        assert!(n["api_addr"].as_str().unwrap().contains(':'));
    }
    let st: Value = c
        .client
        .get(c.url(follower, "/ha/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["view"], "follower");
    let by_id = |id: u64| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(follower)["status"], "ALIVE");
    assert_eq!(by_id(leader)["status"], "ALIVE", "{st}");

    let h = c.client.get(c.url(leader, "/ha/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let h: Value = h.json().await.unwrap();
    assert_eq!(h["healthy"], true);
    assert_eq!(h["voters_alive"], 3, "{h}");
    assert_eq!(h["failure_tolerance"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_of_a_stopped_follower_grows_then_returns_to_zero() {
    let c = TestCluster::start(3);
    let leader = c.wait_leader().await;
    let stopped = (1..=3).find(|i| *i != leader).unwrap();
    let peer = stopped.to_string();
    let p = peer.as_str();
    c.put(leader, "warmup", &json!(0)).await.unwrap();
    wait_metrics(&c, leader, "the follower caught up", |s| {
        (value(s, "raft_replication_lag_entries", &[("peer", p)]) == Some(0.0)).then_some(())
    })
    .await;

    c.kill(stopped);
    for i in 0..100 {
        let r = c.put(leader, &format!("while-down-{i}"), &json!(i)).await.unwrap();
        assert_eq!(r.status, 201);
    }
    let (entries, secs) = wait_metrics(&c, leader, "lag of at least 100 entries and 1 s", |s| {
        let e = value(s, "raft_replication_lag_entries", &[("peer", p)])?;
        let t = value(s, "raft_replication_lag_seconds", &[("peer", p)])?;
        (e >= 100.0 && t >= 1.0).then_some((e, t))
    })
    .await;
    // The lag in seconds keeps growing while the follower is away.
    let later = wait_metrics(&c, leader, "lag seconds growing", |s| {
        let t = value(s, "raft_replication_lag_seconds", &[("peer", p)])?;
        (t >= secs + 1.0).then_some(t)
    })
    .await;
    let ack_age = value(
        &scrape(&c, leader).await,
        "raft_peer_last_ack_age_seconds",
        &[("peer", p)],
    );
    assert!(ack_age.is_none_or(|a| a >= 1.0), "{ack_age:?}");
    eprintln!("stopped follower {stopped}: lag {entries} entries, {secs:.1} s then {later:.1} s");

    c.spawn(stopped);
    wait_metrics(&c, leader, "lag back to 0 entries and 0 s", |s| {
        let e = value(s, "raft_replication_lag_entries", &[("peer", p)])?;
        let t = value(s, "raft_replication_lag_seconds", &[("peer", p)])?;
        (e == 0.0 && t == 0.0).then_some(())
    })
    .await;
    let ack_age = value(
        &scrape(&c, leader).await,
        "raft_peer_last_ack_age_seconds",
        &[("peer", p)],
    )
    .unwrap();
    assert!(ack_age < 5.0, "{ack_age}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_term_change_after_a_leader_kill() {
    let c = TestCluster::start_with(3, &["--log-format=json"]);
    let old = c.wait_leader().await;
    // Formation is complete once every node holds the first leader's entry
    // (before that, a follower with only the initial membership entry
    // refuses its peer's vote: see the README on wiped nodes).
    c.wait_applied(&[1, 2, 3], 1).await;
    let s = scrape(&c, old).await;
    let term = value(&s, "raft_term", &[]).unwrap();
    assert_eq!(value(&s, "raft_role", &[("role", "leader")]), Some(1.0));
    let watcher = (1..=3).find(|i| *i != old).unwrap();
    let changes = value(&scrape(&c, watcher).await, "raft_leader_changes_total", &[]).unwrap();
    assert!(changes >= 1.0);

    c.kill(old);
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let new = c.wait_leader_among(&survivors).await;
    assert_ne!(new, old);
    let s = wait_metrics(&c, new, "new leader role", |s| {
        (value(s, "raft_role", &[("role", "leader")]) == Some(1.0)).then(|| s.to_vec())
    })
    .await;
    assert_eq!(value(&s, "raft_role", &[("role", "follower")]), Some(0.0));
    let new_term = value(&s, "raft_term", &[]).unwrap();
    assert!(new_term > term, "term {term} -> {new_term}");
    for id in survivors {
        wait_metrics(&c, id, "the new leader and term", |s| {
            (value(s, "raft_leader_id", &[]) == Some(new as f64)
                && value(s, "raft_term", &[]) == Some(new_term)
                && value(s, "raft_leader_changes_total", &[]).unwrap_or(0.0) >= 1.0)
                .then_some(())
        })
        .await;
    }
    let after = value(&scrape(&c, watcher).await, "raft_leader_changes_total", &[]).unwrap();
    assert!(after > changes, "leader changes {changes} -> {after}");

    // The election is in the logs, as JSON lines carrying node id, term and leader.
    let log = std::fs::read_to_string(c.nodes[&new].log()).unwrap();
    let events: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!events.is_empty(), "no JSON log lines:\n{}", c.log_tail(new));
    let became_leader = events.iter().find(|e| {
        e["fields"]["message"] == "role changed"
            && e["fields"]["to"] == "leader"
            && e["fields"]["term"] == new_term as u64
    });
    let e =
        became_leader.unwrap_or_else(|| panic!("no 'role changed' to leader in term {new_term}:\n{}", c.log_tail(new)));
    assert_eq!(e["span"]["node_id"], new, "{e}");
    assert!(
        events.iter().any(|e| e["fields"]["message"] == "leader changed"
            && e["fields"]["leader"] == new
            && e["fields"]["term"] == new_term as u64),
        "no 'leader changed' line:\n{}",
        c.log_tail(new)
    );
    assert!(events.iter().any(|e| e["fields"]["message"] == "membership changed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_during_shutdown() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    wait_ready(&c, &[1, 2, 3]).await;
    let target = 3;
    let r = c.admin.post(c.url(target, "/ha/shutdown")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // From now on the node is never ready again: it answers 503 "shutting
    // down" while it drains, then stops listening.
    let start = Instant::now();
    let mut saw_503 = 0;
    loop {
        match readyz(&c, target).await {
            Ok((200, b)) => panic!("ready after /ha/shutdown: {b}"),
            Ok((503, b)) => {
                assert_eq!(b["reason"], "shutting down", "{b}");
                saw_503 += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break, // no longer listening
        }
        assert!(start.elapsed() < WAIT, "node kept serving after /ha/shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = c.terminate(target); // waits for the exit already under way
    assert!(status.success(), "{status:?}\n{}", c.log_tail(target));
    let log = std::fs::read_to_string(c.nodes[&target].log()).unwrap();
    assert!(
        log.contains("shutdown requested over the API"),
        "{}",
        c.log_tail(target)
    );
    eprintln!("503 answers seen before the listener closed: {saw_503}");
    // The rest of the cluster is unaffected.
    let survivors = [1, 2];
    c.wait_leader_among(&survivors).await;
    wait_ready(&c, &survivors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_in_a_minority_is_not_ready() {
    let c = TestCluster::start(3);
    let leader = c.wait_leader().await;
    wait_ready(&c, &[1, 2, 3]).await;

    // 1. The leader alone: its quorum acknowledgements stop.
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    for f in &followers {
        c.kill(*f);
    }
    let reason = wait_not_ready(&c, leader).await;
    eprintln!("lone leader {leader}: {reason}");
    wait_metrics(&c, leader, "has_leader 0 and ready 0", |s| {
        (value(s, "raft_has_leader", &[]) == Some(0.0) && value(s, "keel_ready", &[]) == Some(0.0)).then_some(())
    })
    .await;
    let h = c.client.get(c.url(leader, "/ha/health")).send().await.unwrap();
    assert_eq!(h.status(), 503);
    let st: Value = c
        .client
        .get(c.url(leader, "/ha/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if st["view"] == "leader" {
        for n in st["nodes"].as_array().unwrap().iter().filter(|n| n["id"] != leader) {
            assert!(n["status"] == "DOWN" || n["status"] == "SUSPECTED", "{st}");
        }
    }

    // Everyone back: ready again.
    for f in &followers {
        c.spawn(*f);
    }
    let leader = c.wait_leader().await;
    wait_ready(&c, &[1, 2, 3]).await;

    // 2. A follower alone: it still remembers its leader (pre-vote never
    // lets it start an election), but hears nothing from it.
    let lone = (1..=3).find(|i| *i != leader).unwrap();
    for id in (1..=3).filter(|i| *i != lone) {
        c.kill(id);
    }
    let reason = wait_not_ready(&c, lone).await;
    eprintln!("lone follower {lone}: {reason}");
    assert!(reason.contains("contact") || reason.contains("no leader"), "{reason}");
}
