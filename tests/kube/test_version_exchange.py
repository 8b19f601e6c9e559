"""The version exchange under the kubernetes provider: a gateway of another wire protocol
stops `velo up` during its start, with the one line that names both releases, and the
session changes nothing in the cluster (tests/test_compat.py has the pairs themselves)."""

from __future__ import annotations

import base64
import sys

import pytest

from tests.helpers import free_port, wait_for
from tests.kube.shop import kube_config, service, velo_objects
from tests.test_compat import velo_copy
from velo import __version__
from velo.protocol import PROTOCOL
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster


def test_a_gateway_of_another_protocol_stops_the_start_and_changes_nothing(cluster, namespace, shop, procs,
                                                                            tmp_path):
    before = service(cluster, namespace).metadata.resource_version
    laptop = procs.server("http", text="laptop")
    port = free_port()
    url = f"ws://127.0.0.1:{port}/velo"  # the tunnel goes to a gateway of protocol PROTOCOL + 1
    config = kube_config(tmp_path / "p", namespace, url, candidate_port=laptop)
    config.write_text(config.read_text().replace('name = "shop"', 'name = "shop-version-exchange"', 1))
    up = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)],
                     env={"KUBECONFIG": str(cluster.kubeconfig)}, cwd=config.parent)
    secret = wait_for(lambda: next(iter(cluster.core.list_namespaced_secret(
        namespace, label_selector=f"{ix.LABEL_MANAGED}=velo").items), None), 60, "the session's Secret")
    token = base64.b64decode(secret.data["token"]).decode()  # the newer gateway gets the session's token
    gateway = procs.gateway("*:*", port=port, token=token, cwd=tmp_path,
                            env=velo_copy(tmp_path / "gw", protocol=PROTOCOL + 1, version="9.9.9"))
    assert up.wait(120) == 1, up.log()
    log = up.log()
    line = (f"velo {__version__} (protocol {PROTOCOL}) cannot use the gateway {gateway.url}, "
            f"which runs velo 9.9.9 (protocol {PROTOCOL + 1})")
    assert log.count(line) == 1 and "Traceback" not in log, log
    assert "now sends its traffic" not in log, log
    assert f"velo 9.9.9 (protocol {PROTOCOL + 1}) cannot serve client " in gateway.proc.log(), gateway.proc.log()
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be removed")
    assert service(cluster, namespace).metadata.resource_version == before, "the Service was never touched"
