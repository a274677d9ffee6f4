# Shared by the bench scripts (sourced, not run).

# Prints the leader id that the node with its API on 127.0.0.1:PORT reports,
# once it reports one; fails after 60 s without.
wait_leader() {
    local port=$1 leader=""
    for _ in $(seq 1 300); do
        leader=$(curl -sf --max-time 1 "127.0.0.1:$port/status" |
            python3 -c 'import json,sys; print(json.load(sys.stdin).get("leader_id") or "")' 2>/dev/null || true)
        if [[ -n "$leader" ]]; then
            echo "$leader"
            return 0
        fi
        sleep 0.2
    done
    echo "no leader after 60 s" >&2
    return 1
}

# Prints the CPU time (user + system, in clock ticks) the given pids used.
cpu_ticks() {
    local t=0 p
    for p in "$@"; do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$t"
}
