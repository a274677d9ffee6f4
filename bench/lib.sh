# Shared by the bench scripts (sourced, not run).

# Prints FIELD of the /status of the node with its API on 127.0.0.1:PORT,
# or nothing when it does not answer or has no such field.
status_field() {
    local port=$1 field=$2
    curl -sf --max-time 1 "127.0.0.1:$port/status" |
        python3 -c 'import json,sys; v = json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' \
            "$field" 2>/dev/null || true
}

# Prints the leader id that the node with its API on 127.0.0.1:PORT reports,
# once it reports one; fails after 60 s without.
wait_leader() {
    local port=$1 leader=""
    for _ in $(seq 1 300); do
        leader=$(status_field "$port" leader_id)
        if [[ -n "$leader" ]]; then
            echo "$leader"
            return 0
        fi
        sleep 0.2
    done
    echo "no leader after 60 s" >&2
    return 1
}

# Sums, over the processes PIDS..., the number the awk program PROG prints
# from /proc/<pid>/FILE.
sum_proc() {
    local file=$1 prog=$2 t=0 p
    shift 2
    for p in "$@"; do
        t=$((t + $(awk "$prog" "/proc/$p/$file")))
    done
    echo "$t"
}

# Prints the CPU time (user + system, in clock ticks) the given pids used.
cpu_ticks() { sum_proc stat '{print $14 + $15}' "$@"; }

# Prints one line per thread of the given pids: "<pid> <tid> <name> <ticks>"
# (user + system CPU time in clock ticks; the name is the thread's comm,
# which may contain spaces, so it is read between the parentheses).
thread_ticks() {
    local p t line name rest
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            line=$(cat "$t/stat" 2>/dev/null) || continue
            name=${line#*(}
            name=${name%)*}
            rest=${line##*) }
            # shellcheck disable=SC2086
            set -- $rest
            echo "$p ${t##*/} ${name// /_} $((${12} + ${13}))"
        done
    done
}

# Bytes the given pids have written to storage (/proc/<pid>/io
# write_bytes: counted when a page is dirtied, so a write that the page
# cache has not yet sent to the disk counts as well).
io_write_bytes() { sum_proc io '/^write_bytes:/ {print $2}' "$@"; }

# Starts a plaintext 3-node cluster of KEEL with data in DIR/n1..n3, the API
# of node i on 127.0.0.1:<API><i> and its peer port on 127.0.0.1:<RAFT><i>
# (e.g. API=2400, RAFT=2410), and appends the nodes' pids to `pids`.
start_nodes() {
    local keel=$1 dir=$2 api=$3 raft=$4 i
    for i in 1 2 3; do
        start_node "$keel" "$dir" "$api" "$raft" "$i"
        pids+=("$!")
    done
}

# Starts node I of the cluster `start_nodes` starts, in the background (its
# pid in `$!`), its output appended to DIR/n<I>.log.
start_node() {
    local keel=$1 dir=$2 api=$3 raft=$4 i=$5
    local members="1=127.0.0.1:${raft}1/127.0.0.1:${api}1,2=127.0.0.1:${raft}2/127.0.0.1:${api}2,3=127.0.0.1:${raft}3/127.0.0.1:${api}3"
    "$keel" serve --insecure --node-id "$i" --cluster-name bench --data-dir "$dir/n$i" \
        --api-listen "127.0.0.1:$api$i" --raft-listen "127.0.0.1:$raft$i" \
        --initial-members "$members" --log-level warn >>"$dir/n$i.log" 2>&1 &
}

# Starts a plaintext 3-node cluster of KEEL as `start_nodes` does, in a new
# temporary directory `dir` (named after NAME) that goes, with the nodes
# stopped, when the script exits; waits for the leader (`leader`, its API
# `ep`) and warms the cluster with 500 puts. Sets `dir`, `pids`, `leader`
# and `ep`.
start_warm_cluster() {
    local keel=$1 name=$2 api=$3 raft=$4
    dir=$(mktemp -d -t "keel-$name.XXXXXX")
    pids=()
    trap 'stop_pids "${pids[@]}"; rm -rf "$dir"' EXIT
    start_nodes "$keel" "$dir" "$api" "$raft"
    leader=$(wait_leader "${api}1")
    ep="http://127.0.0.1:$api$leader"
    "$keel" bench --endpoints "$ep" --workload put --clients 8 --count 500 >/dev/null
}

# Stops the given pids (children of this shell) and waits for them.
stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# Installs the Debian package PACKAGE when COMMAND is not on the PATH.
ensure_installed() {
    local command=$1 package=$2 sudo=""
    command -v "$command" >/dev/null && return 0
    echo "installing $package" >&2
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null
}
