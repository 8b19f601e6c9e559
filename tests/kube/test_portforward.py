"""The port-forward backend against the real local control plane (kwok serves
pods/portforward through its PortForward objects, which the pod runner registers).

No Ingress relay is involved here: the only way from the test process to the
traffic-proxy is the apiserver's pods/portforward, and the in-cluster services are in
the harness's network namespace, unreachable from the test process.

The second half: ``[tunnel.port-forward] pod`` with the static provider (a gateway the
user runs in a pod of their own), its configuration checks, and how a pod that is
missing, not ready or forbidden shows, and is followed once it is fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from kubernetes import client

from tests.helpers import KwokPod, free_port, http_get, wait_for, write_config
from velo.config import ConfigError, parse_config
from velo.providers.kubernetes import rbac_role
from tests.kube.ingress import request_via_service
from tests.kube.shop import service
from velo.providers.kubernetes import intercept as ix

cluster_test = pytest.mark.cluster


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


@cluster_test
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


@cluster_test
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


@cluster_test
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


# ---------------------------------------------------------------- [tunnel.port-forward] pod, any provider

def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("velocity.toml"))
    return info.value.messages


STATIC = '[project]\nname = "pf"\n[tunnel]\ntoken = "t"\n[remote.services.web]\ntarget = "127.0.0.1:80"\n'


def test_the_table_is_checked_at_its_keys():
    assert _errors(STATIC + '[tunnel.port-forward]\npod = "Gateway_0"\nport = 0\nnamespce = "x"\n') == [
        "velocity.toml: tunnel.port-forward.pod: expected a Kubernetes pod name (lowercase letters, digits "
        "and '-', at most 253 characters), got \"Gateway_0\"",
        "velocity.toml: tunnel.port-forward.port: expected an integer 1-65535, got 0",
        'velocity.toml: tunnel.port-forward.namespce: unknown key; did you mean "namespace"?',
    ]
    # the static provider has nothing to discover: the table must name the pod
    assert _errors(STATIC + '[tunnel.port-forward]\nnamespace = "shop"\n') == [
        'velocity.toml: tunnel.prefer: "port-forward" names no pod; write [tunnel.port-forward] pod = "NAME" '
        "(the pod whose gateway listens on port-forward://)",
        "velocity.toml: tunnel.port-forward.namespace: only means something with pod (which pod to "
        "port-forward to)",
    ]
    config = parse_config(STATIC + '[tunnel.port-forward]\npod = "gateway-0"\n', Path("velocity.toml"))
    table = config.tunnel.table("port-forward")
    assert (table.pod, table.namespace, table.port, table.kubeconfig, table.context) == (
        "gateway-0", "", 7071, None, "")
    assert table.gateway() == "pod gateway-0 port 7071"


def test_the_kubernetes_provider_refuses_a_pod_of_the_users_choosing():
    """It reaches its own traffic-proxy (by labels, with cluster.context); honouring a pod
    there would send the session's token and routes to a gateway velo did not make."""
    text = ('[project]\nname = "pf"\n[cluster]\nprovider = "kubernetes"\n'
            '[tunnel.port-forward]\npod = "gateway-0"\ncontext = "other"\n')
    why = ("the kubernetes provider reaches its own traffic-proxy pod (by its labels, with cluster.context); "
           'this key is for a gateway you run in a pod yourself, with cluster.provider = "static"')
    assert _errors(text) == [f"velocity.toml: tunnel.port-forward.pod: {why}",
                             f"velocity.toml: tunnel.port-forward.context: {why}"]
    # nothing written: the provider's default, unchanged
    config = parse_config('[project]\nname = "pf"\n[cluster]\nprovider = "kubernetes"\n', Path("velocity.toml"))
    assert config.tunnel.preference == ["port-forward"]
    assert config.tunnel.table("port-forward").gateway() == ""


