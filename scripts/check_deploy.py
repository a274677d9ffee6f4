"""Structural checks of the deployment files that schema validation cannot
make: called by scripts/validate-deploy.sh with the output of
`docker-compose config` as its argument. Exits non-zero naming the first
problem."""

import os
import subprocess
import sys
import tempfile

import dockerfile
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg):
    sys.exit(f"check_deploy: {msg}")


def check(cond, msg):
    if not cond:
        fail(msg)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def dockerfile_checks():
    cmds = dockerfile.parse_file(os.path.join(ROOT, "docker/Dockerfile"))
    froms = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    check(len(froms) >= 2, "Dockerfile: expected a multi-stage build")
    final = cmds[froms[-1]:]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    check(users and users[-1].split(":")[0] not in ("0", "root"), "Dockerfile: the final stage must run as a non-root USER")
    vols = [v for c in final if c.cmd == "VOLUME" for v in c.value]
    check("/var/lib/keel" in vols, "Dockerfile: /var/lib/keel must be a VOLUME")
    check(any(c.cmd == "COPY" and "--from=build" in c.flags for c in final), "Dockerfile: the binary must come from the build stage")
    check(any(c.cmd == "ENTRYPOINT" and c.value[0] == "keel" for c in final), "Dockerfile: ENTRYPOINT keel")
    env = {}
    for c in final:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
    check(env.get("KEEL_DATA_DIR", "").startswith("/var/lib/keel/"), "Dockerfile: KEEL_DATA_DIR must be on the volume")
    print("Dockerfile: multi-stage, non-root user, data volume: ok")


def members(s):
    out = {}
    for part in s.split(","):
        i, addrs = part.split("=")
        raft, api = addrs.split("/")
        out[int(i)] = (raft, api)
    return out


def targets_of(volumes):
    """Container paths of compose volumes, short (src:dst[:mode]) or long syntax."""
    out = []
    for v in volumes:
        out.append(v["target"] if isinstance(v, dict) else v.split(":")[1])
    return out


