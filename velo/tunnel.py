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
import socket
import struct
import time
from typing import Awaitable, Callable

from velo import protocol
from velo.channel import MessageChannel
from velo.mux.window import STREAM_START_WINDOW, WindowTuner
from velo.mux import (
    DataReceived,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    ProtocolError,
    Session,
    SessionClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from velo.transport import TunnelPipe

log = logging.getLogger("velo.tunnel")

MAX_WRITE = 4 * 1024 * 1024  # largest single write handed to the backend
MAX_STREAMS = 8192           # streams a peer may have open towards us on one tunnel
MAX_ACCEPTING = 4096         # of those, still sending their header or being dialled
LISTEN_BACKLOG = 4096        # local listeners: a burst of connects must not overflow the accept queue

_monotonic = time.monotonic
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Close a local socket with a TCP reset instead of a FIN.

    A stream that did not end cleanly must not look complete: for raw TCP,
    HTTP/1.0 bodies and many database protocols a FIN is "end of data" and a
    truncated transfer would pass for a finished one.  ``abort()`` alone only
    skips the flush; the kernel still sends a FIN unless linger is zero.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:  # already closed, or not a TCP socket
            pass
    transport.abort()


class LogOnce:
    """One log line per kind of event per ``period`` seconds; repeats are counted.

    A hostile or broken peer can trigger the same refusal thousands of times a
    second; the log gets the first one and, later, how many followed.
    """

    __slots__ = ("period", "_last", "_suppressed")

    def __init__(self, period: float = 60.0) -> None:
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, logger: logging.Logger, level: int, kind: str, msg: str, *args) -> None:
        now = _monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.period:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        repeats = self._suppressed.pop(kind, 0)
        if repeats:
            msg += f" ({repeats} more since the last such line)"
        logger.log(level, msg, *args)


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
        max_streams: int = MAX_STREAMS,
        max_accepting: int = MAX_ACCEPTING,
        max_buffered: int | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        # Receive windows grow with the measured round trip (velo/mux/window.py).
        self.window_tuner = WindowTuner(start_window=STREAM_START_WINDOW)
        session_limits = {} if max_buffered is None else {"max_buffered": max_buffered}
        self.session = Session(client=client, tuner=self.window_tuner, **session_limits)
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
        self._keepalive_due = 0.0
        self._next_ping = 0.0
        self._last_heard = 0.0  # monotonic time the peer last sent us anything
        self._tasks: set[asyncio.Task] = set()
        # Streams holding bytes because the session-wide send queue was full: no
        # window update will come for them, so flush() retries them once it drained.
        self._starved: list[Bridge] = []
        self.max_streams = max_streams
        self.max_accepting = max_accepting
        self.accepting = 0  # peer-opened streams still in header/dial
        self.dead = False   # torn down: nothing may be written to the pipe any more
        self.reason_logged = False  # abort() already said why, once
        self.going_away = False
        self.log_once = LogOnce()

    # ---- TunnelSink -------------------------------------------------------------

    def connection_made(self, pipe: TunnelPipe) -> None:
        self.pipe = pipe
        new_session = getattr(pipe, "new_session", None)
        if new_session is not None:
            # The backend multiplexes natively (HTTP/2): its streams replace yamux here.
            self.session = new_session(client=self.client, tuner=self.window_tuner)
        if not self.connected.done():
            self.connected.set_result(None)
        now = _monotonic()
        self._last_heard = now
        self._ping(now)  # first RTT right away
        self._arm_keepalive(now)
        self.flush()

    def data_received(self, data: bytes | memoryview) -> None:
        if self.dead:
            return
        self._last_heard = _monotonic()  # any byte from the peer proves it alive
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
                    self.rtt = _monotonic() - sent
                    self.window_tuner.observe_rtt(self.rtt)
            elif kind is PingReceived:
                pass  # the session queued the reply
            elif kind is GoAwayReceived:
                self.going_away = True  # no new streams: `alive` is False from here on
                self.close_reason = f"peer is going away (code {event.code})"
                if self.pipe is not None:
                    self.loop.call_soon(self.pipe.close)
        self.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The pipe is gone (or we gave up on it): every stream still open is broken.

        Idempotent: ``abort`` calls it at once, and the backend calls it again later.
        """
        if not self.close_reason:
            self.close_reason = f"connection lost: {exc}" if exc else "connection closed by peer"
        self._teardown()
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(self.close_reason))
            self.connected.exception()  # retrieved: a tunnel that never came up is not an error to log
        if not self.closed.done():
            self.closed.set_result(self.close_reason)

    def _teardown(self) -> None:
        self.dead = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._starved.clear()
        streams, self.streams = self.streams, {}
        for bridge in streams.values():
            bridge.tunnel_reset()  # a reset (RST) on each local socket, never a FIN
        for task in list(self._tasks):
            task.cancel()

    def pause_writing(self) -> None:
        self.paused = True
        for bridge in self.streams.values():
            bridge.pause_source()

    def resume_writing(self) -> None:
        self.paused = False
        if self._starved:
            self._retry_starved()
        for bridge in list(self.streams.values()):
            bridge.resume_source()

    # ---- API ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.pipe is not None and not self.dead and not self.going_away

    @property
    def peer(self) -> str:
        return getattr(self.pipe, "peer", "?")

    def open(self, bridge: "Bridge", header: dict | bytes) -> None:
        """Attach a local connection as a new outgoing stream that starts with ``header``."""
        try:
            sid = self.session.open_stream()
        except SessionClosedError:  # the peer said go-away: this connection cannot be carried
            bridge.stats.errors += 1
            bridge.stats.last_error = "tunnel is closing"
            bridge.tunnel_reset()
            return
        self.streams[sid] = bridge
        bridge.attach(self, sid)
        data = protocol.encode_header(header)
        sent = self.session.send_data(sid, data)
        if sent < len(data):  # the send queue is full: the header waits in front of any payload
            rest = bytearray(memoryview(data)[sent:])
            if bridge.pending is not None:
                rest += bridge.pending
            bridge.pending = rest
        bridge.expect_reply()
        bridge.start()
        self.schedule_flush()

    def close(self, reason: str = "closed") -> None:
        """Polite close (`velo up` or the gateway stopping): tell the peer, flush, close the pipe.

        Streams still open are cut, so each one ends with a reset on both sides:
        their transfers did not finish and must not look finished.
        """
        if self.dead or self.pipe is None:
            return
        self.close_reason = reason
        session = self.session
        for sid in list(self.streams):
            session.reset_stream(sid)
        session.go_away(0)
        self.flush()
        self._teardown()
        self.pipe.close()

    def abort(self, reason: str) -> None:
        """Give up on the tunnel now (protocol error, keepalive): one log line, streams reset."""
        if self.dead or self.closed.done():
            return
        self.close_reason = reason
        self.reason_logged = True
        log.warning("%s: closing tunnel: %s", self.label, reason)
        self._teardown()
        if self.pipe is not None:
            self.pipe.abort()
        # Do not wait for the backend to report the loss: the supervisor may
        # reconnect right away, and nothing writes to this pipe any more.
        self.connection_lost(None)

    def schedule_flush(self) -> None:
        if self._flush_handle is None and not self.dead:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self.pipe is None or self.dead:
            return
        data = self.session.data_to_send()
        if data:
            if len(data) <= MAX_WRITE:
                self.pipe.write(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), MAX_WRITE):
                    self.pipe.write(view[start : start + MAX_WRITE])
        if self._starved and not self.paused:
            self._retry_starved()

    def queue_full(self) -> bool:
        """Did the session refuse bytes for lack of queue room (not window)?  Only asked
        after a partial send; a session without a send queue limit (HTTP/2) says no."""
        return getattr(self.session, "send_buffer_full", False)

    def starve(self, bridge: "Bridge") -> None:
        """``bridge`` holds bytes the full session queue refused; retry it after the next flush."""
        if not bridge.starved:
            bridge.starved = True
            self._starved.append(bridge)
            self.schedule_flush()

    def _retry_starved(self) -> None:
        starved, self._starved = self._starved, []
        streams = self.streams
        for bridge in starved:
            bridge.starved = False
            if streams.get(bridge.sid) is bridge:
                bridge.window_opened()  # re-registers itself if the queue fills up again

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- internals ----------------------------------------------------------------

    def _ping(self, now: float) -> None:
        if len(self._ping_sent) > 64:  # unanswered pings of a dead peer: keep it bounded
            self._ping_sent.clear()
        self._ping_sent[self.session.ping()] = now
        self._next_ping = now + self._keepalive_interval
        self.schedule_flush()

    def _arm_keepalive(self, now: float) -> None:
        """Wake at the next ping or at the moment the peer's silence reaches the timeout,
        whichever comes first, so a dead peer is noticed ``keepalive_timeout`` after it
        last sent anything (not a whole interval later)."""
        due = min(self._next_ping, self._last_heard + self._keepalive_timeout)
        self._keepalive_due = due
        self._keepalive = self.loop.call_later(max(due - now, 0.001), self._on_keepalive)

    def _on_keepalive(self) -> None:
        self._keepalive = None
        if self.dead:
            return
        now = _monotonic()
        if now - self._keepalive_due > self._keepalive_interval:
            # We ourselves were not running (laptop asleep, process stopped): the
            # peer's answers may be waiting unread, so do not judge it by our gap.
            self._last_heard = now
        silent = now - self._last_heard
        if silent >= self._keepalive_timeout:
            self.abort(f"no keepalive answer from {self.peer} for {silent:.1f}s "
                       f"(keepalive_timeout {self._keepalive_timeout:g}s)")
            return
        if now >= self._next_ping:
            self._ping(now)
        self._arm_keepalive(now)

    def _accept(self, sid: int) -> None:
        if self.resolve is None:
            self.session.reset_stream(sid)
            return
        if len(self.streams) >= self.max_streams:
            self.refuse_stream(sid, "streams", f"more than {self.max_streams} streams open")
            return
        if self.accepting >= self.max_accepting:
            self.refuse_stream(sid, "accepting", f"more than {self.max_accepting} streams waiting for their header or dial")
            return
        bridge = Bridge(self.stats)
        self.streams[sid] = bridge
        bridge.attach(self, sid)
        bridge.expect_header()
        bridge.accepting = True
        self.accepting += 1

    def refuse_stream(self, sid: int, kind: str, why: str) -> None:
        """A cap was hit: reset that stream, count it, one log line (not one per stream)."""
        self.session.reset_stream(sid)
        self.stats.errors += 1
        self.stats.last_error = f"stream refused: {why}"
        self.log_once(log, logging.WARNING, kind, "%s: refusing streams from %s: %s", self.label, self.peer, why)

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
            bridge.accepted()
            self.log_once(log, logging.INFO, "refused:" + reason, "%s: stream %s refused: %s", self.label, sid, reason)
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
        "reading_paused", "closed", "starved", "accepting", "__weakref__",
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
        self.starved = False    # waiting in Tunnel._starved for queue room
        self.accepting = False  # peer-opened, header or dial still to come (Tunnel.accepting)
        stats.open += 1
        stats.total += 1

    # ---- wiring -------------------------------------------------------------------

    def attach(self, tunnel: Tunnel, sid: int) -> None:
        self.tunnel = tunnel
        self.sid = sid
        if tunnel.paused:
            self.pause_source()

    def expect_reply(self) -> None:
        self.reader = protocol.MessageReader(protocol.MAX_HEADER)
        self.awaiting = "reply"

    def expect_header(self) -> None:
        self.reader = protocol.MessageReader(protocol.MAX_HEADER)
        self.awaiting = "header"
        self.early = []

    def accepted(self) -> None:
        """Acceptor: header and dial are over (either way); free the slot they held."""
        if self.accepting:
            self.accepting = False
            self.tunnel.accepting -= 1

    # ---- asyncio.Protocol: the local socket --------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.early is not None:  # acceptor: our dial completed
            tunnel = self.tunnel
            self.accepted()
            if tunnel is None or tunnel.streams.get(self.sid) is not self:
                reset_transport(transport)  # the stream was reset while we dialled
                return
            self._send(protocol.OK_REPLY)
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
            if tunnel.queue_full():
                tunnel.starve(self)
        tunnel.schedule_flush()

    def _send(self, data: bytes) -> None:
        """Towards the tunnel, keeping order behind pending bytes (not counted as payload)."""
        if self.pending is not None:
            self.pending += data
            return
        tunnel = self.tunnel
        sent = tunnel.session.send_data(self.sid, data)
        if sent < len(data):
            self.pending = bytearray(memoryview(data)[sent:])
            self.pause_source()
            if tunnel.queue_full():
                tunnel.starve(self)
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
        self.accepted()
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
            tunnel.session.acknowledge_received_data(self.sid, len(data))
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
        tunnel = self.tunnel
        tunnel.log_once(log, logging.INFO, "fail:" + reason.split(":")[0],
                        "%s: stream %s: %s", tunnel.label, self.sid, reason)
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
        """The peer reset the stream or the whole tunnel is gone: the local socket gets an RST."""
        if self.closed:
            return
        if self.transport is not None:
            reset_transport(self.transport)  # connection_lost does the bookkeeping
        else:
            self.closed = True
            self.stats.open -= 1
            if self.tunnel is not None:
                self.accepted()

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
        if pending and tunnel.queue_full():
            tunnel.starve(self)
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
