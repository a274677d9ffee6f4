#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time and fails if one finds
# a crash. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 60).
#
# cargo-fuzz is installed once into a cached tools directory; the fuzz
# build lives in its own persistent target directory outside the clone (the
# targets are built with sanitizer flags, so they cannot share the
# workspace's), and the corpus grows across runs in a cache directory,
# seeded from the small committed inputs in fuzz/seeds/. The fuzz build does
# not compile RocksDB (see fuzz/Cargo.toml).
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets rustc accept them.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
tools="${KEEL_TOOLS_DIR:-$HOME/.cache/keel-tools}"
target_dir="${KEEL_FUZZ_TARGET_DIR:-$HOME/.cache/keel-fuzz-target}"
corpus_root="${KEEL_FUZZ_CORPUS_DIR:-$HOME/.cache/keel-fuzz-corpus}"

if ! [ -x "$tools/bin/cargo-fuzz" ]; then
    cargo install cargo-fuzz --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1

cd fuzz
cargo fuzz build --target-dir "$target_dir"
for t in snapshot_decode peer_decode wal_scan; do
    corpus="$corpus_root/$t"
    mkdir -p "$corpus"
    cp -n seeds/"$t"/* "$corpus"/
    echo "== fuzzing $t for ${seconds}s (corpus: $corpus)"
    # A crash, a leak, a timeout (10 s for one input) or more than 2 GiB
    # resident ends the run with a non-zero status and the input saved in
    # fuzz/artifacts/$t/; reproduce with `cargo fuzz run $t <that file>`.
    cargo fuzz run --target-dir "$target_dir" "$t" "$corpus" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
