#!/usr/bin/env bash
# How long writes fail when the leader's process dies and is started again
# at once (a supervisor restarting it), against a leader that stays dead.
#
#   bench/leader-restart.sh KEEL_BINARY [ROUNDS]
#
# A fresh plaintext 3-node cluster on loopback (ports 27201-27213, data in a
# new temporary directory), election timeout 1,000 ms (keel's default). Each
# round alternates two cases: the leader is killed with SIGKILL and started
# again with the same arguments right away ("restarted"), or killed and
# started again only after a write has succeeded ("stays down"). From the
# kill, a probe put goes every 10 ms to a surviving node (each bounded to
# 1 s); the round prints the seconds until the first put succeeds and which
# node leads then. A restarted leader comes back as a follower (leader
# restore is off) and must not hold the cluster up for longer than a dead
# one. Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/leader-restart.sh KEEL_BINARY [ROUNDS]}
rounds=${2:-5}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2; }
dir=$(mktemp -d -t keel-leader-restart.XXXXXX)
pids=()
trap 'stop_pids "${pids[@]}"; rm -rf "$dir"' EXIT
start_nodes "$keel" "$dir" 2720 2721
leader=$(wait_leader 27201)
"$keel" bench --endpoints "http://127.0.0.1:2720$leader" --workload put --clients 8 --count 500 >/dev/null
put_via() { curl -sf --max-time 1 -X PUT --data '"probe"' "127.0.0.1:2720$1/v1/kv/probe" >/dev/null; }
for r in $(seq 1 "$rounds"); do
    for case in restarted "stays down"; do
        leader=$(wait_leader "2720$((leader % 3 + 1))")
        survivor=$((leader % 3 + 1))
        # Every node must have caught up before the kill, so that the
        # previous round's restarted node is no slower to vote.
        target=$(status_field "2720$leader" applied_index)
        for n in 1 2 3; do
            for _ in $(seq 1 500); do
                a=$(status_field "2720$n" applied_index)
                [[ -n "$a" ]] && ((a >= target)) && break
                sleep 0.02
            done
        done
        t0=$(date +%s.%N)
        kill -9 "${pids[$((leader - 1))]}"
        wait "${pids[$((leader - 1))]}" 2>/dev/null || true
        if [[ $case == restarted ]]; then
            start_node "$keel" "$dir" 2720 2721 "$leader"
            pids[$((leader - 1))]=$!
        fi
        ok=""
        for _ in $(seq 1 3000); do
            if put_via "$survivor"; then ok=$(date +%s.%N); break; fi
            sleep 0.01
        done
        [[ -n "$ok" ]] || { echo "round $r ($case): no write succeeded through node $survivor" >&2; exit 1; }
        if [[ $case == "stays down" ]]; then
            start_node "$keel" "$dir" 2720 2721 "$leader"
            pids[$((leader - 1))]=$!
        fi
        new=$(wait_leader "2720$survivor")
        python3 -c "import sys; print(f'round {sys.argv[1]}, leader {sys.argv[2]} {sys.argv[3]}: '
                     f'first write after {float(sys.argv[5]) - float(sys.argv[4]):.2f} s, node {sys.argv[6]} leads')" \
            "$r" "$leader" "$case" "$t0" "$ok" "$new"
        leader=$new
    done
done