def test_velo_config_check_says_so_and_exits_non_zero(tmp_path):
    (tmp_path / "velocity.toml").write_text(STATIC + '[tunnel.port-forward]\npod = "gateway-0"\nport = 99999\n')
    bad = subprocess.run([sys.executable, "-m", "velo", "config", "check"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "tunnel.port-forward.port: expected an integer 1-65535, got 99999" in bad.stderr
    (tmp_path / "velocity.toml").write_text(STATIC + '[tunnel.port-forward]\npod = "gateway-0"\n'
                                                     'namespace = "shop"\n')
    good = subprocess.run([sys.executable, "-m", "velo", "config", "check"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "tunnel port-forward pod shop/gateway-0 port 7071" in good.stdout


def _static_up(procs, tmp_path, pod: str, http: int, kubeconfig, namespace: str | None = None):
    """`velo up` with the static provider and ``[tunnel.port-forward] pod``, not waiting for the tunnel."""
    settings = {"pod": pod, "kubeconfig": str(kubeconfig)}
    if namespace:
        settings["namespace"] = namespace
    folder = tmp_path / f"project-{len(procs.all)}"
    folder.mkdir()
    config = write_config(folder / "velocity.toml", gateway_url=None, remote={"web": f"127.0.0.1:{http}"},
                          backend="port-forward", settings=settings, free_ports=True)
    return procs.up(config, wait_up=False)


def _failing(up, text: str, timeout: float = 30) -> dict:
    """The tunnel is not up, status says ``text``, and the reconnect loop keeps trying."""
    status = wait_for(lambda: (s := up.status()) and text in s["tunnel"]["last_error"] and s, timeout,
                      f"{text!r} in status; velo up log:\n{up.proc.log()[-2000:]}")
    assert status["tunnel"]["state"] in ("connecting", "reconnecting", "unauthorized"), status["tunnel"]
    tried = status["tunnel"]["attempts"]
    wait_for(lambda: up.status()["tunnel"]["attempts"] >= tried + 2, 30, "more attempts")
    return status


@cluster_test
def test_a_named_pod_is_waited_for_then_followed_when_recreated(cluster, namespace, procs, tmp_path):
    http = procs.server("http", text="via a pod of my own")
    gateway = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pod = KwokPod(cluster, namespace)
    up = _static_up(procs, tmp_path, pod.name, http, cluster.kubeconfig, namespace=namespace)
    _failing(up, f"pod {namespace}/{pod.name} not found")
    lines = [line for line in up.proc.log().splitlines() if "tunnel not up" in line]
    assert lines == [f"velo: tunnel not up: port-forward: pod {namespace}/{pod.name} not found (context "
                     f"{_context(cluster)}) (retrying until it is)"], lines

    pod.forward_to(gateway.port)  # the pod appears: the next attempt finds it, velo up was not restarted
    tunnel = up.wait_state("up", timeout=30)["tunnel"]
    assert tunnel["backend"] == "port-forward" and tunnel["url"] == f"pod {namespace}/{pod.name} port 7071"
    assert http_get(up.port("web")).endswith(b"via a pod of my own")

    # The pod goes, and comes back under the same name with its gateway on another port.
    pod.delete()
    gateway.proc.signal(9)
    _failing(up, f"pod {namespace}/{pod.name} not found")
    again = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pod.target = None
    pod.forward_to(again.port)
    up.wait_state("up", timeout=30)
    assert http_get(up.port("web")).endswith(b"via a pod of my own")


def _context(cluster) -> str:
    return yaml.safe_load(Path(cluster.kubeconfig).read_text())["current-context"]


@cluster_test
def test_a_pod_that_is_not_ready_is_that_backend_failing(cluster, namespace, procs, tmp_path):
    http = procs.server("http", text="x")
    gateway = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pending = KwokPod(cluster, namespace, node="velo-no-such-node")  # no kubelet: Pending for ever
    pending.forward_to(gateway.port)
    up = _static_up(procs, tmp_path, pending.name, http, cluster.kubeconfig, namespace=namespace)
    _failing(up, f"port-forward: pod {namespace}/{pending.name} is not running (phase Pending)")


def _service_account_token(cluster, namespace: str, name: str) -> str:
    cluster.core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name=name)))
    return cluster.core.create_namespaced_service_account_token(name, namespace, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token


def _grant(cluster, namespace: str, name: str, account: str, rules: list) -> None:
    cluster.rbac.create_namespaced_role(namespace, client.V1Role(metadata=client.V1ObjectMeta(name=name),
                                                                 rules=rules))
    cluster.rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name=name),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=account, namespace=namespace)]))


