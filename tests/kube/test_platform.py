"""velo with the permissions and policies a platform team really sets: a non-admin user
bound to exactly the Role `velo rbac` prints, in a namespace that enforces the
"restricted" Pod Security Standard and a ResourceQuota.  A whole session runs there: up,
forward and reverse requests, live edits, down, and after kill -9 the traffic-proxy
repairing with its own least-privilege Role.  The kube-apiserver's audit log then shows
that every call was allowed and every rule of both Roles was used."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.cluster import harness
from tests.helpers import http_get, wait_for
from tests.kube.ingress import request_in_cluster, request_via_service
from tests.kube.shop import kube_config, kube_up, service, velo, velo_objects
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster

USER = "dev-alice"
REQUEST = b"GET / HTTP/1.1\r\nHost: website\r\nConnection: close\r\n\r\n"


def user_kubeconfig(cluster, tmp_path, namespace: str, user: str = USER):
    """A client certificate from the test cluster's CA, for a user with no group and no rights."""
    USER = user  # noqa: N806
    pki = cluster.cluster.pki
    key, csr, crt, ext = (tmp_path / f"{USER}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\nauthorityKeyIdentifier=keyid,issuer\n")
    for args in (["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={USER}"],
                 ["x509", "-req", "-in", csr, "-CA", pki / "ca.crt", "-CAkey", pki / "ca.key", "-CAcreateserial",
                  "-CAserial", tmp_path / "ca.srl", "-days", "1", "-extfile", ext, "-out", crt]):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    data = yaml.safe_load(open(cluster.kubeconfig).read())
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    data["users"] = [{"name": USER, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}]
    for context in data["contexts"]:
        context["context"]["user"] = USER
        context["context"]["namespace"] = namespace
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def platform(cluster, namespace, shop):
    """The shop namespace, then locked down the way a platform team would."""
    cluster.core.patch_namespace(namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    cluster.core.create_namespaced_resource_quota(namespace, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="team-quota"),
        spec=client.V1ResourceQuotaSpec(hard={"requests.cpu": "2", "requests.memory": "2Gi",
                                              "limits.cpu": "4", "limits.memory": "4Gi"})))
    # The workload behind Service api, named explicitly by the candidate (no pods needed)
    cluster.apps.create_namespaced_stateful_set(namespace, client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name="api"),
        spec=client.V1StatefulSetSpec(
            replicas=0, service_name="api", selector=client.V1LabelSelector(match_labels={"app": "api"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "api"}),
                spec=client.V1PodSpec(containers=[client.V1Container(
                    name="api", image="api:dev", ports=[client.V1ContainerPort(name="web", container_port=8080)],
                    env=[client.V1EnvVar(name="API_MODE", value="cluster")])])))))
    return shop


# ---- the audit log: what each identity really called ------------------------------------

def audited(cluster, user: str, after: int = 0) -> list[dict]:
    """``user``'s requests in the kube-apiserver's audit log (one per request), skipping the
    first ``after`` events."""
    events = harness.audit_events(cluster.cluster.state_dir, user)[after:]
    return list({e["auditID"]: e for e in events}.values())


def call(event: dict) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    group = ref.get("apiGroup", "")
    return f"{event['verb']} {group + '/' if group else ''}{resource}" + (f" {ref['name']}" if ref.get("name") else "")


def grants(rule: dict, event: dict, verb: str | None = None) -> bool:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return (ref.get("apiGroup", "") in rule["apiGroups"] and resource in rule["resources"]
            and event["verb"] in ([verb] if verb else rule["verbs"])
            and (not rule.get("resourceNames") or ref.get("name") in rule["resourceNames"]))


# Checks the apiserver makes inside one request, which the audit log shows as that request
# only: a port-forward's WebSocket upgrade is a GET (verb get) that is also authorized for
# create; its 101 means both were allowed (without create it is a 403 with decision "allow").
ALSO_AUTHORIZED = {("get", "pods/portforward"): "create"}


