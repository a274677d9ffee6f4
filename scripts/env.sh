# Sourced by the scripts: one persistent target directory outside the clone,
# so RocksDB (about 30 minutes cold on 2 cores) is compiled once and every
# later build, test run and dev cluster reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
mkdir -p "$CARGO_TARGET_DIR"
export PATH="${KEEL_TOOLS_DIR:-$HOME/.cache/keel-tools}/bin:$PATH"