def _portforward_rules() -> list:
    """Exactly what `velo rbac` grants for port-forward (a WebSocket upgrade is authorized as get,
    and, since Kubernetes 1.35, as create too: AuthorizePodWebsocketUpgradeCreatePermission)."""
    return [client.V1PolicyRule(api_groups=r["apiGroups"], resources=r["resources"], verbs=r["verbs"])
            for r in yaml.safe_load(rbac_role("x"))["rules"] if "pods/portforward" in r["resources"]]


def _token_client(cluster, token: str) -> client.ApiClient:
    base = cluster.api_client.configuration
    configuration = client.Configuration()
    configuration.host, configuration.ssl_ca_cert = base.host, base.ssl_ca_cert
    configuration.api_key["authorization"] = f"Bearer {token}"
    return client.ApiClient(configuration)


def _user_kubeconfig(cluster, namespace: str, path: Path, user: dict) -> Path:
    """A kubeconfig for the test cluster whose only user is ``user`` (its ``user:`` entry);
    the context's namespace is the table's default namespace."""
    base = cluster.api_client.configuration
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "u",
        "clusters": [{"name": "c", "cluster": {"server": base.host, "certificate-authority": base.ssl_ca_cert}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "u", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
    return path


@cluster_test
def test_forbidden_shows_which_permission_and_granting_it_is_picked_up(cluster, namespace, procs, tmp_path):
    """A user who may not read the pod, then may read it but not port-forward, then may."""
    http = procs.server("http", text="allowed now")
    gateway = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pod = KwokPod(cluster, namespace)
    pod.forward_to(gateway.port)
    token = _service_account_token(cluster, namespace, "pf-user")
    kubeconfig = _user_kubeconfig(cluster, namespace, tmp_path / "pf-user.kubeconfig", {"token": token})
    up = _static_up(procs, tmp_path, pod.name, http, kubeconfig)
    status = _failing(up, f"permission denied while reading pod {namespace}/{pod.name}")
    assert "cannot get resource \"pods\"" in status["tunnel"]["last_error"]

    _grant(cluster, namespace, "pf-read", "pf-user", [client.V1PolicyRule(api_groups=[""], resources=["pods"],
                                                                          verbs=["get"])])
    _failing(up, "permission denied by the apiserver (HTTP 403); port-forward needs the get and create verbs "
                 "on pods/portforward")
    rules = _portforward_rules()
    assert [(r.api_groups, r.resources, r.verbs) for r in rules] == [([""], ["pods/portforward"], ["get", "create"])]
    _grant(cluster, namespace, "pf-forward", "pf-user", rules)
    tunnel = up.wait_state("up", timeout=30)["tunnel"]
    # not written in the table: status shows the namespace used, the kubeconfig context's
    assert tunnel["url"] == f"pod {namespace}/{pod.name} port 7071"
    assert http_get(up.port("web")).endswith(b"allowed now")


EXEC_PLUGIN = """
import json, sys, time
from pathlib import Path
here = Path(sys.argv[1])
with open(here / "runs", "a") as runs:
    runs.write("run\\n")
expires = time.time() + float(sys.argv[2])
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {
    "token": (here / "token").read_text().strip(),
    "expirationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))}}))
"""


@cluster_test
def test_an_exec_credential_plugin_is_run_and_run_again_once_its_token_expired(cluster, namespace, procs, tmp_path):
    """How cloud clusters log in (aws eks get-token, gke-gcloud-auth-plugin, kubelogin): the
    kubeconfig names a program that prints a short-lived token. velo runs it, and on a reconnect
    after the token expired runs it again: the first token stops working meanwhile (its user
    loses its RoleBindings), so the tunnel comes back only with the new one."""
    http = procs.server("http", text="by exec plugin")
    gateway = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pod = KwokPod(cluster, namespace)
    pod.forward_to(gateway.port)
    read = [client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get"])]
    for account in ("early", "late"):
        _grant(cluster, namespace, f"{account}-read", account, read)
        _grant(cluster, namespace, f"{account}-forward", account, _portforward_rules())
    tokens = {account: _service_account_token(cluster, namespace, account) for account in ("early", "late")}
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "print_token.py").write_text(EXEC_PLUGIN)
    (plugin / "token").write_text(tokens["early"])
    lifetime = 4.0
    kubeconfig = _user_kubeconfig(cluster, namespace, tmp_path / "exec.kubeconfig", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "interactiveMode": "Never",
        "args": [str(plugin / "print_token.py"), str(plugin), str(lifetime)]}})

    up = _static_up(procs, tmp_path, pod.name, http, kubeconfig)
    up.wait_state("up", timeout=30)
    assert http_get(up.port("web")).endswith(b"by exec plugin")
    runs = (plugin / "runs").read_text().count("run")
    assert runs >= 1
    expiry = time.monotonic() + lifetime

    # The login moves on: the plugin now prints the other user's token, and the first user
    # may no longer port-forward. Once the first token expired, the tunnel breaks (its
    # gateway restarts elsewhere) and the reconnect must run the plugin again.
    (plugin / "token").write_text(tokens["late"])
    for name in ("early-read", "early-forward"):
        cluster.rbac.delete_namespaced_role_binding(name, namespace)
    with pytest.raises(client.ApiException) as denied:  # the premise: the first token is useless now
        client.CoreV1Api(_token_client(cluster, tokens["early"])).read_namespaced_pod(pod.name, namespace)
    assert denied.value.status == 403
    wait_for(lambda: time.monotonic() > expiry, lifetime + 5, "the first token to expire")
    gateway.proc.signal(9)
    again = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pod.forward_to(again.port)
    wait_for(lambda: http_get(up.port("web"), timeout=2).endswith(b"by exec plugin"), 30,
             f"a request through the new tunnel; velo up log:\n{up.proc.log()[-2000:]}")
    assert (plugin / "runs").read_text().count("run") > runs
    assert up.status()["tunnel"]["state"] == "up"


