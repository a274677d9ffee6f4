# Sourced by the scripts: one persistent target directory outside the clone,
# so RocksDB (about 30 minutes cold on 2 cores) is compiled once and every
# later build, test run and dev cluster reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
mkdir -p "$CARGO_TARGET_DIR"
export PATH="${KEEL_TOOLS_DIR:-$HOME/.cache/keel-tools}/bin:$PATH"

# Cargo takes a crate in the target directory to be up to date when its
# sources, by their paths inside the workspace and their modification
# times, are no newer than the last build. Several clones of this
# repository sharing one target directory can therefore fool it: after a
# build from another clone, a clone whose files are older would be handed
# that clone's binaries. The target directory remembers which clone built
# in it last (`.keel-clone`); when that was another one, or is not known,
# the workspace's own crates are cleaned so that they are built from this
# clone. Run from the clone's root, after CARGO_TARGET_DIR is final.
claim_target_dir() {
    local mark="$CARGO_TARGET_DIR/.keel-clone" here
    here=$(pwd -P)
    [[ "$(cat "$mark" 2>/dev/null)" == "$here" ]] && return 0
    if [[ -d "$CARGO_TARGET_DIR/debug" ]]; then
        echo "the last build in $CARGO_TARGET_DIR may have come from another clone: rebuilding keel's crates from this one" >&2
        cargo clean --quiet -p keel -p keel-raft -p keel-storage -p keel-bench-driver
    fi
    echo "$here" >"$mark"
}
