#!/usr/bin/env bash
# Builds keel for benchmarks and prints the binary's path.
#
# The dev profile, so RocksDB and every dependency built for the tests is
# reused as it is (nothing of RocksDB is recompiled), with these overrides:
# keel's own crates at opt-level 3 in one codegen unit, not incremental;
# the dependencies a request passes through (runtime, HTTP/2, routing, JSON,
# bincode, openraft, the RocksDB wrapper) at opt-level 3 in one codegen
# unit; openraft without its debug-build state validation (`validit`).
# It builds in its own directory, next to the test build's (the tests' own
# `keel` binary stays as it is), seeded once with a copy of the test build so
# that RocksDB is not compiled a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bench_dir="${KEEL_BENCH_TARGET_DIR:-$CARGO_TARGET_DIR-bench}"
if [[ ! -d "$bench_dir" && -d "$CARGO_TARGET_DIR/debug" ]]; then
    echo "seeding $bench_dir from $CARGO_TARGET_DIR" >&2
    cp -a "$CARGO_TARGET_DIR" "$bench_dir"
fi
export CARGO_TARGET_DIR="$bench_dir"
claim_target_dir
args=(
    --config 'profile.dev.package.openraft.debug-assertions=false'
    --config 'profile.dev.package.validit.debug-assertions=false'
)
for p in keel keel-raft keel-storage keel-bench-driver; do
    args+=(--config "profile.dev.package.$p.opt-level=3"
        --config "profile.dev.package.$p.codegen-units=1"
        --config "profile.dev.package.$p.incremental=false")
done
for p in tokio h2 hyper hyper-util http bytes axum axum-core matchit openraft serde_json bincode \
    futures-util rocksdb prometheus-client tracing-core tracing-subscriber hashbrown indexmap; do
    args+=(--config "profile.dev.package.$p.opt-level=3"
        --config "profile.dev.package.$p.codegen-units=1")
done
cargo build --bin keel "${args[@]}" >&2
echo "$CARGO_TARGET_DIR/debug/keel"
