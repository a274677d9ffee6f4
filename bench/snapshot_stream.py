#!/usr/bin/env python3
"""Snapshot streaming benchmark for keel (not part of the test suite).

Starts nodes 1 and 2 of a 3-node cluster on loopback (mutual TLS, as in
production), loads at least --gib GiB of logical state (key + value bytes)
through the HTTP API, makes the leader build a snapshot and purge its log,
restarts nodes 1 and 2 (so their peak-memory counters start fresh), then
starts node 3 with an empty data directory: it can only catch up by
receiving and installing the snapshot over the HTTP/2 peer connection.

Reports the snapshot size, the streaming throughput and install time as the
nodes log them, the peak resident memory (VmHWM from /proc/<pid>/status) of
the sender and the receiver, and the disk's own sequential write rate
(dd with O_DIRECT) in the same directory. Needs only Python 3 and a keel
binary; see bench/README.md for recorded figures.

    python3 bench/snapshot_stream.py --keel "$CARGO_TARGET_DIR/debug/keel" --gib 1
"""

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


class Node:
    def __init__(self, root, keel, node_id, members, cluster):
        self.id = node_id
        self.keel = keel
        self.dir = os.path.join(root, f"node-{node_id}")
        os.makedirs(self.dir, exist_ok=True)
        self.api = members[node_id]["api"]
        self.raft = members[node_id]["raft"]
        self.members = ",".join(f"{i}={m['raft']}/{m['api']}" for i, m in sorted(members.items()))
        certs = os.path.join(root, "certs")
        self.config = os.path.join(self.dir, "keel.toml")
        with open(self.config, "w") as f:
            f.write(
                f'node_id = {node_id}\ncluster_name = "{cluster}"\n'
                f'data_dir = "{os.path.join(self.dir, "data")}"\n'
                f'api_listen = "{self.api}"\nraft_listen = "{self.raft}"\n'
                'log_level = "info,openraft=warn"\nrequest_timeout_ms = 30000\n\n'
                # No automatic snapshots while loading: one is triggered at the end.
                "[raft]\nsnapshot_every = 100000000\nkeep_after_snapshot = 0\n\n"
                f'[tls]\nca = "{certs}/ca.pem"\ncert = "{certs}/node-{node_id}.pem"\n'
                f'key = "{certs}/node-{node_id}-key.pem"\n'
            )
        self.log = os.path.join(self.dir, "keel.log")
        self.proc = None

    def start(self):
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [self.keel, "serve", "--config", self.config, f"--initial-members={self.members}"],
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
        )

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.proc = None

    def mem_kib(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def log_lines(self, needle):
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        with open(self.log, errors="replace") as f:
            return [ansi.sub("", l) for l in f if needle in l]


def field(line, name):
    m = re.search(r" " + re.escape(name) + r"=\"?([^ \"]+)", line)
    return m.group(1) if m else None


class Api:
    def __init__(self, certs, admin):
        name = "admin-bench" if admin else "client-bench"
        self.ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
        self.ctx.load_cert_chain(os.path.join(certs, f"{name}.pem"), os.path.join(certs, f"{name}-key.pem"))
        self.local = threading.local()

    def conn(self, addr):
        c = getattr(self.local, "c", None)
        if c is None or getattr(self.local, "addr", None) != addr:
            host, port = addr.rsplit(":", 1)
            c = http.client.HTTPSConnection(host, int(port), context=self.ctx, timeout=600)
            self.local.c, self.local.addr = c, addr
        return c

    def call(self, addr, method, path, body=None):
        for attempt in range(5):
            c = self.conn(addr)
            try:
                c.request(method, path, body=body, headers={"content-type": "application/json"})
                r = c.getresponse()
                data = r.read()
                return r.status, (json.loads(data) if data else None)
            except (OSError, http.client.HTTPException):
                self.local.c = None
                if attempt == 4:
                    raise
                time.sleep(0.5)


def wait(cond, what, timeout=600):
    start = time.time()
    while time.time() - start < timeout:
        try:
            v = cond()
            if v:
                return v
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def dir_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def disk_write_rate(directory, mib):
    path = os.path.join(directory, "dd-test")
    out = subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "oflag=direct"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    os.remove(path)
    m = re.search(r"copied, ([0-9.]+) s", out)
    secs = float(m.group(1))
    return mib * 1048576 / secs / 1e6, out.strip().splitlines()[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_keel = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/keel-target")), "debug", "keel")
    ap.add_argument("--keel", default=default_keel, help="keel binary (default: %(default)s)")
    ap.add_argument("--gib", type=float, default=1.0, help="logical state to load, GiB")
    ap.add_argument("--value-kib", type=int, default=64, help="value size, KiB")
    ap.add_argument("--threads", type=int, default=8, help="concurrent writers")
    ap.add_argument("--dir", help="work directory (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="keel-bench-")
    os.makedirs(root, exist_ok=True)
    certs = os.path.join(root, "certs")
    run([args.keel, "cert", "ca", "--dir", certs, "--force"])
    for i in (1, 2, 3):
        run([args.keel, "cert", "node", "--dir", certs, "--id", str(i), "--force"])
    run([args.keel, "cert", "client", "--dir", certs, "--name", "bench", "--force"])
    run([args.keel, "cert", "client", "--dir", certs, "--name", "bench", "--admin", "--force"])
    members = {i: {"api": f"127.0.0.1:{free_port()}", "raft": f"127.0.0.1:{free_port()}"} for i in (1, 2, 3)}
    nodes = {i: Node(root, args.keel, i, members, "bench") for i in (1, 2, 3)}
    client, admin = Api(certs, False), Api(certs, True)
    result = {"keel": args.keel, "value_kib": args.value_kib, "threads": args.threads}

    def leader_of(ids):
        seen = set()
        for i in ids:
            st, s = client.call(nodes[i].api, "GET", "/status")
            seen.add(s.get("leader_id") if st == 200 else None)
        return seen.pop() if len(seen) == 1 and None not in seen else None

    try:
        nodes[1].start()
        nodes[2].start()
        leader = wait(lambda: leader_of([1, 2]), "a leader")
        # Load: keys of 12 bytes, values of random base64 (barely compressible).
        value_bytes = args.value_kib * 1024
        n = int(args.gib * (1 << 30) / (value_bytes + 12)) + 1
        start = time.time()

        def put(i):
            # Fresh random text per value: LZ4 finds nothing to share.
            body = json.dumps(base64.b64encode(os.urandom(value_bytes * 3 // 4)).decode()[: value_bytes - 2])
            for _ in range(10):
                st, b = client.call(nodes[leader].api, "PUT", f"/v1/kv/big/{i:08d}", body)
                if st in (200, 201):
                    break
                time.sleep(1)  # e.g. 503 on a busy machine: a retry rewrites the same key
            else:
                raise RuntimeError(f"PUT {i}: {st} {b}")
            return len(body) + len(f"kv/big/{i:08d}")

        with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
            logical = sum(pool.map(put, range(n)))
        load_s = time.time() - start
        result.update(records=n, logical_bytes=logical, load_s=round(load_s, 1), load_mb_s=round(logical / 1e6 / load_s, 1))
        print(f"loaded {n} records, {logical / 2**30:.3f} GiB logical, in {load_s:.1f} s ({logical / 1e6 / load_s:.1f} MB/s)", flush=True)

        t = time.time()
        st, snap = admin.call(nodes[leader].api, "POST", "/admin/snapshot")
        assert st == 200, snap
        result["build_s"] = round(time.time() - t, 1)
        snap_dir = os.path.join(nodes[leader].dir, "data", "snapshots")
        snap_file = max(f for f in os.listdir(snap_dir) if f.endswith(".snap"))
        result["snapshot_file_bytes"] = os.path.getsize(os.path.join(snap_dir, snap_file))
        print(f"snapshot built in {result['build_s']} s: {snap}, file {result['snapshot_file_bytes']} bytes", flush=True)
        # Either node may lead after the restart below, so both build a
        # snapshot and purge their logs (openraft purges after the build,
        # asynchronously); otherwise node 3 could catch up from a log.
        other = 3 - leader
        st, other_snap = admin.call(nodes[other].api, "POST", "/admin/snapshot")
        assert st == 200, other_snap
        for i, upto in ((leader, snap["snapshot"]["index"]), (other, other_snap["snapshot"]["index"])):
            wait(lambda: client.call(nodes[i].api, "GET", "/status")[1]["purged_index"] >= upto, f"node {i}'s log purge", timeout=120)

        # Fresh processes for the sender side, so VmHWM covers only what follows.
        nodes[1].stop()
        nodes[2].stop()
        nodes[1].start()
        nodes[2].start()
        leader = wait(lambda: leader_of([1, 2]), "a leader after restart")
        target = client.call(nodes[leader].api, "GET", "/status")[1]["applied_index"]
        time.sleep(2)
        result["sender_idle_rss_kib"] = nodes[leader].mem_kib("VmRSS")
        result["sender_idle_hwm_kib"] = nodes[leader].mem_kib("VmHWM")

        t = time.time()
        nodes[3].start()
        wait(lambda: client.call(nodes[3].api, "GET", "/status")[1]["applied_index"] >= target, "node 3 to catch up", timeout=3600)
        result["catch_up_s"] = round(time.time() - t, 1)
        result["sender_hwm_kib"] = nodes[leader].mem_kib("VmHWM")
        result["receiver_hwm_kib"] = nodes[3].mem_kib("VmHWM")
        result["sender_rss_after_kib"] = nodes[leader].mem_kib("VmRSS")
        result["receiver_rss_after_kib"] = nodes[3].mem_kib("VmRSS")
        recv = nodes[3].log_lines("snapshot received")[-1]
        sent = nodes[leader].log_lines("snapshot sent")[-1]
        result["received_bytes"] = int(field(recv, "received_bytes"))
        result["stream_ms"] = int(field(recv, "ms"))
        result["stream_mb_s"] = round(result["received_bytes"] / 1e6 / (result["stream_ms"] / 1000), 1)
        result["send_call_ms"] = int(field(sent, "ms"))
        result["receiver_data_dir_bytes"] = dir_bytes(os.path.join(nodes[3].dir, "data"))
        mbps, dd_line = disk_write_rate(root, 1024)
        result["disk_seq_write_mb_s"] = round(mbps, 1)
        result["dd"] = dd_line
        print(json.dumps(result, indent=2))
    finally:
        for node in nodes.values():
            try:
                node.stop()
            except Exception:
                if node.proc:
                    node.proc.kill()
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work directory kept: {root}")


if __name__ == "__main__":
    main()
