#!/usr/bin/env python3
"""velo benchmark harness: velo's forward path against the direct path, same run.

Run it with the interpreter that has velo installed (the project venv):

    .venv/bin/python bench/run.py                       # full run (about 4 minutes)
    .venv/bin/python bench/run.py --duration 1 --rounds 1 --bulk-mib 32   # smoke test

What it does (see bench/README.md for the method and how to read the table):
  * makes sure nginx, wrk and curl are there (installs them from Debian's packages
    with apt-get when run as root; otherwise says what to install and exits 3),
  * starts nginx (own prefix and config, 1 worker, sendfile, no access log) serving a
    1 KiB, a 100 KiB and a bulk (default 256 MiB) file from a temp dir, plus a tiny
    "holder" TCP server that accepts connections and keeps them open,
  * starts `velo gateway` and `velo up` (static provider, fixed local ports) and waits
    until `velo status --json` says the tunnel is up,
  * measures each figure on both arms -- direct (client -> nginx) and velo
    (client -> velo up -> WebSocket -> velo gateway -> nginx) -- interleaved, for
    --rounds rounds, and reports medians and velo/direct ratios,
  * prints a markdown report and writes it to bench/results/latest.md,
  * stops every process it started, also on Ctrl-C or SIGTERM.

Progress goes to stderr, the report to stdout.  The exit code is 0 whenever the run
completed, whether or not the targets were met; 3 when the tools cannot be had; 2 for
a setup problem; 1 when velo could not be brought up.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from hostinfo import cpu_model, memory, package_version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

DIRECT, VELO = "direct", "velo"
ARMS = (DIRECT, VELO)
MB = 1_000_000  # MB/s in this report are 10^6 bytes per second
EXIT_TOOLS = 3
EXIT_SETUP = 2
EXIT_VELO = 1


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A measurement (or a setup step) failed; the message says why, in one line."""


class Fatal(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ---- tools -------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin", "/usr/local/bin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def ensure_tools(allow_install: bool) -> dict[str, str]:
    """nginx, wrk and curl from Debian's packages; apt-get is called at most once each way."""
    # tool -> Debian packages to try, in order
    wanted = {"nginx": ["nginx-light", "nginx"], "wrk": ["wrk"], "curl": ["curl"]}
    missing = [tool for tool in wanted if find_tool(tool) is None]
    if missing:
        hint = "apt-get install -y nginx-light wrk curl (or nginx instead of nginx-light)"
        if not allow_install:
            raise Fatal(f"FAILED: missing {', '.join(missing)} and --no-install was given; run: {hint}", EXIT_TOOLS)
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise Fatal(f"FAILED: missing {', '.join(missing)}; not root or no apt-get, so install them yourself: {hint}",
                        EXIT_TOOLS)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        log(f"installing {', '.join(missing)} from Debian's packages (apt-get update, then apt-get install)")
        update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        if update.returncode != 0:
            log(f"apt-get update failed (exit {update.returncode}): {_tail(update.stderr)}; trying the cached lists")
        for tool in missing:
            if find_tool(tool) is not None:  # another package of the list brought it
                continue
            for package in wanted[tool]:
                done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package],
                                      env=env, capture_output=True, text=True)
                if done.returncode == 0 and find_tool(tool) is not None:
                    log(f"installed {package}")
                    break
                log(f"apt-get install {package} failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}")
        still = [tool for tool in wanted if find_tool(tool) is None]
        if still:
            raise Fatal(f"FAILED: could not install {', '.join(still)} with apt-get; install by hand: {hint}", EXIT_TOOLS)
    return {tool: find_tool(tool) for tool in wanted}


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in (text or "").strip().splitlines()[-lines:] if line.strip())


# ---- processes ---------------------------------------------------------------------


class Procs:
    """Every long-running process this script starts; stop_all() ends exactly these."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen:
        logfile = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logfile,
            stderr=logfile,
            env=env,
            start_new_session=True,  # own process group: terminal Ctrl-C does not hit it, we stop it in order
        )
        logfile.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, name: str, timeout: float = 5.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group is the one start_new_session made for it
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) did not stop within {timeout:g}s of SIGTERM; killing it")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {name}: {exc}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, procs: Procs | None = None,
             name: str = "", interval: float = 0.02):
    """Poll ``check()`` until it returns something truthy; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            tail = procs.log_tail(name) if procs else ""
            raise Fatal(f"{name} exited (code {proc.returncode}) while waiting for {what}:\n{tail}", EXIT_VELO)
        if time.monotonic() > deadline:
            tail = procs.log_tail(name) if procs and name else ""
            raise Fatal(f"timed out after {timeout:g}s waiting for {what}" + (f":\n{tail}" if tail else ""), EXIT_VELO)
        time.sleep(interval)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# ---- HTTP on raw sockets (the probe and the integrity check) -------------------------


