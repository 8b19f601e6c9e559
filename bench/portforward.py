"""`kubectl port-forward` through a REAL kubelet and container runtime vs the direct path.

    .venv/bin/python bench/portforward.py [--rounds 5] [--bulk-mib 64] [--requests 200]

Starts the test control plane and the real node (tests/cluster/node.py; needs root, Docker and
the cached builds: `make test-images node-bins`), runs the sample app pod (tests/node/app), then,
interleaving the arms each round: bulk download MB/s and small-request latency
(a new connection per request) to the pod directly (its pod IP, dialled inside the node's
network namespace) and through `kubectl port-forward` (apiserver -> egress -> kubelet ->
containerd's stream server -> the pod's netns). Prints a markdown table with the ratios.
"""
from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster import harness  # noqa: E402
from tests.cluster import node as nodemod  # noqa: E402
from tests.cluster.podrunner import netns_socket  # noqa: E402

APP_IMAGE = "localhost/velo-test/sample-app:1"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def get(connect, path: str) -> int:
    s = connect()
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        n = 0
        while chunk := s.recv(1 << 20):
            n += len(chunk)
        return n
    finally:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bulk-mib", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()

    sh("bash", str(ROOT / "tests/docker/engine.sh"))
    base = sh("bash", str(ROOT / "proxy/base-image.sh")).splitlines()[-1]
    for tag, ctx in ((APP_IMAGE, "tests/node/app"), (nodemod.PAUSE_IMAGE, "tests/node/pause")):
        sh("docker", "build", "-q", "--network", "none", "--build-arg", f"BASE={base}", "-t", tag, str(ROOT / ctx))
    state = Path(tempfile.mkdtemp(prefix="velo-bench-node-"))
    c = harness.Cluster(state, harness.ensure_binaries())
    nodemod.ensure_node_binaries()
    pf = None
    try:
        c.start(netns=True, fake_node=False, apiserver_args=nodemod.node_apiserver_args(state))
        node = nodemod.RealNode(c).start(images=[nodemod.PAUSE_IMAGE, APP_IMAGE])
        c.kubectl("run", "bench", f"--image={APP_IMAGE}", "--image-pull-policy=Never", "--port=8080", "--", "8080")
        c.kubectl("wait", "--for=condition=Ready", "pod/bench", "--timeout=180s", timeout=200)
        pod_ip = c.kubectl("get", "pod", "bench", "-o", "jsonpath={.status.podIP}").stdout.strip()
        pf = subprocess.Popen([c.kubectl_path, f"--kubeconfig={c.kubeconfig}", "port-forward", "pod/bench", ":8080"],
                              stdout=subprocess.PIPE, text=True)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", pf.stdout.readline()).group(1))

        def direct() -> socket.socket:
            s = netns_socket(node.netns)
            s.connect((pod_ip, 8080))
            return s

        def forwarded() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port))

        harness.wait_for(lambda: get(direct, "/"), 60, "the bench pod to listen")  # Ready != listening: no probe
        arms = {"direct (pod IP in the node netns)": direct, "kubectl port-forward (real kubelet)": forwarded}
        bulk = {a: [] for a in arms}
        lat = {a: [] for a in arms}
        size = args.bulk_mib << 20
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for a in order:
                t0 = time.perf_counter()
                assert get(arms[a], f"/blob/{size}") > size
                bulk[a].append(size / (time.perf_counter() - t0) / 1e6)
                for _ in range(args.requests // args.rounds):
                    t0 = time.perf_counter()
                    get(arms[a], "/")
                    lat[a].append((time.perf_counter() - t0) * 1e3)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        d, f = list(arms)
        print(f"\n| path | bulk MB/s (median of {args.rounds} x {args.bulk_mib} MiB) | request p50 ms | p90 ms |")
        print("|---|---|---|---|")
        for a in arms:
            q = statistics.quantiles(lat[a], n=10)
            print(f"| {a} | {statistics.median(bulk[a]):.0f} | {statistics.median(lat[a]):.2f} | {q[8]:.2f} |")
        print(f"\nport-forward / direct: bulk {statistics.median(bulk[f]) / statistics.median(bulk[d]):.2f}x, "
              f"request latency {statistics.median(lat[f]) / statistics.median(lat[d]):.1f}x")
        return 0
    finally:
        if pf:
            pf.terminate()
            pf.wait(10)
        c.stop(quiet=True)


if __name__ == "__main__":
    sys.exit(main())
