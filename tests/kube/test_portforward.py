"""The port-forward backend against the real local control plane (kwok serves
pods/portforward through its PortForward objects, which the pod runner registers).

No Ingress relay is involved here: the only way from the test process to the
traffic-proxy is the apiserver's pods/portforward, and the in-cluster services are in
the harness's network namespace, unreachable from the test process.
"""

from __future__ import annotations

import time

import psutil
import pytest

from tests.helpers import free_port, http_get, wait_for
from tests.kube.ingress import request_via_service
from tests.kube.shop import service
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster


def _config(path, namespace: str, candidate_port: int, tunnel: str = ""):
    """No [tunnel.websocket] url: the kubernetes provider's default is port-forward."""
    text = f"""
[project]
name = "pfshop"  # its own local ports: other test modules use "shop"

[cluster]
provider = "kubernetes"
namespace = "{namespace}"
ready_timeout = 60

[tunnel]
reconnect_max_delay = 0.5
keepalive_interval = 1.0
keepalive_timeout = 3.0
connect_timeout = 5.0
{tunnel}
[remote]
exclude = ["dns"]

[local.website]
port = {candidate_port}
"""
    path.mkdir(parents=True, exist_ok=True)
    (path / "velocity.toml").write_text(text)
    return path / "velocity.toml"


def _session(cluster, namespace: str) -> str:
    """The provider's session id, from the intercepted Service (velo intercepts once the tunnel works)."""
    return wait_for(lambda: (service(cluster, namespace).metadata.annotations or {}).get(ix.ANN_SESSION), 30,
                    "the Service to be intercepted")


def _proxy_pods(cluster, namespace: str, session: str) -> list:
    return cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items


def _gateway_listening(cluster, namespace: str, pod: str) -> bool:
    record = cluster.pod_process(namespace, pod)
    if not record or not record.get("log"):
        return False
    try:
        with open(record["log"], errors="replace") as log:
            return "listening on " in log.read()
    except OSError:
        return False


def _ready(pod) -> bool:
    conditions = {c.type: c.status for c in (pod.status.conditions or [])}
    return pod.status.phase == "Running" and conditions.get("Ready") == "True" and not pod.metadata.deletion_timestamp


def test_whole_session_over_port_forward_with_no_url(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="laptop via port-forward")
    config = _config(tmp_path / "p", namespace, laptop)
    up = procs.up(config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    tunnel = up.status()["tunnel"]
    assert tunnel["backend"] == "port-forward", tunnel
    session = _session(cluster, namespace)
    pod = _proxy_pods(cluster, namespace, session)[0].metadata.name
    assert tunnel["url"].startswith(f"pod {namespace}/{pod} port "), tunnel

    # forward: to a service the test process cannot reach, through the apiserver
    body = http_get(up.port("backend"))
    assert body.startswith(b"HTTP/1.0 200") and f"{namespace}/backend".encode() in body
    # reverse: the cluster's path to the Service reaches the laptop, over the same tunnel
    request = b"GET / HTTP/1.1\r\nHost: website\r\nConnection: close\r\n\r\n"
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, request), 20,
                      "the Service to reach the laptop")
    assert answer.endswith(b"laptop via port-forward")
    # one connection to the apiserver carries everything; no kubectl, no thread per connection
    process = psutil.Process(up.proc.pid)
    assert not [c for c in process.children(recursive=True) if "kubectl" in " ".join(c.cmdline())]
    for _ in range(5):
        assert f"{namespace}/backend".encode() in http_get(up.port("backend"))
    apiserver_port = int(cluster.server.rsplit(":", 1)[1])
    conns = [c for c in process.net_connections("tcp") if c.raddr and c.raddr.port == apiserver_port]
    assert len(conns) <= 4, conns  # the tunnel, plus the provider's pooled API connections
    assert process.num_threads() < 20


def test_deleted_traffic_proxy_pod_is_followed_within_3s_of_ready(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="laptop")
    config = _config(tmp_path / "p", namespace, laptop)
    up = procs.up(config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    listener = up.port("backend")
    assert f"{namespace}/backend".encode() in http_get(listener)
    session = _session(cluster, namespace)
    old = _proxy_pods(cluster, namespace, session)[0].metadata.name

    cluster.core.delete_namespaced_pod(old, namespace, grace_period_seconds=0)
    up.wait_state("reconnecting", timeout=30)
    new = wait_for(lambda: next((p.metadata.name for p in _proxy_pods(cluster, namespace, session)
                                 if p.metadata.name != old and _ready(p)), None),
                   90, "the Deployment's new traffic-proxy pod to be Ready", interval=0.05)
    # kwok reports Ready before the pod runner has even started the process; a real kubelet
    # waits for the Deployment's readiness probe (/healthz on the gateway). So "Ready" here
    # is the pod Ready *and* its gateway listening, as a real cluster would report it.
    wait_for(lambda: _gateway_listening(cluster, namespace, new), 60, "the new pod's gateway to listen",
             interval=0.05)
    ready_at = time.monotonic()
    body = http_get(listener, timeout=10)  # the same local listener; waits for the tunnel
    took = time.monotonic() - ready_at
    assert f"{namespace}/backend".encode() in body
    assert took < 3.0, f"the request took {took:.2f}s after the new pod was Ready"
    tunnel = up.status()["tunnel"]
    assert tunnel["state"] == "up" and new in tunnel["url"] and tunnel["reconnects"] >= 1, tunnel


def test_unreachable_websocket_falls_back_to_port_forward_and_says_why(cluster, namespace, shop, procs,
                                                                       tmp_path):
    laptop = procs.server("http", text="laptop")
    closed = free_port()
    config = _config(tmp_path / "p", namespace, laptop, tunnel=(
        'prefer = ["websocket", "port-forward"]\n\n'
        f'[tunnel.websocket]\nurl = "ws://127.0.0.1:{closed}/velo"\n'))
    up = procs.up(config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    tunnel = up.status()["tunnel"]
    assert tunnel["backend"] == "port-forward", tunnel
    assert [s["backend"] for s in tunnel["skipped"]] == ["websocket"], tunnel
    assert f"ws://127.0.0.1:{closed}/velo" in tunnel["skipped"][0]["reason"], tunnel
    assert "skipped websocket: ws://127.0.0.1:" in up.proc.log()
    assert f"{namespace}/backend".encode() in http_get(up.port("backend"))
