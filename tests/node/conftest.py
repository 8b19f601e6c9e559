"""Fixtures for the tests of the real traffic-proxy image and the real test node.

  proxy_image  (session)  `make image` (proxy/build-image.sh): the Docker engine, the local
                          Debian base, the image tagged as velo's default proxy_image.
  app_image    (session)  a sample app image on the same local base (tests/node/app/).
  real_node    (package)  a control plane + a real kubelet/containerd/CNI/kube-proxy node
                          (tests/cluster/node.py) with both images imported. Opt-in: only
                          tests that take it start it.

A test that cannot get one of these is skipped with the reason, and fails under CI=true.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import harness
from tests.cluster import node as nodemod

ROOT = Path(__file__).resolve().parents[2]
APP_IMAGE = "localhost/velo-test/sample-app:1"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the node's binaries before the first test when real-node tests are selected, so a
    cold build (~5 min; `make test` does it earlier) does not count against a test's timeout."""
    if not any("real_node" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if harness.can_build() and not nodemod.node_binaries_ready():
        capman = session.config.pluginmanager.getplugin("capturemanager")
        import contextlib
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            try:
                harness.ensure_binaries()
                nodemod.ensure_node_binaries()
            except harness.ClusterError as e:  # the fixture reports it per test
                print(f"velo-node: {e}")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: this must run)", pytrace=False)
    pytest.skip(reason)


def _uncaptured(request):
    capman = request.config.pluginmanager.getplugin("capturemanager")
    import contextlib
    return capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()


@pytest.fixture(scope="session")
def docker_engine(request) -> str:
    with _uncaptured(request):
        r = subprocess.run(["bash", str(ROOT / "tests/docker/engine.sh")], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        _unavailable(f"no Docker engine (tests/docker/engine.sh exit {r.returncode})")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def proxy_image(request, docker_engine) -> str:
    with _uncaptured(request):
        r = subprocess.run(["bash", str(ROOT / "proxy/build-image.sh")], stdout=subprocess.PIPE, text=True,
                           cwd=ROOT, env={**os.environ, "PY": str(Path(os.sys.executable))})
    if r.returncode != 0:
        pytest.fail(f"proxy/build-image.sh failed (exit {r.returncode})", pytrace=False)
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def app_image(request, proxy_image) -> str:
    base = subprocess.run(["bash", str(ROOT / "proxy/base-image.sh")], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    _docker_build(base, APP_IMAGE, ROOT / "tests/node/app")
    return APP_IMAGE


@pytest.fixture(scope="session")
def pause_image(request, docker_engine) -> str:
    base = subprocess.run(["bash", str(ROOT / "proxy/base-image.sh")], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    _docker_build(base, nodemod.PAUSE_IMAGE, ROOT / "tests/node/pause")
    return nodemod.PAUSE_IMAGE


def _docker_build(base: str, tag: str, context: Path) -> None:
    """docker build offline on the local base; its output only when it fails."""
    r = subprocess.run(["docker", "build", "--network", "none", "--build-arg", f"BASE={base}", "-t", tag,
                        str(context)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"docker build {tag} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}", pytrace=False)


class RealNodeHandle:
    def __init__(self, cluster: harness.Cluster, node: nodemod.RealNode, proxy_image: str):
        self.cluster = cluster
        self.proxy_image = proxy_image
        self.node = node
        self.kubeconfig = cluster.kubeconfig
        self.core = cluster.core
        self.apps = cluster.apps


@pytest.fixture(scope="package")  # stopped when tests/node is done, before the rest of the suite
def real_node(request, proxy_image, app_image, pause_image) -> Iterator[RealNodeHandle]:
    reason = harness.netns_supported()[1]
    if reason:
        _unavailable(f"the real node needs a network namespace: {reason}")
    with _uncaptured(request):
        try:
            bin_dir = harness.ensure_binaries()
            nodemod.ensure_node_binaries()
        except harness.ClusterError as e:
            pytest.fail(f"building the node's binaries failed: {e}", pytrace=False)
    state = Path(tempfile.mkdtemp(prefix="velo-node-"))
    c = harness.Cluster(state, bin_dir)
    n = None
    try:
        with _uncaptured(request):
            c.start(owner_pid=os.getpid(), netns=True, fake_node=False,
                    apiserver_args=nodemod.node_apiserver_args(state))
            n = nodemod.RealNode(c).start(images=[nodemod.PAUSE_IMAGE, proxy_image, app_image])
        yield RealNodeHandle(c, n, proxy_image)
    except (harness.ClusterError, subprocess.CalledProcessError) as e:
        pytest.fail(f"starting the real node failed (logs in {state}/logs, {state}/node/logs):\n{e}", pytrace=False)
    finally:
        c.stop(quiet=True)
        if request.session.testsfailed or os.environ.get("VELO_KEEP_CLUSTER_STATE") == "1":
            print(f"\nvelo-node: logs kept in {state}/logs and {state}/node/logs")
        else:
            shutil.rmtree(state, ignore_errors=True)
