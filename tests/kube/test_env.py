"""velo.providers.kubernetes.env against a real kube-apiserver.

The objects are created in the cluster and the Deployment is read back from the API, so the
test sees exactly what velo sees (API defaulting included: divisor, fieldRef apiVersion...).
Every expected value below is written by hand from the kubelet's rules (pkg/kubelet/kubelet_pods.go
makeEnvironmentVariables, pkg/api/v1/resource/helpers.go) -- not computed by the code under test.
"""
from __future__ import annotations

import base64

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from velo.providers.kubernetes.env import EnvError, expand, pick_container, resolve_env

cluster_test = pytest.mark.cluster

APP_CONFIG = {"LOG_LEVEL": "debug", "DB_HOST": "db.internal", "GREETING": "hello",
              "1st-key": "starts with a digit", "dotted.key": "dots are fine"}
APP_EXTRA = {"LOG_LEVEL": "info", "FEATURE": "on"}
APP_SECRET = {"DB_PASSWORD": b"s3cr=t", "API_TOKEN": b"tok-123", "RAW": b"\xff\xfeok"}


def _b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def cm_env(name, key, optional=None):
    return client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(
        config_map_key_ref=client.V1ConfigMapKeySelector(name=key[0], key=key[1], optional=optional)))


def secret_env(name, key, optional=None):
    return client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(
        secret_key_ref=client.V1SecretKeySelector(name=key[0], key=key[1], optional=optional)))


def field_env(name, path):
    return client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(
        field_ref=client.V1ObjectFieldSelector(field_path=path)))


def res_env(name, resource, divisor=None, container=None):
    return client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(
        resource_field_ref=client.V1ResourceFieldSelector(resource=resource, divisor=divisor,
                                                          container_name=container)))


def lit(name, value):
    return client.V1EnvVar(name=name, value=value)


APP_ENV_FROM = [
    client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name="app-config")),
    client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name="app-extra")),
    client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name="app-extra"), prefix="X_"),
    client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name="app-secret")),
    client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name="no-such-secret", optional=True)),
    client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name="no-such-cm", optional=True)),
]

APP_ENV = [
    lit("LITERAL", "plain"),
    client.V1EnvVar(name="EMPTY"),
    lit("DB_URL", "postgres://app:$(DB_PASSWORD)@$(DB_HOST)/app"),
    lit("ESCAPED", "$$(DB_HOST) costs $$5, $HOME stays, so does $"),
    lit("UNRESOLVED", "$(NOPE)-$(LATER)"),
    lit("LATER", "later"),
    lit("CHAIN", "$(DB_URL)?sslmode=off"),
    lit("GREETING", "$(GREETING), world"),
    cm_env("LOG_LEVEL", ("app-config", "LOG_LEVEL")),
    lit("API_TOKEN", "public"),
    lit("USES_TOKEN", "t=$(API_TOKEN)"),
    secret_env("SINGLE_SECRET", ("app-secret", "API_TOKEN")),
    cm_env("OPT_MISSING_KEY", ("app-config", "nope"), optional=True),
    secret_env("OPT_MISSING_SECRET", ("no-such-secret", "x"), optional=True),
    cm_env("X_FEATURE", ("app-config", "nope"), optional=True),
    secret_env("DB_PASSWORD", ("no-such-secret", "pw"), optional=True),
    lit("DUP", "first"),
    lit("DUP", "$(DUP)-second"),
    field_env("POD_NAME", "metadata.name"),
    field_env("POD_NAMESPACE", "metadata.namespace"),
    field_env("POD_UID", "metadata.uid"),
    field_env("NODE_NAME", "spec.nodeName"),
    field_env("SA_NAME", "spec.serviceAccountName"),
    field_env("HOST_IP", "status.hostIP"),
    field_env("HOST_IPS", "status.hostIPs"),
    field_env("POD_IP", "status.podIP"),
    field_env("POD_IPS", "status.podIPs"),
    field_env("APP_LABEL", "metadata.labels['app']"),
    field_env("TIER", "metadata.annotations['velo.dev/tier']"),
    field_env("HASH", "metadata.labels['pod-template-hash']"),
    res_env("CPU_LIMIT_M", "limits.cpu", "1m"),
    res_env("CPU_LIMIT", "limits.cpu"),
    res_env("MEM_LIMIT_MI", "limits.memory", "1Mi"),
    res_env("CPU_REQ_M", "requests.cpu", "1m"),
    res_env("MEM_REQ", "requests.memory"),
    res_env("DISK_LIMIT", "limits.ephemeral-storage"),
    res_env("DISK_REQ", "requests.ephemeral-storage"),
    res_env("SIDECAR_MEM_KI", "limits.memory", "1Ki", container="sidecar"),
    res_env("SIDECAR_CPU", "limits.cpu", container="sidecar"),
    lit("SELF", "$(POD_NAME).$(POD_NAMESPACE):$(CPU_LIMIT_M)"),
]

