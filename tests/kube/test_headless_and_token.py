"""Two promises of a kubernetes session, each checked the way a user would see it:
a headless Service is forwarded end to end (the traffic-proxy dials its DNS name, which
resolves to the ready pods' IPs), and the session token shows nowhere a person reads.

The "pod" behind the headless Service is a real server process in the cluster's network
namespace, listening on the IP kwok gave a real Pod that the Service selects; the pod
runner's hosts file resolves the Service's name from its EndpointSlice, like CoreDNS.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster import podrunner
from tests.cluster.harness import REPO_ROOT, kill_and_wait, netns_add_addr
from tests.helpers import http_get, status_cli, wait_for
from tests.kube.ingress import request_via_service
from tests.kube.shop import endpoint_pods, kube_config, kube_up, velo
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster

KUBE_ENV_KEY = "KUBECONFIG"
REQUEST = b"GET / HTTP/1.1\r\nHost: website\r\nConnection: close\r\n\r\n"


@pytest.fixture
def pod_server(cluster, namespace):
    """start(pod, port): a real HTTP server on ``pod``'s IP inside the cluster network,
    answering with JSON naming ``pod`` (what a process in that pod would be)."""
    started = []

    def start(pod: str, port: int) -> str:
        ip = wait_for(lambda: cluster.core.read_namespaced_pod(pod, namespace).status.pod_ip, 60, f"pod {pod}'s IP")
        netns = cluster.cluster.netns
        netns_add_addr(netns, ip)
        ready = Path(cluster.cluster.state_dir) / "net" / f"{namespace}_{pod}.ready"
        ready.unlink(missing_ok=True)
        log = open(ready.with_suffix(".log"), "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.cluster.harness", "_netsvc",
             "http", ip, str(port), f"{namespace}/{pod}", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"})
        log.close()
        started.append(proc)
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30, f"the server of pod {pod}")
        assert proc.poll() is None, ready.with_suffix(".log").read_text()
        return ip

    yield start
    for proc in started:
        kill_and_wait(proc.pid, None, grace=5, popen=proc)



def make_pod(cluster, namespace: str, name: str, labels: dict, *, hostname: str = "", subdomain: str = "",
             ports: dict[str, int] | None = None) -> None:
    """A Pod on the kwok node (kwok runs it: Running, Ready, an IP), like a StatefulSet's."""
    declared = [client.V1ContainerPort(name=n, container_port=p) for n, p in (ports or {}).items()] or None
    cluster.core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(hostname=hostname or None, subdomain=subdomain or None,
                              containers=[client.V1Container(name="main", image="ledger:dev", ports=declared)])))


@pytest.mark.parametrize("svc, target_port", [("ledger", 7000), ("journal", "journal-http")],
                         ids=["numbered", "named"])
def test_a_headless_service_is_forwarded_to_its_ready_pod(cluster, namespace, shop, procs, tmp_path, pod_server,
                                                          svc, target_port):
    """A named targetPort is the number the pod declares under that name (7000 here too; the
    Service's own port 80 has nothing behind it)."""
    core = cluster.core
    core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name=svc),
        spec=client.V1ServiceSpec(cluster_ip="None", selector={"app": svc},
                                  ports=[client.V1ServicePort(name="http", port=80, target_port=target_port)])))
    pod = f"{svc}-0"
    make_pod(cluster, namespace, pod, {"app": svc}, hostname=pod, subdomain=svc, ports={f"{svc}-http": 7000})
    wait_for(lambda: endpoint_pods(cluster, namespace, svc) == {pod}, 60, f"{svc}'s EndpointSlice")
    ip = pod_server(pod, 7000)
    config = kube_config(tmp_path / "p", namespace, shop.url)
    up = kube_up(procs, config, env={KUBE_ENV_KEY: str(cluster.kubeconfig)})
    forward = up.forward(svc)
    # no Service proxy in front of a headless Service's pods: their port (targetPort) is dialled
    assert forward["target"] == f"{svc}.{namespace}.svc.cluster.local:7000", forward
    answer = http_get(up.port(svc), timeout=15)
    assert answer.startswith(b"HTTP/1.0 200") and f"{namespace}/{pod}".encode() in answer, answer
    # the proxy resolved the name itself: its hosts file has the pod's records, nothing else does
    proxy = max((p for p in core.list_namespaced_pod(namespace, label_selector=ix.LABEL_SESSION).items
                 if p.status.phase == "Running" and not p.metadata.deletion_timestamp),
                key=lambda p: p.metadata.creation_timestamp)  # this session's (an earlier test's may linger)
    hosts = Path(podrunner.pod_process(cluster.cluster.state_dir, namespace, proxy.metadata.name)["hosts_file"])
    records = hosts.read_text()
    assert f"{ip}\t{svc}.{namespace}.svc.cluster.local" in records, records
    assert f"{ip}\t{pod}.{svc}.{namespace}.svc.cluster.local" in records, records


