"""pytest plugin: a real local Kubernetes cluster for tests marked ``@pytest.mark.cluster``.

Load it from the ROOT tests/conftest.py with::

    pytest_plugins = ["tests.cluster.conftest_plugin"]

Fixtures
  cluster    (session)  builds the binaries if needed (tests/cluster/build.sh), starts the cluster
                        once, stops it at the end (finalizer + atexit + SIGTERM/SIGHUP + a watchdog
                        process that fires if pytest is SIGKILLed). Yields a ClusterHandle.
  namespace  (module)   a fresh namespace per test module (its `default` ServiceAccount exists),
                        deleted afterwards.

Environment
  VELO_TEST_KUBECONFIG      use this cluster instead (no build, no start). If the file lives in a
                            harness STATE_DIR (``python -m tests.cluster.harness start DIR``), the
                            pod runner / in-cluster network features work too.
  VELO_TEST_CLUSTER_DIR     state dir for the session's cluster (default: a new /tmp/velo-cluster-*)
  VELO_KEEP_CLUSTER_STATE=1 keep the state dir (logs) even when all tests passed
  CI=true                   a cluster test that would be skipped (no Go, no cluster) fails instead
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cluster import harness
from tests.cluster import podrunner

def _unavailable_reason() -> str:
    return (f"no Kubernetes test cluster: binaries not built in {harness.cache_dir()} and no `go` (>= 1.26) "
            "on PATH to build them (`make cluster-bins`), and VELO_TEST_KUBECONFIG is not set")


def _cluster_available() -> bool:
    return bool(os.environ.get("VELO_TEST_KUBECONFIG")) or harness.binaries_ready() or harness.can_build()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local Kubernetes test cluster (tests/cluster)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """When cluster tests are selected: say once why they will be skipped, or build the binaries
    now, before the first test, so a cold build (~10-25 min) does not count against a per-test
    timeout (pytest-timeout)."""
    if not any(item.get_closest_marker("cluster") for item in session.items):
        return
    if not _cluster_available():
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        verdict = "ERROR (CI=true)" if os.environ.get("CI", "").strip().lower() == "true" else "skipped"
        line = f"velo-cluster: cluster tests {verdict}: {_unavailable_reason()}"
        if tr is not None:
            tr.write_line(line, yellow=True, bold=True)
        else:
            harness.log(line)
        return
    if os.environ.get("VELO_TEST_KUBECONFIG") or harness.binaries_ready():
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        try:
            harness.ensure_binaries()
        except harness.ClusterError as e:  # the `cluster` fixture reports it per test
            harness.log(f"build failed: {e}")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} [CI=true: cluster tests must not be skipped]", pytrace=False)
    pytest.skip(reason)


class ClusterHandle:
    """What the `cluster` fixture yields."""

    def __init__(self, kubeconfig: str, state_dir: str | None, owned: bool):
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir          # a harness STATE_DIR, or None for a foreign cluster
        self.owned = owned                  # started by this session
        self._cluster = harness.Cluster.load(state_dir) if state_dir else None
        from kubernetes import client, config
        self.api_client = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.discovery = client.DiscoveryV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.server = self.api_client.configuration.host

    # -- features that need a harness cluster -----------------------------------------------
    @property
    def cluster(self) -> harness.Cluster:
        if self._cluster is None:
            pytest.skip("needs a cluster started by tests/cluster/harness.py (pod runner, netns)")
        return self._cluster

    @property
    def netns(self) -> str | None:
        return self._cluster.netns if self._cluster else None

    @property
    def node_name(self) -> str:
        return self._cluster.node_name if self._cluster else harness.NODE_NAME

    def require_netns(self) -> str:
        c = self.cluster
        if not c.netns:
            _skip_or_fail(f"no network namespace for the in-cluster network: {c.info.get('netns_unavailable_reason')}")
        return c.netns  # type: ignore[return-value]

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> Any:
        import subprocess
        kubectl = self._cluster.kubectl_path if self._cluster else (shutil.which("kubectl") or "kubectl")
        return subprocess.run([kubectl, f"--kubeconfig={self.kubeconfig}", *args], check=check,
                              capture_output=True, text=True, timeout=timeout)

    @property
    def kubectl_path(self) -> str:
        return self._cluster.kubectl_path if self._cluster else (shutil.which("kubectl") or "kubectl")

    def pod_process(self, namespace: str, name: str) -> dict[str, Any] | None:
        return podrunner.pod_process(self.cluster.state_dir, namespace, name)

    def wait_pod_process(self, namespace: str, name: str, timeout: float = 60, state: str = "running") -> dict:
        return podrunner.wait_pod_process(self.cluster.state_dir, namespace, name, timeout, state)

    def kill_pod_process(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Crash simulation: the runner does not restart it (delete the pod to get a new one)."""
        return podrunner.kill_pod_process(self.cluster.state_dir, namespace, name, sig)

    def start_in_cluster_service(self, name: str, namespace: str, kind: str = "http", port: int = 80) -> dict:
        self.require_netns()
        return self.cluster.start_in_cluster_service(name, namespace, kind, port)

    def stop_in_cluster_service(self, name: str, namespace: str) -> None:
        self.cluster.stop_in_cluster_service(name, namespace)

    def client_for_token(self, token: str):
        """An ApiClient authenticating with a bearer token (same server and CA)."""
        from kubernetes import client
        base = self.api_client.configuration
        cfg = client.Configuration()
        cfg.host = base.host
        cfg.ssl_ca_cert = base.ssl_ca_cert
        cfg.verify_ssl = base.verify_ssl
        cfg.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(cfg)


