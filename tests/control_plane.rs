//! The control-plane API on a real 3-node cluster: conditional writes,
//! cluster-wide rate limits, transactions, idempotency, leases and watches.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use common::TestCluster;
use futures::StreamExt;
use serde_json::Value;
use serde_json::json;

async fn send(
    c: &TestCluster,
    method: reqwest::Method,
    node: u64,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut r = c.client.request(method, c.url(node, path));
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn worker(url: &str) -> Value {
    json!({"url": url, "models": ["llama-3-8b"], "labels": {"zone": "a"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_if_match_writes_give_one_success_and_one_conflict() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    let (st, created) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/workers/w1",
        Some(worker("http://a:1")),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{created}");
    let mut rev = created["revision"].as_u64().unwrap();
    for round in 0..5 {
        let h = [("if-match", rev.to_string())];
        let a = send(
            &c,
            reqwest::Method::PUT,
            2,
            "/v1/workers/w1",
            Some(worker(&format!("http://a:{round}"))),
            &h,
        );
        let b = send(
            &c,
            reqwest::Method::PUT,
            3,
            "/v1/workers/w1",
            Some(worker(&format!("http://b:{round}"))),
            &h,
        );
        let ((sa, ba), (sb, bb)) = tokio::join!(a, b);
        let mut statuses = [sa, sb];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "round {round}: {ba} / {bb}");
        let winner = if sa == 200 { &ba } else { &bb };
        let loser = if sa == 200 { &bb } else { &ba };
        assert_eq!(loser["error"]["code"], "conflict");
        assert_eq!(loser["error"]["current_revision"], winner["revision"]);
        rev = winner["revision"].as_u64().unwrap();
    }
    // The HA view of every node lists the worker (a local, stale read).
    c.wait_applied(&[1, 2, 3], rev).await;
    for node in 1..=3 {
        let (st, ha) = send(&c, reqwest::Method::GET, node, "/ha/workers", None, &[]).await;
        assert_eq!(st, 200);
        assert_eq!(ha["items"][0]["id"], "w1", "node {node}: {ha}");
    }
    // Create-only refuses an existing worker.
    let (st, _) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/workers/w1",
        Some(worker("http://c:1")),
        &[("if-none-match", "*".into())],
    )
    .await;
    assert_eq!(st, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_acquires_over_three_nodes_grant_exactly_the_bucket() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    let (st, b) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/ratelimits/gpu",
        Some(json!({"kind": "token_bucket", "capacity": 100, "refill_per_sec": 0})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let replies: Vec<(u16, Value)> = futures::stream::iter(0..1000u64)
        .map(|i| {
            let c = &c;
            async move {
                send(
                    c,
                    reqwest::Method::POST,
                    1 + i % 3,
                    "/v1/ratelimits/gpu/acquire",
                    Some(json!({"tokens": 1})),
                    &[],
                )
                .await
            }
        })
        .buffer_unordered(48)
        .collect()
        .await;
    let granted = replies.iter().filter(|r| r.0 == 200).count();
    let denied = replies.iter().filter(|r| r.0 == 429).count();
    let other: Vec<&(u16, Value)> = replies.iter().filter(|r| r.0 != 200 && r.0 != 429).collect();
    assert!(
        other.is_empty(),
        "{} unexpected replies, e.g. {:?}",
        other.len(),
        &other[..other.len().min(3)]
    );
    assert_eq!((granted, denied), (100, 900));
    // The bucket agrees: nothing left.
    let (_, rl) = send(&c, reqwest::Method::GET, 2, "/v1/ratelimits/gpu", None, &[]).await;
    assert_eq!(rl["value"]["buckets"][""]["level_milli"], 0, "{rl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_whose_precondition_fails_changes_nothing() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    let (_, w) = send(&c, reqwest::Method::PUT, 1, "/v1/kv/config", Some(json!({"v": 1})), &[]).await;
    let rev = w["revision"].as_u64().unwrap();
    // Node 2 must hold the write before we fingerprint its state.
    c.wait_applied(&[2], rev).await;
    let before = c.state_hash(2).await;
    let txn = json!({
        "compare": [{"key": "kv/config", "revision": rev + 100}],
        "success": [{"put": {"key": "kv/config", "value": {"v": 2}}}, {"put": {"key": "kv/other", "value": 1}}],
    });
    let (st, body) = send(&c, reqwest::Method::POST, 2, "/v1/txn", Some(txn), &[]).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["succeeded"], false);
    // An operation that cannot apply aborts everything as well.
    let txn = json!({"success": [{"put": {"key": "kv/x", "value": 1}}, {"delete": {"key": "kv/missing"}}]});
    let (st, body) = send(&c, reqwest::Method::POST, 3, "/v1/txn", Some(txn), &[]).await;
    assert_eq!(st, 409, "{body}");
    c.wait_applied(&[2], c.status(3).await.unwrap().commit_index).await;
    let after = c.state_hash(2).await;
    assert_eq!(before["hash"], after["hash"], "failed transactions changed the state");
    // And a transaction that holds applies all of its operations at one revision.
    let txn = json!({
        "compare": [{"key": "kv/config", "revision": rev}, {"key": "kv/new", "exists": false}],
        "success": [{"put": {"key": "kv/config", "value": {"v": 3}}}, {"put": {"key": "kv/new", "value": true}}],
    });
    let (st, body) = send(&c, reqwest::Method::POST, 1, "/v1/txn", Some(txn), &[]).await;
    assert_eq!((st, &body["succeeded"]), (200, &json!(true)), "{body}");
    let r1 = c.get(2, "config", false).await.unwrap();
    let r2 = c.get(3, "new", false).await.unwrap();
    assert_eq!(r1.body["revision"], body["revision"]);
    assert_eq!(r2.body["revision"], body["revision"]);
    // Bad input is a 400 naming the problem.
    let (st, body) = send(
        &c,
        reqwest::Method::POST,
        1,
        "/v1/txn",
        Some(json!({"compare": [{"key": "kv/a"}]})),
        &[],
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("exactly one"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_retries_apply_once_and_bad_input_is_named() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    let h = [("idempotency-key", "req-42".to_string())];
    for node in 1..=3 {
        let (st, b) = send(
            &c,
            reqwest::Method::POST,
            node,
            "/v1/counters/req/add",
            Some(json!({"delta": 5})),
            &h,
        )
        .await;
        assert_eq!((st, &b["value"]), (200, &json!(5)), "retry via node {node}: {b}");
    }
    let (_, b) = send(&c, reqwest::Method::GET, 2, "/v1/counters/req", None, &[]).await;
    assert_eq!(b["value"], 5);

    let (st, b) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/policies/p",
        Some(json!({"kind": "fastest"})),
        &[],
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("unknown policy kind"),
        "{b}"
    );
    let (st, b) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/policies/p",
        Some(json!({"kind": "cache_aware", "params": {"cache_threshold": 7}})),
        &[],
    )
    .await;
    assert_eq!(st, 400, "{b}");
    let (st, b) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/policies/p",
        Some(json!({"kind": "cache_aware", "params": {"cache_threshold": 0.5}, "model": "llama"})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let (st, b) = send(
        &c,
        reqwest::Method::PUT,
        1,
        "/v1/workers/w",
        Some(json!({"url": "http://x", "colour": "red"})),
        &[],
    )
    .await;
    assert_eq!(st, 400);
    assert!(b["error"]["message"].as_str().unwrap().contains("colour"), "{b}");
    // Every error, even the framework's own, has the one JSON shape.
    let big = "x".repeat(2 << 20);
    let (st, b) = send(&c, reqwest::Method::PUT, 1, "/v1/kv/big", Some(json!(big)), &[]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (413, Some("body_too_large")), "{b}");
    let (st, b) = send(&c, reqwest::Method::PATCH, 1, "/v1/workers/w", None, &[]).await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{b}"
    );
    let (st, b) = send(&c, reqwest::Method::GET, 1, "/v1/nothing", None, &[]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (404, Some("not_found")), "{b}");
}

/// Reads SSE events (revision, key, kind) from a watch until `want` events
/// arrived or the stream ends.
struct Watch {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Watch {
    async fn open(c: &TestCluster, node: u64, prefix: &str, from: u64) -> Watch {
        let r = c
            .client
            .get(c.url(node, &format!("/v1/watch?prefix={prefix}&from_revision={from}")))
            .timeout(Duration::from_secs(300))
            .send()
            .await
            .expect("watch");
        assert_eq!(r.status(), 200);
        Watch {
            stream: Box::pin(r.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<(u64, String, String)> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.trim().to_string());
                if let Some(d) = data
                    && let Ok(v) = serde_json::from_str::<Value>(&d)
                {
                    return Some((
                        v["revision"].as_u64().unwrap(),
                        v["key"].as_str().unwrap().into(),
                        v["kind"].as_str().unwrap().into(),
                    ));
                }
                continue;
            }
            match tokio::time::timeout(common::WAIT, self.stream.next()).await {
                Ok(Some(Ok(b))) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                _ => return None,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_watch_sees_every_change_in_order_across_reconnects_and_a_leader_kill() {
    let c = TestCluster::start(3);
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let start = c.status(follower).await.unwrap().applied_index + 1;
    let mut acked = BTreeSet::new();
    let mut seen: Vec<u64> = Vec::new();
    let mut w = Watch::open(&c, follower, "workers/", start).await;
    // Writes outside the prefix must not show up.
    c.put(leader, "noise", &json!(1)).await.unwrap();
    for i in 0..60u64 {
        if i == 40 {
            c.kill(leader);
            c.wait_leader_among(&[follower, other]).await;
        }
        let node = if i < 40 {
            1 + i % 3
        } else {
            [follower, other][i as usize % 2]
        };
        let (st, b) = send(
            &c,
            reqwest::Method::PUT,
            node,
            &format!("/v1/workers/w{}", i % 7),
            Some(worker(&format!("http://h:{i}"))),
            &[],
        )
        .await;
        assert!(st == 200 || st == 201, "write {i}: {st} {b}");
        acked.insert(b["revision"].as_u64().unwrap());
        if i == 20 || i == 50 {
            // Drain what has arrived so far, then reconnect from the next revision.
            while seen.last().copied() < acked.last().copied() {
                let (rev, key, kind) = w.next().await.expect("event before reconnect");
                assert!(key.starts_with("workers/") && kind == "put");
                seen.push(rev);
            }
            w = Watch::open(&c, follower, "workers/", seen.last().unwrap() + 1).await;
        }
    }
    while seen.len() < acked.len() {
        let (rev, key, _) = w.next().await.expect("watch ended early");
        assert!(key.starts_with("workers/"));
        seen.push(rev);
    }
    assert!(
        seen.windows(2).all(|p| p[0] < p[1]),
        "out of order or duplicated: {seen:?}"
    );
    assert_eq!(
        seen.iter().copied().collect::<BTreeSet<_>>(),
        acked,
        "gap or extra events"
    );

    // A revision older than the retained history is 410 Gone, with the current revision.
    let r = c
        .client
        .get(c.url(follower, "/v1/watch?from_revision=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "revision 0 means from the start, which is retained here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapsed_lease_removes_the_worker_everywhere() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    let spec = json!({"url": "http://x:1", "lease_ttl_ms": 1000});
    let (st, b) = send(&c, reqwest::Method::PUT, 2, "/v1/workers/leased", Some(spec), &[]).await;
    assert_eq!(st, 201, "{b}");
    let from = b["revision"].as_u64().unwrap() + 1;
    let mut w = Watch::open(&c, 3, "workers/", from).await;
    let (_, key, kind) = w.next().await.expect("the expiry shows up as a delete");
    assert_eq!((key.as_str(), kind.as_str()), ("workers/leased", "delete"));
    let started = Instant::now();
    for node in 1..=3 {
        let (st, _) = send(&c, reqwest::Method::GET, node, "/v1/workers/leased", None, &[]).await;
        assert_eq!(st, 404, "node {node}");
    }
    assert!(started.elapsed() < common::WAIT);
}
