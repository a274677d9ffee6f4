#!/usr/bin/env bash
# fdatasync calls per put on the leader and on one follower, by thread.
#
#   bench/fsyncs-per-put.sh KEEL_BINARY [CLIENTS [SECONDS]]
#
# Each fsync is a disk round trip and, on a virtual machine, exits to the
# host; a disk with an IOPS budget spends it on them. The count per put
# shows how well group commit merges them, and the split by thread shows
# which path took them: the node's event loop (a follower's append synced
# on the spot) or `keel-log-fsync` (group commit).
#
# A fresh plaintext 3-node cluster on loopback (ports 23101-23203, data in a
# new temporary directory), warmed with 2 s of 64-client puts, then CLIENTS
# clients (default 64, one connection each) put for SECONDS (default 8)
# through all three nodes while `perf stat --per-thread` counts the
# `syscalls:sys_enter_fdatasync` tracepoint on the leader and a follower.
# Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/fsyncs-per-put.sh KEEL_BINARY [CLIENTS [SECONDS]]}
clients=${2:-64}
secs=${3:-8}
for n in "$clients" "$secs"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "CLIENTS and SECONDS must be positive integers, got '$n'" >&2; exit 2; }
done
ensure_installed perf linux-perf
dir=$(mktemp -d -t keel-fsyncs.XXXXXX)
pids=()
counters=()
cleanup() {
    stop_pids "${counters[@]}" "${pids[@]}"
    rm -rf "$dir"
}
trap cleanup EXIT

start_nodes "$keel" "$dir" 2310 2320
leader=$(wait_leader 23101)
follower=$((leader % 3 + 1))
eps="http://127.0.0.1:23101,http://127.0.0.1:23102,http://127.0.0.1:23103"
"$keel" bench --endpoints "$eps" --workload put --clients 64 --duration 2 >/dev/null

for role in leader follower; do
    node=$leader
    [[ $role == follower ]] && node=$follower
    # Counts for a little longer than the load runs, so every put's
    # fsyncs fall inside the window.
    timeout 300 perf stat --per-thread -e syscalls:sys_enter_fdatasync -p "${pids[$((node - 1))]}" \
        -o "$dir/$role.txt" -- sleep "$((secs + 2))" 2>/dev/null &
    counters+=("$!")
done
sleep 0.5
report=$("$keel" bench --endpoints "$eps" --workload put --clients "$clients" --duration "$secs" --json)
for c in "${counters[@]}"; do wait "$c" || true; done
counters=()

python3 - "$report" "$dir/leader.txt" "$dir/follower.txt" "$leader" "$follower" "$clients" "$(basename "$keel")" <<'EOF'
import json, re, sys
report = json.loads(sys.argv[1])
ops = report["ops"]
if ops == 0 or report["errors"]:
    sys.exit(f"the load failed: {report['errors']} errors, {ops} puts")
print(f"{sys.argv[6]} clients: {ops} puts, {report['throughput']:.0f} ops/s")
for role, path, node in (("leader", sys.argv[2], sys.argv[4]), ("follower", sys.argv[3], sys.argv[5])):
    by_thread = {}
    for line in open(path):
        m = re.match(r"\s*(\S+)-\d+\s+([\d,]+)\s+syscalls:sys_enter_fdatasync", line)
        if m:
            # A thread's name is cut to 15 bytes; the main thread (the
            # event loop) carries the executable's.
            name = {"keel-log-fsync": "group commit", sys.argv[7][:15]: "event loop"}.get(m.group(1), m.group(1))
            by_thread[name] = by_thread.get(name, 0) + int(m.group(2).replace(",", ""))
    total = sum(by_thread.values())
    parts = ", ".join(f"{k} {v * 1000 / ops:.0f}" for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]) if v * 2000 >= ops)
    print(f"{role} (node {node}): {total * 1000 / ops:.0f} fdatasync per 1,000 puts ({parts})")
EOF