def _state_dir_of(kubeconfig: str) -> str | None:
    d = Path(kubeconfig).resolve().parent
    return str(d) if (d / "cluster.json").is_file() else None


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHandle]:
    ext = os.environ.get("VELO_TEST_KUBECONFIG")
    if ext:
        if not os.path.isfile(ext):
            pytest.fail(f"VELO_TEST_KUBECONFIG={ext} does not exist", pytrace=False)
        yield ClusterHandle(ext, _state_dir_of(ext), owned=False)
        return

    if not _cluster_available():
        _skip_or_fail(_unavailable_reason())

    capman = request.config.pluginmanager.getplugin("capturemanager")

    def uncaptured() -> Any:  # build/start progress goes straight to the terminal
        return capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()

    with uncaptured():
        try:
            bin_dir = harness.ensure_binaries()
        except harness.ClusterError as e:
            pytest.fail(f"building the Kubernetes binaries failed: {e}", pytrace=False)

    keep = bool(os.environ.get("VELO_TEST_CLUSTER_DIR")) or os.environ.get("VELO_KEEP_CLUSTER_STATE") == "1"
    state_dir = os.environ.get("VELO_TEST_CLUSTER_DIR") or tempfile.mkdtemp(prefix="velo-cluster-")
    c = harness.Cluster(state_dir, bin_dir)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        c.stop(quiet=True)

    def on_signal(signum: int, frame: Any) -> None:
        stop()
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    atexit.register(stop)
    request.addfinalizer(stop)
    try:
        with uncaptured():
            c.start(owner_pid=os.getpid())
    except harness.ClusterError as e:
        pytest.fail(f"starting the test cluster failed (logs in {state_dir}/logs):\n{e}", pytrace=False)
    try:
        yield ClusterHandle(c.kubeconfig, str(c.state_dir), owned=True)
    finally:
        stop()
        atexit.unregister(stop)
        for s, h in old.items():
            signal.signal(s, h)
        failed = request.session.testsfailed
        if failed or keep:
            print(f"\nvelo-cluster: logs kept in {state_dir}/logs")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for this test module (deleted afterwards)."""
    from kubernetes import client
    base = re.sub(r"[^a-z0-9-]+", "-", request.module.__name__.rsplit(".", 1)[-1].lower()).strip("-")[:40]
    name = f"t-{base}-{secrets.token_hex(3)}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"velo.dev/test": "true"})))
    # pods are rejected until the namespace's `default` ServiceAccount exists
    harness.wait_for(lambda: cluster.core.read_namespaced_service_account("default", name), 60,
                     f"ServiceAccount {name}/default")
    yield name
    try:
        cluster.core.delete_namespace(name, propagation_policy="Background")
    except Exception:  # noqa: BLE001 - cluster may already be gone
        pass
