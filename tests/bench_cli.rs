//! `keel bench` against a real 3-node cluster over mutual TLS: a bounded
//! run of each kind of workload emits one JSON report with every field the
//! comparison script reads. No figure is checked: speed lives in
//! benchmarks, never in tests.

mod common;

use std::process::Command;
use std::process::Stdio;

use common::TestCluster;
use serde_json::Value;

fn bench(c: &TestCluster, args: &[&str]) -> Value {
    let endpoints: Vec<String> = c.nodes.keys().map(|id| c.url(*id, "")).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("bench")
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .arg("--ca")
        .arg(c.certs.join("ca.pem"))
        .arg("--cert")
        .arg(c.certs.join("client-dev.pem"))
        .arg("--key")
        .arg(c.certs.join("client-dev-key.pem"))
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("run keel bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keel bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"))
}

fn check_report(r: &Value, workload: &str, ops: u64) {
    assert_eq!(r["system"], "keel");
    assert_eq!(r["workload"], workload);
    assert_eq!(r["ops"].as_u64(), Some(ops), "{r}");
    assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
    assert_eq!(r["key_size"], 8);
    assert_eq!(r["endpoints"], 3);
    assert!(r["throughput"].as_f64().unwrap() > 0.0, "{r}");
    for p in ["p50", "p90", "p99", "p99_9", "max", "mean"] {
        assert!(r["latency_ms"][p].as_f64().is_some(), "latency_ms.{p} missing: {r}");
    }
    let l = &r["latency_ms"];
    assert!(
        l["p50"].as_f64() <= l["p99"].as_f64() && l["p99"].as_f64() <= l["max"].as_f64(),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_workload_and_reports_json() {
    let c = TestCluster::start(3);
    c.wait_leader().await;
    let small = ["--clients", "4", "--connections", "2", "--keys", "20", "--count", "40"];
    for w in ["put", "get", "stale-get", "mixed", "acquire"] {
        let r = bench(&c, &[&["--workload", w], &small[..]].concat());
        check_report(&r, w, 40);
        assert_eq!(r["connections"], 2);
    }
    // Three watchers, ten writes: thirty events.
    let r = bench(
        &c,
        &["--workload", "watch", "--clients", "3", "--count", "10", "--rate", "50"],
    );
    check_report(&r, "watch", 30);
    // The put workload wrote the key space: every key reads back at 256 bytes.
    let got = c.get(2, "k0000007", false).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(serde_json::to_vec(&got.body["value"]).unwrap().len(), 256);
}
