#!/usr/bin/env bash
# How long a node killed with SIGKILL takes, once restarted, to serve the
# state it had.
#
#   bench/restart-catch-up.sh KEEL_BINARY [PUTS [ROUNDS]]
#
# A fresh plaintext 3-node cluster on loopback (ports 27001-27103, data in a
# new temporary directory); 64 clients write PUTS puts (default 90,000: under
# `snapshot_every`, so the whole run stays in the log and the state
# machine's memtables); a follower is killed with SIGKILL and started again
# with the same arguments, ROUNDS times (default 3). Each round prints the
# time from the restart until the node answers /status, and until its
# applied index reaches the leader's at the kill (the state machine's
# memtables are lost with the process: the node re-applies, from its own
# log, what its last flush did not hold). Every process it starts is stopped
# by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/restart-catch-up.sh KEEL_BINARY [PUTS [ROUNDS]]}
puts=${2:-90000}
rounds=${3:-3}
dir=$(mktemp -d -t keel-restart.XXXXXX)
pids=()
trap 'stop_pids "${pids[@]}"; rm -rf "$dir"' EXIT
start_nodes "$keel" "$dir" 2700 2710
leader=$(wait_leader 27001)
"$keel" bench --endpoints "http://127.0.0.1:2700$leader" --workload put --clients 64 \
    --count "$puts" >/dev/null
follower=$((leader % 3 + 1))
applied() { status_field "$1" applied_index; } # PORT: the node's applied index, or nothing
for r in $(seq 1 "$rounds"); do
    target=$(applied "2700$leader")
    kill -9 "${pids[$((follower - 1))]}"
    wait "${pids[$((follower - 1))]}" 2>/dev/null || true
    t0=$(date +%s.%N)
    start_node "$keel" "$dir" 2700 2710 "$follower"
    pids[$((follower - 1))]=$!
    up="" caught=""
    for _ in $(seq 1 6000); do
        a=$(applied "2700$follower")
        now=$(date +%s.%N)
        [[ -n "$a" && -z "$up" ]] && up=$now
        if [[ -n "$a" ]] && ((a >= target)); then
            caught=$now
            break
        fi
        sleep 0.01
    done
    [[ -n "$caught" ]] || { echo "round $r: node $follower did not reach index $target" >&2; exit 1; }
    python3 -c "import sys; t0, up, c = map(float, sys.argv[1:4]); \
print(f'round {sys.argv[4]}: node {sys.argv[5]} answered {up - t0:.2f} s after its restart, ' \
      f'held index {sys.argv[6]} after {c - t0:.2f} s')" "$t0" "$up" "$caught" "$r" "$follower" "$target"
done
