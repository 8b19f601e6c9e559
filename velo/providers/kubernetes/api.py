"""Talking to the cluster: kubeconfig, and turning API failures into one line.

The `kubernetes` client is synchronous; the provider calls it through
``asyncio.to_thread``.  It is control plane only (rare calls), never on the data path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import urllib3
from kubernetes import client, config as kubeconfig
from kubernetes.client.rest import ApiException

from velo.provider import ProviderError

log = logging.getLogger("velo.kubernetes")

RBAC_HINT = "`velo rbac` prints a Role that grants what velo needs"


@dataclass
class Connection:
    api: client.ApiClient
    namespace: str
    context: str
    server: str
    user: str

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api)

    @property
    def coordination(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self.api)


def in_cluster_connection(namespace: str | None = None) -> Connection:
    """The traffic-proxy's view: its ServiceAccount, like any pod (VELO_SA_DIR for test runners)."""
    sa_dir = Path(os.environ.get("VELO_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ProviderError("not running in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
    configuration = client.Configuration()
    configuration.host = f"https://{host}:{port}"
    configuration.ssl_ca_cert = str(sa_dir / "ca.crt")
    token_file = sa_dir / "token"

    def refresh(conf) -> None:  # bound tokens rotate: read the file on every request
        conf.api_key["authorization"] = "Bearer " + token_file.read_text().strip()

    configuration.refresh_api_key_hook = refresh
    refresh(configuration)
    ns = namespace or (sa_dir / "namespace").read_text().strip()
    return Connection(client.ApiClient(configuration), ns, "in-cluster", configuration.host, "serviceaccount")


def connect(context: str = "", namespace: str = "", config_file: str | None = None) -> Connection:
    """kubeconfig from ``config_file``, else KUBECONFIG or ~/.kube/config; context and
    namespace from the arguments or the kubeconfig's current context."""
    if config_file is not None and not os.path.isfile(os.path.expanduser(config_file)):
        raise ProviderError(f"kubeconfig {config_file}: no such file")
    files = {"config_file": os.path.expanduser(config_file)} if config_file is not None else {}
    try:
        contexts, current = kubeconfig.list_kube_config_contexts(**files)
    except kubeconfig.ConfigException as exc:
        where = config_file or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ProviderError(f"no usable kubeconfig ({where}): {exc}; set KUBECONFIG or cluster.context") from None
    except FileNotFoundError:
        raise ProviderError("no kubeconfig found (KUBECONFIG is unset and ~/.kube/config does not exist)") from None
    names = [c["name"] for c in contexts]
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    if chosen is None:
        raise ProviderError(f'cluster.context: no context "{context}" in the kubeconfig; available: {", ".join(names)}')
    configuration = client.Configuration()
    try:
        kubeconfig.load_kube_config(context=chosen["name"], client_configuration=configuration, **files)
    except kubeconfig.ConfigException as exc:
        raise ProviderError(f'kubeconfig context "{chosen["name"]}": {exc}') from None
    configuration.retries = False
    if not configuration.verify_ssl:  # said once here, not by urllib3 on every request
        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        log.warning("context %s: TLS verification is off (insecure-skip-tls-verify)", chosen["name"])
    ns = namespace or chosen["context"].get("namespace") or "default"
    user = chosen["context"].get("user", "?")
    return Connection(client.ApiClient(configuration), ns, chosen["name"], configuration.host, user)


def explain(exc: Exception, conn: Connection, doing: str) -> ProviderError:
    """One line for the user: what failed, where, and what to do."""
    if isinstance(exc, ApiException):
        message = _api_message(exc)
        if exc.status == 401:
            return ProviderError(f"{conn.server}: credentials rejected (context {conn.context}); log in again or fix the kubeconfig")
        if exc.status == 403:
            return ProviderError(f"permission denied while {doing}: {message}; {RBAC_HINT}")
        if exc.status == 404:
            return ProviderError(f"{doing}: {message}")
        return ProviderError(f"{doing}: HTTP {exc.status}: {message}")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return ProviderError(f"cluster unreachable at {conn.server} (context {conn.context}): {_reason(exc)}")
    return ProviderError(f"{doing}: {exc}")


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError):
        return str(exc.reason)


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text.lower():
        return "timed out"
    return text.split(": ", 1)[-1][:200]


async def call(conn: Connection, doing: str, fn, *args, **kwargs):
    """Run a blocking client call off the event loop; translate its failure."""
    try:
        return await asyncio.to_thread(fn, *args, _request_timeout=15, **kwargs)
    except ProviderError:
        raise
    except Exception as exc:
        raise explain(exc, conn, doing) from None


def call_sync(conn: Connection, doing: str, fn, *args, **kwargs):
    try:
        return fn(*args, _request_timeout=15, **kwargs)
    except Exception as exc:
        raise explain(exc, conn, doing) from None


def brief(exc: Exception) -> str:
    """A failed call in a few words (for a log line or `velo status`)."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {_api_message(exc)}" if exc.status else str(exc.reason)
    return _reason(exc)


class ApiHealth:
    """Whether the cluster API answers the session's background calls (the Service watch,
    the Lease renewal, re-reading the cluster).  A transient failure is retried by each of
    them, never a reason to end the session: the first failure is one log line, the
    recovery of the last one another, and in between `velo status` shows it.  Called from
    the watch thread and from the event loop alike."""

    def __init__(self, server: str):
        self.server = server
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}  # what -> its last error
        self._since: float | None = None

    def failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            first = not self._failing
            self._failing[what] = brief(exc)
            if first:
                self._since = time.time()
        if first:
            log.warning("the cluster API is failing (%s: %s); retrying, forwards and the tunnel keep working",
                        what, brief(exc))

    def ok(self, what: str) -> None:
        with self._lock:
            if self._failing.pop(what, None) is None or self._failing:
                return
            since, self._since = self._since, None
        log.warning("the cluster API works again (after %.0fs)", time.time() - (since or time.time()))

    def status(self) -> dict:
        with self._lock:
            return {"state": "failing" if self._failing else "ok", "server": self.server,
                    "error": "; ".join(f"{what}: {error}" for what, error in self._failing.items()) or None,
                    "since": self._since}
