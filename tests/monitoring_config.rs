//! The shipped monitoring configuration is valid and speaks about metrics
//! that exist: every PromQL expression of the Grafana dashboard parses
//! (`promtool check rules` on a rules file made of them), the alert rules
//! pass `promtool check rules` and their unit tests (`promtool test rules`),
//! and every keel metric named in the dashboard or the alerts is one that
//! `src/metrics.rs` registers.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;

use common::promtool_path;
use serde_json::Value;

/// The checkout: from the environment `cargo test` runs this in, so a
/// binary built from a checkout at another path still reads this one.
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

fn promtool(args: &[&str], dir: &Path) {
    let out = Command::new(promtool_path())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool not runnable ({e}): run scripts/prereqs.sh (Debian package `prometheus`)")
        });
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `expr` of every panel (rows included), with its panel title.
fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("config/grafana/keel-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_string(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dash["panels"], &mut out);
    out
}

/// Replaces Grafana's variables by values PromQL accepts.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

/// Metric names of keel (`raft_*`, `keel_*`) mentioned in `text`.
fn keel_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &text[start..i];
            if word.starts_with("raft_") || word.starts_with("keel_") {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The registered name a sample name belongs to.
fn family(sample: &str) -> String {
    for suffix in ["_bucket", "_count", "_sum", "_total"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            return base.to_string();
        }
    }
    sample.to_string()
}

#[test]
fn every_dashboard_expression_is_valid_promql() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "only {} expressions", exprs.len());
    let mut rules = String::from("groups:\n  - name: keel-dashboard-expressions\n    rules:\n");
    for (i, (title, e)) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      # {title}\n      - record: keel_dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&substitute(e)).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard-rules.yml"), &rules).unwrap();
    promtool(&["check", "rules", "dashboard-rules.yml"], dir.path());
}

#[test]
fn alert_rules_pass_check_and_unit_tests() {
    let dir = root().join("config/prometheus");
    promtool(&["check", "rules", "alerts.yml"], &dir);
    promtool(&["test", "rules", "alerts_test.yml"], &dir);
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let registered: BTreeSet<&str> = keel::metrics::get().names().iter().copied().collect();
    let mut text: String = dashboard_exprs().into_iter().map(|(_, e)| e + "\n").collect();
    text.push_str(&std::fs::read_to_string(root().join("config/prometheus/alerts.yml")).unwrap());
    let used = keel_names(&text);
    assert!(used.len() >= 20, "{used:?}");
    for name in &used {
        assert!(
            registered.contains(family(name).as_str()) || registered.contains(name.as_str()),
            "{name} is used by the dashboard or the alerts but src/metrics.rs registers no such metric"
        );
    }
    // The panels are all there.
    let titles: Vec<String> = dashboard_exprs().into_iter().map(|(t, _)| t.to_lowercase()).collect();
    for want in [
        "role",
        "term",
        "leader changes",
        "replication lag",
        "commit and apply",
        "proposals",
        "rpc latency",
        "fsync",
        "snapshot",
        "http requests",
        "http errors",
        "http latency",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no dashboard panel about {want}"
        );
    }
}
