"""Each intercepted Service port has a path of its own, and only what velo can carry is
redirected: two candidates on targetPort 8080, a multi-port Service with a local port per
Service port, and candidates velo must refuse before it creates anything."""

from __future__ import annotations

import json
import signal

import pytest
from kubernetes import client

from tests.helpers import http_get, wait_for
from tests.kube.ingress import request_via_service
from tests.kube.shop import kube_config, kube_up, velo, velo_objects
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster


def request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


@pytest.fixture(scope="module")
def apps(cluster, namespace, shop):
    """Services shaped like teammates' real ones (no pods needed: velo replaces their endpoints)."""
    def svc(name: str, ports, **spec):
        cluster.core.create_namespaced_service(namespace, client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(ports=ports, **spec)))

    svc("cart", [client.V1ServicePort(name="http", port=80, target_port=8080)], selector={"app": "cart"})
    svc("orders", [client.V1ServicePort(name="http", port=80, target_port=8080)], selector={"app": "orders"})
    svc("multi", [client.V1ServicePort(name="http", port=80, target_port=8080),
                  client.V1ServicePort(name="alt", port=81, target_port=8080)], selector={"app": "multi"})
    svc("resolver", [client.V1ServicePort(name="dns-tcp", port=53, protocol="TCP"),
                     client.V1ServicePort(name="dns", port=53, protocol="UDP")], selector={"app": "resolver"})
    svc("manual", [client.V1ServicePort(port=80)])
    svc("web80", [client.V1ServicePort(name="http", port=80, target_port=80)], selector={"app": "web80"})
    svc("alias", [client.V1ServicePort(port=443)], type="ExternalName", external_name="example.org")
    return shop


def local(name: str, **keys) -> str:
    body = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}" for k, v in keys.items())
    return f"\n[local.{name}]\n{body}\n"


def _inline(table: dict) -> str:
    return "{ " + ", ".join(f"{k} = {v}" for k, v in table.items()) + " }"


def spec_ports(cluster, namespace: str, name: str) -> list:
    return [(p.name, p.port, p.target_port) for p in cluster.core.read_namespaced_service(name, namespace).spec.ports]


def test_two_candidates_on_the_same_target_port_each_get_their_own_traffic(cluster, namespace, apps, procs, tmp_path):
    cart = procs.server("http", text="cart on the laptop")
    orders = procs.server("http", text="orders on the laptop")
    before = {name: spec_ports(cluster, namespace, name) for name in ("cart", "orders")}
    config = kube_config(tmp_path / "p", namespace, apps.url, exclude='"*"',
                         extra=local("cart", port=cart) + local("orders", port=orders))
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    for name, text in (("cart", b"cart on the laptop"), ("orders", b"orders on the laptop")):
        answer = wait_for(lambda: request_via_service(cluster, namespace, name, 80, request(name)), 20,
                          f"a request to the Service {name}:80")
        assert answer.endswith(text), (name, answer)
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert {name: spec_ports(cluster, namespace, name) for name in ("cart", "orders")} == before


def test_each_port_of_a_multi_port_service_reaches_its_own_local_port(cluster, namespace, apps, procs, tmp_path):
    http = procs.server("http", text="multi http")
    alt = procs.server("http", text="multi alt")
    before = spec_ports(cluster, namespace, "multi")
    config = kube_config(tmp_path / "p", namespace, apps.url, exclude='"*"',
                         extra=local("multi", ports={"http": http, "alt": alt}))
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    for port, text in ((80, b"multi http"), (81, b"multi alt")):
        answer = wait_for(lambda: request_via_service(cluster, namespace, "multi", port, request("multi")), 20,
                          f"a request to the Service multi:{port}")
        assert answer.endswith(text), (port, answer)
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert spec_ports(cluster, namespace, "multi") == before
    svc = cluster.core.read_namespaced_service("multi", namespace)
    assert not any(k.startswith("velo.dev/") for k in (svc.metadata.annotations or {}))


