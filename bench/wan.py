"""Emulated WAN for the benchmarks: toxiproxy on a laptop -> cluster hop.

This kernel has no netem, so latency and bandwidth are added in user space by
toxiproxy (built from the Go module proxy by bench/toxiproxy.sh into a
version-keyed cache).  Each proxied hop gets a ``latency`` toxic on both
directions and, optionally, a ``bandwidth`` toxic on both directions.  It
models delay and rate at the application level, not TCP's own windows, which
is what exposes an application's flow control (stream windows,
acknowledgement timing, extra round trips).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def toxiproxy_binary() -> str:
    """Build (once) and return the toxiproxy server binary."""
    done = subprocess.run([str(HERE / "toxiproxy.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building toxiproxy failed: {done.stderr.strip()[-400:]}")
    return done.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Toxiproxy:
    """One toxiproxy server; ``hop()`` adds a proxied, delayed link to an upstream."""

    def __init__(self, logdir: Path):
        self.api_port = _free_port()
        self.log = open(logdir / "toxiproxy.log", "ab")
        self.proc = subprocess.Popen(
            [toxiproxy_binary(), "-host", "127.0.0.1", "-port", str(self.api_port)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/version")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("toxiproxy did not start; see toxiproxy.log")
                time.sleep(0.05)

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def hop(self, name: str, upstream_port: int, latency_ms: float, rate_kbps: int | None = None) -> int:
        """Listen on a new local port that relays to ``upstream_port`` with the toxics; return the port."""
        port = _free_port()
        self._call("POST", "/proxies", {"name": name, "listen": f"127.0.0.1:{port}",
                                         "upstream": f"127.0.0.1:{upstream_port}", "enabled": True})
        for stream in ("upstream", "downstream"):
            if latency_ms:
                self._call("POST", f"/proxies/{name}/toxics", {
                    "name": f"latency_{stream}", "type": "latency", "stream": stream,
                    "attributes": {"latency": int(latency_ms), "jitter": 0}})
            if rate_kbps:
                self._call("POST", f"/proxies/{name}/toxics", {
                    "name": f"bandwidth_{stream}", "type": "bandwidth", "stream": stream,
                    "attributes": {"rate": int(rate_kbps)}})
        return port

    def set_rate(self, name: str, rate_kbps: int | None) -> None:
        """Add, change or (None) remove the bandwidth cap of a hop."""
        for stream in ("upstream", "downstream"):
            toxic = f"bandwidth_{stream}"
            try:
                self._call("DELETE", f"/proxies/{name}/toxics/{toxic}")
            except OSError:
                pass
            if rate_kbps:
                self._call("POST", f"/proxies/{name}/toxics", {
                    "name": toxic, "type": "bandwidth", "stream": stream, "attributes": {"rate": int(rate_kbps)}})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


GBIT_KBPS = 1_000_000 // 8  # toxiproxy's bandwidth rate is in KB/s: 1 Gbit/s = 125,000 KB/s
