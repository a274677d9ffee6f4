#!/usr/bin/env bash
# The whole verification, for developers and CI alike: formatting, lints,
# and every test (unit, storage conformance, and cluster tests that run the
# real binary as separate processes). It changes no files.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prereqs.sh
. scripts/env.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Cluster tests start several nodes each; two at a time keeps a 2-core
# machine responsive enough for election timeouts of 1-2 s.
cargo test --workspace -- --test-threads=2