def compose_checks(rendered):
    with open(rendered) as f:
        c = yaml.safe_load(f)
    svc = c["services"]
    nodes = sorted(n for n in svc if n.startswith("node"))
    check(nodes == ["node1", "node2", "node3"], f"compose: expected node1..node3, got {nodes}")
    for s in ("certs", "prometheus", "grafana"):
        check(s in svc, f"compose: missing service {s}")
    all_members = set()
    for n in nodes:
        s = svc[n]
        env = s["environment"]
        i = int(env["KEEL_NODE_ID"])
        m = members(env["KEEL_INITIAL_MEMBERS"])
        all_members.add(env["KEEL_INITIAL_MEMBERS"])
        check(m[i] == (env["KEEL_RAFT_ADVERTISE"], env["KEEL_API_ADVERTISE"]), f"compose: {n} advertises other addresses than initial_members says")
        check(env["KEEL_TLS_CERT"].endswith(f"/node-{i}.pem") and env["KEEL_TLS_KEY"].endswith(f"/node-{i}-key.pem"), f"compose: {n} must use node {i}'s certificate")
        check(s["depends_on"]["certs"]["condition"] == "service_completed_successfully", f"compose: {n} must wait for the certificates")
        check("/var/lib/keel" in targets_of(s["volumes"]), f"compose: {n} needs a data volume")
    check(len(all_members) == 1, "compose: nodes disagree on initial members")
    with open(os.path.join(ROOT, "config/prometheus/prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    job = [j for j in prom["scrape_configs"] if j["job_name"] == "keel"][0]
    targets = sorted(t for sc in job["static_configs"] for t in sc["targets"])
    apis = sorted(members(next(iter(all_members))).values())
    check(targets == sorted(a for _, a in apis), f"prometheus.yml: targets {targets} are not the nodes' API addresses")
    check(job["scheme"] == "https" and "cert_file" in job["tls_config"], "prometheus.yml: scrape over HTTPS with a client certificate")
    certs_cmd = "\n".join(svc["certs"]["command"])
    check("--name prometheus" in certs_cmd, "compose: the certs service must make Prometheus' client certificate")
    grafana_vols = targets_of(svc["grafana"]["volumes"])
    check("/var/lib/grafana/dashboards" in grafana_vols and "/etc/grafana/provisioning" in grafana_vols, "compose: grafana must get the dashboard and provisioning")
    with open(os.path.join(ROOT, "docker/grafana/provisioning/dashboards/keel.yml")) as f:
        prov = yaml.safe_load(f)
    check(prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards", "grafana provisioning path")
    print("compose: 3 nodes with generated certificates, Prometheus scraping each node over mTLS, Grafana provisioned: ok")


def k8s_checks():
    d = os.path.join(ROOT, "deploy/k8s")
    docs = []
    kust = load_all(os.path.join(d, "kustomization.yaml"))[0]
    for r in kust["resources"]:
        check(os.path.exists(os.path.join(d, r)), f"kustomization: {r} does not exist")
        docs += load_all(os.path.join(d, r))
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    check(spec["selector"]["matchLabels"].items() <= pod_labels.items(), "StatefulSet selector")
    check(spec["podManagementPolicy"] == "Parallel", "StatefulSet: podManagementPolicy must be Parallel (no pod is ready before a quorum)")
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    headless = services[spec["serviceName"]]
    check(headless["spec"].get("clusterIP") == "None", "the StatefulSet's service must be headless")
    check(headless["spec"].get("publishNotReadyAddresses") is True, "the headless service must publish not-ready pods")
    clients = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
    check(clients, "a client Service is needed")
    for s in services.values():
        check(s["spec"]["selector"].items() <= pod_labels.items(), f"service {s['metadata']['name']} selects no keel pod")
    pdb = by_kind["PodDisruptionBudget"][0]
    check(pdb["spec"]["maxUnavailable"] == 1, "PDB: maxUnavailable 1")
    check(pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "PDB selects no keel pod")
    c = spec["template"]["spec"]["containers"][0]
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe on /readyz")
    check(c["livenessProbe"]["httpGet"]["path"] == "/livez", "liveness probe on /livez")
    pre = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    check("/ha/shutdown" in pre, "preStop must start the graceful shutdown")
    vols = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    check("secret" in vols.get("tls", {}), "TLS must come from a Secret")
    check(spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data", "a data volume per pod")
    check(spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, "pods run as non-root")

    # The start script: syntax, then run it with a stub `keel` for an initial
    # member and for a pod added later by scaling.
    script = c["args"][0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "start.sh")
        with open(path, "w") as f:
            f.write(script)
        subprocess.run(["sh", "-n", path], check=True)
        stub = os.path.join(tmp, "keel")
        with open(stub, "w") as f:
            f.write("#!/bin/sh\nenv | grep '^KEEL_' | sort\n")
        os.chmod(stub, 0o755)
        static = {e["name"]: e["value"] for e in c["env"] if "value" in e}

        def run(pod):
            env = {"PATH": tmp + ":/usr/bin:/bin", "POD_NAME": pod, "POD_NAMESPACE": "prod", "INITIAL_SIZE": static["INITIAL_SIZE"]}
            out = subprocess.run(["sh", path], env=env, check=True, capture_output=True, text=True).stdout
            return dict(line.split("=", 1) for line in out.splitlines())

        e0 = run("keel-0")
        check(e0["KEEL_NODE_ID"] == "1" and e0["KEEL_TLS_CERT"].endswith("/node-1.pem"), f"keel-0 must be node 1: {e0}")
        m = members(e0["KEEL_INITIAL_MEMBERS"])
        check(sorted(m) == [1, 2, 3], f"initial members {m}")
        adv = static["KEEL_API_ADVERTISE"].replace("$(POD_NAME)", "keel-0").replace("$(POD_NAMESPACE)", "prod")
        radv = static["KEEL_RAFT_ADVERTISE"].replace("$(POD_NAME)", "keel-0").replace("$(POD_NAMESPACE)", "prod")
        check(m[1] == (radv, adv), f"keel-0's advertised addresses {radv}/{adv} differ from its initial_members entry {m[1]}")
        e3 = run("keel-3")
        check(e3["KEEL_NODE_ID"] == "4" and "KEEL_INITIAL_MEMBERS" not in e3, f"keel-3 must be node 4 and not an initial member: {e3}")
        check(e3["KEEL_JOIN"] == "https://keel-0.keel-peers.prod.svc:7001", f"keel-3 joins through the headless service: {e3}")
    print("kubernetes: StatefulSet, headless and client Services, PDB, probes, preStop, TLS Secret, start script: ok")


if __name__ == "__main__":
    dockerfile_checks()
    compose_checks(sys.argv[1])
    k8s_checks()
