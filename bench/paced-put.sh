#!/usr/bin/env bash
# Single-client put latency at a paced rate, next to back-to-back puts.
#
#   bench/paced-put.sh KEEL_BINARY [ROUNDS [CLIENT_BINARY...]]
#
# A control plane's writes come a few at a time with pauses between them,
# not back to back; this measures a put that arrives at an idle cluster.
# A fresh plaintext 3-node cluster of KEEL_BINARY on loopback (ports
# 28101-28123, data in a new temporary directory), warmed with 500 puts;
# then, ROUNDS times (default 3), one client puts to the leader back to back
# (2,000 puts) and at 50 and 200 puts per second (300 and 500 puts). Each
# CLIENT_BINARY (default: KEEL_BINARY) runs `keel bench` in turn within a
# round, so builds of the load generator compare on one cluster. Prints
# p50 and p99 in milliseconds per run.
# Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/paced-put.sh KEEL_BINARY [ROUNDS [CLIENT_BINARY...]]}
rounds=${2:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2; }
shift $(($# < 2 ? $# : 2))
clients=("$@")
[[ ${#clients[@]} -gt 0 ]] || clients=("$keel")
for c in "${clients[@]}"; do
    [[ -x $c ]] || { echo "not an executable: $c" >&2; exit 2; }
done
start_warm_cluster "$keel" paced 2810 2812

echo "round client load ops_s p50_ms p99_ms"
for round in $(seq 1 "$rounds"); do
    for load in "--count 2000" "--count 300 --rate 50" "--count 500 --rate 200"; do
        for c in "${clients[@]}"; do
            # shellcheck disable=SC2086 # $load is a list of options
            read -r ops_s p50 p99 < <(timeout 120 "$c" bench --endpoints "$ep" --workload put --clients 1 $load --json |
                python3 -c 'import json,sys
r = json.load(sys.stdin)
if r["errors"] or not r["ops"]:
    sys.exit("%d errors, %d puts" % (r["errors"], r["ops"]))
print(round(r["throughput"]), r["latency_ms"]["p50"], r["latency_ms"]["p99"])')
            rate=${load#*--rate }
            [[ $rate == "$load" ]] && rate="back-to-back"
            echo "$round $(basename "$c") $rate $ops_s $p50 $p99"
        done
    done
done
