"""`velo up` against the real local control plane: discovery, env, forward, reverse,
restore (also after kill -9), concurrent edits, a second session, RBAC and errors.

Everything in-cluster lives in the harness's network namespace: the test process
cannot reach `backend` or `cache` itself, so a passing forward test proves the bytes
went through velo's tunnel and traffic-proxy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from kubernetes import client

from tests.helpers import http_get, wait_for
from tests.kube.ingress import request_via_service
from tests.kube.shop import comparable, endpoint_pods, kube_config, kube_up, service, velo, via_pod
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster


def test_discovery_and_env_without_touching_the_cluster(cluster, namespace, shop, tmp_path):
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=18080)
    check = velo("config", "check", cwd=config.parent, kubeconfig=cluster.kubeconfig)
    assert check.returncode == 0, check.stderr
    out = check.stdout
    for forward in ("backend ", "cache ", "api/http ", "api/grpc ", "db ", "ext "):
        assert f"forward {forward}" in out, out
    assert f"-> backend.{namespace}.svc.cluster.local:80" in out
    assert "-> example.org:443" in out
    assert "forward website" not in out and "forward dns" not in out
    assert "reverse website " in out and "-> 127.0.0.1:18080" in out
    env = json.loads(velo("env", "--format", "json", cwd=config.parent, kubeconfig=cluster.kubeconfig).stdout)
    assert env["MODE"] == "cluster" and env["CFG_FEATURE"] == "on" and env["MY_NAMESPACE"] == namespace
    assert env["DB_PASSWORD"] == "********", "secrets are masked unless asked"
    revealed = json.loads(velo("env", "--format", "json", "--reveal", cwd=config.parent, kubeconfig=cluster.kubeconfig).stdout)
    assert revealed["DB_PASSWORD"] == "s3cret"
    assert env["BACKEND_SERVICE_HOST"] == "127.0.0.1"
    assert env["BACKEND_PORT_80_TCP_ADDR"] == "127.0.0.1"
    assert env["API_SERVICE_PORT_GRPC"] == env["API_PORT_9090_TCP_PORT"]
    assert not cluster.apps.list_namespaced_deployment(namespace, label_selector="app.kubernetes.io/managed-by=velo").items


def test_up_forwards_intercepts_and_down_restores(cluster, namespace, shop, procs, tmp_path):
    original = comparable(service(cluster, namespace))
    original_pods = endpoint_pods(cluster, namespace, "website")
    laptop = procs.server("http", text="hello from the laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})

    # Forward: through the tunnel to services the test process cannot reach itself.
    body = http_get(up.port("backend"))
    assert body.startswith(b"HTTP/1.0 200") and f"{namespace}/backend".encode() in body
    with socket.create_connection(("127.0.0.1", up.port("cache")), timeout=10) as sock:
        sock.sendall(b"ping-through-velo")
        assert sock.recv(100) == b"ping-through-velo"
    env = up.env()
    assert env["BACKEND_SERVICE_PORT"] == str(up.port("backend"))
    assert oct(os.stat(config.parent / ".env").st_mode & 0o777) == "0o600"

    # Reverse: the Service now selects the traffic-proxy, and the cluster's path reaches the laptop.
    svc = service(cluster, namespace)
    assert svc.spec.selector[ix.LABEL_COMPONENT] == ix.COMPONENT
    assert json.loads(svc.metadata.annotations[ix.ANN_ORIGINAL]) == {"app": "website"}
    session = svc.metadata.annotations[ix.ANN_SESSION]
    proxy_pod = wait_for(lambda: next(iter(endpoint_pods(cluster, namespace, "website") - original_pods), None),
                         30, "website's EndpointSlice to point at the traffic-proxy")
    assert "velo-proxy" in proxy_pod
    request = b"GET / HTTP/1.1\r\nHost: website\r\nConnection: close\r\n\r\n"
    # The targetPort ("http") points at this intercept's own traffic-proxy port meanwhile.
    proxy_port = svc.spec.ports[0].target_port
    assert isinstance(proxy_port, int) and proxy_port != 8080
    assert json.loads(svc.metadata.annotations[ix.ANN_PORTS]) == [{"port": 80, "targetPort": "http", "proxy": proxy_port}]
    answer = wait_for(lambda: via_pod(cluster, namespace, proxy_pod, proxy_port, request),
                      15, "a request through the traffic-proxy pod's port-forward")
    assert answer.endswith(b"hello from the laptop")
    # And the way other pods (or an Ingress) reach it: Service -> EndpointSlice -> pod.
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, request),
                      15, "a request to the Service website:80")
    assert answer.endswith(b"hello from the laptop")

    result = velo("down", cwd=config.parent, kubeconfig=cluster.kubeconfig, timeout=90)
    assert result.returncode == 0, result.stderr
    assert up.proc.wait(30) == 0
    assert comparable(service(cluster, namespace)) == original
    wait_for(lambda: endpoint_pods(cluster, namespace, "website") == original_pods, 30, "EndpointSlice back on the original pods")
    # The Service routes to the original pods again (kwok pods: no process answers for them here).
    wait_for(lambda: request_via_service(cluster, namespace, "website", 80, request) is None, 15,
             "the Service to stop routing to the traffic-proxy")
    selector = f"{ix.LABEL_SESSION}={session}"
    wait_for(lambda: not cluster.apps.list_namespaced_deployment(namespace, label_selector=selector).items
             and not cluster.core.list_namespaced_secret(namespace, label_selector=selector).items
             and not cluster.rbac.list_namespaced_role(namespace, label_selector=selector).items, 30,
             "the session's objects to be gone")


def test_kill_9_is_repaired_by_the_cluster_within_the_lease(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=5)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert service(cluster, namespace).spec.selector.get(ix.LABEL_COMPONENT) == ix.COMPONENT
    up.proc.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: service(cluster, namespace).spec.selector == {"app": "website"}, 5 + 10,
             "the traffic-proxy to restore the selector after the lease lapsed")
    elapsed = time.monotonic() - killed
    assert ix.ANN_SESSION not in (service(cluster, namespace).metadata.annotations or {})
    wait_for(lambda: not cluster.apps.list_namespaced_deployment(
        namespace, label_selector="app.kubernetes.io/managed-by=velo").items, 30, "the session's Deployment to be gone")
    print(f"selector restored {elapsed:.1f}s after kill -9 (lease 5s)")


def test_concurrent_edit_survives_restore(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    cluster.core.patch_namespaced_service("website", namespace, {
        "metadata": {"labels": {"team": "checkout"}, "annotations": {"note": "edited during intercept"}}})
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    svc = service(cluster, namespace)
    assert svc.spec.selector == {"app": "website"}
    assert svc.metadata.labels["team"] == "checkout"
    assert svc.metadata.annotations["note"] == "edited during intercept"
    assert not any(k.startswith("velo.dev/") for k in svc.metadata.annotations)
    cluster.core.patch_namespaced_service("website", namespace, [
        {"op": "remove", "path": "/metadata/labels/team"}, {"op": "remove", "path": "/metadata/annotations/note"}])


def test_second_session_is_refused_with_the_holders_name(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="laptop")
    first = kube_config(tmp_path / "first", namespace, shop.url, candidate_port=laptop)
    up = kube_up(procs, first, env={"KUBECONFIG": str(cluster.kubeconfig)})
    # The second developer's laptop; on this one machine it must not bind the first one's ports.
    second = kube_config(tmp_path / "second", namespace, shop.url, candidate_port=laptop, exclude='"*"')
    result = velo("up", cwd=second.parent, kubeconfig=cluster.kubeconfig, timeout=90)
    assert result.returncode == 2
    assert "Service website is already intercepted by" in result.stderr and "since" in result.stderr
    assert "Traceback" not in result.stderr
    assert service(cluster, namespace).spec.selector.get(ix.LABEL_COMPONENT) == ix.COMPONENT, "the first holder keeps it"
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0


def test_services_appearing_while_up_runs_get_listeners(cluster, namespace, shop, procs, tmp_path):
    config = kube_config(tmp_path / "p", namespace, shop.url)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    cluster.start_in_cluster_service("late", namespace, kind="http", port=80)
    try:
        port = wait_for(lambda: up.port("late"), 15, "a listener for the new Service")
        assert b"late" in http_get(port)
    finally:
        cluster.stop_in_cluster_service("late", namespace)
    wait_for(lambda: "late" not in {f["name"] for f in up.status()["forwards"]}, 15, "the listener to go with the Service")


def test_missing_permission_names_verb_and_resource(cluster, namespace, shop, tmp_path):
    cluster.core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody")))
    token = cluster.core.create_namespaced_service_account_token(
        "nobody", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))).status.token
    kubeconfig = tmp_path / "kubeconfig"
    server = cluster.core.api_client.configuration.host
    ca = cluster.core.api_client.configuration.ssl_ca_cert
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "nobody",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "nobody", "user": {"token": token}}],
        "contexts": [{"name": "nobody", "context": {"cluster": "c", "user": "nobody", "namespace": namespace}}]}))
    config = kube_config(tmp_path / "p", namespace, shop.url)
    result = velo("env", cwd=config.parent, kubeconfig=kubeconfig)
    assert result.returncode == 2
    assert "permission denied" in result.stderr and 'cannot list resource "services"' in result.stderr
    assert "velo rbac" in result.stderr and "Traceback" not in result.stderr
    rbac = velo("rbac", cwd=config.parent, kubeconfig=kubeconfig)
    assert rbac.returncode == 0 and "kind: Role" in rbac.stdout and f"namespace: {namespace}" in rbac.stdout


def test_connection_errors_are_one_clear_line(cluster, namespace, shop, tmp_path):
    config = kube_config(tmp_path / "p", namespace, shop.url)
    missing = velo("env", cwd=config.parent, kubeconfig=tmp_path / "nope")
    assert missing.returncode == 2 and "kubeconfig" in missing.stderr and "Traceback" not in missing.stderr
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{dead_port}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "c", "user": "u"}}]}))
    unreachable = velo("env", cwd=config.parent, kubeconfig=dead)
    assert unreachable.returncode == 2
    assert f"cluster unreachable at https://127.0.0.1:{dead_port}" in unreachable.stderr
    no_ns = kube_config(tmp_path / "q", "no-such-namespace", shop.url)
    result = velo("env", cwd=no_ns.parent, kubeconfig=cluster.kubeconfig)
    assert result.returncode == 2 and "namespace no-such-namespace does not exist" in result.stderr
    typo = kube_config(tmp_path / "r", namespace, shop.url, extra="\n[local.webste]\nport = 3000\n")
    result = velo("env", cwd=typo.parent, kubeconfig=cluster.kubeconfig)
    assert result.returncode == 2 and "no Service webste" in result.stderr and "did you mean website" in result.stderr


def test_velo_down_repairs_what_a_double_crash_left(cluster, namespace, shop, procs, tmp_path):
    """Laptop killed AND its traffic-proxy killed: nothing in the cluster can undo it, so
    the next `velo down` must."""
    laptop = procs.server("http", text="laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    session = service(cluster, namespace).metadata.annotations[ix.ANN_SESSION]
    proxy = cluster.apps.list_namespaced_deployment(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items
    pod = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items[0]
    cluster.kill_pod_process(namespace, pod.metadata.name)
    up.proc.signal(signal.SIGKILL)
    up.proc.wait(10)
    assert proxy and service(cluster, namespace).metadata.annotations.get(ix.ANN_SESSION) == session
    result = velo("down", "--all", cwd=config.parent, kubeconfig=cluster.kubeconfig, timeout=90)
    assert result.returncode == 0, result.stderr
    assert f"cleaned up session {session} (restored website)" in result.stdout
    assert service(cluster, namespace).spec.selector == {"app": "website"}
    wait_for(lambda: not cluster.apps.list_namespaced_deployment(
        namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items, 30, "the session's Deployment to be gone")


def test_rejected_credentials_and_ambiguous_workloads(cluster, namespace, shop, tmp_path):
    server = cluster.core.api_client.configuration.host
    bogus = tmp_path / "bogus-kubeconfig"
    bogus.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "bogus",
        "clusters": [{"name": "c", "cluster": {"server": server,
                                               "certificate-authority": cluster.core.api_client.configuration.ssl_ca_cert}}],
        "users": [{"name": "u", "user": {"token": "not-a-valid-token"}}],
        "contexts": [{"name": "bogus", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
    config = kube_config(tmp_path / "p", namespace, shop.url)
    result = velo("env", cwd=config.parent, kubeconfig=bogus)
    assert result.returncode == 2 and f"{server}: credentials rejected" in result.stderr

    twin = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="website-canary"),
        spec=client.V1DeploymentSpec(
            replicas=0, selector=client.V1LabelSelector(match_labels={"app": "website", "track": "canary"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "website", "track": "canary"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="website:canary")]))))
    cluster.apps.create_namespaced_deployment(namespace, twin)
    try:
        config = kube_config(tmp_path / "q", namespace, shop.url, candidate_port=3000)
        result = velo("env", cwd=config.parent, kubeconfig=cluster.kubeconfig)
        assert result.returncode == 2
        assert "deployment/website" in result.stderr and "deployment/website-canary" in result.stderr
        assert 'local.website.workload = "<kind>/<name>"' in result.stderr
        pinned = kube_config(tmp_path / "r", namespace, shop.url, candidate_port=3000,
                             extra='workload = "deployment/website"\n')
        result = velo("env", "--format", "json", cwd=pinned.parent, kubeconfig=cluster.kubeconfig)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["MODE"] == "cluster"
    finally:
        cluster.apps.delete_namespaced_deployment("website-canary", namespace)


def test_tunnel_follows_a_traffic_proxy_pod_restart(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="laptop after restart")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    session = service(cluster, namespace).metadata.annotations[ix.ANN_SESSION]
    selector = f"{ix.LABEL_SESSION}={session}"
    old = cluster.core.list_namespaced_pod(namespace, label_selector=selector).items[0].metadata.name
    cluster.kill_pod_process(namespace, old)          # the traffic-proxy crashes...
    up.wait_state("reconnecting")
    # Meanwhile the Service has no route to the laptop, and velo says so.
    assert [r["state"] for r in up.status()["reverses"]] == ["no route: tunnel down"]
    up.proc.wait_log("no route to this laptop for website until the tunnel is back")
    cluster.core.delete_namespaced_pod(old, namespace, grace_period_seconds=0)  # ...and is replaced
    up.wait_state("up", timeout=60)
    new = cluster.core.list_namespaced_pod(namespace, label_selector=selector).items
    assert new and all(p.metadata.name != old for p in new)
    assert f"{namespace}/backend".encode() in http_get(up.port("backend"))
    request = b"GET / HTTP/1.1\r\nHost: website\r\nConnection: close\r\n\r\n"
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, request), 20,
                      "the Service to reach the laptop through the new traffic-proxy pod")
    assert answer.endswith(b"laptop after restart")
    assert up.status()["tunnel"]["reconnects"] >= 1
    assert [r["state"] for r in up.status()["reverses"]] == ["listening"]


def test_next_velo_up_repairs_a_lapsed_session(cluster, namespace, shop, procs, tmp_path):
    laptop = procs.server("http", text="second run")
    first = kube_config(tmp_path / "first", namespace, shop.url, candidate_port=laptop, lease=5, exclude='"*"')
    up = kube_up(procs, first, env={"KUBECONFIG": str(cluster.kubeconfig)})
    session = service(cluster, namespace).metadata.annotations[ix.ANN_SESSION]
    pod = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items[0]
    cluster.kill_pod_process(namespace, pod.metadata.name)  # nothing in the cluster can undo it now
    up.proc.signal(signal.SIGKILL)
    up.proc.wait(10)
    lease = client.CoordinationV1Api(cluster.core.api_client).read_namespaced_lease(ix.lease_name(session), namespace)
    wait_for(lambda: ix.lease_expired(lease), 15, "the crashed session's lease to lapse")
    second = kube_config(tmp_path / "second", namespace, shop.url, candidate_port=laptop, exclude='"*"')
    again = kube_up(procs, second, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert f"cleaned up session {session} (restored website)" in again.proc.log()
    svc = service(cluster, namespace)
    assert svc.metadata.annotations[ix.ANN_SESSION] != session
    assert json.loads(svc.metadata.annotations[ix.ANN_ORIGINAL]) == {"app": "website"}
    again.proc.signal(signal.SIGTERM)
    assert again.proc.wait(60) == 0
    assert service(cluster, namespace).spec.selector == {"app": "website"}
