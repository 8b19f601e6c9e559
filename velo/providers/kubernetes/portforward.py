"""The kubernetes provider's half of the port-forward backend: which pod, which URL, which
credentials. (The protocol itself is ``velo.backends.portforward``.)

Asked before every (re)connect, so a deleted, crashed or rescheduled traffic-proxy pod is
followed: the pod is found again by the session's labels. Credentials are taken from the
``kubernetes.client.Configuration`` the kubeconfig loader made, so whatever it supports
works here too: client certificates, bearer tokens, exec credential plugins (their
refresh hook runs first, so an expired cloud token is renewed).
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import quote

from velo.provider import Endpoint

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


def _ready(pod) -> bool:
    conditions = {c.type: c.status for c in (pod.status.conditions or [])}
    return (pod.status.phase == "Running" and conditions.get("Ready") == "True"
            and not pod.metadata.deletion_timestamp)


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
    ready = sorted((p for p in pods if _ready(p)), key=lambda p: p.metadata.creation_timestamp, reverse=True)
    if not ready:
        return Endpoint(backend, "", token, settings=settings, label=f"pods/portforward ({selector})",
                        problem=f"no ready traffic-proxy pod in namespace {namespace} ({selector})")
    pod = ready[0].metadata.name
    try:
        context, headers = await asyncio.to_thread(apiserver_credentials, conn)
    except Exception as exc:  # an exec plugin that fails, unreadable cert files...
        return Endpoint(backend, "", token, settings=settings, label=f"pod {pod}",
                        problem=f"kubeconfig credentials for {conn.server}: {exc}")
    return Endpoint(backend, portforward_url(conn, namespace, pod, port), token, settings=settings,
                    ssl_context=context, headers=headers, label=f"pod {namespace}/{pod} port {port}")