def assert_least_privilege(events: list[dict], role: dict, who: str) -> None:
    """No call was denied, every call is one of the Role's rules, every rule was used."""
    for event in list(events):
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        also = ALSO_AUTHORIZED.get((event["verb"], resource))
        if also and (event.get("responseStatus") or {}).get("code") == 101:
            events.append({**event, "verb": also})
    assert events, f"no audit events for {who}"
    denied = sorted({call(e) for e in events if (e.get("responseStatus") or {}).get("code") == 403})
    assert not denied, f"{who}: denied calls: {denied}"
    outside = sorted({call(e) for e in events if e.get("objectRef")
                      and not any(grants(rule, e) for rule in role["rules"])})
    assert not outside, f"{who}: calls outside its Role: {outside}"
    unused = [f"{verb} {group + '/' if group else ''}{resource}"
              for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
              for verb in rule["verbs"]
              if not any(grants({**rule, "apiGroups": [group], "resources": [resource]}, e, verb) for e in events)]
    assert not unused, f"{who}: rules of its Role that no call used: {unused}"


def bind(cluster, namespace: str, user: str, role: dict) -> None:
    cluster.rbac.create_namespaced_role(namespace, role)
    cluster.rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name=f"{user}-velo"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=role["metadata"]["name"]),
        subjects=[client.RbacV1Subject(kind="User", name=user, api_group="rbac.authorization.k8s.io")]))


def own_project(config, name: str):
    """A project name of its own: derived local ports that no other `velo up` here uses."""
    config.write_text(config.read_text().replace('name = "shop"', f'name = "{name}"', 1))
    return config


