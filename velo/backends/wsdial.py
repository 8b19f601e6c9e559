"""Dialling a WebSocket with picows so that a deadline or a cancellation leaves nothing open.

Shared by the WebSocket backend and the port-forward backend (which speaks WebSocket
to the Kubernetes apiserver). Why not plain ``ws_connect``: picows waits for the
handshake behind ``asyncio.shield`` and does not close the TCP connection when that
wait is cancelled, so a `velo down` during a stuck handshake would leave the socket
open until picows's own handshake timer. Here the socket is created by our own
``socket_factory``, so whatever interrupts the dial can shut it down.
"""

from __future__ import annotations

import asyncio
import ssl
from http import HTTPStatus
from typing import Callable, Mapping

from picows import WSHandshakeError, WSListener, ws_connect

from velo.transport import TunnelError

MAX_MESSAGE = 64 * 1024 * 1024
USE_AIOFASTNET = False
"""Client dials only. picows uses aiofastnet's transports when that package is installed;
under uvloop, after ~1,000 quick reconnects `velo up` died in libuv's
``uv__epoll_ctl_flush`` abort() (an fd closed behind libuv's back, libuv#5130); the loop's
own transports do not. The gateway's server keeps picows's default: with the loop's
transports there, tests/test_dataplane.py's 2,000 concurrent echoes lost connections
(not investigated further)."""


async def dial(
    url: str,
    listener_factory: Callable[[], WSListener],
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    logger_name: str = "velo.websocket",
    rejected: str = "the gateway rejected the token",
) -> WSListener:
    """Open a WebSocket to ``url`` within ``timeout``; the listener of the connection.

    Failures become one-line ``TunnelError`` s (``auth=True`` for 401/403); a
    cancellation propagates unchanged after the socket was shut.
    """
    try:
        async with asyncio.timeout(timeout):
            _transport, listener = await ws_connect(
                listener_factory,
                url,
                ssl_context=ssl_context,
                extra_headers=dict(headers or {}),
                websocket_handshake_timeout=timeout,
                max_frame_size=MAX_MESSAGE,
                max_redirects=0,
                logger_name=logger_name,
                use_aiofastnet=USE_AIOFASTNET,
                **({"server_hostname": server_hostname} if server_hostname and ssl_context else {}),
            )
        if _transport.is_disconnected:
            # picows resolves the handshake as done when the peer hangs up during it,
            # and returns a listener that will never be connected.
            raise TunnelError(f"{url}: connection closed during the WebSocket handshake")
        return listener
    except Exception as exc:  # a cancellation propagates as it is
        raise _explain(url, exc, timeout, rejected) from None


def _explain(url: str, exc: Exception, timeout: float, rejected: str) -> TunnelError:
    if isinstance(exc, TunnelError):
        return exc
    if isinstance(exc, WSHandshakeError):
        status = exc.response.status if exc.response is not None else None
        if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
            return TunnelError(f"{url}: {rejected} (HTTP {int(status)})", auth=True)
        body = b""
        if exc.response is not None and exc.response.body:
            body = bytes(exc.response.body)[:200]
        detail = f": {body.decode('utf-8', 'replace').strip()}" if body.strip() else ""
        return TunnelError(f"{url}: WebSocket handshake failed: {exc}{detail}")
    if isinstance(exc, TimeoutError):
        return TunnelError(f"{url}: no answer within {timeout:g}s")
    if isinstance(exc, ssl.SSLError):
        from velo.tls import explain

        return TunnelError(f"{url}: TLS failed: {explain(exc)}")
    if isinstance(exc, OSError):
        return TunnelError(f"{url}: {exc.strerror or exc}")
    return TunnelError(f"{url}: {type(exc).__name__}: {exc}")
