#!/usr/bin/env bash
# Installs the monitoring checkers the tests use, and with --deploy the
# deployment validators of scripts/validate-deploy.sh, into
# $KEEL_TOOLS_DIR (default ~/.cache/keel-tools; scripts/env.sh puts its bin/
# on PATH):
#   promtool             taken out of Debian's `prometheus` package (only the
#                        checker: no Prometheus service is installed or started)
#   --deploy adds:
#   docker-compose 1.29, yamllint          Debian packages
#   kubernetes-validate, dockerfile        PyPI, in a virtualenv under the tools dir
set -euo pipefail

tools="${KEEL_TOOLS_DIR:-$HOME/.cache/keel-tools}"
mkdir -p "$tools/bin"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
updated=""
apt_update() {
  if [ -z "$updated" ]; then
    $sudo apt-get update -qq >/dev/null
    updated=1
  fi
}

if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$tools/bin/promtool" ]; then
  echo "installing promtool into $tools/bin" >&2
  work="$(mktemp -d)"
  (
    cd "$work"
    apt-get download prometheus >/dev/null 2>&1 || { apt_update && apt-get download prometheus >/dev/null; }
    dpkg-deb -x prometheus_*.deb extracted
  )
  install -m 0755 "$work/extracted/usr/bin/promtool" "$tools/bin/promtool"
  rm -rf "$work"
fi

if [ "${1:-}" = "--deploy" ]; then
  need=()
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  command -v yamllint >/dev/null 2>&1 || need+=(yamllint)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    apt_update
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  venv="$tools/venv"
  if [ ! -x "$venv/bin/kubernetes-validate" ] || ! "$venv/bin/python" -c "import dockerfile, yaml" 2>/dev/null; then
    echo "installing kubernetes-validate and dockerfile (PyPI) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate dockerfile pyyaml
  fi
  ln -sf "$venv/bin/kubernetes-validate" "$tools/bin/kubernetes-validate"
fi
