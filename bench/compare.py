#!/usr/bin/env python3
"""The comparison velo exists to win, in one run on one machine (issue 9).

Arms, all to the same nginx:
  direct       client -> nginx
  velo-<b>     client -> `velo up` -> tunnel over backend <b> -> `velo gateway` -> nginx,
               for every backend (websocket, h2, and the tcp plugin when installed)
  velo-port-forward
               client -> `velo up` -> test kube-apiserver -> kwok (pods/portforward of pod
               bench-gateway) -> `velo gateway`'s port-forward:// listener -> nginx
               (with the cluster only: `[tunnel.port-forward] pod = "bench-gateway"`)
  kubectl      client -> `kubectl port-forward` -> test kube-apiserver -> kwok (pods/portforward) -> nginx,
               kubectl's default protocol: SPDY tunnelled over a WebSocket (KEP 4006)
  kubectl-spdy the same with KUBECTL_PORT_FORWARD_WEBSOCKETS=false: the legacy SPDY upgrade

Measured per arm: 1 KiB keep-alive req/s and p50/p99 at 1, 8 and 32 connections (wrk),
the first byte of a new connection through the warm path (connect, GET, first byte;
p50/p99 of --first-byte-samples), and one 64 MiB download (curl).  Twice: on loopback,
and over an emulated WAN (toxiproxy, bench/wan.py) with --latency-ms added each way on
the laptop -> cluster hop of every arm (direct: before nginx; velo: before the gateway;
kubectl and velo-port-forward: before the apiserver), plus a 1 Gbit/s cap for the download.  Arms are
interleaved and rotated over --rounds rounds; medians are reported with ratios to direct.

    .venv/bin/python bench/compare.py                 # full run (about 15 minutes)
    .venv/bin/python bench/compare.py --rounds 1 --duration 1 --no-kubectl   # smoke test

The report (markdown) goes to stdout and bench/results/compare.md.  Exit 0 when the run
completed, whatever the targets said; 3 when tools are missing; 1 when velo (or the test
cluster) could not be brought up.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import os
import re
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import (  # noqa: E402  (same tools, processes and parsers as bench/run.py)
    NGINX_CONF,
    BenchError,
    Fatal,
    Procs,
    _nginx_has_e,
    accepts,
    cleaning_up,
    ensure_tools,
    free_port,
    interruptible,
    log,
    machine_info,
    run_curl,
    run_wrk,
    wait_for,
)
from wan import GBIT_KBPS, Toxiproxy  # noqa: E402

RESULTS = HERE / "results"
MB = 1_000_000
BULK_MIB = 64
BACKENDS = [  # (backend, --listen scheme, path)
    ("websocket", "ws", "/velo"),
    ("h2", "http", "/velo"),
    ("tcp", "tcp", ""),
]
PORT_FORWARD = ("port-forward", "port-forward", "")
"""Through the apiserver like kubectl: only with the test cluster (not with --no-kubectl)."""
GATEWAY_POD = "bench-gateway"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def first_byte(port: int, samples: int, timeout: float = 10.0) -> list[float]:
    """New connection, GET /1k.bin, until the first response byte; seconds each."""
    times = []
    request = b"GET /1k.bin HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    for _ in range(samples):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            data = sock.recv(65536)
            if not data:
                raise BenchError("connection closed before the first byte")
            times.append(time.perf_counter() - t0)
            # Read the whole response by its length: kubectl port-forward does not pass the
            # server's close on promptly, so waiting for EOF would time the wrong thing.
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536) or _eof()
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(body) < length:
                body += sock.recv(65536) or _eof()
    return times


def _eof() -> bytes:
    raise BenchError("connection closed mid-response")


class Compare:
    def __init__(self, args, tools):
        self.args = args
        self.tools = tools
        self.tmp = Path(tempfile.mkdtemp(prefix="velo-compare-"))
        self.tmp.chmod(0o755)
        self.procs = Procs(self.tmp)
        self.token = secrets.token_hex(16)
        self.env = dict(os.environ, VELO_TOKEN=self.token)
        self.samples: dict[tuple, list[float]] = {}
        self.errors: dict[tuple, str] = {}
        self.ports: dict[str, int] = {}
        self.gateway_urls: dict[str, str] = {}
        self.backends = [b for b in BACKENDS if b[0] != "tcp" or self._has_plugin("velo-tcp")]
        if not args.no_kubectl:
            self.backends.append(PORT_FORWARD)
        self.cluster = None
        self.toxiproxy: Toxiproxy | None = None
        self.notes: list[str] = []
        self.kubectl_arms = ["kubectl", "kubectl-spdy"]

    def only(self, wanted: list[str]) -> None:
        """Measure just these arms (direct is always there to compare with)."""
        self.backends = [b for b in self.backends if f"velo-{b[0]}" in wanted]
        self.kubectl_arms = [a for a in self.kubectl_arms if a in wanted]

    @staticmethod
    def _has_plugin(dist: str) -> bool:
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    # ---- setup --------------------------------------------------------------------------

    def start(self) -> None:
        """What every arm shares: nginx, the gateway and, when an arm goes through the
        apiserver, the test cluster."""
        self.start_nginx()
        self.start_gateway()
        if not self.args.no_kubectl:
            self.start_cluster()

    def shared_pids(self) -> dict[str, int]:
        """The processes every arm of the running phase goes through, by name, for CPU figures."""
        pids = {"gateway": self.procs.procs["gateway"].pid, "nginx": self.procs.procs["nginx"].pid}
        if self.toxiproxy is not None:
            pids["toxiproxy"] = self.toxiproxy.proc.pid
        if self.cluster is not None:
            pids["apiserver"] = self.cluster._popen["kube-apiserver"].pid
            pids["kwok"] = self.cluster._popen["kwok"].pid
        return pids

    def path_pids(self, phase: str, arm: str) -> dict[str, int]:
        """The processes ``arm``'s requests cross: its own (`velo up` as "up", or kubectl; none
        for direct) first, then ``shared_pids``."""
        own = self.procs.procs.get(f"up-{phase}-{arm.removeprefix('velo-')}") if arm.startswith("velo-") \
            else self.procs.procs.get(f"{arm}-{phase}")
        pids = {} if own is None else {"up" if arm.startswith("velo-") else arm: own.pid}
        return {**pids, **self.shared_pids()}

    def start_nginx(self) -> None:
        www = self.tmp / "www"
        www.mkdir()
        (www / "1k.bin").write_bytes(os.urandom(1024))
        block = os.urandom(1 << 20)
        with open(www / f"bulk-{BULK_MIB}m.bin", "wb") as f:
            for i in range(BULK_MIB):
                f.write(i.to_bytes(8, "big") + block[8:])
        for sub in ("body", "proxy"):
            (self.tmp / sub).mkdir()
        port = self.ports["nginx"] = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=port, www=www))
        argv = [self.tools["nginx"], "-p", str(self.tmp), "-c", str(conf)]
        if _nginx_has_e(self.tools["nginx"]):
            argv += ["-e", str(self.tmp / "nginx-error.log")]
        proc = self.procs.start("nginx", argv)
        wait_for("nginx", lambda: accepts(port), 15, proc, self.procs, "nginx")

    def start_gateway(self) -> None:
        ready = self.tmp / "gateway.ready"
        argv = [sys.executable, "-m", "velo", "gateway", "--allow", f"127.0.0.1:{self.ports['nginx']}",
                "--ready-file", str(ready)]
        for backend, scheme, path in self.backends:
            argv += ["--listen", f"{scheme}://127.0.0.1:0{path}"]  # port-forward:// stays on loopback
        proc = self.procs.start("gateway", argv, env=self.env)
        text = wait_for("the gateway", lambda: ready.exists() and ready.read_text().strip(), 20, proc,
                        self.procs, "gateway")
        for line in text.splitlines():
            scheme = line.split(":", 1)[0]
            for backend, s, _ in self.backends:
                if s == scheme:
                    self.gateway_urls[backend] = line

    def start_cluster(self) -> None:
        """The test control plane, two pods on the kwok node: bench-nginx, whose kwok
        PortForward goes to nginx (the kubectl arm), and bench-gateway, whose PortForward goes
        to the gateway's port-forward:// listener (velo-port-forward)."""
        from tests.cluster.harness import Cluster, binaries_ready

        if not binaries_ready():
            raise Fatal("the test cluster's binaries are not built: run tests/cluster/build.sh "
                        "(or pass --no-kubectl)", 3)
        log("starting the test cluster (kube-apiserver + kwok)")
        self.cluster = Cluster(self.tmp / "cluster").start(netns=False, owner_pid=os.getpid())
        manifest = f"""
apiVersion: v1
kind: Pod
metadata: {{name: bench-nginx, namespace: default}}
spec:
  nodeName: {self.cluster.node_name}
  containers: [{{name: nginx, image: registry.invalid/nginx, ports: [{{containerPort: 80}}]}}]
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: PortForward
metadata: {{name: bench-nginx, namespace: default}}
spec:
  forwards: [{{ports: [80], target: {{address: 127.0.0.1, port: {self.ports['nginx']}}}}}]
"""
        pf_url = self.gateway_urls.get("port-forward")
        if pf_url:
            from velo.backends.portforward import DEFAULT_PORT

            pf_port = urlsplit(pf_url).port
            manifest += f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {GATEWAY_POD}, namespace: default}}
