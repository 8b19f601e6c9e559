"""What the kubernetes tests share: a namespace shaped like a small application, the
`velo` command, and helpers that look at the cluster the way a user would."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path

from kubernetes import client
from kubernetes.stream import portforward

from tests.helpers import wait_for
from tests.kube.ingress import Ingress

def velo(*args, cwd, kubeconfig, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "KUBECONFIG": str(kubeconfig)})


def kube_config(path, namespace: str, url: str, *, candidate_port: int | None = None, lease: int = 30,
                extra: str = "", exclude: str = '"dns"', ready_timeout: float = 60, cluster_extra: str = "",
                project: str | None = None):
    """A kubernetes project in folder ``path``.  Its name (which the derived local ports come
    from) is the folder's own unless given: two `velo up` on one machine, in this run or
    another, never want the same ports; rewriting the same folder's config keeps it."""
    import zlib

    name = project or f"shop-{zlib.crc32(str(Path(path).resolve()).encode()):08x}"
    text = f"""
[project]
name = "{name}"

[cluster]
provider = "kubernetes"
namespace = "{namespace}"
lease_seconds = {lease}
ready_timeout = {ready_timeout}
{cluster_extra}
[tunnel]
reconnect_max_delay = 0.5
keepalive_interval = 1.0
keepalive_timeout = 3.0

[tunnel.websocket]
url = "{url}"

[remote]
exclude = [{exclude}]
"""
    if candidate_port:
        text += f"\n[local.website]\nport = {candidate_port}\n"
    path.mkdir(parents=True, exist_ok=True)
    (path / "velocity.toml").write_text(text + extra)
    return path / "velocity.toml"


def make_shop(cluster, namespace):
    """A namespace shaped like a small application."""
    cluster.require_netns()
    core, apps = cluster.core, cluster.apps
    cluster.start_in_cluster_service("backend", namespace, kind="http", port=80)
    cluster.start_in_cluster_service("cache", namespace, kind="tcp-echo", port=6379)
    V1 = client
    core.create_namespaced_service(namespace, V1.V1Service(
        metadata=V1.V1ObjectMeta(name="api"),
        spec=V1.V1ServiceSpec(selector={"app": "api"}, ports=[
            V1.V1ServicePort(name="http", port=80, target_port="web"),
            V1.V1ServicePort(name="grpc", port=9090, target_port=9090)])))
    core.create_namespaced_service(namespace, V1.V1Service(
        metadata=V1.V1ObjectMeta(name="dns"),
        spec=V1.V1ServiceSpec(selector={"app": "dns"}, ports=[V1.V1ServicePort(name="dns", port=53, protocol="UDP")])))
    core.create_namespaced_service(namespace, V1.V1Service(
        metadata=V1.V1ObjectMeta(name="db"),
        spec=V1.V1ServiceSpec(cluster_ip="None", selector={"app": "db"}, ports=[V1.V1ServicePort(port=5432, target_port=5432)])))
    core.create_namespaced_service(namespace, V1.V1Service(
        metadata=V1.V1ObjectMeta(name="ext"),
        spec=V1.V1ServiceSpec(type="ExternalName", external_name="example.org", ports=[V1.V1ServicePort(port=443)])))
    core.create_namespaced_config_map(namespace, V1.V1ConfigMap(
        metadata=V1.V1ObjectMeta(name="website-config"), data={"FEATURE": "on", "GREETING": "hi"}))
    core.create_namespaced_secret(namespace, V1.V1Secret(
        metadata=V1.V1ObjectMeta(name="website-secret"),
        data={"password": base64.b64encode(b"s3cret").decode()}))
    apps.create_namespaced_deployment(namespace, V1.V1Deployment(
        metadata=V1.V1ObjectMeta(name="website"),
        spec=V1.V1DeploymentSpec(
            replicas=1, selector=V1.V1LabelSelector(match_labels={"app": "website"}),
            template=V1.V1PodTemplateSpec(
                metadata=V1.V1ObjectMeta(labels={"app": "website", "tier": "web"}),
                spec=V1.V1PodSpec(containers=[V1.V1Container(
                    name="web", image="website:dev", ports=[V1.V1ContainerPort(name="http", container_port=8080)],
                    env_from=[V1.V1EnvFromSource(config_map_ref=V1.V1ConfigMapEnvSource(name="website-config"), prefix="CFG_")],
                    env=[
                        V1.V1EnvVar(name="MODE", value="cluster"),
                        V1.V1EnvVar(name="DB_PASSWORD", value_from=V1.V1EnvVarSource(
                            secret_key_ref=V1.V1SecretKeySelector(name="website-secret", key="password"))),
                        V1.V1EnvVar(name="MY_NAMESPACE", value_from=V1.V1EnvVarSource(
                            field_ref=V1.V1ObjectFieldSelector(field_path="metadata.namespace"))),
                    ])])))))
    core.create_namespaced_service(namespace, V1.V1Service(
        metadata=V1.V1ObjectMeta(name="website", labels={"app": "website"}),
        spec=V1.V1ServiceSpec(selector={"app": "website"}, ports=[V1.V1ServicePort(name="http", port=80, target_port="http")])))
    wait_for(lambda: endpoint_pods(cluster, namespace, "website"), 60, "website's EndpointSlice to list its pod")
    ingress = Ingress(cluster, namespace)
    yield ingress
    ingress.close()