@pytest.mark.parametrize("name, keys, why", [
    ("resolver", {"port": 3000}, "Service resolver has a UDP port dns: intercepting it would move that traffic too, "
                                 "and velo carries TCP only"),
    ("manual", {"port": 3000}, "Service manual has no selector (its endpoints are managed by hand)"),
    ("alias", {"port": 3000}, "Service alias is an ExternalName alias for example.org: it has no pods"),
    ("multi", {"ports": {"http": 3000}}, "Service multi port alt has no entry in local.multi.ports: a selector "
                                         "swap moves every port of the Service"),
])
def test_a_candidate_velo_cannot_carry_is_refused_before_anything_is_created(cluster, namespace, apps, tmp_path,
                                                                             name, keys, why):
    before = cluster.core.read_namespaced_service(name, namespace).metadata.resource_version
    config = kube_config(tmp_path / "p", namespace, apps.url, exclude='"*"', extra=local(name, **keys))
    for command in (["config", "check"], ["up"]):
        result = velo(*command, cwd=config.parent, kubeconfig=cluster.kubeconfig, timeout=90)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert f"[local.{name}]: {why}" in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr and "now sends its traffic" not in result.stdout
        assert not velo_objects(cluster, namespace), "nothing may be created for a refused candidate"
    assert cluster.core.read_namespaced_service(name, namespace).metadata.resource_version == before
    assert ix.ANN_SESSION not in (cluster.core.read_namespaced_service(name, namespace).metadata.annotations or {})


def test_an_external_name_service_is_forwarded_end_to_end(cluster, namespace, apps, procs, tmp_path):
    """An ExternalName alias (here for a Service of another namespace, as a migration would
    leave it) is part of what the traffic-proxy may dial."""
    other = f"{namespace}-legacy"[:63]
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other,
                                                                                  labels={"velo.dev/test": "true"})))
    try:
        cluster.start_in_cluster_service("billing", other, kind="http", port=80)
        cluster.core.create_namespaced_service(namespace, client.V1Service(
            metadata=client.V1ObjectMeta(name="billing"),
            spec=client.V1ServiceSpec(type="ExternalName", external_name=f"billing.{other}.svc.cluster.local",
                                      ports=[client.V1ServicePort(port=80)])))
        laptop = procs.server("http", text="laptop")
        config = kube_config(tmp_path / "p", namespace, apps.url, exclude='"ext"', extra=local("cart", port=laptop))
        up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
        answer = http_get(up.port("billing"))
        assert answer.startswith(b"HTTP/1.0 200") and f"{other}/billing".encode() in answer, answer
        up.proc.signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
    finally:
        cluster.core.delete_namespaced_service("billing", namespace)
        cluster.stop_in_cluster_service("billing", other)
        cluster.core.delete_namespace(other)


def test_env_expands_service_links_to_the_local_listeners_and_prints_warnings(cluster, namespace, apps, tmp_path):
    cluster.apps.create_namespaced_deployment(namespace, client.V1Deployment(
        metadata=client.V1ObjectMeta(name="cart"),
        spec=client.V1DeploymentSpec(
            replicas=0, selector=client.V1LabelSelector(match_labels={"app": "cart"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "cart"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="cart", image="cart:dev", env=[
                    client.V1EnvVar(name="BACKEND", value="http://$(BACKEND_SERVICE_HOST):$(BACKEND_SERVICE_PORT)/x"),
                    client.V1EnvVar(name="LATER", value="$(NOT_DEFINED_ANYWHERE)"),
                ])])))))
    try:
        config = kube_config(tmp_path / "p", namespace, apps.url, extra=local("cart", port=3000))
        result = velo("env", "--format", "json", cwd=config.parent, kubeconfig=cluster.kubeconfig)
        assert result.returncode == 0, result.stderr
        env = json.loads(result.stdout)
        assert env["BACKEND"] == f"http://127.0.0.1:{env['BACKEND_SERVICE_PORT']}/x"
        assert env["LATER"] == "$(NOT_DEFINED_ANYWHERE)", "kept as written, like the kubelet"
        assert "[local.cart] env: LATER: $(NOT_DEFINED_ANYWHERE) is not defined before LATER" in result.stderr
        assert result.stderr.count("[local.cart] env:") == 1, result.stderr  # once, not per re-discovery
    finally:
        cluster.apps.delete_namespaced_deployment("cart", namespace)


def test_a_target_port_below_1024_works_for_the_non_root_proxy(cluster, namespace, apps, procs, tmp_path):
    laptop = procs.server("http", text="port 80 on the laptop")
    config = kube_config(tmp_path / "p", namespace, apps.url, exclude='"*"', extra=local("web80", port=laptop))
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    answer = wait_for(lambda: request_via_service(cluster, namespace, "web80", 80, request("web80")), 20,
                      "a request to the Service web80:80")
    assert answer.endswith(b"port 80 on the laptop")
    pod = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_COMPONENT}={ix.COMPONENT}").items[0]
    container = pod.spec.containers[0]
    assert all(p.container_port >= 1024 for p in container.ports), "a non-root process cannot bind below 1024"
    assert pod.spec.security_context.run_as_non_root and not container.security_context.allow_privilege_escalation
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert spec_ports(cluster, namespace, "web80") == [("http", 80, 80)]
