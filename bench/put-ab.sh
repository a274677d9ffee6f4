#!/usr/bin/env bash
# A/B of keel builds (or settings) on single-client put latency and
# 64-client put throughput, alternating A, B, A, B, ...
#
#   bench/put-ab.sh [ROUNDS] LABEL=KEEL_BINARY[:ENV=VALUE,...] LABEL=...
#
# e.g. bench/put-ab.sh 3 one=keel multi=keel:KEEL_WORKER_THREADS=0
#
# WORKLOAD=get (or stale-get, mixed, acquire, watch), CLIENTS, CONNECTIONS
# and RATE (operations per second, all clients; writes for watch) change the
# measured phase (default: put, 64 clients, one connection each, no limit).
#
# Per run: a fresh plaintext 3-node cluster on loopback (ports 25001-25103,
# data in a new temporary directory), 2 s of 64-client puts to warm it, the
# single-client put p50 against the leader (4 s) and against a follower
# (4 s), with the mean log fsync on the leader and on that follower during
# the leader's phase (keel_storage_fsync_duration_seconds), then 64 clients
# over all three nodes for 8 s with the cluster's CPU time (user + system,
# /proc/<pid>/stat) per operation. The ENV settings go to `keel serve` only;
# the load generator is always the first binary named.
# Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

rounds=3
workload=${WORKLOAD:-put}
clients=${CLIENTS:-64}
conns=${CONNECTIONS:-$clients}
rate=()
[[ -n "${RATE:-}" ]] && rate=(--rate "$RATE")
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    rounds=$1
    shift
fi
(($# >= 1)) || { echo "usage: bench/put-ab.sh [ROUNDS] LABEL=KEEL[:ENV=V,...] ..." >&2; exit 2; }
loadgen=""
members="1=127.0.0.1:25101/127.0.0.1:25001,2=127.0.0.1:25102/127.0.0.1:25002,3=127.0.0.1:25103/127.0.0.1:25003"
all="http://127.0.0.1:25001,http://127.0.0.1:25002,http://127.0.0.1:25003"
pids=()
dir=""
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    pids=()
    [[ -n "$dir" ]] && rm -rf "$dir"
    dir=""
}
trap stop EXIT

p50() { python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_ms"]["p50"])'; }

# "seconds count" of a node's log fsyncs so far (keel_storage_fsync_duration_seconds).
fsyncs() {
    python3 - "$1" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
vals = {}
for line in text.splitlines():
    for k in ("sum", "count"):
        if line.startswith(f"keel_storage_fsync_duration_seconds_{k} "):
            vals[k] = float(line.split()[1])
print(vals.get("sum", 0.0), int(vals.get("count", 0)))
EOF
}

# Mean log fsync in ms between two `fsyncs` readings.
fsync_mean() {
    python3 -c 'import sys; s0, c0, s1, c1 = map(float, " ".join(sys.argv[1:]).split()); print(f"{(s1 - s0) / max(1, c1 - c0) * 1e3:.3f}")' "$1" "$2"
}

run() {
    local label=$1 keel=$2 envs=$3
    dir=$(mktemp -d -t keel-put-ab.XXXXXX)
    local envargs=()
    [[ -n "$envs" ]] && IFS=, read -r -a envargs <<<"$envs"
    for i in 1 2 3; do
        env "${envargs[@]}" "$keel" serve --insecure --node-id "$i" --cluster-name bench --data-dir "$dir/n$i" \
            --api-listen "127.0.0.1:2500$i" --raft-listen "127.0.0.1:2510$i" \
            --initial-members "$members" --log-level warn >"$dir/n$i.log" 2>&1 &
        pids+=("$!")
    done
    local leader
    leader=$(wait_leader 25001)
    local follower=$((leader % 3 + 1))
    "$loadgen" bench --endpoints "$all" --workload put --clients 64 --duration 2 >/dev/null
    local l1 f1 lf0 ff0 lf1 ff1
    lf0=$(fsyncs "2500$leader")
    ff0=$(fsyncs "2500$follower")
    l1=$("$loadgen" bench --endpoints "http://127.0.0.1:2500$leader" --workload put --clients 1 --duration 4 --json | p50)
    lf1=$(fsyncs "2500$leader")
    ff1=$(fsyncs "2500$follower")
    f1=$("$loadgen" bench --endpoints "http://127.0.0.1:2500$follower" --workload put --clients 1 --duration 4 --json | p50)
    local t0 t1 out
    t0=$(cpu_ticks "${pids[@]}")
    out=$("$loadgen" bench --endpoints "$all" --workload "$workload" --clients "$clients" \
        --connections "$conns" "${rate[@]}" --duration 8 --json)
    t1=$(cpu_ticks "${pids[@]}")
    local syncs
    syncs="$(fsync_mean "$lf0" "$lf1")/$(fsync_mean "$ff0" "$ff1")"
    python3 - "$label" "$l1" "$f1" "$t0" "$t1" "$(getconf CLK_TCK)" "$out" "$workload $clients/$conns" "$syncs" <<'EOF'
import json, sys
label, l1, f1, t0, t1, hz, out, what, syncs = sys.argv[1:]
r = json.loads(out)
cpu = (int(t1) - int(t0)) / int(hz) * 1e6 / r["ops"]
print(f"{label}: put 1 client p50 {float(l1):.3f} ms (leader) {float(f1):.3f} ms (follower), "
      f"log fsync mean {syncs} ms (leader/follower) | "
      f"{what}: {r['throughput']:.0f} ops/s, p50 {r['latency_ms']['p50']:.2f} ms, "
      f"{r['errors']} errors, cluster CPU {cpu:.0f} us per op")
EOF
    stop
}

for ((round = 1; round <= rounds; round++)); do
    for spec in "$@"; do
        label=${spec%%=*}
        rest=${spec#*=}
        keel=${rest%%:*}
        envs=""
        [[ "$rest" == *:* ]] && envs=${rest#*:}
        [[ -z "$loadgen" ]] && loadgen=$keel
        echo -n "round $round "
        run "$label" "$keel" "$envs"
    done
done
