#!/usr/bin/env bash
# Where a single put's wall time goes between running, waiting for a CPU and
# sleeping, per process, from the scheduler's own trace.
#
#   bench/sched-per-put.sh KEEL_BINARY [PUTS [RATE]]
#
# A single put is a chain of hand-offs between the load generator and the
# three nodes (bench/README.md). Each hand-off wakes a thread, which then
# may wait for a CPU before it runs: on two CPUs shared by four processes
# that wait is part of every put. `perf sched record` traces every context
# switch and wake-up on the machine while one client sends PUTS puts
# (default 2000) to the leader, back to back or at RATE puts/s; per put it
# prints, for the load generator and each node (all threads together, then
# each thread name that ran at least once per 10 puts): CPU time, the time
# spent runnable but not running (scheduling delay), and the number of
# times it was switched out.
#
# A fresh plaintext 3-node cluster on loopback (ports 28101-28113, data in a
# new temporary directory), warmed with 500 puts. Tracing costs a little per
# switch: compare runs of this script, not its latency with other scripts'.
# The nodes are told apart by their pids and the load generator by its
# threads' names (keel*, tokio*, bench*), so any other keel process running
# on the machine meanwhile is counted as load generator.
# Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/sched-per-put.sh KEEL_BINARY [PUTS [RATE]]}
puts=${2:-2000}
rate=${3:-}
[[ $puts =~ ^[1-9][0-9]*$ ]] || { echo "PUTS must be a positive integer, got '$puts'" >&2; exit 2; }
[[ -z $rate || $rate =~ ^[1-9][0-9]*$ ]] || { echo "RATE must be a positive integer, got '$rate'" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is needed (Debian: linux-perf)" >&2; exit 2; }
start_warm_cluster "$keel" sched 2810 2811

args=(--endpoints "$ep" --workload put --clients 1 --count "$puts" --json)
[[ -n $rate ]] && args+=(--rate "$rate")
# The load generator runs under perf, which traces the whole machine
# (-a) until it exits.
timeout 600 perf sched record -a -o "$dir/sched.data" -- "$keel" bench "${args[@]}" >"$dir/bench.json" 2>"$dir/perf.err"
perf sched timehist -i "$dir/sched.data" 2>/dev/null >"$dir/events.txt"

python3 - "$dir/bench.json" "$dir/events.txt" "$leader" "${pids[@]}" <<'EOF'
import json, sys
from collections import defaultdict
r = json.load(open(sys.argv[1]))
events, leader = sys.argv[2], int(sys.argv[3])
node_pids = {int(p): i + 1 for i, p in enumerate(sys.argv[4:])}
ops = r["ops"]
# timehist columns: time cpu comm[tid/pid] (comm[tid] for a process's
# first thread) wait-time sch-delay run-time, in ms
run = defaultdict(float); delay = defaultdict(float); switches = defaultdict(int)
for line in open(events):
    f = line.split()
    if len(f) < 6 or not f[0][0].isdigit():
        continue
    task = f[2]
    if not task.endswith("]") or "[" not in task:
        continue
    name, ids = task.rsplit("[", 1)
    tid, _, pid = ids.rstrip("]").partition("/")
    try:
        pid = int(pid or tid)
        d, t = float(f[4]), float(f[5])
    except ValueError:
        continue
    if pid in node_pids:
        who = f"node {node_pids[pid]}" + (" (leader)" if node_pids[pid] == leader else "")
    elif name.startswith(("keel", "tokio", "bench")):
        # Not a node: the load generator (perf's child), by its threads' names.
        who = "load generator"
    else:
        continue
    for key in (who, (who, name)):
        run[key] += t; delay[key] += d; switches[key] += 1
print(f"{ops} puts, p50 {r['latency_ms']['p50']:.3f} ms, {r['throughput']:.0f} puts/s, {r['errors']} errors")
print(f"{'per put':>32} | {'on CPU us':>9} | {'waiting for a CPU us':>20} | {'switches':>8}")
def row(label, key):
    print(f"{label:>32} | {run[key] * 1000 / ops:9.1f} | {delay[key] * 1000 / ops:20.1f} | {switches[key] / ops:8.2f}")
for who in sorted(k for k in run if isinstance(k, str)):
    row(who, who)
    # Its threads by name, those that ran at least once per 10 puts.
    for key in sorted((k for k in run if isinstance(k, tuple) and k[0] == who), key=lambda k: -run[k]):
        if switches[key] * 10 >= ops:
            row(key[1], key)
EOF
