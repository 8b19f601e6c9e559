"""Self-tests of the local cluster harness: control plane, kwok, pod runner, port-forward, RBAC,
the in-cluster network stand-in. They use a tiny stand-in traffic-proxy (an HTTP server embedded
below), not `velo gateway`."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from typing import Any, Callable

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.harness import pid_alive, wait_for

pytestmark = pytest.mark.cluster

TRAFFIC_PROXY_LABELS = {"app.kubernetes.io/component": "velo-traffic-proxy"}

# The stand-in traffic proxy: listens on the port the runner maps containerPort 8080 to.
STANDIN = r'''
import json, os, socket, ssl, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = json.loads(os.environ["VELO_PORT_MAP"])["8080"]
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
class H(BaseHTTPRequestHandler):
    def _send(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        try:
            if u.path == "/":
                return self._send(200, {"pod": os.environ.get("POD_NAME"), "pid": os.getpid()})
            if u.path == "/env":
                return self._send(200, {k: os.environ.get(k) for k in q["names"].split(",")})
            if u.path == "/fetch":
                with direct.open(q["url"], timeout=5) as r:
                    return self._send(200, {"status": r.status, "body": r.read().decode()})
            if u.path == "/tcp":
                with socket.create_connection((q["host"], int(q["port"])), timeout=5) as s:
                    s.sendall(q["data"].encode())
                    s.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                return self._send(200, {"echo": data.decode()})
            if u.path == "/whoami":
                sa = os.environ["VELO_SA_DIR"]
                token = open(os.path.join(sa, "token")).read()
                ctx = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt"))
                host, p = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
                req = urllib.request.Request(
                    f"https://{host}:{p}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
                    data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
                    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
                with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                    return self._send(200, json.load(r))
            self._send(404, {"path": u.path})
        except Exception as e:
            self._send(502, {"error": repr(e)})
    def log_message(self, fmt, *args):
        print(fmt % args, flush=True)
print("stand-in listening on", port, flush=True)
ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
'''

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def until(cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    return wait_for(cond, timeout, what, interval=0.2)


def deployment(name: str, labels: dict[str, str], replicas: int = 1, command: list[str] | None = None,
               ports: list[int] | None = None, env: list[client.V1EnvVar] | None = None,
               sa: str | None = None) -> client.V1Deployment:
    sel = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=sel),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={**sel, **labels}),
                spec=client.V1PodSpec(
                    service_account_name=sa,
                    termination_grace_period_seconds=5,
                    containers=[client.V1Container(
                        name="main", image="registry.invalid/ignored:latest", command=command, env=env,
                        ports=[client.V1ContainerPort(container_port=p) for p in ports or []])]))))


def standin(name: str, replicas: int = 1, extra_env: list[client.V1EnvVar] | None = None,
            labels: dict[str, str] | None = None) -> client.V1Deployment:
    env = [client.V1EnvVar(name="POD_NAME", value_from=client.V1EnvVarSource(
        field_ref=client.V1ObjectFieldSelector(field_path="metadata.name")))] + (extra_env or [])
    return deployment(name, labels or TRAFFIC_PROXY_LABELS, replicas, command=["python3", "-c", STANDIN],
                      ports=[8080], env=env)


def running_pods(cluster: Any, ns: str, app: str, n: int | None = None) -> list[client.V1Pod]:
    pods = [p for p in cluster.core.list_namespaced_pod(ns, label_selector=f"app={app}").items
            if p.status.phase == "Running" and p.status.pod_ip and p.metadata.deletion_timestamp is None]
    if n is not None and len(pods) != n:
        return []
    return pods


def http_get(port: int, path: str = "/", timeout: float = 10) -> dict:
    with DIRECT.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.load(r)


def service_answers(ip: str, port: int, send: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(send)
            return expect in s.recv(4096)
    except OSError:
        return False


class PortForward:
    """`kubectl port-forward pod/NAME :PORT`, local port parsed from its output."""

    def __init__(self, cluster: Any, ns: str, pod: str, port: int):
        self.proc = subprocess.Popen(
            [cluster.kubectl_path, f"--kubeconfig={cluster.kubeconfig}", "-n", ns, "port-forward",
             f"pod/{pod}", f":{port}", "--address=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 30
        seen = []
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(f"kubectl port-forward printed no port: {seen}") from None
            seen.append(line)
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line)
            if m:
                self.local_port = int(m.group(1))
                return

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "PortForward":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()


def get_via_kubectl_port_forward(cluster: Any, ns: str, pod: str, path: str) -> dict:
    with PortForward(cluster, ns, pod, 8080) as pf:
        return until(lambda: http_get(pf.local_port, path), f"GET {path} via kubectl port-forward", 30)


@pytest.fixture(scope="module")
def proxy(cluster, namespace):
    """One running stand-in traffic-proxy pod with its runner process."""
    cluster.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="proxy-secret"), string_data={"token": "s3cret"}))
    cluster.core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="proxy-config"), data={"mode": "fast"}))
    env = [
        client.V1EnvVar(name="LITERAL", value="x-$(POD_NAME)"),
        client.V1EnvVar(name="FROM_SECRET", value_from=client.V1EnvVarSource(
            secret_key_ref=client.V1SecretKeySelector(name="proxy-secret", key="token"))),
        client.V1EnvVar(name="FROM_CM", value_from=client.V1EnvVarSource(
            config_map_key_ref=client.V1ConfigMapKeySelector(name="proxy-config", key="mode"))),
        client.V1EnvVar(name="POD_NS", value_from=client.V1EnvVarSource(
            field_ref=client.V1ObjectFieldSelector(field_path="metadata.namespace"))),
        client.V1EnvVar(name="POD_IP", value_from=client.V1EnvVarSource(
            field_ref=client.V1ObjectFieldSelector(field_path="status.podIP"))),
    ]
    cluster.apps.create_namespaced_deployment(namespace, standin("proxy", extra_env=env))
    pod = until(lambda: running_pods(cluster, namespace, "proxy", 1), "proxy pod Running")[0]
    rec = cluster.wait_pod_process(namespace, pod.metadata.name)
    return {"pod": pod, "name": pod.metadata.name, "record": rec}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_deployment_pod_runs_on_kwok_node(cluster, namespace):
    cluster.apps.create_namespaced_deployment(namespace, deployment("plain", {}))
    pod = until(lambda: running_pods(cluster, namespace, "plain", 1), "Deployment pod Running")[0]
    assert pod.spec.node_name == cluster.node_name
    assert pod.status.pod_ip.startswith("10.244.")
    assert cluster.pod_process(namespace, pod.metadata.name) is None  # not a traffic proxy: kwok only


def test_endpointslice_follows_service_selector(cluster, namespace):
    cluster.apps.create_namespaced_deployment(namespace, deployment("blue", {"color": "blue"}, replicas=1))
    cluster.apps.create_namespaced_deployment(namespace, deployment("green", {"color": "green"}, replicas=2))
    blue = {p.status.pod_ip for p in until(lambda: running_pods(cluster, namespace, "blue", 1), "blue pods")}
    green = {p.status.pod_ip for p in until(lambda: running_pods(cluster, namespace, "green", 2), "green pods")}
    cluster.core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector={"color": "blue"},
                                  ports=[client.V1ServicePort(port=80, target_port=8080)])))

    def slice_ips() -> set[str]:
        slices = cluster.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web").items
        return {a for s in slices for e in (s.endpoints or [])
                if e.conditions is None or e.conditions.ready is not False for a in e.addresses}

    until(lambda: slice_ips() == blue, f"EndpointSlice == blue {blue}")
    cluster.core.patch_namespaced_service("web", namespace, {"spec": {"selector": {"color": "green"}}})
    until(lambda: slice_ips() == green, f"EndpointSlice == green {green}")


def test_runner_process_env_and_service_account(cluster, namespace, proxy):
    rec = proxy["record"]
    assert rec["state"] == "running" and pid_alive(rec["pid"])
    assert set(rec["port_map"]) == {"8080"}
    names = "POD_NAME,LITERAL,FROM_SECRET,FROM_CM,POD_NS,POD_IP,VELO_SA_DIR,KUBERNETES_SERVICE_HOST"
    env = get_via_kubectl_port_forward(cluster, namespace, proxy["name"], f"/env?names={names}")
    assert env["POD_NAME"] == proxy["name"]
    assert env["LITERAL"] == f"x-{proxy['name']}"
    assert env["FROM_SECRET"] == "s3cret" and env["FROM_CM"] == "fast"
    assert env["POD_NS"] == namespace and env["POD_IP"] == proxy["pod"].status.pod_ip
    assert os.path.isfile(os.path.join(env["VELO_SA_DIR"], "token"))
    # the projected token authenticates as the pod's ServiceAccount, through KUBERNETES_SERVICE_*
    who = get_via_kubectl_port_forward(cluster, namespace, proxy["name"], "/whoami")
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:default", who


def test_kubectl_port_forward_reaches_runner_process(cluster, namespace, proxy):
    got = get_via_kubectl_port_forward(cluster, namespace, proxy["name"], "/")
    assert got == {"pod": proxy["name"], "pid": got["pid"]}


def test_python_client_port_forward_reaches_runner_process(cluster, namespace, proxy):
    from kubernetes.stream import portforward

    def fetch() -> dict:
        pf = portforward(cluster.core.connect_get_namespaced_pod_portforward, proxy["name"], namespace,
                         ports="8080")
        try:
            s = pf.socket(8080)
            s.settimeout(10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            buf = b""
            while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < int(
                    re.search(rb"Content-Length: (\d+)", buf).group(1)):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            assert pf.error(8080) is None, pf.error(8080)
            head, body = buf.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
            return json.loads(body)
        finally:
            pf.close()

    assert until(fetch, "GET / via kubernetes.stream.portforward", 30)["pod"] == proxy["name"]


def test_rbac_role_does_not_reach_other_namespace(cluster, namespace):
    other = f"{namespace}-other"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        svc = client.V1Service(metadata=client.V1ObjectMeta(name="target"),
                               spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)]))
        cluster.core.create_namespaced_service(namespace, svc)
        cluster.core.create_namespaced_service(other, svc)
        cluster.core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(name="limited")))
        cluster.rbac.create_namespaced_role(namespace, client.V1Role(
            metadata=client.V1ObjectMeta(name="svc-patch"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["services"], verbs=["get", "patch"])]))
        cluster.rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="svc-patch"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="svc-patch"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="limited", namespace=namespace)]))
        token = cluster.core.create_namespaced_service_account_token("limited", namespace,
                                                                     client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["https://kubernetes.default.svc.cluster.local"]))).status.token
        limited = client.CoreV1Api(cluster.client_for_token(token))
        patch = {"metadata": {"labels": {"patched": "yes"}}}
        until(lambda: limited.patch_namespaced_service("target", namespace, patch), "patch in own namespace", 20)
        with pytest.raises(ApiException) as ei:
            limited.patch_namespaced_service("target", other, patch)
        assert ei.value.status == 403
    finally:
        cluster.core.delete_namespace(other)


def test_pod_delete_kills_process_and_replacement_starts(cluster, namespace):
    # (the runner also accepts the label key velo.dev/traffic-proxy)
    cluster.apps.create_namespaced_deployment(namespace, standin("crashy", labels={"velo.dev/traffic-proxy": "true"}))
    first = until(lambda: running_pods(cluster, namespace, "crashy", 1), "crashy pod Running")[0].metadata.name
    rec = cluster.wait_pod_process(namespace, first)
    # 1. a crash: the runner does not restart the process
    cluster.kill_pod_process(namespace, first)
    exited = cluster.wait_pod_process(namespace, first, timeout=20, state="exited")
    assert exited["exit_code"] == -signal.SIGKILL and not pid_alive(rec["pid"])
    # 2. the test deletes the pod; the ReplicaSet creates a new one, which the runner starts
    cluster.core.delete_namespaced_pod(first, namespace)
    second = until(lambda: [p for p in running_pods(cluster, namespace, "crashy", 1) if p.metadata.name != first],
                   "replacement pod Running")[0].metadata.name
    rec2 = cluster.wait_pod_process(namespace, second)
    assert rec2["pid"] != rec["pid"] and pid_alive(rec2["pid"])
    assert get_via_kubectl_port_forward(cluster, namespace, second, "/")["pod"] == second
    # 3. deleting a pod kills its (running) process
    cluster.core.delete_namespaced_pod(second, namespace)
    until(lambda: not pid_alive(rec2["pid"]), "process of deleted pod gone", 30)
    until(lambda: (cluster.pod_process(namespace, second) or {}).get("state") == "stopped", "record stopped", 30)


def test_in_cluster_services_only_reachable_from_runner_processes(cluster, namespace, proxy):
    cluster.require_netns()
    web = cluster.start_in_cluster_service("echo-http", namespace, kind="http", port=80)
    tcp = cluster.start_in_cluster_service("echo-tcp", namespace, kind="tcp-echo", port=7000)
    try:
        # the test process: names do not resolve, ClusterIPs do not answer
        for host in ("echo-http", f"echo-http.{namespace}", f"echo-http.{namespace}.svc.cluster.local"):
            with pytest.raises(OSError):
                socket.getaddrinfo(host, 80)
        # (a sandbox's default route may accept any TCP connect, so check for an actual answer)
        assert not service_answers(web["ip"], web["port"], b"GET / HTTP/1.0\r\n\r\n", b"echo-http")
        assert not service_answers(tcp["ip"], tcp["port"], b"ping", b"ping")
        # a runner process: all three DNS forms answer (hosts file may lag the Service by a moment)
        with PortForward(cluster, namespace, proxy["name"], 8080) as pf:
            for host in ("echo-http", f"echo-http.{namespace}", f"echo-http.{namespace}.svc.cluster.local"):
                got = until(lambda host=host: http_get(pf.local_port, f"/fetch?url=http://{host}/hello"), f"fetch {host}", 30)
                assert got["status"] == 200, got
                assert json.loads(got["body"])["service"] == f"{namespace}/echo-http"
            echo = http_get(pf.local_port, f"/tcp?host=echo-tcp.{namespace}.svc.cluster.local&port=7000&data=ping")
            assert echo == {"echo": "ping"}
    finally:
        cluster.stop_in_cluster_service("echo-http", namespace)
        cluster.stop_in_cluster_service("echo-tcp", namespace)