def test_a_named_target_port_whose_pod_comes_later_is_dialled_once_it_runs(cluster, namespace, shop, procs,
                                                                            tmp_path, pod_server):
    """The Service exists before its pods (a StatefulSet scaled up after `velo up`): velo says it
    dials the Service's port until a running pod declares the name, then picks the number up by
    itself. Pods starting change no Service, so no Service event announces it."""
    core = cluster.core
    core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="diary"),
        spec=client.V1ServiceSpec(cluster_ip="None", selector={"app": "diary"},
                                  ports=[client.V1ServicePort(name="http", port=80, target_port="diary-http")])))
    config = kube_config(tmp_path / "p", namespace, shop.url)
    config.write_text(config.read_text().replace('name = "shop"', 'name = "shop-diary"', 1))
    up = kube_up(procs, config, env={KUBE_ENV_KEY: str(cluster.kubeconfig)})
    assert up.forward("diary")["target"] == f"diary.{namespace}.svc.cluster.local:80"
    up.proc.wait_log("Service diary: no running pod declares its targetPort diary-http yet; dialling port 80 "
                     "until one does", timeout=10)

    make_pod(cluster, namespace, "diary-0", {"app": "diary"}, hostname="diary-0", subdomain="diary",
             ports={"diary-http": 7000})
    wait_for(lambda: endpoint_pods(cluster, namespace, "diary") == {"diary-0"}, 60, "diary's EndpointSlice")
    pod_server("diary-0", 7000)
    wait_for(lambda: up.forward("diary")["target"] == f"diary.{namespace}.svc.cluster.local:7000", 15,
             f"the forward to follow the pod's port; log:\n{up.proc.log()[-1500:]}")
    answer = http_get(up.port("diary"), timeout=15)
    assert answer.startswith(b"HTTP/1.0 200") and f"{namespace}/diary-0".encode() in answer, answer
    assert up.proc.log().count("Service diary: a running pod declares its targetPort diary-http now") == 1


def test_the_session_token_shows_nowhere(cluster, namespace, shop, procs, tmp_path):
    """Not in `velo up`'s output (at debug level), `velo status` or its JSON, the
    traffic-proxy's log, or the repr of the Endpoints that carry it."""
    laptop = procs.server("http", text="laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop)
    env = {KUBE_ENV_KEY: str(cluster.kubeconfig)}
    up = procs.start("up", [sys.executable, "-m", "velo", "up", "--log-level", "debug", "-c", str(config)],
                     env=env, cwd=config.parent)
    up.wait_log("velo: running; Ctrl-C stops", timeout=90)
    status = status_cli(config)
    assert status["tunnel"]["state"] == "up", status
    secret = wait_for(lambda: _session_secret(cluster, namespace), 30, "the session's Secret")
    token = base64.b64decode(secret.data["token"]).decode()
    session = secret.metadata.labels[ix.LABEL_SESSION]  # the cluster-side session (not `velo status`'s id)
    assert len(token) >= 32
    # the traffic-proxy's Deployment hands it the token only by reference
    deployment = cluster.apps.list_namespaced_deployment(namespace, label_selector=f"{ix.LABEL_SESSION}").items[0]
    assert token not in json.dumps(client.ApiClient().sanitize_for_serialization(deployment))
    forms = {token, base64.b64encode(token.encode()).decode()}  # as written, and as the API returns it

    def assert_hidden(text: str, where: str) -> None:
        for form in forms:
            assert form not in text, f"the session token is in {where}"

    table = velo("status", cwd=config.parent, kubeconfig=cluster.kubeconfig)
    assert table.returncode == 0 and "tunnel" in table.stdout, table.stdout + table.stderr
    assert_hidden(table.stdout + table.stderr, "`velo status`")
    assert_hidden(json.dumps(status), "`velo status --json`")
    # a request each way, so that the proxy has streams to log too
    assert f"{namespace}/backend".encode() in http_get(_forward_port(status, "backend"), timeout=15)
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20, "a reverse request")
    assert answer.endswith(b"laptop"), answer
    proxies = [p.metadata.name for p in cluster.core.list_namespaced_pod(
        namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items]
    assert proxies, "the traffic-proxy pod"
    logs = {}
    for pod in proxies:
        record = podrunner.pod_process(cluster.cluster.state_dir, namespace, pod)
        if record:
            logs[pod] = Path(record["log"]).read_text(errors="replace")
    assert any("attached from" in text for text in logs.values()), logs  # we read the right log
    up.signal(15)
    assert up.wait(60) == 0, up.log()
    for pod, text in logs.items():
        assert_hidden(text, f"the traffic-proxy pod {pod}'s log")
    assert_hidden(up.log(), "`velo up`'s output (stdout and stderr, --log-level debug)")


def _forward_port(status: dict, service: str) -> int:
    forward = next(f for f in status["forwards"] if f["name"].split("/")[0] == service)
    return int(forward["listen"].rsplit(":", 1)[1])


def _session_secret(cluster, namespace: str):
    items = cluster.core.list_namespaced_secret(namespace, label_selector=f"{ix.LABEL_MANAGED}=velo").items
    return items[0] if items else None


ENDPOINTS_SCRIPT = """
import asyncio, json, sys
from velo.config import load_config
from velo.providers.kubernetes import KubernetesProvider

async def main():
    session = await KubernetesProvider().open(load_config(sys.argv[1]))
    try:
        endpoints = await session.endpoints()
    finally:
        await session.close()
    print(json.dumps({"token": session.token, "backends": [e.backend for e in endpoints],
                      "carried": [e.token == session.token for e in endpoints],
                      "reprs": [repr(e) for e in endpoints] + [str(e) for e in endpoints] + [repr(endpoints)]}))

asyncio.run(main())
"""


def test_endpoints_of_a_kubernetes_session_never_show_the_token(cluster, namespace, shop, tmp_path):
    """Both kinds the provider makes: a backend with a url (an Ingress), and port-forward
    through the apiserver (whose Endpoint also carries the kubeconfig's credentials)."""
    config = kube_config(tmp_path / "p", namespace, shop.url, extra="\n[tunnel.port-forward]\n")
    out = subprocess.run([sys.executable, "-c", ENDPOINTS_SCRIPT, str(config)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, KUBE_ENV_KEY: str(cluster.kubeconfig)}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    found = json.loads(out.stdout)
    assert found["backends"] == ["websocket", "port-forward"] and all(found["carried"]), found
    for shown in found["reprs"]:
        assert found["token"] not in shown, shown
