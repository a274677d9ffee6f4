#!/usr/bin/env bash
# The whole verification, for developers and CI alike: formatting, lints,
# and every test (unit, storage conformance, and cluster tests that run the
# real binary as separate processes). It changes no files.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prereqs.sh
./scripts/prereqs-obs.sh
. scripts/env.sh
claim_target_dir

# Alert rules and their unit tests (the dashboard's PromQL and a live
# /metrics scrape are checked with promtool by the cargo tests).
promtool check rules config/prometheus/alerts.yml
promtool test rules config/prometheus/alerts_test.yml
# Docker, Compose and Kubernetes files, as far as they can be checked here.
./scripts/validate-deploy.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Cluster tests start several nodes each; two at a time keeps a 2-core
# machine responsive enough for election timeouts of 1-2 s.
# The fault-injection suite (tests/faults.rs) is part of it: its bounded
# smoke set needs root for network namespaces. `KEEL_FAULTS=long` runs the
# longer set. Each scenario's result line is printed at the end.
# Coverage-guided fuzzing of the snapshot and peer-RPC decoders and of the
# write-ahead log check, bounded.
./scripts/fuzz.sh 20
export KEEL_FAULT_REPORT="${TMPDIR:-/tmp}/keel-fault-report.$$"
rm -f "$KEEL_FAULT_REPORT"
status=0
cargo test --workspace --no-fail-fast -- --test-threads=2 || status=$?
if [ -s "$KEEL_FAULT_REPORT" ]; then
    echo "== fault-injection suite =="
    cat "$KEEL_FAULT_REPORT"
fi
rm -f "$KEEL_FAULT_REPORT"
exit "$status"