class HttpConn:
    """One kept-alive HTTP/1.1 connection; GET returns (status, body length)."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise BenchError("connection closed mid-response")
        self.buf += chunk

    def get(self, path: str) -> tuple[int, int]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if match is None:
            raise BenchError("response without Content-Length")
        size = int(match.group(1))
        while len(self.buf) < size:
            self._more()
        self.buf = self.buf[size:]
        return status, size

    def close(self) -> None:
        self.sock.close()


def fetch_sha256(port: int, path: str, timeout: float) -> tuple[int, str]:
    """GET with Connection: close, hashing the body as it streams; returns (length, sha256)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("connection closed before the response headers")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise BenchError(f"HTTP {status}")
        size = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
        digest = hashlib.sha256(body)
        got = len(body)
        view = bytearray(1 << 20)
        while got < size:
            n = sock.recv_into(view)
            if not n:
                break
            digest.update(memoryview(view)[:n])
            got += n
        return got, digest.hexdigest()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def paced_probe(port: int, interval: float, keep_going, max_seconds: float) -> list[tuple[float, float]]:
    """Sequential 1 KiB GETs on one kept-alive connection, one every ``interval`` seconds.

    Returns (scheduled send time, latency) pairs.  Latency is measured from the
    *scheduled* send time, so a stall also counts against the requests that could not
    be sent during it (no coordinated omission).
    """
    conn = HttpConn(port)
    samples = []
    try:
        conn.get("/1k.bin")  # the connection (and the tunnel stream) exists before timing starts
        start = time.perf_counter()
        i = 0
        while keep_going() and time.perf_counter() - start < max_seconds:
            scheduled = start + i * interval
            now = time.perf_counter()
            if scheduled > now:
                time.sleep(scheduled - now)
            status, size = conn.get("/1k.bin")
            done = time.perf_counter()
            if status != 200 or size != 1024:
                raise BenchError(f"probe got HTTP {status}, {size} bytes")
            samples.append((scheduled, done - scheduled))
            i += 1
    finally:
        conn.close()
    return samples


# ---- wrk and curl ------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise BenchError(f"cannot parse wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(wrk: str, url: str, connections: int, duration: int, close: bool = False) -> dict:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done.returncode != 0 or rps is None:
        raise BenchError(f"wrk failed (exit {done.returncode}): {_tail(done.stderr or out)}")
    result = {"rps": float(rps.group(1))}
    latency = re.search(r"^\s+Latency\s+([\d.]+\w+)", out, re.M)
    if latency:
        result["lat_ms"] = _ms(latency.group(1))
    p50 = re.search(r"^\s+50%\s+([\d.]+\w+)", out, re.M)
    if p50:
        result["p50_ms"] = _ms(p50.group(1))
    p99 = re.search(r"^\s+99%\s+([\d.]+\w+)", out, re.M)
    if p99:
        result["p99_ms"] = _ms(p99.group(1))
    errors = []
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock and any(int(x) for x in sock.groups()):
        errors.append(sock.group(0))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors.append(non2xx.group(0))
    requests = re.search(r"(\d+) requests in", out)
    if requests and int(requests.group(1)) == 0:
        errors.append("no request completed")
    result["errors"] = "; ".join(errors)
    return result


def run_curl(curl: str, url: str, expected: int, max_time: float) -> dict:
    argv = [curl, "-s", "-o", "/dev/null", "--max-time", f"{max_time:g}",
            "-w", "%{http_code} %{size_download} %{speed_download} %{time_total} %{time_starttransfer}", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=max_time + 30)
    return _curl_result(done.returncode, done.stdout, done.stderr, expected)


def _curl_result(code: int, out: str, err: str, expected: int) -> dict:
    try:
        status, size, speed, total, ttfb = out.split()
        status, size = int(status), int(float(size))
    except ValueError:
        raise BenchError(f"curl failed (exit {code}): {_tail(err) or out!r}") from None
    if code != 0 or status != 200 or size != expected:
        raise BenchError(f"curl exit {code}, HTTP {status}, {size} of {expected} bytes in {float(total):.1f}s")
    return {"mbps": float(speed) / MB, "total_s": float(total), "ttfb_s": float(ttfb)}


# ---- the bench ---------------------------------------------------------------------

HOLDER = r"""
import asyncio, sys
held = set()
class Hold(asyncio.Protocol):
    def connection_made(self, transport):
        held.add(transport)
        transport.write(b"hi\n")
    def data_received(self, data):
        pass
    def connection_lost(self, exc):
        pass
async def main():
    server = await asyncio.get_running_loop().create_server(Hold, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
    }}
}}
"""

VELOCITY_TOML = """\
# written by bench/run.py
[project]
name = "velo-bench"

[cluster]
provider = "static"

[tunnel]
prefer = ["websocket"]
token_env = "VELO_TOKEN"

[tunnel.websocket]
url = "ws://127.0.0.1:{gw_port}/velo"

[remote.services.web]
target = "127.0.0.1:{nginx_port}"
local_port = {web_port}

[remote.services.hold]
target = "127.0.0.1:{hold_port}"
local_port = {hold_local_port}

[env]
file = ""
"""


