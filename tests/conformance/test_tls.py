"""TLS for every network backend: what the client refuses, and what the gateway asks for.

The passing paths (ca_file plus server_name, all the conformance cases over wss:// and
https://) are in test_backends.py; here, each way verification must fail, and fail
visibly in `velo status`, for both TLS backends.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conformance.conftest import CASES, SERVER_NAME, Mesh
from tests.helpers import TOKEN, http_get

TLS_CASES = [case for case in CASES if case.tls]


@pytest.fixture(params=TLS_CASES, ids=[case.id for case in TLS_CASES])
def tls_mesh(request, procs, test_ca, tmp_path) -> Mesh:
    return Mesh(procs, request.param, test_ca, tmp_path)


def _start_up_with(mesh: Mesh, http: int, settings: dict):
    from tests.helpers import write_config

    folder = mesh.tmp / f"project-{len(settings)}-{mesh.runs}"
    mesh.runs += 1
    folder.mkdir()
    config = write_config(folder / "velocity.toml", gateway_url=mesh.gateway.url, backend=mesh.case.backend,
                          remote={"conf-tls-web": f"127.0.0.1:{http}"}, settings=settings)
    return mesh.procs.up(config, wait_up=False)


def test_the_system_trust_store_does_not_trust_a_private_ca(tls_mesh):
    http = tls_mesh.procs.server("http", text="private")
    tls_mesh.start_gateway(f"127.0.0.1:{http}")
    up = _start_up_with(tls_mesh, http, {"server_name": SERVER_NAME})  # no ca_file: the OS trust store
    status = tls_mesh_wait_error(up)
    assert "certificate verify failed: unable to get local issuer certificate" in status, status


def test_the_name_checked_is_the_urls_host_unless_server_name_says_otherwise(tls_mesh):
    http = tls_mesh.procs.server("http", text="private")
    tls_mesh.start_gateway(f"127.0.0.1:{http}")
    # The certificate names gateway.velo.test only; the URL says 127.0.0.1.
    up = _start_up_with(tls_mesh, http, {"ca_file": str(tls_mesh.ca.ca_file)})
    status = tls_mesh_wait_error(up)
    assert "IP address mismatch" in status, status  # the URL says 127.0.0.1
    up.proc.stop()  # frees the local port for the next run
    fixed = _start_up_with(tls_mesh, http, {"ca_file": str(tls_mesh.ca.ca_file), "server_name": SERVER_NAME})
    fixed.wait_state("up", timeout=20)
    assert http_get(fixed.port("conf-tls-web")).endswith(b"private")


def tls_mesh_wait_error(up) -> str:
    from tests.helpers import wait_for

    status = wait_for(lambda: (s := up.status()) and "TLS failed" in s["tunnel"]["last_error"] and s, 20,
                      f"a TLS failure in velo status; log:\n{up.proc.log()[-2000:]}")
    assert status["tunnel"]["state"] != "up"
    return status["tunnel"]["last_error"]


@pytest.mark.parametrize("scheme", ["wss", "https"])
def test_a_tls_listener_without_a_certificate_is_refused_in_one_line(scheme, tmp_path):
    done = subprocess.run([sys.executable, "-m", "velo", "gateway", "--listen", f"{scheme}://127.0.0.1:0/velo"],
                          capture_output=True, text=True, timeout=30, env={"VELO_TOKEN": TOKEN, "PATH": "/usr/bin"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"velo: --listen {scheme}://127.0.0.1:0/velo: a TLS listener needs --tls-cert and --tls-key"]
