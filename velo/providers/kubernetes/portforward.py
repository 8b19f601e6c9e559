"""pods/portforward endpoints: which pod, which URL, which credentials. (The protocol
itself is ``velo.backends.portforward``.)

Two callers, one code path from "a pod" to "an Endpoint the backend can dial":
- the kubernetes provider, for its traffic-proxy, found by the session's labels
  (``endpoint``);
- the port-forward backend itself, for a pod named in ``[tunnel.port-forward] pod``,
  with any provider (``named_pod_endpoint``): a gateway the user runs in a pod of their own.

Both are asked before every (re)connect, so a deleted, crashed or rescheduled pod is
followed. Credentials are taken from the ``kubernetes.client.Configuration`` the
kubeconfig loader made, so whatever it supports works here too: client certificates,
bearer tokens, exec credential plugins (their refresh hook runs first, so an expired
cloud token is renewed).
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import quote

from velo.provider import Endpoint, ProviderError

from .api import Connection, call

PORT_FORWARD_LISTEN = "port-forward://127.0.0.1:{port}"
"""Where the traffic-proxy accepts tunnels that come through pods/portforward (pod loopback)."""


def apiserver_credentials(conn: Connection) -> tuple[ssl.SSLContext | None, tuple[tuple[str, str], ...]]:
    """TLS context and Authorization header for the apiserver, as the client would send them.

    Blocking (an exec plugin may run): call it in a thread.
    """
    configuration = conn.api.configuration
    if configuration.refresh_api_key_hook is not None:
        configuration.refresh_api_key_hook(configuration)
    headers: list[tuple[str, str]] = []
    token = configuration.get_api_key_with_prefix("authorization") or configuration.get_api_key_with_prefix(
        "BearerToken")
    if token:
        headers.append(("Authorization", token))
    elif configuration.username or configuration.password:
        headers.append(("Authorization", configuration.get_basic_auth_token()))
    if not configuration.host.startswith("https"):
        return None, tuple(headers)
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context, tuple(headers)


def portforward_url(conn: Connection, namespace: str, pod: str, port: int) -> str:
    host = conn.api.configuration.host.rstrip("/")
    scheme, _, rest = host.partition("://")
    ws = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    return f"{ws}://{rest}/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward?ports={port}"


def not_ready(pod) -> str:
    """Why port-forward to this pod cannot work now ("" when it can)."""
    if pod.metadata.deletion_timestamp:
        return "is being deleted"
    conditions = {c.type: c.status for c in (pod.status.conditions or [])}
    phase = pod.status.phase or "Unknown"
    if phase != "Running":
        return f"is not running (phase {phase})"
    if conditions.get("Ready") != "True":
        return "is not Ready"
    return ""


async def pod_endpoint(conn: Connection, namespace: str, pod: str, port: int, *, backend: str, token: str,
                       settings) -> Endpoint:
    """The Endpoint to ``port`` of this (ready) pod, with the kubeconfig's credentials."""
    label = f"pod {namespace}/{pod} port {port}"
    try:
        context, headers = await asyncio.to_thread(apiserver_credentials, conn)
    except Exception as exc:  # an exec plugin that fails, unreadable cert files...
        return Endpoint(backend, "", token, settings=settings, label=label,
                        problem=f"kubeconfig credentials for {conn.server}: {exc}")
    return Endpoint(backend, portforward_url(conn, namespace, pod, port), token, settings=settings,
                    ssl_context=context, headers=headers, label=label)


async def endpoint(conn: Connection, namespace: str, selector: str, port: int, *, backend: str, token: str,
                   settings) -> Endpoint:
    """The port-forward endpoint to the session's ready traffic-proxy pod (newest first), or
    an Endpoint whose ``problem`` says why there is none right now."""
    try:
        pods = (await call(conn, "listing the traffic-proxy pod", conn.core.list_namespaced_pod, namespace,
                           label_selector=selector)).items
    except Exception as exc:
        return Endpoint(backend, "", token, settings=settings, label=f"pods/portforward ({selector})",
                        problem=f"finding the traffic-proxy pod: {exc}")
    ready = sorted((p for p in pods if not not_ready(p)), key=lambda p: p.metadata.creation_timestamp,
                   reverse=True)
    if not ready:
        return Endpoint(backend, "", token, settings=settings, label=f"pods/portforward ({selector})",
                        problem=f"no ready traffic-proxy pod in namespace {namespace} ({selector})")
    return await pod_endpoint(conn, namespace, ready[0].metadata.name, port, backend=backend, token=token,
                              settings=settings)


async def named_pod_endpoint(conn: Connection, namespace: str, pod: str, port: int, *, backend: str, token: str,
                             settings) -> Endpoint:
    """The Endpoint to a pod known by name, read again on every call (so a pod recreated
    under the same name is followed), or an Endpoint whose ``problem`` is one line: the pod
    does not exist, is not ready, or this user may not read it."""
    label = f"pod {namespace}/{pod} port {port}"
    try:
        found = await call(conn, f"reading pod {namespace}/{pod}", conn.core.read_namespaced_pod, pod, namespace)
    except ProviderError as exc:
        text = str(exc)
        if text.startswith(f"reading pod {namespace}/{pod}: ") and "not found" in text:
            text = f"pod {namespace}/{pod} not found (context {conn.context})"
        return Endpoint(backend, "", token, settings=settings, label=label, problem=text)
    why = not_ready(found)
    if why:
        return Endpoint(backend, "", token, settings=settings, label=label, problem=f"pod {namespace}/{pod} {why}")
    return await pod_endpoint(conn, namespace, pod, port, backend=backend, token=token, settings=settings)
