#!/usr/bin/env bash
# Installs what a fresh Debian machine with only Rust lacks to build and test keel:
# libclang (RocksDB's Rust bindings are generated with bindgen), a C++
# compiler (RocksDB itself is compiled from source) and iproute2.
set -euo pipefail

need=()
# libclang itself, not libclang-cpp (which some images carry without it),
# in either place Debian puts it: one of them is enough.
have_libclang=""
for f in /usr/lib/llvm-*/lib/libclang.so /usr/lib/x86_64-linux-gnu/libclang.so; do
  [ -e "$f" ] && have_libclang=yes
done
[ -n "$have_libclang" ] || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
# The fault-injection suite puts each node in a network namespace (`ip netns`).
command -v ip >/dev/null 2>&1 || need+=(iproute2)

if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# schemathesis fuzzes the API from its OpenAPI document in the test suite.
# Pinned: a new release may generate different cases from the same seed.
schemathesis_version=4.32.5
if ! st --version 2>/dev/null | grep -qxF "st, version $schemathesis_version"; then
  echo "installing schemathesis $schemathesis_version (PyPI)" >&2
  python3 -m pip install --quiet "schemathesis==$schemathesis_version"
fi