def test_a_missing_kubeconfig_is_that_backend_failing_not_velo_up(procs, tmp_path):
    missing = tmp_path / "no-such-kubeconfig"
    up = _static_up(procs, tmp_path, "gateway-0", 9, missing)
    _failing(up, f"[tunnel.port-forward] kubeconfig {missing}: no such file")
    assert up.proc.running() and "Traceback" not in up.proc.log()


@cluster_test
def test_context_picks_the_kubeconfig_context_and_a_wrong_one_is_named(cluster, namespace, procs, tmp_path):
    http = procs.server("http", text="by context")
    gateway = procs.gateway(f"127.0.0.1:{http}", scheme="port-forward")
    pod = KwokPod(cluster, namespace)
    pod.forward_to(gateway.port)
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    real = kubeconfig["current-context"]
    # the current context is a dead cluster; only `context` leads to the test cluster
    kubeconfig["clusters"].append({"name": "dead", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}})
    kubeconfig["contexts"].append({"name": "dead", "context": {"cluster": "dead", "user": kubeconfig["users"][0]["name"],
                                                               "namespace": namespace}})
    kubeconfig["current-context"] = "dead"
    path = tmp_path / "two-contexts.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))

    def up_with(context: str):
        folder = tmp_path / f"ctx-{context}"
        folder.mkdir()
        config = write_config(folder / "velocity.toml", gateway_url=None, remote={"web": f"127.0.0.1:{http}"},
                              backend="port-forward", free_ports=True,
                              settings={"pod": pod.name, "namespace": namespace, "kubeconfig": str(path),
                                        "context": context})
        return procs.up(config, wait_up=False)

    _failing(up_with("nope"), f'[tunnel.port-forward] context: no context "nope" in the kubeconfig; '
                              f"available: {real}, dead")
    up = up_with(real)
    up.wait_state("up", timeout=30)
    assert http_get(up.port("web")).endswith(b"by context")
