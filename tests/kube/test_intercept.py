"""The selector swap and restore against the real apiserver, including a concurrent
writer that changes the Service between velo's read and velo's patch."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from velo.providers.kubernetes import intercept as ix
from velo.providers.kubernetes.api import Connection

pytestmark = pytest.mark.cluster


class RacingConnection(Connection):
    """The real API; before velo's first Service patch lands, someone else edits the Service."""

    def __init__(self, conn: Connection, edit: dict):
        super().__init__(conn.api, conn.namespace, conn.context, conn.server, conn.user)
        self.edit = edit
        self.patches = 0

    @property
    def core(self):
        real = client.CoreV1Api(self.api)
        outer = self

        class Core:
            def __getattr__(self, name):
                return getattr(real, name)

            def patch_namespaced_service(self, name, namespace, body, **kw):
                outer.patches += 1
                if outer.patches == 1:  # a teammate's kubectl, right between our read and our write
                    real.patch_namespaced_service(name, namespace, outer.edit)
                return real.patch_namespaced_service(name, namespace, body, **kw)

        return Core()


@pytest.fixture
def service(cluster, namespace):
    cluster.core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="shop", labels={"app": "shop"}),
        spec=client.V1ServiceSpec(selector={"app": "shop", "tier": "web"}, ports=[client.V1ServicePort(port=80)])))
    yield "shop"
    cluster.core.delete_namespaced_service("shop", namespace)


def connection(cluster, namespace) -> Connection:
    api = cluster.core.api_client
    return Connection(api, namespace, "test", api.configuration.host, "admin")


def test_intercept_retries_a_conflict_and_keeps_the_other_edit(cluster, namespace, service):
    racing = RacingConnection(connection(cluster, namespace), {"metadata": {"labels": {"team": "payments"}}})
    ix.intercept(racing, service, "s1", lambda _s: True)
    assert racing.patches == 2, "the first patch must fail its resourceVersion test and be retried"
    svc = cluster.core.read_namespaced_service(service, namespace)
    assert svc.spec.selector == ix.proxy_labels("s1")
    assert svc.metadata.labels["team"] == "payments"
    assert json.loads(svc.metadata.annotations[ix.ANN_ORIGINAL]) == {"app": "shop", "tier": "web"}


def test_restore_retries_a_conflict_and_changes_only_what_velo_changed(cluster, namespace, service):
    ix.intercept(connection(cluster, namespace), service, "s2", lambda _s: True)
    racing = RacingConnection(connection(cluster, namespace), {"metadata": {"annotations": {"owner": "sre"}}})
    assert ix.restore(racing, service, "s2") is True
    assert racing.patches == 2
    svc = cluster.core.read_namespaced_service(service, namespace)
    assert svc.spec.selector == {"app": "shop", "tier": "web"}
    assert svc.metadata.annotations == {"owner": "sre"}


def test_restore_by_another_session_changes_nothing(cluster, namespace, service):
    conn = connection(cluster, namespace)
    ix.intercept(conn, service, "s3", lambda _s: True)
    before = cluster.core.read_namespaced_service(service, namespace)
    assert ix.restore(conn, service, "someone-else") is False
    after = cluster.core.read_namespaced_service(service, namespace)
    assert after.metadata.resource_version == before.metadata.resource_version
    assert ix.restore(conn, service, "s3") is True


def test_a_lapsed_holder_is_repaired_before_intercepting(cluster, namespace, service):
    conn = connection(cluster, namespace)
    ix.intercept(conn, service, "dead", lambda _s: True)
    with pytest.raises(ix.InterceptRefused, match="already intercepted"):
        ix.intercept(conn, service, "new", lambda s: s == "dead")  # holder alive: refused
    ix.intercept(conn, service, "new", lambda _s: False)  # holder lapsed: taken over
    svc = cluster.core.read_namespaced_service(service, namespace)
    assert svc.metadata.annotations[ix.ANN_SESSION] == "new"
    assert json.loads(svc.metadata.annotations[ix.ANN_ORIGINAL]) == {"app": "shop", "tier": "web"}, \
        "the original selector, not the dead session's proxy labels"
