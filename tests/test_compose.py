"""Docker Compose: a real engine, the real Compose v2 CLI (pytest-docker), a busybox image.

The container reaches a remote service only through velo (the remote server listens on this
machine's loopback, which a container cannot see) and answers a reverse request that
enters at the gateway. Setup: tests/docker/engine.sh, tests/tools/compose.sh and
tests/docker/image.sh (all run by `make test`). Without an engine these tests skip with one
line; under CI=true they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.helpers import ROOT, free_port, wait_for, write_config

pytestmark = pytest.mark.docker


def _docker_missing() -> str:
    if not shutil.which("docker"):
        return "no docker CLI on PATH"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
            return "no Docker engine answers (tests/docker/engine.sh starts one)"
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode != 0:
            return "no Docker Compose v2 plugin (tests/tools/compose.sh builds one)"
    except subprocess.TimeoutExpired:
        return "the docker CLI did not answer in 30 s"
    return ""


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} [CI=true: Docker tests must not be skipped]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    """The test image (busybox on FROM scratch), built from local files only."""
    if reason := _docker_missing():
        _skip_or_fail(f"Docker tests: {reason}")
    for attempt in range(3):  # an engine busy with another suite's containers can refuse for a moment
        out = subprocess.run([str(ROOT / "tests/docker/image.sh")], capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return out.stdout.strip().splitlines()[-1]
        time.sleep(2)
    why = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}").splitlines()[-3:]
    _skip_or_fail(f"Docker tests: cannot build the test image: {' / '.join(why)}")


def velo(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, **(env or {})})


def get(port: int, path: str = "/", timeout: float = 5) -> bytes:
    """One HTTP/1.0 GET (busybox httpd speaks it); the body, or b"" on any failure."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return b""
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] else b""


# The candidate: busybox httpd on 8080 serving a page of its own, and /remote.txt, what it
# fetched from the "web" service at the address velo's env gave it ($$: no interpolation).
APP_COMMAND = (
    "mkdir -p /www && echo from-the-container > /www/index.html; "
    "(until wget -q -O /www/remote.tmp \"$$WEB_URL\"; do sleep 0.2; done; mv /www/remote.tmp /www/remote.txt) & "
    "exec httpd -f -p 8080 -h /www"
)


def _project(tmp_path, procs, image, *, listen: str | None):
    """Remote service + gateway + velocity.toml + a compose file with service "app"."""
    remote = procs.server("http", text="from-the-cluster")
    local_port, expose = free_port(), free_port()
    gateway = procs.gateway(f"127.0.0.1:{remote}", allow_reverse=(expose,))
    # a pinned free local port: the hashed default is the same for every test run on this machine
    extra = f'[remote.services.web]\ntarget = "127.0.0.1:{remote}"\nlocal_port = {free_port()}\n'
    extra += f'[remote]\nlisten = "{listen}"\n' if listen else ""
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          local={"app": (local_port, expose)}, extra=extra)
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump({"services": {"app": {
        "image": image, "command": ["sh", "-c", APP_COMMAND], "expose": ["8080"], "stop_signal": "SIGKILL",
    }}}))
    return config, local_port, expose


def _through_velo(expose: int) -> tuple[bytes, bytes]:
    """Both directions, asked at the gateway's reverse port: (/, /remote.txt)."""
    return get(expose, "/"), get(expose, "/remote.txt")


def _compose_down(project: str, cwd) -> None:
    subprocess.run(["docker", "compose", "-p", project, "down", "-v", "-t", "1"], cwd=cwd,
                   capture_output=True, timeout=120)