class Bench:
    def __init__(self, args, tools: dict[str, str]):
        self.args = args
        self.tools = tools
        self.tmp = Path(tempfile.mkdtemp(prefix="velo-bench-"))
        self.tmp.chmod(0o755)  # nginx's worker runs as an unprivileged user and must reach www/
        self.procs = Procs(self.tmp)
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.errors: dict[tuple[str, str], list[str]] = {}
        self.notes: list[str] = []
        self.extra: dict[str, str] = {}
        self.token = secrets.token_hex(16)
        self.velo = self._velo_argv()
        self.env = dict(os.environ, VELO_TOKEN=self.token)
        self.bulk_path = ""
        self.bulk_size = args.bulk_mib * 1024 * 1024
        self.hashes: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.gateway_argv: list[str] = []

    @staticmethod
    def _velo_argv() -> list[str]:
        beside = Path(sys.executable).parent / "velo"
        if beside.exists():
            return [str(beside)]
        return [sys.executable, "-m", "velo"]

    # ---- recording ----------------------------------------------------------------

    def record(self, key: str, arm: str, value: float) -> None:
        self.samples.setdefault((key, arm), []).append(value)

    def fail(self, key: str, arm: str, message: str) -> None:
        self.errors.setdefault((key, arm), []).append(message)
        log(f"  {key} [{arm}]: ERROR {message}")

    def median(self, key: str, arm: str) -> float | None:
        values = self.samples.get((key, arm))
        return statistics.median(values) if values else None

    # ---- setup --------------------------------------------------------------------

    def make_files(self) -> None:
        www = self.tmp / "www"
        www.mkdir()
        for name, size in (("1k.bin", 1024), ("100k.bin", 100 * 1024)):
            data = os.urandom(size)
            (www / name).write_bytes(data)
            self.hashes[name] = hashlib.sha256(data).hexdigest()
        block = os.urandom(1 << 20)
        digest = hashlib.sha256()
        name = f"bulk-{self.args.bulk_mib}m.bin"
        with open(www / name, "wb") as f:
            for i in range(self.args.bulk_mib):
                chunk = i.to_bytes(8, "big") + block[8:]  # no two MiB alike: a lost or repeated chunk shows
                f.write(chunk)
                digest.update(chunk)
        self.bulk_path = "/" + name
        self.hashes[name] = digest.hexdigest()
        log(f"files in {www}: 1k.bin, 100k.bin, {name} ({self.args.bulk_mib} MiB)")

    def start_nginx(self) -> None:
        port = self.ports["nginx"] = free_port()
        for sub in ("body", "proxy"):
            (self.tmp / sub).mkdir()
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, port=port, www=self.tmp / "www"))
        argv = [self.tools["nginx"], "-p", str(self.tmp), "-c", str(conf)]
        if _nginx_has_e(self.tools["nginx"]):
            argv += ["-e", str(self.tmp / "nginx-error.log")]
        proc = self.procs.start("nginx", argv)
        wait_for("nginx to accept connections", lambda: accepts(port), 15, proc, self.procs, "nginx")
        status, size = _get_once(port, "/1k.bin")
        if status != 200 or size != 1024:
            raise Fatal(f"nginx answered HTTP {status} with {size} bytes for /1k.bin", EXIT_SETUP)
        log(f"nginx on 127.0.0.1:{port} (pid {proc.pid})")

    def start_holder(self) -> None:
        proc = self.procs.start("holder", [sys.executable, "-c", HOLDER], stdout_pipe=True)
        line = proc.stdout.readline()
        if not line.strip():
            raise Fatal(f"holder server did not start:\n{self.procs.log_tail('holder')}", EXIT_SETUP)
        self.ports["hold"] = int(line)
        log(f"holder on 127.0.0.1:{self.ports['hold']} (pid {proc.pid})")

    def start_gateway(self) -> float:
        """Start `velo gateway`; returns the seconds until its ready-file appeared."""
        ready = self.tmp / "gateway.ready"
        try:
            ready.unlink()
        except FileNotFoundError:
            pass
        if not self.gateway_argv:
            self.ports["gateway"] = free_port()
            self.gateway_argv = [
                *self.velo, "gateway",
                "--listen", f"ws://127.0.0.1:{self.ports['gateway']}/velo",
                "--allow", f"127.0.0.1:{self.ports['nginx']}",
                "--allow", f"127.0.0.1:{self.ports['hold']}",
                "--reverse-host", "127.0.0.1",
                "--ready-file", str(ready),
            ]
        started = time.monotonic()
        proc = self.procs.start("gateway", self.gateway_argv, env=self.env)
        wait_for("the gateway's ready-file", lambda: ready.exists() and ready.read_text().strip(), 30,
                 proc, self.procs, "gateway", interval=0.005)
        return time.monotonic() - started

    def start_up(self) -> None:
        project = self.tmp / "project"
        project.mkdir()
        self.ports["web"] = free_port()
        self.ports["hold_local"] = free_port()
        self.config = project / "velocity.toml"
        self.config.write_text(VELOCITY_TOML.format(
            gw_port=self.ports["gateway"], nginx_port=self.ports["nginx"], web_port=self.ports["web"],
            hold_port=self.ports["hold"], hold_local_port=self.ports["hold_local"],
        ))
        proc = self.procs.start("up", [*self.velo, "up", "-c", str(self.config)], env=self.env)
        started = time.monotonic()
        status = wait_for("`velo status` to report the tunnel up", self._tunnel_up, 60, proc, self.procs, "up",
                          interval=0.1)
        log(f"velo up (pid {proc.pid}): tunnel {status['tunnel']['state']} via {status['tunnel']['url']} "
            f"after {time.monotonic() - started:.2f}s; forwards "
            + ", ".join(f"{f['name']} {f['listen']}" for f in status.get("forwards", [])))

    def velo_status(self) -> dict | None:
        done = subprocess.run([*self.velo, "status", "--json", "-c", str(self.config)],
                              capture_output=True, text=True, env=self.env, timeout=30)
        if done.returncode != 0:
            return None
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None

    def _tunnel_up(self):
        status = self.velo_status()
        if status and status.get("running") and status.get("tunnel", {}).get("state") == "up":
            return status
        return None

    def check_alive(self) -> None:
        for name in ("nginx", "gateway", "up", "holder"):
            proc = self.procs.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise Fatal(f"{name} exited (code {proc.returncode}) during the run:\n{self.procs.log_tail(name)}",
                            EXIT_VELO)

    def url(self, arm: str, path: str) -> str:
        port = self.ports["nginx"] if arm == DIRECT else self.ports["web"]
        return f"http://127.0.0.1:{port}{path}"

    def port(self, arm: str) -> int:
        return self.ports["nginx"] if arm == DIRECT else self.ports["web"]

    def integrity(self) -> None:
        """Every file arrives intact through velo (sha256), before anything is timed."""
        for name in ("1k.bin", "100k.bin", self.bulk_path.lstrip("/")):
            size, digest = fetch_sha256(self.ports["web"], "/" + name, timeout=120)
            if digest != self.hashes[name]:
                self.notes.append(f"**integrity: {name} through velo arrived corrupted** ({size} bytes, sha256 differs)")
                log(f"INTEGRITY FAILURE: {name} through velo: {size} bytes, sha256 differs")
            else:
                log(f"integrity ok through velo: {name} ({size} bytes)")
        self.extra["integrity"] = "sha256 of all three files checked through velo before timing"

    # ---- measurements ---------------------------------------------------------------

    def cpu_snap(self) -> tuple[float, dict[str, float]]:
        return time.monotonic(), {name: cpu_seconds(self.procs.procs[name].pid) for name in ("up", "gateway")}

    def cpu_record(self, key: str, arm: str, snap, units: float) -> None:
        """CPU of velo's two processes over a velo-arm run: % of one core and per unit of work."""
        if arm != VELO or snap is None:
            return
        then, before = snap
        now, after = self.cpu_snap()
        for name in before:
            used = after[name] - before[name]
            self.record(f"cpu_{key}_{name}_pct", VELO, 100 * used / max(now - then, 1e-9))
            if units > 0:
                self.record(f"cpu_{key}_{name}_per", VELO, 1e6 * used / units)

    def wrk_keepalive(self, arm: str, key: str, path: str, connections: int) -> None:
        snap = self.cpu_snap() if arm == VELO else None
        try:
            result = run_wrk(self.tools["wrk"], self.url(arm, path), connections, self.args.duration)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            self.fail(key, arm, str(exc))
            return
        self.cpu_record(key, arm, snap, result["rps"] * self.args.duration)
        self.record(f"{key}_rps", arm, result["rps"])
        if "lat_ms" in result:
            self.record(f"{key}_lat", arm, result["lat_ms"])
        if result["errors"]:
            self.fail(f"{key}_rps", arm, f"wrk: {result['errors']}")
        log(f"  {key} [{arm}]: {result['rps']:,.0f} req/s, mean {result.get('lat_ms', float('nan')):.3f} ms")

    def wrk_close(self, arm: str) -> None:
        key = "close_c8"
        snap = self.cpu_snap() if arm == VELO else None
        try:
            result = run_wrk(self.tools["wrk"], self.url(arm, "/1k.bin"), 8, self.args.duration, close=True)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            self.fail(key, arm, str(exc))
            return
        self.cpu_record(key, arm, snap, result["rps"] * self.args.duration)
        self.record(f"{key}_rps", arm, result["rps"])
        if result["errors"]:
            self.fail(f"{key}_rps", arm, f"wrk: {result['errors']}")
        log(f"  {key} [{arm}]: {result['rps']:,.0f} new connections/s")

    def idle_probe(self, arm: str) -> None:
        try:
            samples = paced_probe(self.port(arm), self.args.probe_interval_ms / 1000, lambda: True,
                                  max_seconds=min(2.0, float(self.args.duration)))
        except (BenchError, OSError) as exc:
            self.fail("idle", arm, str(exc))
            return
        lat = [s[1] * 1000 for s in samples]
        self.record("idle_p50", arm, percentile(lat, 50))
        self.record("idle_p99", arm, percentile(lat, 99))
        log(f"  idle probe [{arm}]: n={len(lat)} p50 {percentile(lat, 50):.3f} ms p99 {percentile(lat, 99):.3f} ms")

    def bulk(self, arm: str) -> None:
        snap = self.cpu_snap() if arm == VELO else None
        try:
            result = run_curl(self.tools["curl"], self.url(arm, self.bulk_path), self.bulk_size, self.args.bulk_timeout)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            self.fail("bulk_mbps", arm, str(exc))
            return
        self.cpu_record("bulk", arm, snap, self.bulk_size / MB)
        self.record("bulk_mbps", arm, result["mbps"])
        log(f"  bulk [{arm}]: {result['mbps']:,.0f} MB/s ({result['total_s']:.2f}s)")

    def hol(self, arm: str) -> None:
        """1 KiB requests on another connection while the bulk download runs."""
        argv = [self.tools["curl"], "-s", "-o", "/dev/null", "--max-time", f"{self.args.bulk_timeout:g}",
                "-w", "%{http_code} %{size_download} %{speed_download} %{time_total} %{time_starttransfer}",
                self.url(arm, self.bulk_path)]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            samples = paced_probe(self.port(arm), self.args.probe_interval_ms / 1000, lambda: proc.poll() is None,
                                  max_seconds=self.args.bulk_timeout)
        except (BenchError, OSError) as exc:
            proc.kill()
            proc.communicate()
            self.fail("hol", arm, f"probe: {exc}")
            return
        out, err = proc.communicate(timeout=self.args.bulk_timeout + 30)
        try:
            result = _curl_result(proc.returncode, out, err, self.bulk_size)
        except BenchError as exc:
            self.fail("hol", arm, f"download: {exc}")
            return
        # keep the probes sent while the body was actually flowing
        first, last = started + result["ttfb_s"], started + result["total_s"]
        during = [lat * 1000 for sent, lat in samples if first <= sent <= last]
        if len(during) < 10:
            self.fail("hol", arm, f"only {len(during)} probes during the download (bulk too short? use a bigger --bulk-mib)")
            if not during:
                return
        self.record("hol_p50", arm, percentile(during, 50))
        self.record("hol_p99", arm, percentile(during, 99))
        self.record("hol_max", arm, max(during))
        self.record("hol_n", arm, len(during))
        self.record("hol_bulk_mbps", arm, result["mbps"])
        log(f"  head-of-line [{arm}]: n={len(during)} p50 {percentile(during, 50):.3f} ms "
            f"p99 {percentile(during, 99):.3f} ms max {max(during):.3f} ms; download {result['mbps']:,.0f} MB/s")

    def memory(self) -> None:
        n = self.args.idle_streams
        pids = {"up": self.procs.procs["up"].pid, "gateway": self.procs.procs["gateway"].pid}
        before = {name: vm_rss_kib(pid) for name, pid in pids.items()}
        socks = []
        try:
            for i in range(n):
                sock = socket.create_connection(("127.0.0.1", self.ports["hold_local"]), timeout=15)
                socks.append(sock)
                got = b""
                while len(got) < 3:  # the holder's greeting: the gateway really dialled this stream
                    chunk = sock.recv(3 - len(got))
                    if not chunk:
                        raise BenchError(f"stream {i + 1} closed before the holder's greeting")
                    got += chunk
            status = self.velo_status() or {}
            hold = next((f for f in status.get("forwards", []) if f.get("name", "").startswith("hold")), {})
            after = {name: vm_rss_kib(pid) for name, pid in pids.items()}
            for name in pids:
                per = (after[name] - before[name]) / n
                self.record(f"mem_{name}", VELO, per)
                self.record(f"rss_{name}_before", VELO, before[name] / 1024)
                log(f"  memory {name}: {before[name] / 1024:.1f} -> {after[name] / 1024:.1f} MiB with {n} idle streams: "
                    f"{per:.1f} KiB per stream")
            self.extra["mem_open"] = (f"`velo status` counted {hold.get('open', '?')} open streams on the holder "
                                      f"forward while measured")
        except (BenchError, OSError) as exc:
            self.fail("mem_up", VELO, f"after {len(socks)} streams: {exc}")
        finally:
            for sock in socks:
                sock.close()
        if socks:
            self._check_streams_closed()

    def _check_streams_closed(self) -> None:
        """After the idle streams are closed, `velo status` must count none open again."""
        deadline = time.monotonic() + 10
        left = None
        while time.monotonic() < deadline:
            status = self.velo_status() or {}
            hold = next((f for f in status.get("forwards", []) if f.get("name", "").startswith("hold")), {})
            left = hold.get("open")
            if left == 0:
                log("  idle streams closed: `velo status` counts 0 open")
                return
            time.sleep(0.2)
        self.notes.append(f"**{left} of the idle streams still counted open by `velo status` 10s after the "
                          "client closed them**")
        log(f"  {left} idle streams still open 10s after closing them")

    def reconnect(self) -> None:
        """kill -9 the gateway, start it again, time until a request through velo works."""
        self.procs.kill9("gateway")
        started = time.monotonic()
        try:
            ready_s = self.start_gateway()
        except Fatal as exc:
            self.fail("reconnect_s", VELO, str(exc).splitlines()[0])
            raise
        attempts = 0
        deadline = started + 60
        while True:
            attempts += 1
            try:
                status, size = _get_once(self.ports["web"], "/1k.bin", timeout=30)
                if status == 200 and size == 1024:
                    break
            except (OSError, BenchError):
                pass
            if time.monotonic() > deadline:
                self.fail("reconnect_s", VELO, f"no successful request within 60s ({attempts} attempts)")
                return
            time.sleep(0.002)
        total = time.monotonic() - started
        self.record("reconnect_s", VELO, total)
        self.record("reconnect_ready_s", VELO, ready_s)
        self.record("reconnect_tunnel_s", VELO, total - ready_s)
        log(f"  reconnect: first OK request {total:.3f}s after the restart (gateway ready after {ready_s:.3f}s, "
            f"{attempts} attempt(s))")

    # ---- the run ------------------------------------------------------------------

    def warm_up(self) -> None:
        for arm in ARMS:
            try:
                run_wrk(self.tools["wrk"], self.url(arm, "/1k.bin"), 8, 1)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                log(f"warm-up {arm}: {exc}")

    def run(self) -> None:
        args = self.args
        for r in range(args.rounds):
            order = ARMS if r % 2 == 0 else ARMS[::-1]  # A B, then B A: no arm always goes first
            log(f"round {r + 1}/{args.rounds} (order: {', '.join(order)})")
            steps = [
                *[(lambda arm, c=c: self.wrk_keepalive(arm, f"ka_c{c}", "/1k.bin", c)) for c in args.connections],
                lambda arm: self.wrk_keepalive(arm, "ka100k_c8", "/100k.bin", 8),
                self.wrk_close,
                self.idle_probe,
                self.bulk,
                self.hol,
            ]
            for step in steps:
                for arm in order:
                    self.check_alive()
                    step(arm)
            if not args.no_reconnect:
                self.check_alive()
                self.reconnect()

    # ---- report -------------------------------------------------------------------

    def report(self, started: float, load_start: tuple, load_end: tuple) -> str:
        args = self.args
        m = machine_info(self.tools)
        rows: list[tuple[str, str, str, bool, str]] = []  # label, key, format, ratio?, target
        for c in args.connections:
            rows.append((f"1 KiB keep-alive req/s, {c} conn{'s' if c > 1 else ''}", f"ka_c{c}_rps", "int", True,
                         "target" if c == 32 else ""))
            rows.append((f"1 KiB wrk mean latency, {c} conn{'s' if c > 1 else ''} (ms)", f"ka_c{c}_lat", "ms", True, ""))
        rows += [
            ("100 KiB keep-alive req/s, 8 conns", "ka100k_c8_rps", "int", True, ""),
            ("new connections/s (`Connection: close`, 8 conns)", "close_c8_rps", "int", True, ""),
            (f"1 KiB latency p50, idle, paced {args.probe_interval_ms:g} ms (ms)", "idle_p50", "ms", True, ""),
            (f"1 KiB latency p99, idle, paced {args.probe_interval_ms:g} ms (ms)", "idle_p99", "ms", True, ""),
            (f"{args.bulk_mib} MiB download (MB/s)", "bulk_mbps", "int", True, "bulk"),
            (f"1 KiB p50 during the {args.bulk_mib} MiB download (ms)", "hol_p50", "ms", True, ""),
            (f"1 KiB p99 during the {args.bulk_mib} MiB download (ms)", "hol_p99", "ms", True, ""),
            (f"1 KiB max during the {args.bulk_mib} MiB download (ms)", "hol_max", "ms", True, ""),
            ("  probes during the download (n)", "hol_n", "int", False, ""),
            ("  download speed with the probe running (MB/s)", "hol_bulk_mbps", "int", True, ""),
            (f"memory per idle stream, `velo up` (KiB; {args.idle_streams} streams, fresh process)", "mem_up", "f1", False, ""),
            (f"memory per idle stream, `velo gateway` (KiB; {args.idle_streams} streams, fresh process)", "mem_gateway", "f1", False, ""),
            ("  RSS `velo up` before (MiB)", "rss_up_before", "f1", False, ""),
            ("  RSS `velo gateway` before (MiB)", "rss_gateway_before", "f1", False, ""),
            ("reconnect: gateway restart -> first OK request (s)", "reconnect_s", "f3", False, ""),
            ("  of which gateway start-up until listening (s)", "reconnect_ready_s", "f3", False, ""),
            ("  of which tunnel re-established + request (s)", "reconnect_tunnel_s", "f3", False, ""),
        ]
        out = []
        when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out.append(f"# velo benchmark, {when}\n")
        out.append(f"- machine: {m['cpu']}, {m['cores']} cores, {m['mem']}, kernel {m['kernel']}")
        out.append(f"- software: Python {m['python']}, uvloop {m['uvloop']}, picows {m['picows']}, "
                   f"velo {m['velo']} ({m['git']}); {m['nginx']}, {m['wrk']}, {m['curl']}")
        out.append(f"- method: {args.rounds} round(s), arms interleaved (direct/velo order swapped every round), "
                   f"medians; wrk `-t1 -d{args.duration}s`; nginx 1 worker, sendfile on, access_log off; "
                   "velo = client -> `velo up` forward listener -> WebSocket (picows) -> `velo gateway` -> nginx, "
                   "all on 127.0.0.1; MB = 10^6 bytes")
        out.append("- **wrk (or curl and the probe), nginx and velo's two processes (`velo up`, `velo gateway`) "
                   f"share {m['cores']} cores**: absolute numbers depend on the machine and its load, "
                   "the velo/direct ratios are what carries over")
        out.append(f"- load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}"
                   + (" -- **the machine was busy: figures are not representative**"
                      if max(load_start[0], load_end[0]) > 0.5 * int(m['cores']) + 0.5 else ""))
        out.append(f"- run time {time.monotonic() - started:.0f}s\n")
        out.append("| measurement | direct | velo | velo/direct | target |")
        out.append("|---|---:|---:|---:|---|")
        for label, key, fmt, ratio, target in rows:
            d, v = self.median(key, DIRECT), self.median(key, VELO)
            if d is None and v is None and not self.errors.get((key, DIRECT)) and not self.errors.get((key, VELO)):
                continue
            cells = [_cell(d, fmt, self.errors.get((key, DIRECT))), _cell(v, fmt, self.errors.get((key, VELO)))]
            if (key, DIRECT) not in self.samples and not self.errors.get((key, DIRECT)):
                cells[0] = "--"
            r = v / d if (ratio and d and v is not None) else None
            tgt = ""
            if target == "target":
                tgt = f"velo >= 0.40 x direct: **{'PASS' if r is not None and r >= 0.40 else 'FAIL'}**"
            elif target == "bulk":
                tgt = f"velo >= 200 MB/s: **{'PASS' if v is not None and v >= 200 else 'FAIL'}**"
                if args.bulk_mib != 256:
                    tgt += f" (measured on {args.bulk_mib} MiB, target is for 256 MiB)"
            out.append(f"| {label} | {cells[0]} | {cells[1]} | {'' if r is None else f'{r:.2f}'} | {tgt} |")
        out.append("")
        out.append("Ratios are velo/direct of the medians: above 1 is better for rates, worse for latencies. "
                   "wrk's mean latency suffers from coordinated omission; the paced probe (one kept-alive "
                   f"connection, one request every {args.probe_interval_ms:g} ms, latency counted from the "
                   "scheduled send time) does not.")
        cpu_rows = [(f"1 KiB keep-alive, {c} conn{'s' if c > 1 else ''}", f"ka_c{c}", "us/request") for c in args.connections]
        cpu_rows += [("100 KiB keep-alive, 8 conns", "ka100k_c8", "us/request"),
                     ("new connections (`Connection: close`, 8 conns)", "close_c8", "us/connection"),
                     (f"{args.bulk_mib} MiB download", "bulk", "us/MB")]
        if any(self.samples.get((f"cpu_{key}_up_pct", VELO)) for _l, key, _u in cpu_rows):
            out.append("\nCPU of velo's processes during the velo-arm runs (medians; 100 % = one core busy; "
                       "per unit = CPU time / work done):\n")
            out.append("| run | `velo up` % core | `velo gateway` % core | `velo up` per unit | `velo gateway` per unit | unit |")
            out.append("|---|---:|---:|---:|---:|---|")
            for label, key, unit in cpu_rows:
                vals = [self.median(f"cpu_{key}_{name}_{kind}", VELO)
                        for kind in ("pct", "per") for name in ("up", "gateway")]
                if vals[0] is None:
                    continue
                out.append(f"| {label} | " + " | ".join("" if v is None else f"{v:,.0f}" for v in vals) + f" | {unit} |")
        notes = list(self.notes)
        for key in ("integrity", "mem_open"):
            if key in self.extra:
                notes.append(self.extra[key])
        for (key, arm), messages in sorted(self.errors.items()):
            notes.append(f"error in {key} [{arm}]: " + "; ".join(sorted(set(messages))))
        if self.extra.get("status"):
            notes.append(self.extra["status"])
        if notes:
            out.append("\nNotes:\n")
            out.extend(f"- {n}" for n in notes)
        out.append("\n<details><summary>Per-round values</summary>\n")
        out.append("| measurement | arm | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
        out.append("|---|---|" + "---:|" * args.rounds)
        for label, key, fmt, _ratio, _t in rows:
            for arm in ARMS:
                values = self.samples.get((key, arm))
                if values:
                    out.append(f"| {label} | {arm} | " + " | ".join(_fmt(x, fmt) for x in values) + " |")
        out.append("\n</details>\n")
        return "\n".join(out)


def _cell(value: float | None, fmt: str, errors: list[str] | None) -> str:
    if value is None:
        return "error" if errors else ""
    return _fmt(value, fmt) + (" (!)" if errors else "")


def _fmt(value: float, fmt: str) -> str:
    if fmt == "int":
        return f"{value:,.0f}"
    if fmt == "ms":
        return f"{value:.3f}"
    if fmt == "f1":
        return f"{value:.1f}"
    if fmt == "f3":
        return f"{value:.3f}"
    return f"{value:g}"


def _get_once(port: int, path: str, timeout: float = 10.0) -> tuple[int, int]:
    conn = HttpConn(port, timeout=timeout)
    try:
        return conn.get(path)
    finally:
        conn.close()


def _nginx_has_e(nginx: str) -> bool:
    done = subprocess.run([nginx, "-h"], capture_output=True, text=True)
    return "-e filename" in (done.stdout + done.stderr)


def _version_line(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(0) if match else "?"


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    cpu, mem, version = cpu_model(), memory(), package_version
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "mem": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": version("uvloop"),
        "picows": version("picows"),
        "velo": version("velo"),
        "git": git.stdout.strip() or "no git",
        "nginx": _version_line([tools["nginx"], "-v"], r"nginx/[\d.]+"),
        "wrk": _version_line([tools["wrk"], "-v"], r"wrk (?:debian/)?\d\S*"),
        "curl": _version_line([tools["curl"], "--version"], r"curl [\d.]+"),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark velo's forward path against the direct path (same run).")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="wrk connection counts for the 1 KiB keep-alive runs (default 1,8,32)")
    p.add_argument("--bulk-mib", type=int, default=256, help="size of the bulk download in MiB (default 256)")
    p.add_argument("--bulk-timeout", type=float, default=120.0, help="curl --max-time for one bulk download (default 120)")
    p.add_argument("--probe-interval-ms", type=float, default=2.0,
                   help="pacing of the 1 KiB latency probe (default 2 ms = 500 req/s)")
    p.add_argument("--idle-streams", type=int, default=1000, help="streams for the memory figure (default 1000; 0 skips)")
    p.add_argument("--no-reconnect", action="store_true", help="skip the gateway kill/restart measurement")
    p.add_argument("--no-install", action="store_true", help="never call apt-get; fail if a tool is missing")
    p.add_argument("--output", type=Path, default=RESULTS / "latest.md", help="markdown file (default bench/results/latest.md)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for debugging")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.bulk_mib < 1 or not args.connections:
        p.error("--rounds, --duration and --bulk-mib must be >= 1")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interruptible() -> None:
    """SIGTERM and Ctrl-C raise KeyboardInterrupt, so the script's ``finally`` stops every
    process it started (a killed benchmark must not leave a cluster or velo running)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored


def cleaning_up() -> None:
    """From here on a second Ctrl-C or SIGTERM must not cut the cleanup short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv=None) -> int:
    args = parse_args(argv)
    interruptible()
    if importlib.util.find_spec("velo") is None:
        log(f"velo is not importable from {sys.executable}; run with the project venv: .venv/bin/python bench/run.py")
        return EXIT_SETUP
    try:
        tools = ensure_tools(allow_install=not args.no_install)
    except Fatal as exc:
        log(str(exc))
        return exc.code
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * args.idle_streams + 4096)) if hard != resource.RLIM_INFINITY else 65536
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by every process started below
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * args.idle_streams + 256:
        log(f"open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} is too low for "
            f"--idle-streams {args.idle_streams}")
        return EXIT_SETUP

    started = time.monotonic()
    load_start = os.getloadavg()
    bench = Bench(args, tools)
    log(f"temp dir {bench.tmp}")
    try:
        bench.make_files()
        bench.start_nginx()
        bench.start_holder()
        bench.start_gateway()
        log(f"velo gateway on ws://127.0.0.1:{bench.ports['gateway']}/velo (pid {bench.procs.procs['gateway'].pid})")
        bench.start_up()
        if args.idle_streams > 0:
            # first, on fresh processes: later, memory freed by the throughput runs would be
            # reused by the new streams and hide their cost
            bench.memory()
        bench.integrity()
        bench.warm_up()
        bench.run()
        status = bench.velo_status() or {}
        tunnel = status.get("tunnel", {})
        forwards = ", ".join(f"{f['name']}: {f.get('total', '?')} streams, {f.get('errors', '?')} errors"
                             + (f" (last: {f['last_error']})" if f.get("last_error") else "")
                             for f in status.get("forwards", []))
        bench.extra["status"] = (f"`velo status` at the end: tunnel {tunnel.get('state', '?')}, "
                                 f"{tunnel.get('reconnects', '?')} reconnect(s), rtt {tunnel.get('rtt_ms', '?')} ms; "
                                 f"{forwards}")
        report = bench.report(started, load_start, os.getloadavg())
    except Fatal as exc:
        log(str(exc))
        log(f"logs kept in {bench.tmp}")
        args.keep_tmp = True
        return exc.code
    except KeyboardInterrupt:
        log("interrupted; stopping everything this script started")
        return 130
    finally:
        cleaning_up()
        bench.procs.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        else:
            log(f"temp dir kept: {bench.tmp}")
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report + "\n")
    log(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