spec:
  nodeName: {self.cluster.node_name}
  containers: [{{name: gateway, image: registry.invalid/velo-gateway, ports: [{{containerPort: {DEFAULT_PORT}}}]}}]
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: PortForward
metadata: {{name: {GATEWAY_POD}, namespace: default}}
spec:
  forwards: [{{ports: [{DEFAULT_PORT}], target: {{address: 127.0.0.1, port: {pf_port}}}}}]
"""
        path = self.tmp / "bench-pod.yaml"
        path.write_text(manifest)
        self.cluster.kubectl("apply", "-f", str(path))
        pods = ["pod/bench-nginx"] + ([f"pod/{GATEWAY_POD}"] if pf_url else [])
        self.cluster.kubectl("wait", "--for=condition=Ready", *pods, "--timeout=60s", timeout=90)
        self.ports["apiserver"] = int(self.cluster.server.rsplit(":", 1)[1])

    # ---- one phase: loopback or WAN -------------------------------------------------------

    def start_arms(self, phase: str, wan: bool) -> dict[str, int]:
        arms = {}
        nginx = self.ports["nginx"]
        if wan:
            self.toxiproxy = Toxiproxy(self.tmp)
            arms["direct"] = self.toxiproxy.hop("direct", nginx, self.args.latency_ms)
        else:
            arms["direct"] = nginx
        for backend, _, _ in self.backends:
            if backend == "port-forward":  # the laptop dials the apiserver, not the gateway
                kubeconfig = self.kubeconfig(phase, f"velo-{backend}", wan)
                table = f'pod = "{GATEWAY_POD}"\nnamespace = "default"\nkubeconfig = "{kubeconfig}"'
                arms[f"velo-{backend}"] = self.start_up(phase, backend, table)
                continue
            url = self.gateway_urls[backend]
            if wan:
                gw_port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                hop = self.toxiproxy.hop(f"velo-{backend}", gw_port, self.args.latency_ms)
                url = url.replace(f":{gw_port}", f":{hop}", 1)
            arms[f"velo-{backend}"] = self.start_up(phase, backend, f'url = "{url}"')
        if self.cluster is not None:
            # kubectl's default since 1.31 tunnels SPDY over a WebSocket (KEP 4006); the
            # legacy SPDY upgrade beside it says which of the apiserver's protocols serves better.
            for arm in self.kubectl_arms:
                arms[arm] = self.start_port_forward(phase, self.kubeconfig(phase, arm, wan), arm,
                                                    websockets=arm == "kubectl")
        for arm, port in arms.items():  # warm: the tunnel (or port-forward) carries a request
            wait_for(f"{arm} to answer", lambda p=port: self._get_ok(p), 30)
        return arms

    def _get_ok(self, port: int) -> bool:
        try:
            first_byte(port, 1, timeout=5)
            return True
        except (OSError, BenchError):
            return False

    def kubeconfig(self, phase: str, arm: str, wan: bool) -> Path:
        """The test cluster's kubeconfig; on the WAN phase its server is ``arm``'s own hop to the
        apiserver (so the download's bandwidth cap applies to that arm alone)."""
        server = self.cluster.server
        if wan:
            hop = self.toxiproxy.hop(arm, self.ports["apiserver"], self.args.latency_ms)
            server = server.rsplit(":", 1)[0] + f":{hop}"
        kubeconfig = self.tmp / f"kubeconfig-{phase}-{arm}"
        kubeconfig.write_text(Path(self.cluster.kubeconfig).read_text().replace(self.cluster.server, server))
        return kubeconfig

    def start_up(self, phase: str, backend: str, table: str) -> int:
        """`velo up` (static provider) forwarding "web" to nginx; ``table`` is the body of
        ``[tunnel.<backend>]``."""
        folder = self.tmp / f"{phase}-{backend}"
        folder.mkdir()
        port = free_port()
        (folder / "velocity.toml").write_text(
            f'[project]\nname = "bench-{phase}-{backend}"\n\n[tunnel]\ntoken_env = "VELO_TOKEN"\n\n'
            f'[tunnel.{backend}]\n{table}\n\n[remote.services.web]\n'
            f'target = "127.0.0.1:{self.ports["nginx"]}"\nlocal_port = {port}\n')
        name = f"up-{phase}-{backend}"
        proc = self.procs.start(name, [sys.executable, "-m", "velo", "up", "-c", str(folder / "velocity.toml")],
                                env=self.env)
        wait_for(f"velo up ({backend}) to listen", lambda: accepts(port), 30, proc, self.procs, name)
        return port

    def start_port_forward(self, phase: str, kubeconfig: Path, arm: str, websockets: bool = True) -> int:
        port = free_port()
        name = f"{arm}-{phase}"
        env = dict(os.environ, KUBECTL_PORT_FORWARD_WEBSOCKETS="true" if websockets else "false")
        proc = self.procs.start(name, [self.cluster.kubectl_path, f"--kubeconfig={kubeconfig}", "port-forward",
                                       "pod/bench-nginx", f"{port}:80", "--address=127.0.0.1"], env=env)
        wait_for("kubectl port-forward to listen", lambda: accepts(port), 30, proc, self.procs, name)
        return port

    def stop_arms(self, phase: str) -> None:
        for name in list(self.procs.procs):
            if name.startswith(("up-", "kubectl-")) and phase in name:
                self.procs.stop(name)
        if self.toxiproxy is not None:
            self.toxiproxy.stop()
            self.toxiproxy = None

    def record(self, key: tuple, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def measure(self, phase: str, arms: dict[str, int]) -> None:
        names = list(arms)
        for r in range(self.args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            log(f"{phase}: round {r + 1}/{self.args.rounds}: {', '.join(order)}")
            for arm in order:
                port = arms[arm]
                url = f"http://127.0.0.1:{port}/1k.bin"
                for conns in self.args.connections:
                    key = (phase, arm, f"c{conns}")
                    try:
                        result = run_wrk(self.tools["wrk"], url, conns, self.args.duration)
                        if result["errors"]:
                            raise BenchError(result["errors"])
                        self.record(key + ("rps",), result["rps"])
                        self.record(key + ("p50",), result.get("p50_ms", result.get("lat_ms", 0)))
                        self.record(key + ("p99",), result.get("p99_ms", 0))
                    except BenchError as exc:
                        self.errors[key] = str(exc)
                        log(f"  {arm} {conns} conns: {exc}")
                try:
                    times = first_byte(port, self.args.first_byte_samples)
                    self.record((phase, arm, "fb", "p50"), 1000 * statistics.median(times))
                    self.record((phase, arm, "fb", "p99"), 1000 * percentile(times, 0.99))
                except (OSError, BenchError) as exc:
                    self.errors[(phase, arm, "fb")] = str(exc)
                if self.toxiproxy is not None:
                    self.toxiproxy.set_rate(arm, GBIT_KBPS)
                try:
                    res = run_curl(self.tools["curl"], f"http://127.0.0.1:{port}/bulk-{BULK_MIB}m.bin",
                                   BULK_MIB << 20, self.args.bulk_timeout)
                    self.record((phase, arm, "bulk"), res["mbps"])
                except BenchError as exc:
                    self.errors[(phase, arm, "bulk")] = str(exc)
                    log(f"  {arm} download: {exc}")
                finally:
                    if self.toxiproxy is not None:
                        self.toxiproxy.set_rate(arm, None)

    # ---- report ---------------------------------------------------------------------------

    def med(self, *key) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def table(self, phase: str, arms: list[str]) -> str:
        conns = self.args.connections
        head = ["path"] + [f"{c} conn req/s (x direct)" for c in conns] + \
               [f"{c} conn p50/p99 ms" for c in conns] + ["first byte p50/p99 ms", "64 MiB MB/s (x direct)"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in arms:
            cells = [arm]
            for c in conns:
                rps, base = self.med(phase, arm, f"c{c}", "rps"), self.med(phase, "direct", f"c{c}", "rps")
                cells.append(self._cell(rps, base, "{:,.0f}", (phase, arm, f"c{c}")))
            for c in conns:
                p50, p99 = self.med(phase, arm, f"c{c}", "p50"), self.med(phase, arm, f"c{c}", "p99")
                cells.append(f"{p50:.2f} / {p99:.2f}" if p50 is not None else "error")
            p50, p99 = self.med(phase, arm, "fb", "p50"), self.med(phase, arm, "fb", "p99")
            cells.append(f"{p50:.2f} / {p99:.2f}" if p50 is not None else "error")
            bulk, base = self.med(phase, arm, "bulk"), self.med(phase, "direct", "bulk")
            cells.append(self._cell(bulk, base, "{:,.0f}", (phase, arm, "bulk")))
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def _cell(self, value, base, fmt, key) -> str:
        if value is None:
            return f"error ({self.errors.get(key, 'no sample')[:60]})"
        text = fmt.format(value)
        return f"{text} ({value / base:.2f})" if base else text

    def targets(self, arms: list[str]) -> list[str]:
        out = []
        velo = [a for a in arms if a.startswith("velo-")]
        kube = self.med("loopback", "kubectl", "c32", "rps")
        for arm in velo:
            rps = self.med("loopback", arm, "c32", "rps")
            if kube and rps:
                out.append(f"- loopback, 32 connections: {arm} {rps / kube:.1f}x kubectl port-forward's req/s "
                           f"(target >= 5x): {'PASS' if rps >= 5 * kube else 'FAIL'}")
        for c in self.args.connections if "velo-port-forward" in velo else ():
            rps, kube_c = self.med("loopback", "velo-port-forward", f"c{c}", "rps"), \
                self.med("loopback", "kubectl", f"c{c}", "rps")
            if rps and kube_c:
                out.append(f"- loopback, {c} conn: velo-port-forward {rps / kube_c:.1f}x kubectl port-forward's "
                           f"req/s (target > 1x, same apiserver and kwok): {'PASS' if rps > kube_c else 'FAIL'}")
        for phase in ("loopback", "wan"):
            bulk, kube_b = self.med(phase, "velo-port-forward", "bulk"), self.med(phase, "kubectl", "bulk")
            if bulk and kube_b:
                out.append(f"- {phase}, 64 MiB download: velo-port-forward {bulk:.0f} MB/s vs kubectl port-forward "
                           f"{kube_b:.0f} MB/s (target > 1x): {'PASS' if bulk > kube_b else 'FAIL'}")
        added = 2 * self.args.latency_ms
        direct_fb = self.med("wan", "direct", "fb", "p50")
        for arm in velo:
            fb = self.med("wan", arm, "fb", "p50")
            if fb is not None and direct_fb is not None:
                out.append(f"- WAN, first byte of a new connection: {arm} {fb:.1f} ms vs direct {direct_fb:.1f} ms "
                           f"(target: within one added round trip, {added:g} ms, of direct): "
                           f"{'PASS' if fb <= direct_fb + added else 'FAIL'}")
        direct_bulk, kube_bulk = self.med("wan", "direct", "bulk"), self.med("wan", "kubectl", "bulk")
        for arm in velo:
            bulk = self.med("wan", arm, "bulk")
            if bulk is None or not direct_bulk:
                continue
            ok = bulk >= 0.8 * direct_bulk and (kube_bulk is None or bulk >= kube_bulk)
            vs_kube = f", kubectl {kube_bulk:.0f} MB/s" if kube_bulk else ""
            out.append(f"- WAN + 1 Gbit/s, 64 MiB download: {arm} {bulk:.0f} MB/s = {bulk / direct_bulk:.2f} of "
                       f"direct{vs_kube} (target >= 0.8 of direct and >= kubectl): {'PASS' if ok else 'FAIL'}")
        return out

    def report(self, arms: list[str], started: float, loads: tuple) -> str:
        info = machine_info(self.tools)
        lines = [
            f"# velo vs direct vs kubectl port-forward ({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
            f"Load average at start / end: {loads[0]} / {loads[1]}. wrk -t1 -d{self.args.duration}s, "
            f"{self.args.rounds} interleaved rounds, medians; first byte over {self.args.first_byte_samples} "
            "new connections. Everything (wrk, nginx, velo's processes, the apiserver, kwok, toxiproxy) "
            "shares the machine's cores: ratios carry over, absolute numbers do not.",
            "",
            "## Loopback",
            "",
            self.table("loopback", arms),
            "",
            *([] if self.args.no_wan else [
                f"## Emulated WAN: {self.args.latency_ms:g} ms added each way (toxiproxy), "
                "1 Gbit/s cap for the download",
                "",
                self.table("wan", arms),
                "",
            ]),
            "## Targets",
            "",
            *self.targets(arms),
            "",
            f"Run took {time.monotonic() - started:.0f} s.",
        ]
        return "\n".join(lines + self.notes)

    def close(self) -> None:
        if self.toxiproxy is not None:
            self.toxiproxy.stop()
        self.procs.stop_all()
        if self.cluster is not None:
            self.cluster.stop(quiet=True)
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


THROUGH_APISERVER = ("kubectl", "kubectl-spdy", "velo-port-forward")


def bench_for(args, wanted: list[str] | None, install: bool = True) -> Compare:
    """A Compare for ``wanted`` arms (None: all), with the test cluster only when one of them
    goes through the apiserver; Fatal when the tools cannot be had."""
    args.no_kubectl = getattr(args, "no_kubectl", False) or (
        wanted is not None and not any(arm in THROUGH_APISERVER for arm in wanted))
    bench = Compare(args, ensure_tools(install))
    if wanted is not None:
        bench.only(wanted)
    return bench


def guarded(bench: Compare, body) -> int:
    """``body()`` with ``bench`` running: a setup failure or Ctrl-C/SIGTERM is an exit code and
    one line, and everything the bench started is stopped whatever happened."""
    try:
        return body() or 0
    except Fatal as exc:
        log(f"FAILED: {exc}")
        return exc.code
    except KeyboardInterrupt:
        log("interrupted; stopping everything this script started")
        return 130
    finally:
        cleaning_up()
        bench.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    p.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--first-byte-samples", type=int, default=30)
    p.add_argument("--latency-ms", type=float, default=10.0, help="added each way on the WAN phase")
    p.add_argument("--bulk-timeout", type=float, default=120.0)
    p.add_argument("--no-kubectl", action="store_true", help="skip the kubectl port-forward arm")
    p.add_argument("--arms", type=lambda s: s.split(","), default=None,
                   help="only these arms besides direct, comma-separated (velo-websocket, velo-h2, velo-tcp, "
                        "velo-port-forward, kubectl, kubectl-spdy); default: all")
    p.add_argument("--no-wan", action="store_true")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS / "compare.md")
    args = p.parse_args(argv)
    interruptible()
    try:
        bench = bench_for(args, args.arms, install=not args.no_install)
    except Fatal as exc:
        log(str(exc))
        return exc.code
    started = time.monotonic()
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())

    def run() -> None:
        arms: list[str] = []
        bench.start()
        for phase, wan in (("loopback", False), ("wan", True)):
            if wan and args.no_wan:
                continue
            ports = bench.start_arms(phase, wan)
            arms = list(ports)
            bench.measure(phase, ports)
            bench.stop_arms(phase)
        report = bench.report(arms, started, (load_start, " ".join(f"{x:.1f}" for x in os.getloadavg())))
        print(report)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
        log(f"report written to {args.output}")

    return guarded(bench, run)


if __name__ == "__main__":
    sys.exit(main())
