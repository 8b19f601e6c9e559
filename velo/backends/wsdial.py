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
import socket
import ssl
from http import HTTPStatus
from typing import Callable, Mapping

from picows import WSHandshakeError, WSListener, ws_connect

from velo.transport import TunnelError

MAX_MESSAGE = 64 * 1024 * 1024


async def _connected_socket(host: str, port: int, made: list[socket.socket]) -> socket.socket:
    """Try each address in turn; every socket made is recorded so it can be shut on cancel."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        made.append(sock)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last  # type: ignore[misc]


def _shut(made: list[socket.socket], handed: list[socket.socket]) -> None:
    """Shut every socket of the attempt; close the ones no transport owns yet (closing the
    fd under a transport would confuse the loop, which closes it itself on the EOF)."""
    for sock in made:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if sock.fileno() != -1 and not any(sock is h for h in handed):
            sock.close()


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
    made: list[socket.socket] = []
    handed: list[socket.socket] = []

    async def socket_factory(parsed) -> socket.socket:
        sock = await _connected_socket(parsed.host, parsed.port, made)
        handed.append(sock)
        return sock

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
                socket_factory=socket_factory,
                logger_name=logger_name,
                **({"server_hostname": server_hostname} if server_hostname and ssl_context else {}),
            )
        return listener
    except BaseException as exc:
        _shut(made, handed)
        if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
            raise
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
        return TunnelError(f"{url}: TLS failed: {exc.reason or exc}")
    if isinstance(exc, OSError):
        return TunnelError(f"{url}: {exc.strerror or exc}")
    return TunnelError(f"{url}: {type(exc).__name__}: {exc}")
