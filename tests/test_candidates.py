"""velo runs the candidates: real processes, real files, real signals.

Each test writes a small candidate program into its tmp folder.  It records every start
(pid and the env it got) in ``starts``, starts a grandchild (to prove the whole process
group goes), and, when given a port, serves HTTP on it after a short delay (a dev server
that takes time to come up).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import Up, free_port, http_get, wait_for, write_config

CANDIDATE = r'''
import http.server, os, socketserver, subprocess, sys, time
starts, mode = sys.argv[1], sys.argv[2]
with open(starts, "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "web": os.environ.get(os.environ.get("VELO_TEST_URL_VAR", "WEB_URL")), "flavour": os.environ.get("FLAVOUR"),
                        "t": time.time()}) + "\n")
print("candidate up", os.getpid(), flush=True)
if mode == "crash":
    sys.exit(3)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(starts + ".grandchildren", "a") as f:
    f.write(f"{grandchild.pid}\n")
if mode.startswith("serve:"):
    port, generation = int(mode.split(":")[1]), len(open(starts).read().splitlines())
    time.sleep(0.7)  # a dev server takes a moment before it listens
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"generation {generation}".encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args): pass
    socketserver.TCPServer.allow_reuse_address = True
    socketserver.TCPServer(("127.0.0.1", port), Handler).serve_forever()
time.sleep(600)
'''.replace("import http.server", "import json, http.server")


class Project:
    """A velocity.toml with one candidate "website" run by velo, behind a real gateway."""

    def __init__(self, procs, tmp: Path, mode: str = "sleep", watch=("src/**/*.py",), port=None, expose=None,
                 extra: str = ""):
        self.procs, self.tmp = procs, tmp
        (tmp / "candidate.py").write_text(CANDIDATE)
        (tmp / "src").mkdir()
        (tmp / "src" / "app.py").write_text("x = 1\n")
        (tmp / "node_modules").mkdir()
        self.starts = tmp / "starts"
        self.http = procs.server("http", text="remote web")
        self.port, self.expose = port or free_port(), expose or free_port()
        self.gateway = procs.gateway(f"127.0.0.1:{self.http}", allow_reverse=[self.expose])
        # velo's stable local port comes from the service name: one of its own per test, so
        # that parallel runs of other suites (which use "web") never hold it.
        self.service = f"web{secrets.token_hex(3)}"
        self.url_var = f"{self.service.upper()}_URL"
        config = write_config(tmp / "velocity.toml", gateway_url=self.gateway.url,
                              remote={self.service: f"127.0.0.1:{self.http}"},
                              local={"website": (self.port, self.expose)},
                              extra=f'[env.vars]\nVELO_TEST_URL_VAR = "{self.url_var}"\n')
        run = json.dumps([sys.executable, str(tmp / "candidate.py"), str(self.starts), mode])
        config.write_text(config.read_text().replace(
            f"port = {self.port}\n",
            f"port = {self.port}\nrun = {run}\nwatch = {json.dumps(list(watch))}\n") + extra)
        self.config = config

    def up(self, *args: str) -> Up:
        proc = self.procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(self.config), *args],
                                cwd=self.tmp)
        up = Up(proc, self.config)
        wait_for(lambda: up.status() or not proc.running(), 20, "velo up to start")
        assert proc.running(), f"velo up exited:\n{proc.log()}"
        return up

    def start_records(self) -> list[dict]:
        if not self.starts.exists():
            return []
        return [json.loads(line) for line in self.starts.read_text().splitlines()]

    def wait_starts(self, n: int, up: Up, timeout: float = 20) -> list[dict]:
        return wait_for(lambda: len(r := self.start_records()) >= n and r, timeout,
                        f"{n} starts of the candidate; velo up log:\n{up.proc.log()[-3000:]}")

    def grandchildren(self) -> list[int]:
        path = Path(str(self.starts) + ".grandchildren")
        return [int(p) for p in path.read_text().split()] if path.exists() else []


def candidate_status(up: Up) -> dict:
    return up.status()["candidates"][0]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def settle(up: Up, seconds: float = 1.5) -> None:
    """Give a wrong extra restart the chance to happen (this asserts an absence)."""
    time.sleep(seconds)


def test_saving_a_watched_file_restarts_once_and_ignored_files_do_not(procs, tmp_path):
    project = Project(procs, tmp_path)
    up = project.up()
    first = project.wait_starts(1, up)[0]
    wait_for(lambda: candidate_status(up)["state"] == "running", 10, "running")
    (tmp_path / "node_modules" / "lib.py").write_text("ignored\n")
    (tmp_path / "notes.txt").write_text("not watched\n")
    settle(up)
    assert len(project.start_records()) == 1, "an ignored or unwatched file restarted the candidate"

    (tmp_path / "src" / "app.py").write_text("x = 2\n")
    second = project.wait_starts(2, up)[1]
    up.proc.wait_log("velo: restarting website: src/app.py changed")
    settle(up)
    assert len(project.start_records()) == 2
    assert not alive(first["pid"]) and second["pid"] != first["pid"]
    status = wait_for(lambda: (s := candidate_status(up))["state"] == "running" and s, 10, "running again")
    assert status["restarts"] == 1 and status["pid"] and status["uptime"] is not None
    assert "[website] candidate up" in up.proc.log(), "output is prefixed with the candidate's name"
    assert "\x1b[" not in up.proc.log(), "no colour when piped"


def test_a_burst_of_twenty_saves_is_one_restart(procs, tmp_path):
    project = Project(procs, tmp_path)
    up = project.up()
    project.wait_starts(1, up)
    wait_for(lambda: candidate_status(up)["state"] == "running", 10, "running")
    started = time.monotonic()
    for i in range(20):
        (tmp_path / "src" / f"module{i % 4}.py").write_text(f"x = {i}\n")
        time.sleep(0.01)
    assert time.monotonic() - started < 0.5
    project.wait_starts(2, up)
    settle(up, 2.0)
    assert len(project.start_records()) == 2, up.proc.log()[-2000:]
    assert candidate_status(up)["restarts"] == 1


def test_a_crash_is_restarted_with_backoff_showing_the_exit_code(procs, tmp_path):
    project = Project(procs, tmp_path, mode="crash")
    up = project.up()
    records = project.wait_starts(3, up, timeout=30)
    log = up.proc.log()
    assert "velo: website crashed (exit code 3); restarting in 0.5s" in log
    assert "velo: website crashed (exit code 3); restarting in 1s" in log
    gaps = [b["t"] - a["t"] for a, b in zip(records, records[1:])]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps  # the delay doubles
    status = candidate_status(up)
    assert status["last_exit"] == 3 and status["restarts"] >= 2

    def table():
        return subprocess.run([sys.executable, "-m", "velo", "status", "-c", str(project.config)],
                              capture_output=True, text=True, timeout=30).stdout

    shown = wait_for(lambda: "crashed" in (t := table()) and t, 30, "`velo status` to show the crash")
    assert "website" in shown


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_stopping_or_killing_velo_up_leaves_no_candidate_process(procs, tmp_path, how):
    project = Project(procs, tmp_path)
    up = project.up()
    candidate = project.wait_starts(1, up)[0]["pid"]
    grandchild = wait_for(project.grandchildren, 10, "the grandchild")[0]
    guard = candidate_status(up)["pid"]
    assert alive(candidate) and alive(grandchild) and alive(guard)
    assert psutil.Process(grandchild).ppid() == candidate
    os.kill(up.proc.pid, how)
    up.proc.wait(30)
    wait_for(lambda: not any(alive(p) for p in (guard, candidate, grandchild)), 15,
             "the guard, the candidate and its grandchild to be gone")


def test_a_reverse_request_during_a_restart_waits_for_the_new_process(procs, tmp_path):
    port = free_port()
    project = Project(procs, tmp_path, mode=f"serve:{port}", port=port)
    up = project.up()
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 20,
             f"reverse listener; velo up log:\n{up.proc.log()[-3000:]}\ngateway:\n{project.gateway.proc.log()[-2000:]}")
    assert wait_for(lambda: http_get(project.expose).endswith(b"generation 1"), 20, "the first generation")
    (tmp_path / "src" / "app.py").write_text("x = 3\n")
    wait_for(lambda: candidate_status(up)["state"] in ("restarting", "starting") or len(project.start_records()) > 1,
             10, "the restart to begin")
    body = http_get(project.expose, timeout=30)  # arrives while the new process is not listening yet
    assert body.endswith(b"generation 2"), body
    assert up.status()["tunnel"]["reconnects"] == 0, "a candidate restart must not touch the tunnel"


def test_an_environment_change_restarts_the_candidate_with_the_new_env(procs, tmp_path):
    project = Project(procs, tmp_path, extra='FLAVOUR = "vanilla"\n')
    up = project.up()
    assert project.wait_starts(1, up)[0]["flavour"] == "vanilla"
    project.config.write_text(project.config.read_text().replace('"vanilla"', '"chocolate"'))
    second = project.wait_starts(2, up)[1]
    assert second["flavour"] == "chocolate"
    up.proc.wait_log("velo: restarting website: its environment changed")


def test_no_run_starts_no_process_but_writes_the_env(procs, tmp_path):
    project = Project(procs, tmp_path)
    up = project.up("--no-run")
    up.wait_state("up")
    wait_for(lambda: (tmp_path / ".env").exists(), 10, "the env file")
    assert project.url_var in (tmp_path / ".env").read_text()
    settle(up)
    assert project.start_records() == [] and up.status()["candidates"] == []
    own = psutil.Process(up.proc.pid).children(recursive=True)
    assert own == [], f"velo up --no-run started {own}"


def test_only_limits_the_candidates_and_rejects_unknown_names(procs, tmp_path):
    project = Project(procs, tmp_path)
    bad = subprocess.run([sys.executable, "-m", "velo", "up", "-c", str(project.config), "--only", "webshop"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--only webshop: no such [local.<name>]" in bad.stderr
    up = project.up("--only", "website")
    project.wait_starts(1, up)
    assert [c["name"] for c in up.status()["candidates"]] == ["website"]


def test_velo_run_gets_the_running_sessions_env(procs, tmp_path):
    project = Project(procs, tmp_path)
    up = project.up("--no-run")
    up.wait_state("up")
    result = subprocess.run(
        [sys.executable, "-m", "velo", "run", "-c", str(project.config), "--",
         sys.executable, "-c", f"import os; print(os.environ['{project.url_var}'])"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"http://127.0.0.1:{up.port(project.service)}"
    failing = subprocess.run([sys.executable, "-m", "velo", "run", "-c", str(project.config), "--", "false"],
                             capture_output=True, text=True, timeout=30)
    assert failing.returncode == 1, "velo run returns the command's exit code"
    up.proc.stop()
    gone = subprocess.run([sys.executable, "-m", "velo", "run", "-c", str(project.config), "--", "true"],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode == 2 and "no `velo up` is running" in gone.stderr


def test_editing_the_run_command_in_velocity_toml_starts_the_new_command(procs, tmp_path):
    project = Project(procs, tmp_path)
    up = project.up()
    first = project.wait_starts(1, up)[0]
    project.config.write_text(project.config.read_text().replace('"sleep"]', '"crash"]'))
    up.proc.wait_log("velo: website: run settings changed")
    up.proc.wait_log("velo: website crashed (exit code 3)")
    assert not alive(first["pid"])


def test_output_is_coloured_per_candidate_on_a_terminal(procs, tmp_path):
    import pty
    import select

    project = Project(procs, tmp_path)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "velo", "up", "-c", str(project.config)], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True,
                            env={k: v for k, v in os.environ.items() if k != "NO_COLOR"})
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"\x1b[36m[website]\x1b[0m candidate up" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert b"\x1b[36m[website]\x1b[0m candidate up" in seen, seen[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.close(master)
