#!/usr/bin/env bash
# Instructions one node executes per put, counted by callgrind.
#
#   bench/callgrind-per-op.sh KEEL_BINARY [leader|follower] [PUTS] [RATE]
#
# CPU time per operation on a shared two-core virtual machine moves by 10-20 %
# from run to run; an instruction count does not, so a change worth a few per
# cent shows here when it drowns in `put-ab.sh`. It counts instructions, not
# time: cache misses, system calls and wake-ups cost more than their count.
#
# A fresh plaintext 3-node cluster on loopback (ports 26001-26103), node 1
# under `valgrind --tool=callgrind`, nodes 2 and 3 as they are. Node 1 is made
# leader (or a follower) with a leader transfer, warmed up with 100 puts, then
# the script counts node 1's instructions twice over the same time: once while
# one client sends PUTS puts at RATE per second to the leader (default 300 at
# 30/s), once idle (heartbeats and timers). It prints the difference per put.
# KEEP=1 keeps the callgrind files (the loaded window is the next-to-last
# dump) for callgrind_annotate. Every process it starts is stopped by pid;
# every wait is bounded.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

keel=${1:?usage: bench/callgrind-per-op.sh KEEL_BINARY [leader|follower] [PUTS] [RATE]}
role=${2:-leader}
puts=${3:-300}
rate=${4:-30}
ensure_installed valgrind valgrind
dir=$(mktemp -d -t keel-callgrind.XXXXXX)
members="1=127.0.0.1:26101/127.0.0.1:26001,2=127.0.0.1:26102/127.0.0.1:26002,3=127.0.0.1:26103/127.0.0.1:26003"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -n "${KEEP:-}" ]]; then echo "callgrind profiles kept in $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

for i in 1 2 3; do
    pre=()
    if [[ $i == 1 ]]; then
        pre=(valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$dir/cg.%p" -q)
    fi
    "${pre[@]}" "$keel" serve --insecure --node-id "$i" --cluster-name bench --data-dir "$dir/n$i" \
        --api-listen "127.0.0.1:2600$i" --raft-listen "127.0.0.1:2610$i" \
        --initial-members "$members" --log-level warn >"$dir/n$i.log" 2>&1 &
    pids+=("$!")
done
vg=${pids[0]}

# Node 1 is slow to start under valgrind; ask it, not the others, so that it
# has joined before anything is measured.
leader=$(wait_leader 26001)
want=1
[[ $role == follower ]] && want=2
if [[ $leader != "$want" ]]; then
    curl -sf --max-time 60 -X POST -H 'content-type: application/json' \
        -d "{\"to\":$want}" "127.0.0.1:2600$leader/admin/transfer-leader" >/dev/null
fi
for _ in $(seq 1 300); do
    [[ $(wait_leader 26001) == "$want" ]] && break
    sleep 0.2
done
[[ $(wait_leader 26001) == "$want" ]] || { echo "node $want did not become leader" >&2; exit 1; }
ep="http://127.0.0.1:2600$want"
"$keel" bench --endpoints "$ep" --workload put --clients 1 --count 100 --rate "$rate" >/dev/null

# callgrind_control talks to the valgrind process itself.
count() { # OUT CMD...: node 1's instructions while CMD runs, CMD's output to OUT
    local out=$1
    shift
    callgrind_control -z "$vg" >/dev/null 2>&1
    "$@" >"$out"
    local before
    before=$(ls "$dir"/cg.* 2>/dev/null | wc -l)
    callgrind_control -d "$vg" >/dev/null 2>&1
    for _ in $(seq 1 300); do
        (($(ls "$dir"/cg.* 2>/dev/null | wc -l) > before)) && break
        sleep 0.1
    done
    local f
    f=$(ls -t "$dir"/cg.* | head -1)
    awk '/^summary:/ {print $2}' "$f"
}
secs=$(python3 -c "print($puts / $rate)")
load_ir=$(count "$dir/bench.json" "$keel" bench --endpoints "$ep" --workload put --clients 1 \
    --count "$puts" --rate "$rate" --json)
idle_ir=$(count /dev/null sleep "$secs")
python3 - "$dir/bench.json" "$load_ir" "$idle_ir" "$puts" "$role" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
load, idle, n, role = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ok = r["ops"]
if r["errors"] or ok != n:
    sys.exit(f"{r['errors']} errors, {ok} of {n} puts succeeded")
print(f"node 1 as {role}: {(load - idle) / ok:,.0f} instructions per put "
      f"({load:,} over {ok} puts, {idle:,} idle over the same time)")
EOF
