//! The `keel` command as an operator meets it: configuration errors, a data
//! directory from another cluster or of a newer data layout, the README's
//! `dev-cluster` command and `disk-check`.

mod common;

use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::TestCluster;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// Runs keel to completion and returns (success, stderr). Every command run
/// this way is expected to finish (most should refuse to start); one still
/// running after a minute is killed and fails the test, so a refusal that
/// breaks cannot leave the test waiting on a node that started.
fn run(cmd: &mut Command) -> (bool, String) {
    const LIMIT: Duration = Duration::from_secs(60);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel");
    let start = Instant::now();
    while child.try_wait().expect("wait for keel").is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keel still running after {LIMIT:?}; it should have finished");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("keel's output");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// A one-node cluster that formed and was then stopped cleanly, its data
/// directory left as a node leaves it.
async fn one_stopped_node() -> TestCluster {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    assert_eq!(c.terminate(1).code(), Some(0), "clean exit on SIGTERM");
    c
}

#[test]
fn serve_refuses_an_unspecified_advertised_address() {
    let td = tempfile::tempdir().unwrap();
    let (ok, err) = run(keel()
        .args([
            "serve",
            "--node-id",
            "1",
            "--insecure",
            "--api-listen",
            "0.0.0.0:7001",
            "--data-dir",
        ])
        .arg(td.path()));
    assert!(!ok);
    assert!(err.contains("api_advertise") && err.contains("unspecified"), "{err}");
}

#[test]
fn serve_refuses_to_start_without_tls_files_unless_insecure() {
    let td = tempfile::tempdir().unwrap();
    let (ok, err) = run(keel().args(["serve", "--node-id", "1", "--data-dir"]).arg(td.path()));
    assert!(!ok);
    assert!(err.contains("tls.ca") && err.contains("--insecure"), "{err}");
}

#[test]
fn config_file_with_an_unknown_key_is_refused_by_name() {
    let td = tempfile::tempdir().unwrap();
    let cfg = td.path().join("k.toml");
    std::fs::write(&cfg, "node_id = 1\nelection_timeout = 5\n").unwrap();
    let (ok, err) = run(keel().arg("serve").arg("--config").arg(&cfg));
    assert!(!ok);
    assert!(err.contains("election_timeout"), "{err}");
}

#[test]
fn disk_check_reports_one_writer_and_a_quorum_of_three_as_json() {
    let td = tempfile::tempdir().unwrap();
    let out = keel()
        .args(["disk-check", "--count", "20", "--syncers", "3", "--json", "--dir"])
        .arg(td.path())
        .stdin(Stdio::null())
        .output()
        .expect("run keel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["record_bytes"], 300, "{r}");
    assert_eq!(r["alone"]["n"], 20, "{r}");
    assert_eq!(r["together"]["quorum"], 2, "{r}");
    assert_eq!(r["together"]["quorum_synced"]["n"], 20, "{r}");
    for p in ["p50_ms", "p99_ms", "max_ms"] {
        assert!(r["alone"][p].as_f64().is_some_and(|v| v > 0.0), "alone.{p}: {r}");
    }
    assert_eq!(
        std::fs::read_dir(td.path()).unwrap().count(),
        0,
        "probe files left behind"
    );

    let (ok, err) = run(keel().args(["disk-check", "--syncers", "0", "--dir"]).arg(td.path()));
    assert!(!ok && err.contains("--syncers"), "{err}");
    let (ok, err) = run(keel().args(["disk-check", "--dir"]).arg(td.path().join("missing")));
    assert!(!ok && err.contains("missing"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_cluster_is_refused() {
    let c = one_stopped_node().await;
    let p = &c.nodes[&1];
    let (ok, err) = run(keel()
        .arg("serve")
        .arg("--config")
        .arg(&p.config)
        .args(&c.extra_args)
        .args(["--cluster-name", "someone-else"]));
    assert!(!ok);
    assert!(err.contains("belongs to cluster"), "{err}");
    // The original cluster still starts from the same directory.
    c.spawn(1);
    c.wait_leader().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_a_newer_data_layout_is_refused() {
    let c = one_stopped_node().await;
    let p = &c.nodes[&1];
    let set_layout = |v: u32| async move {
        let log = keel_storage::LogStore::open(&p.data_dir().join("log"), std::sync::Arc::new(keel_storage::NoHooks))
            .expect("open the stopped node's log");
        log.set_data_layout(v).await.expect("record a layout");
    };
    // What a newer build would leave behind.
    set_layout(keel_storage::DATA_LAYOUT + 1).await;
    let (ok, err) = run(keel().arg("serve").arg("--config").arg(&p.config).args(&c.extra_args));
    assert!(!ok);
    let newer = format!("data layout {}", keel_storage::DATA_LAYOUT + 1);
    assert!(err.contains(&newer) && err.contains("newer keel"), "{err}");
    // Nothing was changed by the refusal: with its layout back, the node
    // starts and leads again.
    set_layout(keel_storage::DATA_LAYOUT).await;
    c.spawn(1);
    c.wait_leader().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_starts_three_nodes_and_stops_them_on_ctrl_c() {
    let td = tempfile::tempdir().unwrap();
    let dir = td.path().join("dev");
    let mut child = keel()
        .args(["dev-cluster", "--nodes", "3", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let file = dir.join("cluster.json");
    let start = Instant::now();
    // cluster.json appears once the nodes are spawned; then /status must
    // name a leader on every node.
    let cf = loop {
        if let Ok(cf) = keel::dev_cluster::ClusterFile::read(&file) {
            break cf;
        }
        assert!(start.elapsed() < common::WAIT, "no cluster.json");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cf.nodes.len(), 3);
    for p in [
        &cf.ca_cert,
        &cf.client_cert,
        &cf.client_key,
        &cf.admin_cert,
        &cf.admin_key,
    ] {
        assert!(p.is_absolute() && p.exists(), "{}", p.display());
    }
    let client = common::http_client(&dir.join("certs"), "client-dev.pem", "client-dev-key.pem");
    for n in &cf.nodes {
        assert!(n.pid > 0 && n.data_dir.is_absolute() && n.config.exists());
        let url = format!("https://{}/status", n.api_addr);
        loop {
            let s: Option<keel::cluster::StatusView> = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            if s.is_some_and(|s| s.leader_id.is_some()) {
                break;
            }
            assert!(start.elapsed() < common::WAIT, "node {} never saw a leader", n.id);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    common::signal(child.id(), nix::sys::signal::Signal::SIGINT);
    let stopped = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(stopped.elapsed() < common::WAIT, "dev-cluster did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "dev-cluster exit: {status}");
    for n in &cf.nodes {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(n.pid as i32), None).is_ok();
        assert!(!alive, "node {} (pid {}) still running", n.id, n.pid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_commands_put_get_list_and_remove_a_worker() {
    let c = TestCluster::start(1);
    c.wait_leader().await;
    let p = &c.nodes[&1];
    let creds = |cmd: &mut Command| {
        cmd.arg("--endpoint")
            .arg(format!("https://{}", p.api_addr))
            .arg("--ca")
            .arg(c.certs.join("ca.pem"))
            .arg("--cert")
            .arg(c.certs.join("client-dev.pem"))
            .arg("--key")
            .arg(c.certs.join("client-dev-key.pem"));
    };
    let out = |args: &[&str]| {
        let mut cmd = keel();
        cmd.args(args);
        creds(&mut cmd);
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, stdout, err) = out(&[
        "worker",
        "put",
        "w1",
        "--url",
        "http://10.0.0.1:8000",
        "--model",
        "llama",
        "--label",
        "zone=a",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("\"created\": true"), "{stdout}");
    let (ok, stdout, _) = out(&["worker", "list", "--model", "llama"]);
    assert!(ok && stdout.contains("10.0.0.1"), "{stdout}");
    let (ok, stdout, _) = out(&["worker", "list", "--model", "other"]);
    assert!(ok && !stdout.contains("10.0.0.1"), "{stdout}");
    let (ok, _, err) = out(&["policy", "put", "p", "{\"kind\": \"nope\"}"]);
    assert!(!ok && err.contains("unknown policy kind"), "{err}");
    let (ok, _, err) = out(&["worker", "rm", "w1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = out(&["worker", "get", "w1"]);
    assert!(!ok && err.contains("404"), "{err}");
}
