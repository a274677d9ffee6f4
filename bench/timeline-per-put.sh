#!/usr/bin/env bash
# Where a single put's wall time goes, step by step along its path through
# the load generator, the leader and the first follower to answer.
#
#   bench/timeline-per-put.sh KEEL_BINARY [PUTS]
#
# A fresh plaintext 3-node cluster on loopback (ports 28201-28213, data in a
# new temporary directory), warmed with 500 puts at 8 clients and 2,000 at
# one. Then `perf record` traces every system call's entry and exit on the
# three nodes and on the load generator (one clock for both) while one
# client sends PUTS puts (default 300) back to back to the leader. Each put
# is followed through the calls that mark its steps: the request's socket
# write, the leader's read of it and its log write, the append to the
# followers, the first answering follower's read, log write and fdatasync
# and its answer, the leader's read of it, the answer to the client and the
# client's read of it (the apply between those two makes no system call: the
# state machine writes without a write-ahead log). A write(2) of more than
# 8 bytes on a node's event-loop thread is a write to the log's
# write-ahead log (8 bytes is a wake-up of an event loop). Prints the median
# of each step.
# Tracing slows every system call by a few microseconds, so the steps that
# are mostly calls look longer than they are: compare runs of this script,
# not its total with other scripts' latencies.
# Every process it starts is stopped by pid; every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/timeline-per-put.sh KEEL_BINARY [PUTS]}
puts=${2:-300}
[[ $puts =~ ^[1-9][0-9]*$ ]] || { echo "PUTS must be a positive integer, got '$puts'" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is needed (Debian: linux-perf)" >&2; exit 2; }
start_warm_cluster "$keel" timeline 2820 2821
"$keel" bench --endpoints "$ep" --workload put --clients 1 --count 2000 >/dev/null

node_pids="${pids[0]},${pids[1]},${pids[2]}"
timeout 300 perf record -k mono -q -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit \
    -p "$node_pids" -o "$dir/nodes.data" 2>/dev/null &
recorder=$!
pids+=("$recorder")
# perf attaches to every thread before it writes its first sample header.
for _ in $(seq 1 100); do
    [[ -s "$dir/nodes.data" ]] && break
    sleep 0.1
done
[[ -s "$dir/nodes.data" ]] || { echo "perf did not start" >&2; exit 1; }
timeout 300 perf record -k mono -q -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit -o "$dir/client.data" -- \
    "$keel" bench --endpoints "$ep" --workload put --clients 1 --count "$puts" --json >"$dir/client.json" 2>/dev/null
kill -INT "$recorder"
wait "$recorder" 2>/dev/null || true
for f in nodes client; do
    perf script -i "$dir/$f.data" -F pid,tid,time,event,trace 2>/dev/null >"$dir/$f.txt"
done

python3 - "$dir" "${pids[$((leader - 1))]}" "${pids[0]}" "${pids[1]}" "${pids[2]}" <<'EOF'
import bisect, collections, json, re, statistics, sys

d, leader = sys.argv[1], int(sys.argv[2])
followers = [int(p) for p in sys.argv[3:6] if int(p) != leader]
READ, WRITE, WRITEV, RECVFROM, FDATASYNC = 0, 1, 20, 45, 75
line = re.compile(r"\s*(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)\s*(.*)")

def load(path):
    """(time in µs, pid, tid, 'enter' or 'exit', call number, first args or return value)"""
    out = []
    for l in open(path):
        m = line.match(l)
        if not m:
            continue
        pid, tid, t, kind, nr, rest = m.groups()
        if kind == "enter":
            val = [int(x, 16) for x in rest.strip("()").split(",")[:3]]
        else:
            try:
                val = int(rest.split("=")[1])
            except (IndexError, ValueError):
                val = None
        out.append((float(t) * 1e6, int(pid), int(tid), kind, int(nr), val))
    out.sort()
    return out

client = load(f"{d}/client.txt")
by_pid = collections.defaultdict(list)
for e in load(f"{d}/nodes.txt"):
    by_pid[e[1]].append(e)
by_pid["client"] = client
times = {p: [e[0] for e in evs] for p, evs in by_pid.items()}

def after(p, t, pred, within=5000):
    """The first event of process p at or after t (µs) that matches, within `within` µs."""
    evs = by_pid[p]
    for e in evs[bisect.bisect_left(times[p], t):]:
        if e[0] > t + within:
            return None
        if pred(e):
            return e
    return None

def last_before(p, t0, t1, pred):
    evs = by_pid[p]
    hit = None
    for e in evs[bisect.bisect_left(times[p], t0):bisect.bisect_left(times[p], t1)]:
        if pred(e):
            hit = e
    return hit

def call(nr, kind="enter", main=False):
    return lambda e: e[4] == nr and e[3] == kind and (not main or e[1] == e[2])

def wal_write(e):
    # A write(2) of more than 8 bytes on the event loop: a RocksDB WAL record.
    return e[4] == WRITE and e[3] == "enter" and e[1] == e[2] and e[5][2] > 8

def got_bytes(e):
    return e[4] in (READ, RECVFROM) and e[3] == "exit" and (e[5] or 0) > 0

steps = collections.defaultdict(list)
totals = []
t = client[0][0] if client else 0
end = client[-1][0] if client else 0
while True:
    req = after("client", t, call(WRITEV), within=end - t + 1)
    if req is None:
        break
    t = req[0] + 1
    lwal = after(leader, req[0], wal_write)
    if lwal is None:
        continue
    lread = last_before(leader, req[0], lwal[0], got_bytes)
    lsend = after(leader, lwal[0], call(WRITEV, main=True))
    if lread is None or lsend is None:
        continue
    best = None
    for f in followers:
        fread = after(f, lsend[0], got_bytes)
        fwal = fread and after(f, fread[0], wal_write)
        fsync = fwal and after(f, fwal[0], call(FDATASYNC))
        fsynced = fsync and after(f, fsync[0], call(FDATASYNC, "exit"))
        fanswer = fsynced and after(f, fsynced[0], call(WRITEV, main=True))
        if fanswer and (best is None or fanswer[0] < best[-1][0]):
            best = (fread, fwal, fsync, fsynced, fanswer)
    if best is None:
        continue
    fread, fwal, fsync, fsynced, fanswer = best
    lack = after(leader, fanswer[0], got_bytes)
    lanswer = lack and after(leader, lack[0], call(WRITEV, main=True))
    cread = lanswer and after("client", lanswer[0], got_bytes)
    if not cread:
        continue
    marks = [
        ("load generator writes the request -> leader has read it", req, lread),
        ("leader: request read -> log write", lread, lwal),
        ("leader: log write -> append sent to the followers", lwal, lsend),
        ("append sent -> follower has read it", lsend, fread),
        ("follower: append read -> log write", fread, fwal),
        ("follower: log write -> fdatasync", fwal, fsync),
        ("follower: fdatasync", fsync, fsynced),
        ("follower: synced -> answer sent", fsynced, fanswer),
        ("answer sent -> leader has read it", fanswer, lack),
        ("leader: answer read -> apply -> answer to the client", lack, lanswer),
        ("answer to the client -> load generator has read it", lanswer, cread),
    ]
    for name, a, b in marks:
        steps[name].append(b[0] - a[0])
    totals.append(cread[0] - req[0])
    t = cread[0]

report = json.load(open(f"{d}/client.json"))
print(f"{len(totals)} puts followed of {report['ops']}; the load generator's p50 under tracing: "
      f"{report['latency_ms']['p50'] * 1000:.0f} µs")
print(f"{'step':<58} {'median µs':>9}")
for name, v in steps.items():
    print(f"{name:<58} {statistics.median(v):9.0f}")
if totals:
    print(f"{'request write to answer read (median of the whole)':<58} {statistics.median(totals):9.0f}")
EOF
