"""The Tilt extension (plugins/tilt/Tiltfile) with the real `tilt ci`, headless.

tilt is built from source by tests/tools/tilt.sh (with its web UI, so it runs in prod mode
like a released binary; `make test` runs the script). The Tiltfile under test loads the
extension, runs velo's mesh as a resource and a candidate with velo's env, and a last
resource checks both directions; `tilt ci` exits 0 only if every resource got ready or
succeeded. Without tilt (no Go toolchain) these tests skip with one line; under CI=true
they fail instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, status_cli, wait_for, write_config

EXTENSION = ROOT / "plugins" / "tilt" / "Tiltfile"
VELO_BIN = str(Path(sys.executable).with_name("velo"))


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} [CI=true: Tilt tests must not be skipped]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tilt() -> str:
    try:
        out = subprocess.run([str(ROOT / "tests/tools/tilt.sh")], capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        _skip_or_fail("Tilt tests: tests/tools/tilt.sh did not finish in an hour")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]
        _skip_or_fail(f"Tilt tests: no tilt binary ({last})")
    return out.stdout.strip().splitlines()[-1]


# The candidate: on every GET it fetches $WEB_URL (velo's forward, from the env Tilt gave
# it) and answers with what it got.
APP = '''
import os, sys, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = urllib.request.urlopen(os.environ["WEB_URL"], timeout=10).read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 9))
        self.end_headers()
        self.wfile.write(b"app saw: " + body)
    def log_message(self, *args):
        pass

open("app.started", "w").close()
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''

# The check: a request that enters at the gateway's reverse port (as cluster traffic
# would), goes through velo to the candidate, which asks the remote service through velo.
CHECK = '''
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20) as sock:
    sock.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
body = data.partition(b"\\r\\n\\r\\n")[2]
print("check got:", body.decode())
sys.exit(0 if body == b"app saw: from-the-cluster" else 1)
'''


def _project(tmp_path: Path, procs, *, token_env: str = "VELO_TEST_TOKEN") -> Path:
    remote = procs.server("http", text="from-the-cluster")
    app_port, expose = free_port(), free_port()
    gateway = procs.gateway(f"127.0.0.1:{remote}", allow_reverse=(expose,))
    # a pinned free local port: the hashed default is the same for every test run on this machine
    web = f'[remote.services.web]\ntarget = "127.0.0.1:{remote}"\nlocal_port = {free_port()}\n'
    write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, local={"app": (app_port, expose)},
                 token_env=token_env, extra=web)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "check.py").write_text(CHECK)
    py = sys.executable
    (tmp_path / "Tiltfile").write_text(textwrap.dedent(f"""\
        analytics_settings(enable=False)
        load({str(EXTENSION)!r}, 'velo', 'velo_local_resource')

        velo(velo_bin={VELO_BIN!r})
        velo_local_resource('app', serve_cmd=[{py!r}, 'app.py', '{app_port}'], velo_bin={VELO_BIN!r},
                            readiness_probe=probe(period_secs=1, tcp_socket=tcp_socket_action({app_port})))
        local_resource('check', cmd=[{py!r}, 'check.py', '{expose}'], resource_deps=['app'])
    """))
    return tmp_path / "Tiltfile"


def _tilt_ci(tilt: str, tiltfile: Path, timeout: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TILT_DEV_DIR": str(tiltfile.parent / ".tilt-dev"), "NO_COLOR": "1"}
    return subprocess.run([tilt, "ci", "--file", str(tiltfile), "--port", str(free_port()), "--timeout", timeout],
                          cwd=tiltfile.parent, env=env, capture_output=True, text=True, timeout=600)


def test_tilt_ci_runs_the_mesh_and_a_candidate_with_velos_env(tilt, procs, tmp_path):
    tiltfile = _project(tmp_path, procs)
    result = _tilt_ci(tilt, tiltfile, "3m")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "check got: app saw: from-the-cluster" in log  # reverse in, forward out, env from velo
    assert (tmp_path / ".env").exists()                    # velo up --no-run wrote it
    assert "velo: started" not in log                      # --no-run: velo started no candidate itself
    # Tilt owns velo's lifecycle: when `tilt ci` is done, velo up has stopped too
    wait_for(lambda: status_cli(tmp_path / "velocity.toml") == {"running": False}, 30, "velo up to stop with tilt")


def test_the_candidate_waits_for_velo_to_be_ready(tilt, procs, tmp_path):
    """A mesh whose tunnel never comes up (wrong token) is never ready: Tilt does not start the
    candidate, and `tilt ci` fails instead of passing on a half-made mesh."""
    tiltfile = _project(tmp_path, procs, token_env="VELO_WRONG_TOKEN")
    os.environ["VELO_WRONG_TOKEN"] = "not-the-gateway-token"
    try:
        result = _tilt_ci(tilt, tiltfile, "40s")
    finally:
        del os.environ["VELO_WRONG_TOKEN"]
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-4000:]
    assert not (tmp_path / "app.started").exists(), "Tilt started the candidate before velo was ready"
    assert "check got:" not in log
    assert "velo: not ready: tunnel unauthorized" in log  # the probe's one line, in Tilt's log