def test_container_with_the_override_reaches_the_cluster_and_answers_a_reverse_request(procs, tmp_path, image):
    from pytest_docker.plugin import get_docker_services

    from velo.integrations.compose import bridge_gateway

    bridge = bridge_gateway()
    config, local_port, expose = _project(tmp_path, procs, image, listen=bridge)
    up = procs.up(config)
    web = up.forward("web")
    assert web["listen"].startswith(f"{bridge}:"), web  # where containers reach it, not 0.0.0.0

    result = velo("compose", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    override = tmp_path / "docker-compose.velo.yml"
    assert stat.S_IMODE(override.stat().st_mode) == 0o600  # it holds the env
    app = yaml.safe_load(override.read_text())["services"]["app"]
    web_port = web["listen"].rsplit(":", 1)[1]
    assert app["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert app["environment"]["WEB_URL"] == f"http://host.docker.internal:{web_port}"
    assert app["ports"] == [f"127.0.0.1:{local_port}:8080"]

    project = f"velo-test-{uuid.uuid4().hex[:8]}"
    with get_docker_services("docker compose", [str(tmp_path / "docker-compose.yml"), str(override)],
                             project, ["up -d"], ["down -v -t 1"]) as services:
        try:
            services.wait_until_responsive(lambda: all(_through_velo(expose)), timeout=90, pause=0.2)
        except Exception:
            logs = subprocess.run(["docker", "compose", "-p", project, "logs"], capture_output=True, text=True)
            raise AssertionError(f"got {_through_velo(expose)} through velo; container log:\n{logs.stdout[-2000:]}"
                                 f"\nvelo up log:\n{up.proc.log()[-3000:]}") from None
        page, fetched = _through_velo(expose)
    assert page.strip() == b"from-the-container"        # reverse: gateway -> velo -> published port
    assert fetched.strip() == b"from-the-cluster"        # forward: container -> velo -> gateway -> remote
    assert up.forward("web")["total"] >= 1  # the container's request went through velo's listener
    assert up.status()["reverse_streams"]["total"] >= 1


def test_velo_up_compose_runs_the_project_and_stops_it(procs, tmp_path, image):
    from velo.integrations.compose import bridge_gateway

    config, _local_port, expose = _project(tmp_path, procs, image, listen=None)
    project = f"velo-test-{uuid.uuid4().hex[:8]}"
    proc = procs.start("up-compose", [sys.executable, "-m", "velo", "up", "--compose", "-c", str(config)],
                       cwd=tmp_path, env={"COMPOSE_PROJECT_NAME": project})
    try:
        proc.wait_log(f"forwards listen on {bridge_gateway()} (the docker bridge)", timeout=60)
        wait_for(lambda: all(_through_velo(expose)), 120,
                 f"both directions through velo; velo up log:\n{proc.log()[-3000:]}", interval=0.2)
        page, fetched = _through_velo(expose)
        assert (page.strip(), fetched.strip()) == (b"from-the-container", b"from-the-cluster")

        proc.signal(signal.SIGTERM)
        assert proc.wait(90) == 0, proc.log()[-3000:]
        assert _running(project, tmp_path) == [], "velo up left the project's containers running"
    finally:
        _compose_down(project, tmp_path)


def _running(project: str, cwd) -> list[str]:
    return subprocess.run(["docker", "compose", "-p", project, "ps", "-q"], cwd=cwd,
                          capture_output=True, text=True, timeout=60).stdout.split()


def test_sigkill_of_velo_up_compose_stops_the_containers_too(procs, tmp_path, image):
    config, _local_port, expose = _project(tmp_path, procs, image, listen=None)
    project = f"velo-test-{uuid.uuid4().hex[:8]}"
    proc = procs.start("up-compose", [sys.executable, "-m", "velo", "up", "--compose", "-c", str(config)],
                       cwd=tmp_path, env={"COMPOSE_PROJECT_NAME": project})
    try:
        wait_for(lambda: _running(project, tmp_path), 120, f"the container to run; log:\n{proc.log()[-3000:]}",
                 interval=0.5)
        os.killpg(proc.pid, 0)  # still there
        proc.signal(signal.SIGKILL)  # no cleanup code of velo runs
        proc.wait(10)
        wait_for(lambda: _running(project, tmp_path) == [], 90,
                 "the containers to stop after velo up was killed", interval=0.5)
    finally:
        _compose_down(project, tmp_path)


def test_override_survives_compose_interpolation_and_bad_input_is_one_line(procs, tmp_path, image):
    remote = procs.server("http", text="x")
    gateway = procs.gateway(f"127.0.0.1:{remote}")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, local={"app": (free_port(), free_port())},
                          extra=f'[remote.services.web]\ntarget = "127.0.0.1:{remote}"\nlocal_port = {free_port()}\n'
                          '[env.vars]\nPASSWORD = "pa$$word${HOME}"\n')

    result = velo("compose", "-c", str(config), cwd=tmp_path)  # no compose file yet
    assert result.returncode == 2 and "no Compose file in" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump({"services": {"app": {"image": image}}}))
    assert velo("compose", "-c", str(config), cwd=tmp_path).returncode == 0
    project = f"velo-test-{uuid.uuid4().hex[:8]}"
    try:  # what the container really gets
        shown = subprocess.run(["docker", "compose", "-p", project, "-f", "docker-compose.yml", "-f",
                                "docker-compose.velo.yml", "run", "--rm", "-T", "app",
                                "sh", "-c", 'echo "$PASSWORD"; echo "$WEB_SERVICE_HOST"'],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        _compose_down(project, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["pa$$word${HOME}", "host.docker.internal"]  # as written, not interpolated

    config.write_text(config.read_text() + '\n[compose.services]\napp = "website"\n')
    result = velo("compose", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "compose.services.app: no Compose service 'website' (the project's services: app)" in result.stderr


def test_velo_up_compose_stops_loudly_when_compose_fails_and_says_why_without_an_engine(procs, tmp_path, image):
    config, _local_port, _expose = _project(tmp_path, procs, image, listen=None)

    # no engine at that address: one clear line, exit 2, nothing started
    result = velo("up", "--compose", "-c", str(config), cwd=tmp_path,
                  env={"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot find the docker bridge (is the Docker engine running?)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    # docker compose up itself fails (an image that does not exist and cannot be pulled here)
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump({"services": {"app": {
        "image": "velo-test/no-such-image:0", "pull_policy": "never"}}}))
    project = f"velo-test-{uuid.uuid4().hex[:8]}"
    try:
        result = velo("up", "--compose", "-c", str(config), cwd=tmp_path, env={"COMPOSE_PROJECT_NAME": project},
                      timeout=180)
    finally:
        _compose_down(project, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "velo: docker compose up exited with code" in result.stdout