def test_a_whole_session_as_a_user_bound_to_exactly_the_printed_role(cluster, namespace, platform, procs, tmp_path):
    kubeconfig = user_kubeconfig(cluster, tmp_path, namespace)
    laptop = procs.server("http", text="alice's laptop")
    api_laptop = procs.server("http", text="alice's api")
    config = own_project(kube_config(tmp_path / "p", namespace, platform.url, candidate_port=laptop, lease=5,
                                     extra='workload = "deployment/website"\n'), "platform-alice")
    denied = velo("env", cwd=config.parent, kubeconfig=kubeconfig)
    assert denied.returncode == 2 and "permission denied" in denied.stderr, "the user starts with no rights"
    printed = velo("rbac", cwd=config.parent, kubeconfig=kubeconfig)
    assert printed.returncode == 0, printed.stderr
    role = yaml.safe_load(printed.stdout)
    before_binding = len(harness.audit_events(cluster.cluster.state_dir, USER))
    bind(cluster, namespace, USER, role)
    env = {"KUBECONFIG": str(kubeconfig)}

    # up, forward, reverse
    up = kube_up(procs, config, env=env)
    assert f"{namespace}/backend".encode() in http_get(up.port("backend"))
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20,
                      "a request to the Service website:80")
    assert answer.endswith(b"alice's laptop")
    pod = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_COMPONENT}={ix.COMPONENT}").items[0]
    limits = pod.spec.containers[0].resources
    assert limits.requests and limits.limits, "the quota admits only pods that declare requests and limits"

    # live edits: adding a Service someone else holds is refused; once free it is intercepted
    # (its workload named explicitly), then removed again
    teammate = own_project(kube_config(tmp_path / "t", namespace, "", exclude='"*"', lease=5,
                                       extra=f'\n[local.api]\nport = {api_laptop}\n'), "platform-teammate")
    teammate.write_text(teammate.read_text().replace('[tunnel.websocket]\nurl = ""\n', ""))  # port-forward
    other = kube_up(procs, teammate, env=env)
    held = service(cluster, namespace, "api").metadata.annotations[ix.ANN_SESSION]
    base = config.read_text()
    with_api = base + f'\n[local.api]\nport = {api_laptop}\nworkload = "statefulset/api"\n'
    config.write_text(with_api)
    up.proc.wait_log("velocity.toml not applied, still running the last good config: Service api is already "
                     f"intercepted by", timeout=30)
    assert service(cluster, namespace, "api").metadata.annotations[ix.ANN_SESSION] == held
    other.proc.signal(signal.SIGTERM)
    assert other.proc.wait(60) == 0
    config.write_text(with_api + "# the teammate is gone: try again\n")
    up.proc.wait_log("velo: Service api now sends its traffic to this laptop", timeout=30)
    answer = wait_for(lambda: request_in_cluster(cluster, namespace, "api", 80, REQUEST), 20,
                      "a request from inside the cluster to the Service api:80")
    assert answer.endswith(b"alice's api")
    config.write_text(base)
    wait_for(lambda: service(cluster, namespace, "api").spec.selector == {"app": "api"}, 30,
             "the removed candidate's Service to be restored")

    # down
    down = velo("down", cwd=config.parent, kubeconfig=kubeconfig, timeout=90)
    assert down.returncode == 0, down.stderr
    assert up.proc.wait(30) == 0
    log = up.proc.log()
    for trouble in ("permission denied", "forbidden", "the cluster api is failing", "cleaning up failed"):
        assert trouble not in log.lower(), log
    assert service(cluster, namespace).spec.selector == {"app": "website"}
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be gone")

    # kill -9: the traffic-proxy repairs with its own Role (restore, delete its Lease and Deployment)
    again = kube_up(procs, config, env=env)
    session = service(cluster, namespace).metadata.annotations[ix.ANN_SESSION]
    proxy = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items[0]
    proxy_log = cluster.pod_process(namespace, proxy.metadata.name)["log"]
    again.proc.signal(signal.SIGKILL)
    wait_for(lambda: service(cluster, namespace).spec.selector == {"app": "website"}, 30,
             "the traffic-proxy to restore the Service")
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be gone")
    text = open(proxy_log).read()
    assert f"session {session} cleaned up" in text and "cleanup attempt" not in text, text[-3000:]
    repair = velo("down", "--all", cwd=config.parent, kubeconfig=kubeconfig, timeout=90)
    assert repair.returncode == 0 and "permission denied" not in repair.stderr, repair.stderr

    # What the apiserver saw: the developer's calls against `velo rbac`'s Role ...
    assert_least_privilege(audited(cluster, USER, after=before_binding), role, USER)
    # ... and the traffic-proxy's against its own (the one that repaired after kill -9)
    proxy_user = f"system:serviceaccount:{namespace}:{ix.object_name(session)}"
    proxy_role = next(d for d in yaml.safe_load_all(
        (Path(ix.__file__).parent / "traffic-proxy.yaml").read_text().replace("${session}", session))
        if d and d["kind"] == "Role")
    proxy_calls = audited(cluster, proxy_user)
    assert_least_privilege(proxy_calls, proxy_role, proxy_user)
    assert not [call(e) for e in proxy_calls if (e.get("objectRef") or {}).get("resource") == "secrets"]


def test_a_step_that_is_denied_half_way_leaves_nothing_behind(cluster, namespace, platform, tmp_path):
    """A Role that lacks one verb (create rolebindings): `velo up` fails at that step with one
    line naming it, after it created the Deployment, Lease, ServiceAccount and Role, and
    removes them all again with the permissions it has."""
    from velo.providers.kubernetes import rbac_role

    user = "dev-bob"
    kubeconfig = user_kubeconfig(cluster, tmp_path, namespace, user)
    role = yaml.safe_load(rbac_role(namespace))
    role["metadata"]["name"] = "velo-developer-without-rolebindings"
    for rule in role["rules"]:
        if "rolebindings" in rule["resources"]:
            rule["resources"] = ["roles"]
            role["rules"].append({"apiGroups": rule["apiGroups"], "resources": ["rolebindings"], "verbs": ["delete"]})
            break
    bind(cluster, namespace, user, role)
    before = service(cluster, namespace).metadata.resource_version
    config = kube_config(tmp_path / "p", namespace, platform.url, candidate_port=3000, exclude='"*"')
    result = velo("up", cwd=config.parent, kubeconfig=kubeconfig, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "permission denied while creating RoleBinding" in last and 'cannot create resource "rolebindings"' in last
    assert "Traceback" not in result.stderr
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "every object of the failed start to be removed")
    assert service(cluster, namespace).metadata.resource_version == before
