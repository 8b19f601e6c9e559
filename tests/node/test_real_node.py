"""End to end on a REAL node (tests/cluster/node.py): kubelet, containerd + runc, CNI bridge,
kube-proxy, with the traffic-proxy image built by `make image` and a sample app image on the
same local base, both imported into the node's containerd (nothing is pulled).

  * `velo up` (kubernetes provider) creates the traffic-proxy; the kubelet runs it from the
    local store as UID 65532 with no capabilities; its readiness probe passes.
  * The tunnel, both ways a user gets one: velo's port-forward backend (no url: the provider's
    default), and `[tunnel.websocket] url` pointing at a relay that opens, per connection, a
    port-forward to the ready traffic-proxy pod. Both go through the apiserver and the REAL
    kubelet's streaming path (kubelet -> containerd CRI stream server).
  * A forward request reaches the sample `backend` pod (cluster DNS -> ClusterIP -> kube-proxy).
  * A request from another pod to the candidate's ClusterIP reaches the laptop (kube-proxy ->
    the traffic-proxy pod -> tunnel).
  * Killing the traffic-proxy container (not the pod): the kubelet restarts it, the tunnel
    comes back.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
from kubernetes import client
from kubernetes.stream import portforward

from tests.helpers import Up, free_port, http_get, wait_for
from tests.node.conftest import APP_IMAGE
from velo.providers.kubernetes import intercept as ix

# the first test also pays for the node's start (~30-60 s) and every wait is generous for a loaded CI
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
NS = "shop"


class PortForwardIngress:
    """A local listener; each connection becomes a port-forward (through the apiserver and the
    real kubelet) to the tunnel port of the namespace's ready traffic-proxy pod."""

    def __init__(self, core, namespace: str, port: int = 7070):
        self.core, self.namespace, self.target = core, namespace, port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.server.getsockname()[1]}/velo"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _pod(self) -> str | None:
        for pod in self.core.list_namespaced_pod(self.namespace,
                                                 label_selector=f"{ix.LABEL_COMPONENT}={ix.COMPONENT}").items:
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            if ready and not pod.metadata.deletion_timestamp:
                return pod.metadata.name
        return None

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(c,), daemon=True).start()

    def _relay(self, c: socket.socket) -> None:
        pod = self._pod()
        if pod is None:
            c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            c.close()
            return
        try:
            pf = portforward(self.core.connect_get_namespaced_pod_portforward, pod, self.namespace,
                             ports=str(self.target))
            u = pf.socket(self.target)
        except Exception:  # noqa: BLE001 - like an Ingress whose backend just went away
            c.close()
            return
        self.connections += 1

        def pump(a, b) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(u, c), daemon=True)
        t.start()
        pump(c, u)
        t.join(30)
        c.close()
        pf.close()

    def close(self) -> None:
        self.server.close()


def _app(apps, core, name: str, text: str, port_name: str = "http") -> None:
    labels = {"app": name}
    apps.create_namespaced_deployment(NS, client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(replicas=1, selector=client.V1LabelSelector(match_labels=labels),
                                     template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels=labels),
            spec=client.V1PodSpec(termination_grace_period_seconds=2, containers=[client.V1Container(
                name="app", image=APP_IMAGE, image_pull_policy="Never", args=["8080"],
                env=[client.V1EnvVar(name="APP_NAME", value=text)],
                ports=[client.V1ContainerPort(name=port_name, container_port=8080)],
                readiness_probe=client.V1Probe(http_get=client.V1HTTPGetAction(path="/", port=8080),
                                               period_seconds=1),
                security_context=client.V1SecurityContext(
                    run_as_non_root=True, allow_privilege_escalation=False, read_only_root_filesystem=True,
                    capabilities=client.V1Capabilities(drop=["ALL"])))])))))
    core.create_namespaced_service(NS, client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1ServiceSpec(selector=labels, ports=[client.V1ServicePort(name="http", port=80,
                                                                              target_port=port_name)])))


def _ready_pod(core, app: str) -> client.V1Pod:
    def ready():
        for pod in core.list_namespaced_pod(NS, label_selector=f"app={app}").items:
            if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                return pod
        return None
    return wait_for(ready, 180, f"a Ready {app} pod on the real node")


def _get_via_portforward(core, pod: str, port: int, path: str) -> bytes:
    pf = portforward(core.connect_get_namespaced_pod_portforward, pod, NS, ports=str(port))
    try:
        s = pf.socket(port)
        s.settimeout(30)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data
    finally:
        pf.close()


@pytest.fixture(scope="module")
def shop(real_node):
    core, apps = real_node.core, real_node.apps
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    wait_for(lambda: core.read_namespaced_service_account("default", NS), 60, "ServiceAccount shop/default")
    _app(apps, core, "backend", "backend")
    _app(apps, core, "website", "website-in-cluster")
    _app(apps, core, "client", "client")
    for app in ("backend", "website", "client"):
        _ready_pod(core, app)
    ingress = PortForwardIngress(core, NS)
    yield ingress
    ingress.close()