def endpoint_pods(cluster, namespace: str, service: str) -> set[str]:
    slices = client.DiscoveryV1Api(cluster.core.api_client).list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}").items
    return {e.target_ref.name for s in slices for e in (s.endpoints or []) if e.target_ref}


def via_pod(cluster, namespace: str, pod: str, port: int, payload: bytes) -> bytes:
    """Connect to a pod's port the way the cluster would: through the apiserver's port-forward."""
    try:
        forward = portforward(cluster.core.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port))
    except client.ApiException as exc:
        raise AssertionError(f"port-forward to {pod}:{port}: {exc.status} {exc.reason} {exc.body}") from None
    sock = forward.socket(port)
    sock.settimeout(10)
    sock.sendall(payload)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"laptop"):
                break
    except (TimeoutError, socket.timeout):
        pass
    sock.close()
    forward.close()
    return data


def service(cluster, namespace: str, name: str = "website"):
    return cluster.core.read_namespaced_service(name, namespace)


def comparable(svc) -> dict:
    data = client.ApiClient().sanitize_for_serialization(svc)
    for key in ("resourceVersion", "managedFields"):
        data["metadata"].pop(key, None)
    return data




def kubeconfig_variant(source, dest, *, server: str | None = None, insecure: bool = False):
    """A copy of a kubeconfig with another server URL, or without TLS verification (for a
    process whose clock is so far off that the test CA's certificates look not yet valid)."""
    import json

    import yaml

    data = yaml.safe_load(open(source).read())
    for entry in data["clusters"]:
        if server:
            entry["cluster"]["server"] = server
        if insecure:
            entry["cluster"].pop("certificate-authority-data", None)
            entry["cluster"].pop("certificate-authority", None)
            entry["cluster"]["insecure-skip-tls-verify"] = True
    dest.write_text(json.dumps(data))
    return dest


def coordination(cluster) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(cluster.core.api_client)


def velo_objects(cluster, namespace: str) -> list[str]:
    """Every object of any velo session left in the namespace."""
    selector = "app.kubernetes.io/managed-by=velo"
    found = []
    for kind, lister in (("lease", coordination(cluster).list_namespaced_lease),
                         ("deployment", cluster.apps.list_namespaced_deployment),
                         ("secret", cluster.core.list_namespaced_secret),
                         ("serviceaccount", cluster.core.list_namespaced_service_account),
                         ("role", cluster.rbac.list_namespaced_role),
                         ("rolebinding", cluster.rbac.list_namespaced_role_binding)):
        found += [f"{kind}/{o.metadata.name}" for o in lister(namespace, label_selector=selector).items]
    return found


def kube_up(procs, config, env: dict, timeout: float = 90):
    """`velo up` started and finished starting: the traffic-proxy ready, the tunnel up and
    the candidates intercepted (it prints "running" only after that)."""
    up = procs.up(config, env=env, wait_up=False)
    up.proc.wait_log("velo: running; Ctrl-C stops", timeout=timeout)
    up.wait_state("up", timeout=timeout)  # without candidates, "running" does not wait for the tunnel
    return up