# Written by hand.  Order: velo's (dict semantics: first definition's position, last value);
# envFrom keys in source order, each source's keys sorted.
EXPECTED = [
    # envFrom app-config
    ("1st-key", "starts with a digit"),        # relaxed names (GA in 1.34): kept
    ("DB_HOST", "db.internal"),
    ("GREETING", "hello, world"),              # env expands the envFrom value, then overrides it
    ("LOG_LEVEL", "debug"),                    # app-extra said info; the env configMapKeyRef wins
    ("dotted.key", "dots are fine"),
    # envFrom app-extra
    ("FEATURE", "on"),
    # envFrom app-extra, prefix X_
    ("X_FEATURE", "on"),                       # optional missing key: the envFrom value stays
    ("X_LOG_LEVEL", "info"),
    # envFrom app-secret
    ("API_TOKEN", "public"),                   # overridden by a literal: no longer secret
    ("DB_PASSWORD", "s3cr=t"),                 # optional missing secret: the envFrom value stays
    ("RAW", b"\xff\xfeok".decode("utf-8", "surrogateescape")),
    # env
    ("LITERAL", "plain"),
    ("EMPTY", ""),
    ("DB_URL", "postgres://app:s3cr=t@db.internal/app"),
    ("ESCAPED", "$(DB_HOST) costs $5, $HOME stays, so does $"),
    ("UNRESOLVED", "$(NOPE)-$(LATER)"),        # LATER is defined only afterwards
    ("LATER", "later"),
    ("CHAIN", "postgres://app:s3cr=t@db.internal/app?sslmode=off"),
    ("USES_TOKEN", "t=public"),
    ("SINGLE_SECRET", "tok-123"),
    ("DUP", "first-second"),
    ("POD_NAME", "web-local-abc12"),
    ("POD_NAMESPACE", None),                   # the test namespace, filled in below
    ("POD_UID", ""),
    ("NODE_NAME", "laptop"),
    ("SA_NAME", "default"),
    ("HOST_IP", "10.1.2.3"),
    ("HOST_IPS", "10.1.2.3"),
    ("POD_IP", "10.1.2.3"),
    ("POD_IPS", "10.1.2.3"),
    ("APP_LABEL", "web"),
    ("TIER", "frontend"),
    ("HASH", ""),
    ("CPU_LIMIT_M", "500"),                    # 500m / 1m
    ("CPU_LIMIT", "1"),                        # ceil(0.5)
    ("MEM_LIMIT_MI", "96"),                    # ceil(100000000 / 1048576 = 95.37)
    ("CPU_REQ_M", "250"),
    ("MEM_REQ", "100000000"),                  # no request: defaults to the limit
    ("DISK_REQ", "0"),                         # neither request nor limit: zero
    ("SIDECAR_MEM_KI", "65536"),               # 64Mi / 1Ki
    ("SIDECAR_CPU", "2"),                      # ceil(1100m)
    ("SELF", None),                            # filled in below
]

EXPECTED_SECRET_KEYS = {"DB_PASSWORD", "RAW", "DB_URL", "CHAIN", "SINGLE_SECRET"}


def deployment(name, containers, labels=None, annotations=None, pod_resources=None):
    labels = labels or {"app": name}
    spec = client.V1PodSpec(containers=containers)
    if pod_resources is not None:
        spec.resources = pod_resources
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=0,  # only the template matters; no pods needed
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels, annotations=annotations),
                spec=spec)))


def container(name, env=None, env_from=None, ports=(), limits=None, requests=None):
    return client.V1Container(
        name=name, image="example.invalid/app", env=env, env_from=env_from,
        ports=[client.V1ContainerPort(container_port=p, name=n) for p, n in ports] or None,
        resources=client.V1ResourceRequirements(limits=limits, requests=requests))


