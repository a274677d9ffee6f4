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
members="1=127.0.0.1:27101/127.0.0.1:27001,2=127.0.0.1:27102/127.0.0.1:27002,3=127.0.0.1:27103/127.0.0.1:27003"
applied() { # PORT: the node's applied index, or nothing
    curl -sf --max-time 1 "127.0.0.1:$1/status" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["applied_index"])' 2>/dev/null || true
}
for r in $(seq 1 "$rounds"); do
    target=$(applied "2700$leader")
    kill -9 "${pids[$((follower - 1))]}"
    wait "${pids[$((follower - 1))]}" 2>/dev/null || true
    t0=$(date +%s.%N)
    "$keel" serve --insecure --node-id "$follower" --cluster-name bench --data-dir "$dir/n$follower" \
        --api-listen "127.0.0.1:2700$follower" --raft-listen "127.0.0.1:2710$follower" \
        --initial-members "$members" --log-level warn >>"$dir/n$follower.log" 2>&1 &
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
