//! schemathesis (from PyPI) fuzzes the live API of a 3-node cluster from its
//! own OpenAPI document: no response may be a 5xx or break the documented
//! schema. The watch stream is excluded (it never ends by design).

mod common;

use std::process::Command;

use common::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_or_schema_violations() {
    let st = which("st")
        .expect("schemathesis's `st` command is required (scripts/prereqs.sh installs the pinned version from PyPI)");
    let c = TestCluster::start(3);
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let certs = c.certs.clone();
    let url = c.url(follower, "/openapi.json");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .args(["run", &url])
            .args(["--checks", "not_a_server_error,response_schema_conformance"])
            .arg("--tls-verify")
            .arg(certs.join("ca.pem"))
            .arg("--request-cert")
            .arg(certs.join("client-dev.pem"))
            .arg("--request-cert-key")
            .arg(certs.join("client-dev-key.pem"))
            .args(["--exclude-path", "/v1/watch"])
            // No example database: every run starts from the seed alone
            // and leaves nothing in the checkout (a stale database once
            // replayed a case into a hypothesis-internal error).
            .args(["--generation-database", "none"])
            .args([
                "--max-examples",
                "10",
                // One worker: Python 3.11's parser is not safe across
                // threads (hypothesis parses lambdas while generating
                // cases, and two workers at once raise "AST constructor
                // recursion depth mismatch", a runtime error).
                "--workers",
                "1",
                "--request-timeout",
                "30",
                // A network-level failure (a connection the client reused
                // just as it closed) is retried; a server that crashed or
                // resets a request every time still fails the run.
                "--request-retries",
                "2",
                "--seed",
                "1",
            ])
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    // The whole report on failure: an error's details come before the
    // summary, far above its last lines.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed") && !stdout.contains(" failed"), "{stdout}");
    // Every node is still healthy and in agreement afterwards.
    c.assert_converged(&[1, 2, 3]).await;
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(cmd))
        .find(|p| p.is_file())
}
