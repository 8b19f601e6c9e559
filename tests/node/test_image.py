"""The traffic-proxy image, built for real (`make image`) and run under the Docker engine the
way the pod spec declares it: its user, no capabilities, no privilege escalation, a read-only
root filesystem. Then a real tunnel through it."""
from __future__ import annotations

import collections
import json
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import velo
from tests.helpers import TOKEN, wait_for, write_config
from velo.providers.kubernetes.settings import PROXY_IMAGE_REPOSITORY, KubernetesTable, default_proxy_image

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "velo/providers/kubernetes/traffic-proxy.yaml"


def template_docs(**values: str) -> list[dict]:
    """velo's traffic-proxy template, placeholders from ``values`` or "x"."""
    text = string.Template(TEMPLATE.read_text()).substitute(collections.defaultdict(lambda: "x", values))
    return [d for d in yaml.safe_load_all(text) if d]


def gateway_pod() -> tuple[dict, dict]:
    """(pod-level securityContext, the gateway container) of velo's traffic-proxy Deployment."""
    deploy = next(d for d in template_docs() if d["kind"] == "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    return spec.get("securityContext") or {}, spec["containers"][0]


def docker_run_flags(pod_sc: dict, container: dict) -> list[str]:
    """The pod spec's securityContext (pod level, overridden by the container's), as `docker run`
    flags (what a kubelet would ask runc for)."""
    sc = {**pod_sc, **(container.get("securityContext") or {})}
    flags = ["--read-only"]  # the strictest: the gateway must not need to write to its image
    for cap in (sc.get("capabilities") or {}).get("drop") or []:
        flags += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sc.get("runAsUser") is not None:
        flags += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    return flags


def test_default_proxy_image_is_the_one_release_publishes():
    assert default_proxy_image() == f"{PROXY_IMAGE_REPOSITORY}:{velo.__version__}"
    assert KubernetesTable().proxy_image == default_proxy_image()
    release = (ROOT / ".github/workflows/release.yml").read_text()
    assert f"tags: {PROXY_IMAGE_REPOSITORY}:${{{{ steps.version.outputs.version }}}}" in release
    assert "platforms: linux/amd64,linux/arm64" in release


@pytest.mark.slow
def test_image_version_user_and_size(proxy_image):
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", proxy_image, "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"velo {velo.__version__}"
    info = json.loads(subprocess.run(["docker", "image", "inspect", proxy_image], capture_output=True, text=True,
                                     check=True).stdout)[0]
    user = info["Config"]["User"]
    # runAsNonRoot needs a NUMERIC non-root user in the image (the kubelet cannot resolve names)
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) != 0, user
    size_mb = info["Size"] / 1e6
    print(f"\n{proxy_image}: {size_mb:.0f} MB")
    assert size_mb < 250, f"the traffic-proxy image grew to {size_mb:.0f} MB"


@pytest.mark.slow
def test_image_serves_a_tunnel_locked_down_as_the_pod_spec_declares(proxy_image, procs, tmp_path):
    """Readiness (the probe's /healthz) and a forward through the tunnel, with the pod spec's
    security context: the tunnel reaches the gateway's own port 7070 from inside the container."""
    pod_sc, container = gateway_pod()
    flags = docker_run_flags(pod_sc, container)
    assert "--cap-drop" in flags and "ALL" in flags and "no-new-privileges" in flags
    name = f"velo-proxy-test-{tmp_path.name[-8:]}".lower().replace("_", "-")
    run = subprocess.run(["docker", "run", "-d", "--rm", "--name", name, *flags, "-e", f"VELO_TOKEN={TOKEN}",
                          "-p", "127.0.0.1::7070", proxy_image, "--listen", "ws://0.0.0.0:7070/velo",
                          "--allow", "127.0.0.1:7070"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    try:
        inspect = json.loads(subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                                            check=True).stdout)[0]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True
        assert inspect["Config"]["User"] == "65532:65532"
        port = int(inspect["NetworkSettings"]["Ports"]["7070/tcp"][0]["HostPort"])
        probe = container["readinessProbe"]["httpGet"]
        wait_for(lambda: _get(port, probe["path"]).startswith(b"HTTP/1.1 200"), 60,
                 f"the image's readiness endpoint {probe['path']}; docker logs:\n{_logs(name)}")
        # uid/caps as seen by the gateway process itself
        status = subprocess.run(["docker", "exec", name, "cat", "/proc/1/status"], capture_output=True,
                                text=True, timeout=30).stdout
        assert re.search(r"^Uid:\s+65532\s", status, re.M), status
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        # a forward through the tunnel: laptop -> velo up -> ws tunnel -> gateway in the container
        config = write_config(tmp_path / "velocity.toml", gateway_url=f"ws://127.0.0.1:{port}/velo",
                              remote={"self": "127.0.0.1:7070"}, free_ports=True)
        up = procs.up(config)
        local = up.port("self")
        reply = _get(local, "/healthz")
        assert reply.startswith(b"HTTP/1.1 200"), reply
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def _get(port: int, path: str) -> bytes:
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _logs(name: str) -> str:
    r = subprocess.run(["docker", "logs", "--tail", "30", name], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


def test_platform_manifests_are_generated_from_the_template_velo_renders():
    """proxy/manifests/*.yaml are what `velo up` creates (same template): regenerate to compare."""
    check = subprocess.run([sys.executable, str(ROOT / "proxy/manifests/generate.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    role = next(d for d in yaml.safe_load_all((ROOT / "proxy/manifests/role.yaml").read_text()) if d["kind"] == "Role")
    template_role = next(d for d in template_docs(session="shared", namespace="velo") if d["kind"] == "Role")
    assert role["rules"] == template_role["rules"]
    install = [d["kind"] for d in yaml.safe_load_all((ROOT / "proxy/manifests/install.yaml").read_text()) if d]
    assert install == [d["kind"] for d in template_docs()]