def _config(tmp_path, url: str | None, laptop_port: int):
    """``url`` None: no backend table, so the kubernetes provider's default (port-forward)."""
    websocket = f'[tunnel.websocket]\nurl = "{url}"\n' if url else ""
    d = tmp_path / "p"
    d.mkdir()
    (d / "velocity.toml").write_text(f"""
[project]
name = "shop"

[cluster]
provider = "kubernetes"
namespace = "{NS}"
lease_seconds = 30
ready_timeout = 180

[tunnel]
reconnect_max_delay = 0.5
keepalive_interval = 1.0
keepalive_timeout = 3.0

{websocket}
[local.website]
port = {laptop_port}

# free local ports: other checkouts on this machine may run the same test (velo's defaults are stable)
[remote.services.backend]
local_port = {free_port()}

[remote.services.client]
local_port = {free_port()}
""")
    return d / "velocity.toml"


def test_sample_app_runs_under_its_security_context(real_node, shop):
    """The node really runs containers: the kubelet probed the pod Ready, and the port-forward
    through the kubelet reaches the process, which runs as the image's non-root user."""
    pod = _ready_pod(real_node.core, "backend")
    assert pod.spec.node_name == real_node.node.name and pod.status.pod_ip.startswith("10.244.0.")
    body = _get_via_portforward(real_node.core, pod.metadata.name, 8080, "/")
    assert body.startswith(b"HTTP/1.0 200") and body.endswith(f"backend from {pod.metadata.name}\n".encode())
    pid = real_node.node.container_pid(NS, pod.metadata.name, "app")
    status = open(f"/proc/{pid}/status").read()
    assert "\nUid:\t65532\t" in status and "\nCapEff:\t0000000000000000" in status


@pytest.mark.parametrize("tunnel", ["port-forward", "websocket-via-relay"])
def test_velo_up_on_a_real_node_forward_reverse_and_container_restart(real_node, shop, procs, tmp_path, tunnel):
    core = real_node.core
    laptop = procs.server("http", text="hello from the laptop")
    config = _config(tmp_path, shop.url if tunnel == "websocket-via-relay" else None, laptop)
    # procs.up() allows 20 s to start; a loaded 2-core CI machine needs more for the first status
    proc = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)],
                       env={"KUBECONFIG": real_node.kubeconfig}, cwd=config.parent)
    up = Up(proc, config)
    wait_for(lambda: up.status() or not proc.running(), 120, "velo up to start")
    assert proc.running(), f"velo up exited:\n{proc.log()}"
    up.wait_state("up", timeout=240)

    # the traffic-proxy pod: the kubelet ran the image from the local store, under its security context
    proxy = wait_for(lambda: shop._pod(), 60, "a Ready traffic-proxy pod")
    pod = core.read_namespaced_pod(proxy, NS)
    gateway = pod.spec.containers[0]
    assert gateway.image == real_node.proxy_image
    status = next(s for s in pod.status.container_statuses if s.name == gateway.name)
    assert status.ready and status.image_id, status
    pid = real_node.node.container_pid(NS, proxy, gateway.name)
    proc_status = open(f"/proc/{pid}/status").read()
    assert "\nUid:\t65532\t" in proc_status and "\nCapEff:\t0000000000000000" in proc_status, proc_status
    assert "\nNoNewPrivs:\t1" in proc_status
    if tunnel == "port-forward":
        state = up.status()["tunnel"]
        assert state["backend"] == "port-forward" and state["url"].startswith(f"pod {NS}/{proxy} "), state
    else:
        assert shop.connections >= 1, "the tunnel went through the relay's port-forward"

    # forward: laptop -> tunnel -> traffic-proxy pod -> DNS -> ClusterIP -> kube-proxy -> backend pod
    backend_pod = _ready_pod(core, "backend").metadata.name
    body = wait_for(lambda: http_get(up.port("backend"), timeout=20), 60, "a forward request to backend")
    assert body.startswith(b"HTTP/1.0 200") and body.endswith(f"backend from {backend_pod}\n".encode()), body

    # reverse: another pod -> website's ClusterIP -> kube-proxy -> traffic-proxy pod -> laptop
    website_ip = core.read_namespaced_service("website", NS).spec.cluster_ip
    client_pod = _ready_pod(core, "client").metadata.name
    url = urllib.parse.quote(f"http://{website_ip}/", safe="")

    def from_client_pod() -> bytes:
        return _get_via_portforward(core, client_pod, 8080, f"/fetch?url={url}")
    answer = wait_for(lambda: (b := from_client_pod()).endswith(b"hello from the laptop") and b, 60,
                      "a request from the client pod to website's ClusterIP to reach the laptop")
    assert answer.startswith(b"HTTP/1.0 200")

    # kill the traffic-proxy's container (not the pod): the kubelet restarts it, the tunnel comes back
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: next(s for s in core.read_namespaced_pod(proxy, NS).status.container_statuses
                          if s.name == gateway.name).restart_count >= 1, 120, "the kubelet to restart the container")
    wait_for(lambda: shop._pod() == proxy, 120, "the restarted traffic-proxy to be Ready again (same pod)")
    up.wait_state("up", timeout=120)
    wait_for(lambda: from_client_pod().endswith(b"hello from the laptop"), 120,
             "the reverse path through the restarted traffic-proxy")
    body = wait_for(lambda: http_get(up.port("backend"), timeout=20), 60, "a forward request after the restart")
    assert body.endswith(f"backend from {backend_pod}\n".encode())

    down = subprocess.run([sys.executable, "-m", "velo", "down", "-c", str(config)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KUBECONFIG": real_node.kubeconfig}, cwd=config.parent)
    assert down.returncode == 0, down.stderr
    assert up.proc.wait(60) == 0