class CountingCore:
    """Proxy to CoreV1Api that counts ConfigMap/Secret reads."""

    def __init__(self, core):
        self._core = core
        self.reads: list[tuple[str, str]] = []

    def read_namespaced_config_map(self, name, namespace, **kw):
        self.reads.append(("ConfigMap", name))
        return self._core.read_namespaced_config_map(name, namespace, **kw)

    def read_namespaced_secret(self, name, namespace, **kw):
        self.reads.append(("Secret", name))
        return self._core.read_namespaced_secret(name, namespace, **kw)


@pytest.fixture(scope="module")
def objects(cluster, namespace):
    core, apps = cluster.core, cluster.apps
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="app-config"), data=APP_CONFIG,
        binary_data={"BLOB": _b64(b"binary data never reaches env")}))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="app-extra"), data=APP_EXTRA))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="app-secret"),
        data={k: _b64(v) for k, v in APP_SECRET.items()}))
    app = container("app", env=APP_ENV, env_from=APP_ENV_FROM, ports=[(8080, "http")],
                    limits={"cpu": "500m", "memory": "100M"}, requests={"cpu": "250m"})
    sidecar = container("sidecar", ports=[(9090, "metrics")], limits={"cpu": "1100m", "memory": "64Mi"})
    apps.create_namespaced_deployment(namespace, deployment(
        "web", [app, sidecar], labels={"app": "web"}, annotations={"velo.dev/tier": "frontend"}))

    broken = {
        "missing-key": [cm_env("NEEDS_KEY", ("app-config", "nope"))],
        "missing-cm": [cm_env("NEEDS_CM", ("no-such-cm", "k"))],
        "missing-secret-key": [secret_env("NEEDS_SECRET", ("app-secret", "nope"))],
    }
    for name, env in broken.items():
        apps.create_namespaced_deployment(namespace, deployment(name, [container("main", env=env)]))
    apps.create_namespaced_deployment(namespace, deployment("missing-envfrom", [container(
        "main", env_from=[client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name="gone"))])]))
    return namespace


def template(cluster, namespace, name) -> client.V1PodTemplateSpec:
    return cluster.apps.read_namespaced_deployment(name, namespace).spec.template


@cluster_test
def test_resolve_every_form(cluster, objects):
    ns = objects
    tpl = template(cluster, ns, "web")
    app = pick_container(tpl.spec, [8080])
    core = CountingCore(cluster.core)
    got = resolve_env(core, ns, tpl, app, pod_name="web-local-abc12", node_name="laptop", pod_ip="10.1.2.3")

    expected = [(k, ns if k == "POD_NAMESPACE" else f"web-local-abc12.{ns}:500" if k == "SELF" else v)
                for k, v in EXPECTED]
    assert got.as_dict() == dict(expected)
    assert list(got.env) == expected
    assert got.secret_keys == EXPECTED_SECRET_KEYS
    assert list(got.warnings) == [
        'Secret "app-secret" key "RAW" is not UTF-8 text; passed on byte for byte',
        "UNRESOLVED: $(NOPE) is not defined before UNRESOLVED; kept as written",
        "UNRESOLVED: $(LATER) is not defined before UNRESOLVED; kept as written",
        "POD_UID: metadata.uid exists only on a real pod; using an empty value",
        "HASH: metadata.labels['pod-template-hash'] is not set on the pod template (a controller or "
        "admission webhook may add it to real pods); using an empty value",
        "DISK_LIMIT: limits.ephemeral-storage is not set on container app; Kubernetes would use the "
        "node's allocatable amount, unknown here; left out",
    ]
    # every object read once, the missing optional ones included
    assert sorted(core.reads) == [("ConfigMap", "app-config"), ("ConfigMap", "app-extra"),
                                  ("ConfigMap", "no-such-cm"), ("Secret", "app-secret"),
                                  ("Secret", "no-such-secret")]


@cluster_test
def test_strict_env_names_skip_like_old_kubelets(cluster, objects):
    tpl = template(cluster, objects, "web")
    got = resolve_env(cluster.core, objects, tpl, pick_container(tpl.spec, name="app"),
                      pod_name="p", strict_env_names=True)
    assert "1st-key" not in got.as_dict()
    assert got.as_dict()["dotted.key"] == "dots are fine"  # [-._a-zA-Z][-._a-zA-Z0-9]* allows dots
    assert 'envFrom ConfigMap "app-config": keys 1st-key skipped: not valid environment variable names' \
        in got.warnings


