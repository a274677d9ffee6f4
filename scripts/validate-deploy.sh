#!/usr/bin/env bash
# Validates the Docker, Compose, Kubernetes and Prometheus files with what
# runs without a container runtime or a cluster (no image is built here):
#   docker-compose config     docker/compose.yml resolves (Compose 1.29, no daemon)
#   kubernetes-validate       deploy/k8s against the Kubernetes 1.30 schemas, strict
#   yamllint --strict         every YAML file of deploy/, docker/, config/prometheus/
#   promtool check config     config/prometheus/prometheus.yml (syntax only: the
#                             certificate files exist only inside the containers)
#   scripts/check_deploy.py   structure: Dockerfile (parsed with Docker's own
#                             parser), compose wiring, StatefulSet/Services/PDB
#                             wiring, and the pod start script run with a stub
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prereqs-obs.sh --deploy
. scripts/env.sh
venv="${KEEL_TOOLS_DIR:-$HOME/.cache/keel-tools}/venv"

rendered="$(mktemp)"
trap 'rm -f "$rendered"' EXIT
docker-compose -f docker/compose.yml config > "$rendered"
echo "docker-compose config: ok"
kubernetes-validate --strict --quiet -k 1.30.0 deploy/k8s/services.yaml deploy/k8s/statefulset.yaml deploy/k8s/pdb.yaml
echo "kubernetes-validate --strict (1.30): ok"
yamllint --strict deploy docker config/prometheus .yamllint.yml
echo "yamllint --strict: ok"
promtool check config --syntax-only config/prometheus/prometheus.yml >/dev/null
echo "promtool check config: ok"
"$venv/bin/python" scripts/check_deploy.py "$rendered"
