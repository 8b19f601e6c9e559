"""The asyncio edge of a tunnel: one mux.Session over one TunnelPipe.

Gateway and client use this same class; they differ only in who opens which
streams and in the ``resolve`` callback that decides where an accepted stream
is dialled (the gateway's policy, or the client's table of local candidates).

Flow control is end to end and per stream.  Bytes from a local socket go into
the session only while the stream's send window allows; the rest waits in that
stream's ``pending`` buffer with the socket paused.  Bytes from the tunnel are
credited back to the peer only once the local socket accepted them without
pausing, so a reader that stops reading stalls its own stream and nothing else,
and memory stays within one window per stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from velo import protocol
from velo.channel import MessageChannel
from velo.mux.window import WindowTuner
from velo.mux import (
    DataReceived,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    ProtocolError,
    Session,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from velo.transport import TunnelPipe

log = logging.getLogger("velo.tunnel")

MAX_WRITE = 4 * 1024 * 1024  # largest single write handed to the backend


class Refused(Exception):
    """The acceptor will not connect this stream; the reason goes back to the opener."""


Resolver = Callable[[dict], Awaitable["tuple[str, int] | MessageChannel"]]
"""Acceptor side: where a stream with this header goes (a TCP address or Python code)."""


class StreamStats:
    """Counters one listener (or target) shares across its streams; read by `velo status`."""

    __slots__ = ("open", "total", "bytes_up", "bytes_down", "errors", "last_error")

    def __init__(self) -> None:
        self.open = 0
        self.total = 0
        self.bytes_up = 0     # local socket -> tunnel
        self.bytes_down = 0   # tunnel -> local socket
        self.errors = 0
        self.last_error = ""

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Tunnel:
    """Implements TunnelSink; see the module docstring."""

    def __init__(
        self,
        *,
        client: bool,
        resolve: Resolver | None = None,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 15.0,
        dial_timeout: float = 10.0,
        label: str = "tunnel",
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        # Receive windows grow with the measured round trip (velo/mux/window.py).
        self.window_tuner = WindowTuner()
        self.session = Session(client=client, tuner=self.window_tuner)
        self.resolve = resolve
        self.label = label
        self.pipe: TunnelPipe | None = None
        self.streams: dict[int, Bridge] = {}
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.paused = False
        self.rtt: float | None = None
        self.close_reason = ""
        self.stats = StreamStats()  # streams the peer opened towards us
        self._flush_handle: asyncio.Handle | None = None
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._dial_timeout = dial_timeout
        self._ping_sent: dict[int, float] = {}
        self._keepalive: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- TunnelSink -------------------------------------------------------------

    def connection_made(self, pipe: TunnelPipe) -> None:
        self.pipe = pipe
        new_session = getattr(pipe, "new_session", None)
        if new_session is not None:
            # The backend multiplexes natively (HTTP/2): its streams replace yamux here.
            self.session = new_session(client=self.client, tuner=self.window_tuner)
        if not self.connected.done():
            self.connected.set_result(None)
        self._ping_sent[self.session.ping()] = time.monotonic()  # first RTT right away
        self._keepalive = self.loop.call_later(self._keepalive_interval, self._on_keepalive)
        self.flush()

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            events = self.session.receive_data(data)
        except ProtocolError as exc:
            self.abort(f"protocol error from {self.peer}: {exc.reason}")
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                bridge = streams.get(event.stream_id)
                if bridge is not None:
                    bridge.tunnel_data(event.data)
                else:
                    self.session.acknowledge_received_data(event.stream_id, len(event.data))
            elif kind is WindowUpdated:
                bridge = streams.get(event.stream_id)
                if bridge is not None and bridge.pending:
                    bridge.window_opened()
            elif kind is StreamOpened:
                self._accept(event.stream_id)
            elif kind is StreamEnded:
                bridge = streams.get(event.stream_id)
                if bridge is not None:
                    bridge.tunnel_eof()
            elif kind is StreamReset:
                bridge = streams.pop(event.stream_id, None)
                if bridge is not None:
                    bridge.tunnel_reset()
            elif kind is PongReceived:
                sent = self._ping_sent.pop(event.opaque, None)
                if sent is not None:
                    self.rtt = time.monotonic() - sent
                    self.window_tuner.observe_rtt(self.rtt)
            elif kind is PingReceived:
                pass  # the session queued the reply
            elif kind is GoAwayReceived:
                self.close_reason = f"peer is going away (code {event.code})"
                if self.pipe is not None:
                    self.loop.call_soon(self.pipe.close)
        self.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if not self.close_reason:
            self.close_reason = f"connection lost: {exc}" if exc else "connection closed by peer"
        streams, self.streams = self.streams, {}
        for bridge in streams.values():
            bridge.tunnel_reset()
        for task in list(self._tasks):
            task.cancel()
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(self.close_reason))
        if not self.closed.done():
            self.closed.set_result(self.close_reason)

    def pause_writing(self) -> None:
        self.paused = True
        for bridge in self.streams.values():
            bridge.pause_source()

    def resume_writing(self) -> None:
        self.paused = False
        for bridge in list(self.streams.values()):
            bridge.resume_source()

    # ---- API ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.pipe is not None and not self.closed.done()

    @property
    def peer(self) -> str:
        return getattr(self.pipe, "peer", "?")

    def open(self, bridge: "Bridge", header: dict | bytes) -> None:
        """Attach a local connection as a new outgoing stream that starts with ``header``."""
        sid = self.session.open_stream()
        self.streams[sid] = bridge
        bridge.attach(self, sid)
        self.session.send_data(sid, protocol.encode_header(header))
        bridge.expect_reply()
        bridge.start()
        self.schedule_flush()

    def close(self, reason: str = "closed") -> None:
        """Polite close: tell the peer, flush, then close the pipe."""
        if self.closed.done() or self.pipe is None:
            return
        self.close_reason = reason
        self.session.go_away(0)
        self.flush()
        self.pipe.close()

    def abort(self, reason: str) -> None:
        if self.closed.done():
            return
        self.close_reason = reason
        log.warning("%s: closing tunnel: %s", self.label, reason)
        if self.pipe is not None:
            self.pipe.abort()
        else:
            self.connection_lost(None)

    def schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self.pipe is None:
            return
        data = self.session.data_to_send()
        if not data:
            return
        if len(data) <= MAX_WRITE:
            self.pipe.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), MAX_WRITE):
            self.pipe.write(view[start : start + MAX_WRITE])

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- internals ----------------------------------------------------------------

    def _on_keepalive(self) -> None:
        now = time.monotonic()
        if self._ping_sent and now - min(self._ping_sent.values()) > self._keepalive_timeout:
            self.abort(f"no keepalive answer from {self.peer} for {self._keepalive_timeout:g}s")
            return
        if not self._ping_sent:
            self._ping_sent[self.session.ping()] = now
            self.flush()
        self._keepalive = self.loop.call_later(self._keepalive_interval, self._on_keepalive)

    def _accept(self, sid: int) -> None:
        if self.resolve is None:
            self.session.reset_stream(sid)
            return
        bridge = Bridge(self.stats)
        self.streams[sid] = bridge
        bridge.attach(self, sid)
        bridge.expect_header()

    async def dial(self, bridge: "Bridge", header: dict) -> None:
        """Acceptor side: resolve the header, connect, answer the opener."""
        sid = bridge.sid
        try:
            assert self.resolve is not None
            target = await self.resolve(header)
            if isinstance(target, MessageChannel):
                target.attach(bridge)
                return
            host, port = target
            async with asyncio.timeout(self._dial_timeout):  # no extra task, unlike wait_for
                await self.loop.create_connection(lambda: bridge, host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, Refused):
                reason = str(exc)
            elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                reason = f"dial timed out after {self._dial_timeout:g}s"
            else:
                reason = f"dial failed: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
            bridge.stats.errors += 1
            bridge.stats.last_error = reason
            log.info("%s: stream %s refused: %s", self.label, sid, reason)
            if self.streams.get(sid) is bridge:
                del self.streams[sid]
                self.session.send_data(sid, protocol.encode({"ok": False, "error": reason}))
                self.session.reset_stream(sid)
                self.schedule_flush()
            bridge.tunnel_reset()
            return


class Bridge(asyncio.Protocol):
    """One local TCP connection joined to one tunnel stream.

    It is the asyncio Protocol of the local socket, whichever side opened it:
    an accepted local connection (opener) or a connection the acceptor dialled.
    """

    __slots__ = (
        "stats", "tunnel", "sid", "transport", "pending", "local_eof", "fin_sent",
        "remote_eof", "write_paused", "unacked", "reader", "awaiting", "early",
        "reading_paused", "closed", "__weakref__",
    )

    def __init__(self, stats: StreamStats) -> None:
        self.stats = stats
        self.tunnel: Tunnel | None = None
        self.sid = 0
        self.transport: asyncio.Transport | None = None
        self.pending: bytearray | None = None  # socket bytes the window did not take yet
        self.local_eof = False
        self.fin_sent = False
        self.remote_eof = False
        self.write_paused = False
        self.unacked = 0
        self.reader: protocol.MessageReader | None = None
        self.awaiting: str = ""   # "", "reply" (opener) or "header" (acceptor)
        self.early: list[bytes] | None = None  # acceptor: payload that arrived before the dial finished
        self.reading_paused = False
        self.closed = False
        stats.open += 1
        stats.total += 1

    # ---- wiring -------------------------------------------------------------------

    def attach(self, tunnel: Tunnel, sid: int) -> None:
        self.tunnel = tunnel
        self.sid = sid
        if tunnel.paused:
            self.pause_source()

    def expect_reply(self) -> None:
        self.reader = protocol.MessageReader()
        self.awaiting = "reply"

    def expect_header(self) -> None:
        self.reader = protocol.MessageReader()
        self.awaiting = "header"
        self.early = []

    # ---- asyncio.Protocol: the local socket --------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.early is not None:  # acceptor: our dial completed
            tunnel = self.tunnel
            if tunnel is None or tunnel.streams.get(self.sid) is not self:
                transport.close()
                return
            tunnel.session.send_data(self.sid, protocol.OK_REPLY)
            early, self.early = self.early, None
            for chunk in early or ():
                self._write_local(chunk)
            if self.remote_eof:
                self._local_write_eof()
            tunnel.schedule_flush()
        elif self.tunnel is not None and self.tunnel.paused:
            self.pause_source()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_up += len(data)
        tunnel = self.tunnel
        if tunnel is None or self.pending is not None:
            if self.pending is None:
                self.pending = bytearray(data)
            else:
                self.pending += data
            self.pause_source()
            return
        sent = tunnel.session.send_data(self.sid, data)
        if sent < len(data):
            self.pending = bytearray(memoryview(data)[sent:])
            self.pause_source()
        tunnel.schedule_flush()

    def eof_received(self) -> bool:
        self.local_eof = True
        if self.tunnel is not None and self.pending is None:
            self._send_fin()
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.open -= 1
        tunnel = self.tunnel
        if tunnel is None:
            return
        if tunnel.streams.get(self.sid) is self:
            del tunnel.streams[self.sid]
            if not (self.fin_sent and self.remote_eof):
                tunnel.session.reset_stream(self.sid)
                tunnel.schedule_flush()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.unacked and self.tunnel is not None:
            self.tunnel.session.acknowledge_received_data(self.sid, self.unacked)
            self.unacked = 0
            self.tunnel.schedule_flush()

    # ---- from the tunnel ----------------------------------------------------------

    def tunnel_data(self, data: bytes) -> None:
        if self.awaiting:
            self._preamble(data)
            return
        if self.early is not None:  # acceptor, dial in progress: hold it, unacknowledged
            self.early.append(data)
            return
        self._write_local(data)

    def _write_local(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed:
            self.tunnel.session.acknowledge_received_data(self.sid, len(data))
            return
        self.stats.bytes_down += len(data)
        transport.write(data)
        if self.write_paused:
            self.unacked += len(data)
        else:
            self.tunnel.session.acknowledge_received_data(self.sid, len(data))

    def _preamble(self, data: bytes) -> None:
        tunnel = self.tunnel
        try:
            message, rest = self.reader.first(data)
        except protocol.MessageError as exc:
            self._fail(f"bad stream {self.awaiting}: {exc}")
            return
        if message is None:
            tunnel.session.acknowledge_received_data(self.sid, len(data))
            return
        tunnel.session.acknowledge_received_data(self.sid, len(data) - len(rest))
        kind, self.awaiting, self.reader = self.awaiting, "", None
        if kind == "reply":
            if not message.get("ok"):
                self._fail(str(message.get("error") or "refused by peer"))
                return
            if rest:
                self._write_local(rest)
        else:  # header: the acceptor dials, holding the payload until connected
            if rest:
                self.early.append(rest)
            tunnel.spawn(tunnel.dial(self, message))

    def _fail(self, reason: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = reason
        log.info("%s: stream %s: %s", self.tunnel.label, self.sid, reason)
        tunnel = self.tunnel
        if tunnel.streams.get(self.sid) is self:
            del tunnel.streams[self.sid]
            tunnel.session.reset_stream(self.sid)
            tunnel.schedule_flush()
        self.tunnel_reset()

    def tunnel_eof(self) -> None:
        self.remote_eof = True
        if self.awaiting:
            self._fail(f"stream closed before its {self.awaiting} arrived")
            return
        if self.transport is not None and self.early is None:
            self._local_write_eof()

    def _local_write_eof(self) -> None:
        transport = self.transport
        if self.fin_sent:
            transport.close()  # both directions done; close() still flushes
            if self.tunnel.streams.get(self.sid) is self:
                del self.tunnel.streams[self.sid]
        elif transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def tunnel_reset(self) -> None:
        """The peer reset the stream or the whole tunnel is gone."""
        if self.closed:
            return
        if self.transport is not None:
            self.transport.abort()  # connection_lost does the bookkeeping
        else:
            self.closed = True
            self.stats.open -= 1

    def start(self) -> None:
        """Opener: the stream exists now; send what arrived while we waited for it."""
        if self.pending is not None:
            self.window_opened()
        elif self.local_eof:
            self._send_fin()
        else:
            self.resume_source()

    def window_opened(self) -> None:
        pending = self.pending
        if pending is None:
            return
        tunnel = self.tunnel
        sent = tunnel.session.send_data(self.sid, pending)
        if sent:
            del pending[:sent]
            tunnel.schedule_flush()
        if not pending:
            self.pending = None
            if self.local_eof:
                self._send_fin()
            else:
                self.resume_source()

    def _send_fin(self) -> None:
        if self.fin_sent:
            return
        self.fin_sent = True
        tunnel = self.tunnel
        if tunnel.streams.get(self.sid) is not self:
            return
        tunnel.session.end_stream(self.sid)
        tunnel.schedule_flush()
        if self.remote_eof and self.transport is not None:
            self.transport.close()
            del tunnel.streams[self.sid]

    # ---- backpressure towards the local socket --------------------------------------

    def pause_source(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if (
            self.reading_paused
            and self.pending is None
            and self.tunnel is not None
            and not self.tunnel.paused
            and self.transport is not None
        ):
            self.reading_paused = False
            self.transport.resume_reading()


class AcceptedBridge(Bridge):
    """A connection accepted by a local listener, to be sent through a tunnel as a new
    stream.  The client's forward listeners and the gateway's reverse listeners are the
    same thing seen from either end; ``listener.accepted`` decides which tunnel."""

    __slots__ = ("listener",)

    def __init__(self, listener) -> None:
        super().__init__(listener.stats)
        self.listener = listener

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.listener.accepted(self, transport)
