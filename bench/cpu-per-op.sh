#!/usr/bin/env bash
# Throughput and CPU per operation of a 3-node keel cluster under put load.
#
#   bench/cpu-per-op.sh KEEL_BINARY [CLIENTS [CONNECTIONS [SECONDS]]]
#
# Starts a fresh 3-node cluster (plaintext, loopback, ports 24001-24103,
# data in a new temporary directory), warms it with 3 s of puts, then runs
# `keel bench --workload put` for SECONDS (default 10) and prints the
# throughput, p50 latency, the CPU time (user + system) all three nodes
# used per put over the run, and the bytes they wrote to storage per put.
# With PERF=1 it also records the leader with
# `perf record --call-graph dwarf` for 3 s into the data directory's
# perf.data (kept; its path is printed); PERF=follower records a follower
# instead. ROUNDS=N measures N runs of SECONDS one after another on the
# same cluster (does throughput hold as the data grows?), each reported on
# its own. THREADS=1 also prints the CPU per put of each kind of thread,
# summed over the three nodes (threads named alike, such as RocksDB's
# background threads, together). Every process it starts is stopped
# by pid before it exits.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/cpu-per-op.sh KEEL_BINARY [CLIENTS [CONNECTIONS [SECONDS]]]}
clients=${2:-64}
conns=${3:-$clients}
secs=${4:-10}
rounds=${ROUNDS:-1}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2; }
dir=$(mktemp -d -t keel-cpu-per-op.XXXXXX)
endpoints="http://127.0.0.1:24001,http://127.0.0.1:24002,http://127.0.0.1:24003"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -z "${PERF:-}" ]]; then rm -rf "$dir"; fi
}
trap cleanup EXIT

start_nodes "$keel" "$dir" 2400 2410

leader=$(wait_leader 24001)
leader_pid=${pids[$((leader - 1))]}
profiled_pid=$leader_pid
if [[ "${PERF:-}" == follower ]]; then
    profiled_pid=${pids[$((leader % 3))]}
fi

"$keel" bench --endpoints "$endpoints" --workload put --clients "$clients" --connections "$conns" \
    --duration 3 >/dev/null
hz=$(getconf CLK_TCK)
for round in $(seq 1 "$rounds"); do
    t0=$(cpu_ticks "${pids[@]}")
    w0=$(io_write_bytes "${pids[@]}")
    [[ -n "${THREADS:-}" ]] && thread_ticks "${pids[@]}" >"$dir/threads0"
    perf_pid=""
    if [[ -n "${PERF:-}" && "$round" == 1 ]]; then
        perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$profiled_pid" -o "$dir/perf.data" \
            -- sleep 3 >/dev/null 2>&1 &
        perf_pid=$!
    fi
    "$keel" bench --endpoints "$endpoints" --workload put --clients "$clients" --connections "$conns" \
        --duration "$secs" --json >"$dir/bench.json"
    t1=$(cpu_ticks "${pids[@]}")
    w1=$(io_write_bytes "${pids[@]}")
    [[ -n "${THREADS:-}" ]] && thread_ticks "${pids[@]}" >"$dir/threads1"
    [[ -n "$perf_pid" ]] && wait "$perf_pid"
    [[ "$rounds" -gt 1 ]] && printf 'round %s: ' "$round"
    python3 - "$dir/bench.json" "$t0" "$t1" "$hz" "$clients" "$conns" "$w0" "$w1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t0, t1, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
us = (t1 - t0) / hz * 1e6 / r["ops"]
written = (int(sys.argv[8]) - int(sys.argv[7])) / r["ops"]
print(f"put {sys.argv[5]} clients / {sys.argv[6]} connections: {r['throughput']:.0f} ops/s, "
      f"p50 {r['latency_ms']['p50']:.2f} ms, {r['errors']} errors, cluster CPU {us:.0f} us per put, "
      f"{written:,.0f} bytes written to storage per put")
EOF
    if [[ -n "${THREADS:-}" ]]; then
        python3 - "$dir/bench.json" "$dir/threads0" "$dir/threads1" "$hz" <<'EOF'
import collections, json, sys
ops = json.load(open(sys.argv[1]))["ops"]
hz = int(sys.argv[4])
def read(path):
    return {(p, t): (name, int(ticks)) for p, t, name, ticks in (l.split() for l in open(path))}
before, after = read(sys.argv[2]), read(sys.argv[3])
by_name = collections.Counter()
for k, (name, ticks) in after.items():
    by_name[name] += ticks - before.get(k, (name, 0))[1]
total = sum(by_name.values()) or 1
print("CPU per put by thread (the three nodes; threads that ended during the run are not counted):")
for name, ticks in by_name.most_common():
    if ticks:
        print(f"  {name:<20} {ticks / hz * 1e6 / ops:7.1f} us  {100 * ticks / total:5.1f} %")
EOF
    fi
done
[[ -n "${PERF:-}" ]] && echo "profile of pid $profiled_pid (leader $leader_pid): $dir/perf.data"
exit 0