@cluster_test
@pytest.mark.parametrize("name, message", [
    ("missing-key", 'container "main": env NEEDS_KEY: key "nope" not found in ConfigMap "app-config" '
                    "(namespace {ns}); the pod would not start (CreateContainerConfigError)"),
    ("missing-cm", 'container "main": env NEEDS_CM: ConfigMap "no-such-cm" not found in namespace {ns} '
                   '(wanted key "k"); the pod would not start (CreateContainerConfigError)'),
    ("missing-secret-key", 'container "main": env NEEDS_SECRET: key "nope" not found in Secret "app-secret" '
                           "(namespace {ns}); the pod would not start (CreateContainerConfigError)"),
    ("missing-envfrom", 'container "main": envFrom: Secret "gone" not found in namespace {ns}; '
                        "the pod would not start (CreateContainerConfigError)"),
])
def test_missing_required_reference(cluster, objects, name, message):
    tpl = template(cluster, objects, name)
    with pytest.raises(EnvError) as err:
        resolve_env(cluster.core, objects, tpl, pick_container(tpl.spec), pod_name="p")
    assert str(err.value) == message.format(ns=objects)


@cluster_test
def test_forbidden_secret_read(cluster, objects):
    """A user who may read ConfigMaps but not Secrets gets one line naming verb and resource."""
    ns = objects
    core, rbac = cluster.core, cluster.rbac
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="limited")))
    rbac.create_namespaced_role(ns, client.V1Role(
        metadata=client.V1ObjectMeta(name="cm-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get"])]))
    rbac.create_namespaced_role_binding(ns, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="cm-reader"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="limited", namespace=ns)]))
    token = core.create_namespaced_service_account_token("limited", ns, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600))).status.token
    limited = client.CoreV1Api(cluster.client_for_token(token))

    tpl = template(cluster, ns, "web")
    with pytest.raises(EnvError) as err:
        resolve_env(limited, ns, tpl, pick_container(tpl.spec, name="app"), pod_name="p")
    assert str(err.value).startswith(f"cannot get secrets in namespace {ns}: forbidden "
                                     '(Secret "app-secret", for container "app")')
    # other API failures propagate unchanged (here: 401 from a bogus token)
    bogus = client.CoreV1Api(cluster.client_for_token("not-a-token"))
    with pytest.raises(ApiException) as api_err:
        resolve_env(bogus, ns, tpl, pick_container(tpl.spec, name="app"), pod_name="p")
    assert api_err.value.status == 401


@cluster_test
def test_pod_level_limits_stand_in_for_container_limits(cluster, objects):
    """PodLevelResources (beta, on since 1.34): a container without a limit gets the pod's."""
    ns = objects
    main = container("main", env=[res_env("CPU", "limits.cpu", "1m"), res_env("MEM_MI", "limits.memory", "1Mi"),
                                  res_env("MEM_REQ_MI", "requests.memory", "1Mi")],
                     requests={"memory": "10Mi"})
    try:
        cluster.apps.create_namespaced_deployment(ns, deployment(
            "podlevel", [main], pod_resources=client.V1ResourceRequirements(limits={"cpu": "2", "memory": "1Gi"})))
    except ApiException as exc:  # pragma: no cover - a cluster with the gate off
        pytest.skip(f"pod-level resources rejected: {exc.reason}")
    tpl = template(cluster, ns, "podlevel")
    if tpl.spec.resources is None:  # pragma: no cover - field dropped: gate off
        pytest.skip("PodLevelResources disabled")
    got = resolve_env(cluster.core, ns, tpl, tpl.spec.containers[0], pod_name="p")
    assert got.as_dict() == {"CPU": "2000", "MEM_MI": "1024", "MEM_REQ_MI": "10"}
    assert got.warnings == ()


@cluster_test
def test_api_defaults_as_read_back(cluster, objects):
    """What the client returns for fields left out (the resolver must treat them as unset)."""
    c = template(cluster, objects, "web").spec.containers[0]
    by_name = {e.name: e for e in c.env}
    assert by_name["CPU_LIMIT"].value_from.resource_field_ref.divisor in (None, "0")
    assert by_name["POD_NAME"].value_from.field_ref.api_version == "v1"


