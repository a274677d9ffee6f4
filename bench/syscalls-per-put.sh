#!/usr/bin/env bash
# System calls per put on the leader and on one follower, counted by strace.
#
#   bench/syscalls-per-put.sh KEEL_BINARY [CLIENTS [PUTS]]
#
# A single put's latency is mostly hand-offs between processes and threads
# (bench/README.md); each socket write, WAL write, fsync and wake-up is a
# system call, so their count per put shows what a change adds to or takes
# off the write path, and which messages a put costs.
#
# A fresh plaintext 3-node cluster on loopback (ports 27001-27103, data in a
# new temporary directory), warmed with 500 puts, then `strace -c -f` on the
# leader and on one follower while CLIENTS clients (default 1) send PUTS puts
# (default 2000) to the leader. Prints each node's calls per put by system
# call: every call the node made while the puts ran, divided by the puts, so
# heartbeats and timers over those seconds are counted too (one client's
# 2,000 puts take about 2 s: some 20 heartbeats to each follower, at 100 ms;
# more puts make their share smaller). strace slows every call it counts:
# read the counts, not the times.
# Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/syscalls-per-put.sh KEEL_BINARY [CLIENTS [PUTS]]}
clients=${2:-1}
puts=${3:-2000}
for n in "$clients" "$puts"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "CLIENTS and PUTS must be positive integers, got '$n'" >&2; exit 2; }
done
ensure_installed strace strace
dir=$(mktemp -d -t keel-syscalls.XXXXXX)
pids=()
tracers=()
cleanup() {
    stop_pids "${tracers[@]}" "${pids[@]}"
    rm -rf "$dir"
}
trap cleanup EXIT

start_nodes "$keel" "$dir" 2700 2710
leader=$(wait_leader 27001)
follower=$((leader % 3 + 1))
ep="http://127.0.0.1:2700$leader"
"$keel" bench --endpoints "$ep" --workload put --clients 8 --count 500 >/dev/null

for role in leader follower; do
    node=$leader
    [[ $role == follower ]] && node=$follower
    timeout 300 strace -c -f -p "${pids[$((node - 1))]}" -o "$dir/$role.txt" 2>/dev/null &
    tracers+=("$!")
done
# The counted puts start once strace traces every thread of both nodes.
traced() {
    local pid t
    for pid in "${pids[$((leader - 1))]}" "${pids[$((follower - 1))]}"; do
        for t in /proc/"$pid"/task/*; do
            [[ $(awk '/^TracerPid:/ {print $2}' "$t/status" 2>/dev/null) =~ ^[1-9] ]] || return 1
        done
    done
}
for _ in $(seq 1 100); do
    traced && break
    sleep 0.1
done
traced || { echo "strace did not attach to every thread" >&2; exit 1; }
ops=$("$keel" bench --endpoints "$ep" --workload put --clients "$clients" --count "$puts" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["ops"]); sys.exit(r["errors"] > 0)')
for t in "${tracers[@]}"; do kill -INT "$t" 2>/dev/null || true; done
for t in "${tracers[@]}"; do wait "$t" 2>/dev/null || true; done
tracers=()

python3 - "$ops" "$clients" "$dir/leader.txt" "$dir/follower.txt" <<'EOF'
import sys
ops, clients = int(sys.argv[1]), sys.argv[2]
def calls(path):
    out = {}
    for line in open(path):
        f = line.split()
        # "% time seconds usecs/call calls [errors] syscall"
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            out[f[-1]] = int(f[3])
    return out
nodes = {"leader": calls(sys.argv[3]), "follower": calls(sys.argv[4])}
names = sorted(set(nodes["leader"]) | set(nodes["follower"]),
               key=lambda n: -(nodes["leader"].get(n, 0) + nodes["follower"].get(n, 0)))
print(f"system calls per put, {ops} puts from {clients} client(s) to the leader")
print(f"{'call':>16} {'leader':>8} {'follower':>9}")
for n in names:
    l, f = nodes["leader"].get(n, 0) / ops, nodes["follower"].get(n, 0) / ops
    if l >= 0.01 or f >= 0.01:
        print(f"{n:>16} {l:8.2f} {f:9.2f}")
print(f"{'total':>16} {sum(nodes['leader'].values()) / ops:8.2f} {sum(nodes['follower'].values()) / ops:9.2f}")
EOF
