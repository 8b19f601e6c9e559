"""The seam between velo's tunnel and the wire that carries it.

A backend (WebSocket, HTTP/2, port-forward, anything a plugin adds) only has to
move opaque bytes in both directions with backpressure.  Velo's multiplexer rides
on top and never learns which backend carries it, the same way httpcore's
connection pool never learns which network backend it has.

The two halves mirror ``asyncio.Protocol``/``asyncio.Transport`` on purpose: the
hot path is a chain of synchronous callbacks, with no coroutine per chunk.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol


class TunnelSink(Protocol):
    """What velo gives a backend: the receiving end of one tunnel connection."""

    def connection_made(self, pipe: "TunnelPipe") -> None: ...
    def data_received(self, data: bytes | memoryview) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class TunnelPipe(Protocol):
    """What a backend gives velo: the sending end of one tunnel connection.

    A backend whose protocol multiplexes natively (HTTP/2) may also offer
    ``new_session(client=..., tuner=...)`` returning an object with
    ``velo.mux.Session``'s sans-IO API; the tunnel then drives its streams
    through that instead of running yamux over the pipe (velo/backends/h2.py).
    """

    peer: str
    # Optional ``shown``: where the backend actually went, when it resolved more than the
    # Endpoint said (a pod named without its namespace): `velo status` shows it instead.

    def write(self, data: bytes | memoryview) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


SinkFactory = Callable[[], TunnelSink]
Authenticator = Callable[[str | None], bool]
"""Called with the presented bearer token (or None); True admits the client."""


class SinkFlowControl:
    """The socket's write-side flow control passed on to velo's sink, remembered while there
    is no sink yet (a handshake in progress) so that the sink starts paused if need be."""

    sink: TunnelSink | None = None
    _write_paused = False

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.sink is not None:
            self.sink.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.sink is not None:
            self.sink.resume_writing()


class ProtocolPipe(SinkFlowControl, asyncio.Protocol):
    """A TunnelPipe over one asyncio stream transport (TCP, or TLS over it): the half every
    socket-based backend shares (h2, the tcp plugin).  asyncio's flow-control callbacks go
    to velo's sink; velo's calls go to the transport.  Subclasses create ``sink`` when their
    handshake allows (``start_sink``) and override ``data_received``."""

    def __init__(self, sink_factory: SinkFactory) -> None:
        self._sink_factory = sink_factory
        self.sink: TunnelSink | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"

    def start_sink(self) -> TunnelSink:
        sink = self.sink = self._sink_factory()
        sink.connection_made(self)
        if self._write_paused:
            sink.pause_writing()
        return sink

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.sink is not None:
            self.sink.connection_lost(exc)

    # ---- TunnelPipe ------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then connection_lost

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TunnelError(Exception):
    """A tunnel could not be established; ``reason`` is shown in `velo status`."""

    def __init__(self, reason: str, *, auth: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.auth = auth


@dataclass(frozen=True)
class Endpoint:
    """One way to reach a gateway, as the provider resolved it for this attempt.

    Everything a backend needs to dial travels in here (not as more ``connect``
    arguments), so a new option does not change every backend's signature.
    """

    backend: str
    url: str
    token: str = field(repr=False)  # never in a repr, a log line or a traceback
    settings: Any = None
    """The backend's validated ``[tunnel.<name>]`` table (None when built in code)."""
    ssl_context: ssl.SSLContext | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may carry credentials
    """Extra request headers, e.g. the Kubernetes apiserver's Authorization."""
    label: str = ""
    """What `velo status` shows instead of the URL (e.g. "pod velo-proxy-abc")."""
    problem: str = ""
    """Why the provider could not prepare this backend now (no ready pod...): the client
    counts it as this backend failing, with this reason, and tries the next one."""

    @property
    def shown(self) -> str:
        return self.label or self.url


@dataclass(frozen=True)
class GatewayListen:
    """Where and how a gateway accepts tunnels for one backend."""

    host: str
    port: int
    path: str = "/"
    ssl: ssl.SSLContext | None = None


class TunnelBackend:
    """Base class for tunnel backends.  Subclass, set ``name`` and ``schemes``,
    and return an instance from the ``velo_tunnel_backends`` hook."""

    name: ClassVar[str] = ""
    schemes: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    async def connect(self, endpoint: Endpoint, sink_factory: SinkFactory, *, timeout: float) -> TunnelPipe:
        """Open one tunnel to ``endpoint``, all of it within ``timeout`` seconds.

        Raise TunnelError on failure (``auth=True`` when the gateway rejected the
        token). Any other exception also counts as this backend failing; a
        cancellation must propagate as CancelledError and leave no socket behind.
        """
        raise NotImplementedError

    async def serve(
        self,
        listen: GatewayListen,
        authenticate: Authenticator,
        sink_factory: SinkFactory,
    ) -> asyncio.AbstractServer:
        """Accept tunnels (gateway side).  Backends that only dial may leave this out."""
        raise TunnelError(f"backend {self.name!r} cannot serve a gateway")