@cluster_test
def test_pick_container(cluster, objects):
    spec = template(cluster, objects, "web").spec
    assert pick_container(spec, [8080]).name == "app"
    assert pick_container(spec, ["metrics"]).name == "sidecar"
    assert pick_container(spec, ["http"]).name == "app"
    assert pick_container(spec, ["9090"]).name == "sidecar"
    assert pick_container(spec, [9090, 8080, "http"]).name == "app"   # declares the most
    assert pick_container(spec, [1234, "grpc"]).name == "app"         # no match: the first
    assert pick_container(spec).name == "app"
    assert pick_container(spec, [8080], name="sidecar").name == "sidecar"  # explicit name wins
    with pytest.raises(EnvError, match=r'^no container "db" in the pod template; containers: app, sidecar$'):
        pick_container(spec, name="db")


@pytest.mark.parametrize("value, expected", [
    ("$(A)", "a"),
    ("$$(A)", "$(A)"),
    ("$$$(A)", "$a"),
    ("$$$$", "$$"),
    ("x$", "x$"),
    ("$(A", "$(A"),
    ("$(a$(A)", "$(a$(A)"),      # the reference runs to the first ')': name "a$(A"
    ("$x$(B)", "$x$(B)"),
    ("$()", "$()"),
    ("é$(A)é", "éaé"),
])
def test_expand_matches_kubernetes(value, expected):
    assert expand(value, {"A": "a"}.get)[0] == expected


class FakeCore:
    """Just enough CoreV1Api for the cases a real apiserver makes awkward to set up."""

    def __init__(self, secrets=None):
        self.secrets = secrets or {}

    def read_namespaced_secret(self, name, namespace):
        if name not in self.secrets:
            raise ApiException(status=404)
        return client.V1Secret(metadata=client.V1ObjectMeta(name=name),
                               data={k: _b64(v) for k, v in self.secrets[name].items()})

    def read_namespaced_config_map(self, name, namespace):
        raise ApiException(status=404)


def test_service_env_fallback_nul_and_odd_references():
    init = container("migrate", limits={"cpu": "300m"})
    main = container("main", limits={"memory": "1Gi"}, env=[
        lit("URL", "http://$(REDIS_SERVICE_HOST):$(REDIS_SERVICE_PORT)/$(OWN)"),  # OWN: not yet defined
        lit("OWN", "x"),
        lit("REDIS_SERVICE_HOST", "overridden"),
        lit("AFTER", "$(REDIS_SERVICE_HOST)"),                 # the container's own value comes first
        secret_env("WITH_NUL", ("s", "k")),
        res_env("INIT_CPU_M", "limits.cpu", "1m", container="migrate"),
        res_env("INIT_MEM", "limits.memory", container="migrate"),  # init containers get no defaulting
        res_env("NO_SUCH", "limits.cpu", container="ghost"),
        res_env("MEM_G", "limits.memory", "1G"),              # ceil(1073741824 / 1e9)
        field_env("PHASE", "status.phase"),
    ])
    tpl = client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={"app": "x"}),
                                   spec=client.V1PodSpec(containers=[main], init_containers=[init],
                                                         service_account_name="runner"))
    got = resolve_env(FakeCore({"s": {"k": b"abc\0def"}}), "ns", tpl, main, pod_name="p",
                      service_env={"REDIS_SERVICE_HOST": "127.0.0.1", "REDIS_SERVICE_PORT": "6379"})
    assert got.as_dict() == {"URL": "http://127.0.0.1:6379/$(OWN)", "OWN": "x", "REDIS_SERVICE_HOST": "overridden",
                             "AFTER": "overridden", "WITH_NUL": "abc", "INIT_CPU_M": "300", "INIT_MEM": "0",
                             "MEM_G": "2"}
    assert got.secret_keys == {"WITH_NUL"}
    assert list(got.warnings) == [
        "URL: $(OWN) is not defined before URL; kept as written",
        "WITH_NUL: the value contains a NUL byte, which a process environment cannot hold; cut at the NUL "
        "(the container runtime would refuse it)",
        'NO_SUCH: resourceFieldRef names container "ghost", which is not in the pod; left out',
        "PHASE: fieldRef status.phase is not supported; left out",
    ]
