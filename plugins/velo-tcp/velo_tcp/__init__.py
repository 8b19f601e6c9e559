"""Raw TCP tunnel backend for velo: a token handshake, then a plain byte pipe.

For trusted networks and `kubectl port-forward`, where nothing in between needs
HTTP.  There is no encryption unless velo hands the backend an SSL context, so
do not expose a ``tcp://`` gateway to the internet.

Configuration (the plugin owns its table, velo's core does not know these keys)::

    [tunnel.tcp]
    url = "tcp://gateway.example:7071"
    so_keepalive = true      # optional: let the OS probe an idle connection

Wire protocol (one connection = one tunnel):

    client -> server   b"VELO/1 <token>\\n"
    server -> client   b"OK\\n"  then both sides are a byte pipe
                  or   b"DENIED\\n"  then the server closes

The server reads at most 1 KiB for the greeting and gives up after 5 s.  After
``OK`` every byte belongs to velo's multiplexer; bytes that arrive in the same
read as the ``OK`` line (or the greeting) are handed on, not dropped.

The adapter is an ``asyncio.Protocol`` on both sides: the hot path is the
transport's synchronous ``data_received`` callback forwarding to velo's sink,
with no coroutine and no stream buffer per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from urllib.parse import urlsplit

from velo.config.tables import BackendTable, Flag, url_for
from velo.hookspecs import hookimpl
from velo.transport import (
    Authenticator,
    Endpoint,
    GatewayListen,
    ProtocolPipe,
    SinkFactory,
    TunnelBackend,
    TunnelError,
)

__all__ = ["TcpBackend", "TcpTable", "velo_tunnel_backends", "velo_config_tables", "MAGIC", "OK", "DENIED"]

log = logging.getLogger("velo.tcp")

MAGIC = b"VELO/1"
OK = b"OK\n"
DENIED = b"DENIED\n"
MAX_LINE = 1024            # longest greeting / reply line, newline included
HANDSHAKE_TIMEOUT = 5.0    # server side: seconds a client has to send its greeting


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if not peer:
        return "?"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _TcpPipe(ProtocolPipe):
    """One TCP connection: handshake first, then velo's TunnelPipe over the transport
    (``ProtocolPipe``); ``sink`` is velo's ``TunnelSink`` once the handshake succeeded."""

    def __init__(self, sink_factory: SinkFactory) -> None:
        super().__init__(sink_factory)
        self._buffer = bytearray()            # handshake bytes until the first "\n"

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = _peer_name(transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:  # the hot path
            sink.data_received(data)
            return
        if self.transport.is_closing():  # handshake already decided against this connection
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) >= MAX_LINE:
                self._handshake_failed(f"handshake line longer than {MAX_LINE} bytes")
            return
        if end >= MAX_LINE:
            self._handshake_failed(f"handshake line longer than {MAX_LINE} bytes")
            return
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        rest = bytes(self._buffer[end + 1 :])
        self._buffer = bytearray()
        self._handshake_line(line, rest)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.sink is not None:
            super().connection_lost(exc)
        else:
            self._handshake_failed("connection closed during the handshake" + (f": {exc}" if exc else ""))

    # ---- handshake ---------------------------------------------------------------------

    def _start_pipe(self, rest: bytes) -> None:
        """The handshake succeeded: from here on the connection belongs to velo."""
        sink = self.start_sink()
        if rest and self.sink is sink and not self.transport.is_closing():
            sink.data_received(rest)

    def _handshake_line(self, line: bytes, rest: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _handshake_failed(self, reason: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _ClientPipe(_TcpPipe):
    def __init__(self, sink_factory: SinkFactory, token: str, url: str, done: asyncio.Future) -> None:
        super().__init__(sink_factory)
        self._token = token
        self._url = url
        self._done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.write(MAGIC + b" " + self._token.encode() + b"\n")  # type: ignore[attr-defined]

    def _handshake_line(self, line: bytes, rest: bytes) -> None:
        if line == OK.rstrip(b"\n"):
            if self._done.done():  # connect() gave up (timeout / cancelled) meanwhile
                self.abort()
                return
            self._done.set_result(None)
            self._start_pipe(rest)
        elif line == DENIED.rstrip(b"\n"):
            self._fail(TunnelError(f"{self._url}: the gateway rejected the token", auth=True))
        else:
            shown = line[:60].decode("ascii", "replace")
            self._handshake_failed(f"unexpected handshake reply {shown!r} (is this a velo tcp:// gateway?)")

    def _handshake_failed(self, reason: str) -> None:
        self._fail(TunnelError(f"{self._url}: {reason}"))

    def _fail(self, error: TunnelError) -> None:
        if not self._done.done():
            self._done.set_exception(error)
        self.abort()


class _ServerPipe(_TcpPipe):
    def __init__(self, sink_factory: SinkFactory, authenticate: Authenticator) -> None:
        super().__init__(sink_factory)
        self._authenticate = authenticate
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._handshake_failed, f"no handshake within {HANDSHAKE_TIMEOUT:g}s"
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _handshake_line(self, line: bytes, rest: bytes) -> None:
        self._cancel_deadline()
        magic, _, token = line.partition(b" ")
        if magic != MAGIC:
            self._handshake_failed("not a velo tcp handshake")
            return
        presented = token.strip().decode("utf-8", "replace") or None
        if not self._authenticate(presented):
            log.warning("tcp: %s presented an invalid or missing token", self.peer)
            self.transport.write(DENIED)
            self.transport.close()
            return
        self.transport.write(OK)
        # The sink (velo's Tunnel) is created only now: a client that failed the
        # handshake never costs the gateway a tunnel.
        self._start_pipe(rest)

    def _handshake_failed(self, reason: str) -> None:
        self._cancel_deadline()
        if self.transport is not None and not self.transport.is_closing():
            log.info("tcp: dropping %s: %s", self.peer, reason)
            self.transport.abort()


class TcpTable(BackendTable):
    """``[tunnel.tcp]``: validated by velo with the same messages as its own keys."""

    url: url_for("tcp")  # type: ignore[valid-type]
    so_keepalive: Flag = False
    """SO_KEEPALIVE on the tunnel socket, for networks that drop idle flows silently."""


class TcpBackend(TunnelBackend):
    name = "tcp"
    schemes = ("tcp",)
    description = "raw TCP with a token handshake (trusted networks, port-forward)"

    async def connect(self, endpoint: Endpoint, sink_factory: SinkFactory, *, timeout: float) -> _TcpPipe:
        url, token, ssl_context = endpoint.url, endpoint.token, endpoint.ssl_context
        keepalive = bool(getattr(endpoint.settings, "so_keepalive", False))
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise TunnelError(f"{url}: {exc}") from None
        if parts.scheme not in self.schemes or not host or port is None:
            raise TunnelError(f"{url}: expected tcp://HOST:PORT")
        if "\n" in token or "\r" in token:
            raise TunnelError(f"{url}: the token must be a single line")

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pipe = _ClientPipe(sink_factory, token, url, done)
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(
                    lambda: pipe,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                )
                if keepalive:
                    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                await done
        except TunnelError:
            raise
        except (TimeoutError, asyncio.TimeoutError):
            pipe.abort()
            raise TunnelError(f"{url}: no answer within {timeout:g}s") from None
        except ssl.SSLError as exc:
            pipe.abort()
            raise TunnelError(f"{url}: TLS failed: {exc.reason or exc}") from None
        except OSError as exc:
            pipe.abort()
            raise TunnelError(f"{url}: {exc.strerror or exc}") from None
        except BaseException:  # cancelled: leave no half-open socket behind
            pipe.abort()
            raise
        return pipe

    async def serve(
        self,
        listen: GatewayListen,
        authenticate: Authenticator,
        sink_factory: SinkFactory,
    ) -> asyncio.AbstractServer:
        if listen.path not in ("", "/"):
            log.warning("tcp: ignoring the path %r of the listen URL (tcp:// has no paths)", listen.path)
        return await asyncio.get_running_loop().create_server(
            lambda: _ServerPipe(sink_factory, authenticate),
            listen.host,
            listen.port,
            ssl=listen.ssl,
            reuse_address=True,
        )


@hookimpl
def velo_tunnel_backends():
    return [TcpBackend()]


@hookimpl
def velo_config_tables():
    return {"tunnel.tcp": TcpTable}
