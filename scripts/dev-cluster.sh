#!/usr/bin/env bash
# Starts a local 3-node keel cluster on loopback with generated certificates.
# Stays up until Ctrl-C, then stops every node cleanly.
#   ./scripts/dev-cluster.sh [--nodes N] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prereqs.sh
. scripts/env.sh
claim_target_dir
cargo build --bin keel
nodes=3
dir=keel-dev
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
exec "$CARGO_TARGET_DIR/debug/keel" dev-cluster --nodes "$nodes" --dir "$dir"
