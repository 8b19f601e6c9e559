"""Sans-IO yamux session: bytes in -> events, calls -> bytes out.

No I/O and no clock here so the same code drives asyncio, threads or tests,
and so the hot path is nothing but parsing and bookkeeping.
"""

from __future__ import annotations

from .events import (
    DataReceived,
    Event,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from .window import WindowTuner
from .frames import (
    FAST_HEADER,
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_U32,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    ProtocolError,
)

__all__ = ["Session", "StreamClosedError", "SessionClosedError"]

_unpack_from = FAST_HEADER.unpack_from
_pack = FAST_HEADER.pack

# version/type/flags fused into the first u32 of FAST_HEADER (version is 0).
_WU = TYPE_WINDOW_UPDATE << 16
_PING = TYPE_PING << 16
_GO_AWAY = TYPE_GO_AWAY << 16


class StreamClosedError(Exception):
    """Writing to a stream we already half-closed, or that was reset/forgotten."""


class SessionClosedError(Exception):
    """No new streams: a GoAway was sent or received, or the session failed."""


class _Stream:
    """Per-stream flow-control state; slotted because there may be 64k of them."""

    __slots__ = ("send_window", "recv_window", "pending", "local_closed", "remote_closed", "window", "epoch")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window  # bytes the peer lets us send
        self.recv_window = recv_window  # bytes the peer may still send us
        self.pending = 0  # consumed by the app but not yet credited to the peer
        self.window = recv_window  # our receive window; only a WindowTuner grows it
        self.epoch = 0.0  # the tuner's: when this stream last sent credit
        self.local_closed = False
        self.remote_closed = False


class Session:
    """One end of a yamux connection.

    Feed received bytes to ``receive_data``, act on the returned events, and
    write ``data_to_send()`` to the transport after every call that may queue
    output. Memory stays bounded because a peer can never have more than
    ``window`` unacknowledged bytes in flight per stream, partial frames are
    streamed out instead of buffered, and ``send_data`` stops accepting once
    ``max_buffered`` bytes sit undrained in the outbound queue.
    """

    def __init__(
        self,
        *,
        client: bool,
        window: int = INITIAL_WINDOW,
        max_frame: int = 64 * 1024,
        max_streams: int = 65536,
        max_buffered: int = 64 * 1024 * 1024,
        tuner: WindowTuner | None = None,
    ) -> None:
        # yamux can only grow a window from the implicit 256 KiB, never shrink it.
        if not INITIAL_WINDOW <= window <= MAX_U32:
            raise ValueError(f"window must be within [{INITIAL_WINDOW}, {MAX_U32}]")
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        if max_streams < 0:
            raise ValueError("max_streams must be >= 0")
        if max_buffered < 1:
            raise ValueError("max_buffered must be positive")
        self.client = client
        self._window = window
        self._max_frame = max_frame
        self._max_streams = max_streams
        self._max_buffered = max_buffered
        self._tuner = tuner  # grows receive windows (velo/mux/window.py); None: fixed
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._local_parity = 1 if client else 0
        self._peer_max_id = 0  # highest stream id the peer has opened
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._ping_id = 0
        self._local_go_away = False
        self._remote_go_away = False
        self._failed: ProtocolError | None = None
        # Inbound parse state carried between receive_data calls.
        self._hdr = bytearray()  # < 12 bytes of a split header
        self._rem = 0  # payload bytes of the current data frame still to come
        self._rem_sid = 0  # where they go (0: discard)
        self._rem_fin = False  # that frame carried FIN, apply once complete
        # Side channel from _frame() to the parse loop (avoids a tuple per frame).
        self._dsid = 0
        self._dfin = False

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse every complete frame (and partial payloads) in ``data``.

        On a ProtocolError a GoAway(protocol error) is queued and the session
        refuses further input; flush ``data_to_send()`` and close.
        """
        if self._failed is not None:
            raise self._failed
        if type(data) is not bytes:
            # One copy up front lets every payload slice be a plain bytes copy.
            data = bytes(data)
        events: list[Event] = []
        try:
            self._feed(data, events)
        except ProtocolError as exc:
            exc.events = events
            self._fail(exc)
            raise
        return events

    def _fail(self, exc: ProtocolError) -> None:
        self._failed = exc
        if not self._local_go_away:
            self._local_go_away = True
            self._queue_control(_GO_AWAY, 0, GO_AWAY_PROTOCOL_ERROR)

    def _feed(self, data: bytes, events: list[Event]) -> None:
        n = len(data)
        pos = 0
        streams = self._streams
        append = events.append

        rem = self._rem
        if rem:
            # Tail of a data frame whose header arrived in an earlier call.
            take = rem if rem <= n else n
            sid = self._rem_sid
            if sid and take and sid in streams:  # app may have reset it meanwhile
                append(DataReceived(sid, data[:take]))
            rem -= take
            self._rem = rem
            pos = take
            if rem:
                return
            if self._rem_fin:
                self._rem_fin = False
                st = streams.get(sid)
                if st is not None:
                    self._remote_end(sid, st, events)
        elif self._hdr:
            # Rare (header split across reads): a copy keeps the loop simple.
            data = bytes(self._hdr) + data
            self._hdr.clear()
            n = len(data)

        unpack = _unpack_from
        while n - pos >= HEADER_SIZE:
            vtf, sid, length = unpack(data, pos)
            pos += HEADER_SIZE
            if not vtf:
                # Hot path: version 0, data frame, no flags.
                st = streams.get(sid)
                if st is not None and length <= st.recv_window and not st.remote_closed:
                    st.recv_window -= length
                    end = pos + length
                    if end <= n:
                        if length:
                            append(DataReceived(sid, data[pos:end]))
                        pos = end
                        continue
                    if pos < n:
                        append(DataReceived(sid, data[pos:]))
                    self._rem = end - n
                    self._rem_sid = sid
                    self._rem_fin = False
                    return
            length = self._frame(vtf, sid, length, events)
            if length:
                end = pos + length
                dsid = self._dsid
                if end <= n:
                    if dsid:
                        append(DataReceived(dsid, data[pos:end]))
                    pos = end
                    if self._dfin:
                        st = streams.get(dsid)
                        if st is not None:
                            self._remote_end(dsid, st, events)
                else:
                    if dsid and pos < n:
                        append(DataReceived(dsid, data[pos:]))
                    self._rem = end - n
                    self._rem_sid = dsid
                    self._rem_fin = self._dfin
                    return
        if pos < n:
            self._hdr += data[pos:]

    def _frame(self, vtf: int, sid: int, length: int, events: list[Event]) -> int:
        """Everything but the plain-data fast path.

        Returns the number of payload bytes that follow the header (data
        frames only) and leaves their destination in ``_dsid``/``_dfin``.
        """
        version = vtf >> 24
        ftype = (vtf >> 16) & 0xFF
        flags = vtf & 0xFFFF
        if version:
            raise ProtocolError(f"unsupported version {version}")
        if ftype == TYPE_DATA or ftype == TYPE_WINDOW_UPDATE:
            return self._stream_frame(ftype, flags, sid, length, events)
        if ftype == TYPE_PING:
            if sid:
                raise ProtocolError(f"ping on stream {sid}")
            if flags & FLAG_SYN:
                self._queue_control(_PING | FLAG_ACK, 0, length)
                events.append(PingReceived(length))
            elif flags & FLAG_ACK:
                events.append(PongReceived(length))
            else:
                raise ProtocolError("ping without SYN or ACK")
            return 0
        if ftype == TYPE_GO_AWAY:
            if sid:
                raise ProtocolError(f"go-away on stream {sid}")
            self._remote_go_away = True
            events.append(GoAwayReceived(length))
            return 0
        raise ProtocolError(f"unknown frame type {ftype}")

    def _stream_frame(self, ftype: int, flags: int, sid: int, length: int, events: list[Event]) -> int:
        is_data = ftype == TYPE_DATA
        self._dsid = 0
        self._dfin = False
        if not sid:
            raise ProtocolError("stream frame on stream 0")
        streams = self._streams
        st = streams.get(sid)
        if flags & FLAG_SYN:
            if st is not None:
                raise ProtocolError(f"SYN on existing stream {sid}")
            if (sid & 1) == self._local_parity:
                raise ProtocolError(f"peer opened stream {sid} with our parity")
            if sid <= self._peer_max_id:
                # Ids only grow: reopening one the peer already used (after a reset, say)
                # would let its late data be credited to the new stream.
                raise ProtocolError(f"SYN reuses stream id {sid}")
            self._peer_max_id = sid
            if (
                flags & FLAG_RST
                or self._local_go_away
                or len(streams) >= self._max_streams
            ):
                if not flags & FLAG_RST:
                    self._queue_control(_WU | FLAG_RST, sid, 0)
                return length if is_data else 0
            send_window = INITIAL_WINDOW
            if not is_data:
                send_window += length
                if send_window > MAX_U32:
                    raise ProtocolError("send window overflow")
            st = streams[sid] = self._new_stream(send_window)
            events.append(StreamOpened(sid))
            # ACK right away: it tells the peer our (possibly larger) window.
            self._queue_control(_WU | FLAG_ACK, sid, st.window - INITIAL_WINDOW)
            if not is_data:
                if flags & FLAG_FIN:
                    self._remote_end(sid, st, events)
                return 0
        elif st is None:
            # Stale frame for a stream we reset or fully closed: legitimately
            # racing with our RST/FIN, so swallow it. Ids nobody ever opened
            # mean the peer is confused.
            if (sid & 1) == self._local_parity:
                if sid >= self._next_id:
                    raise ProtocolError(f"frame for stream {sid} we never opened")
            elif sid > self._peer_max_id:
                raise ProtocolError(f"frame for stream {sid} the peer never opened")
            return length if is_data else 0
        else:
            if flags & FLAG_RST:
                self._forget(sid)
                events.append(StreamReset(sid))
                return length if is_data else 0
            if not is_data:
                if length or flags & FLAG_ACK:
                    window = st.send_window + length
                    if window > MAX_U32:
                        raise ProtocolError("send window overflow")
                    st.send_window = window
                    if not st.local_closed:
                        events.append(WindowUpdated(sid, window))
                if flags & FLAG_FIN:
                    if st.remote_closed:
                        raise ProtocolError(f"second FIN on stream {sid}")
                    self._remote_end(sid, st, events)
                return 0
        # Data frame on a live stream (possibly just opened by this SYN).
        if st.remote_closed:
            raise ProtocolError(f"data after FIN on stream {sid}")
        if length > st.recv_window:
            raise ProtocolError(
                f"data ({length} bytes) exceeds receive window ({st.recv_window}) on stream {sid}"
            )
        st.recv_window -= length
        if flags & FLAG_ACK and not flags & FLAG_SYN and not st.local_closed:
            events.append(WindowUpdated(sid, st.send_window))
        if length:
            self._dsid = sid
            self._dfin = bool(flags & FLAG_FIN)
        elif flags & FLAG_FIN:
            self._remote_end(sid, st, events)
        return length

    def _remote_end(self, sid: int, st: _Stream, events: list[Event]) -> None:
        st.remote_closed = True
        events.append(StreamEnded(sid))
        if st.local_closed:
            self._forget(sid)

    # ----------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        """Drain the outbound queue (joined once, so frequent calls are cheap)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        self._out_bytes = 0
        return data

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def send_buffer_full(self) -> bool:
        """True when ``send_data`` is refusing data for lack of queue room (not window).

        A caller left holding bytes should retry once it has drained
        ``data_to_send()``: no event will announce that the room came back.
        """
        return self._out_bytes >= self._max_buffered

    def _queue_control(self, vtf: int, sid: int, value: int) -> None:
        self._out.append(_pack(vtf, sid, value))
        self._out_bytes += HEADER_SIZE

    # ---------------------------------------------------------------- streams

    def open_stream(self) -> int:
        """Allocate an id and queue its SYN; data may follow without waiting."""
        if self._local_go_away or self._remote_go_away or self._failed is not None:
            raise SessionClosedError("session is going away")
        sid = self._next_id
        if sid > MAX_U32:
            raise SessionClosedError("stream ids exhausted")
        self._next_id = sid + 2
        st = self._streams[sid] = self._new_stream(INITIAL_WINDOW)
        # The SYN's delta announces any receive window above the default.
        self._queue_control(_WU | FLAG_SYN, sid, st.window - INITIAL_WINDOW)
        return sid

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> int:
        """Queue as much of ``data`` as flow control allows; return bytes taken.

        Partial acceptance is the backpressure signal: retry the rest after a
        ``WindowUpdated`` event or, when ``send_buffer_full`` says the
        session-wide queue was the limit, after draining ``data_to_send``.
        """
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        n = len(data)
        k = st.send_window
        room = self._max_buffered - self._out_bytes
        if room < k:
            k = room if room > 0 else 0
        if n < k:
            k = n
        fin = end_stream and k == n
        if not k and not fin:
            return 0
        if type(data) is not bytes:
            # Never keep a view of the caller's buffer: it may be reused.
            data = bytes(data[:k])
        out = self._out
        mf = self._max_frame
        if k <= mf:
            out.append(_pack(FLAG_FIN if fin else 0, stream_id, k))
            if k:
                out.append(data if k == len(data) else data[:k])
            self._out_bytes += k + HEADER_SIZE
        else:
            last = k - mf
            for off in range(0, k, mf):
                if off < last:
                    out.append(_pack(0, stream_id, mf))
                    out.append(data[off : off + mf])
                else:
                    out.append(_pack(FLAG_FIN if fin else 0, stream_id, k - off))
                    out.append(data[off:k])
            self._out_bytes += k + HEADER_SIZE * ((k + mf - 1) // mf)
        st.send_window -= k
        if fin:
            st.local_closed = True
            if st.remote_closed:
                self._forget(stream_id)
        return k

    def send_window(self, stream_id: int) -> int:
        """What ``send_data`` would accept right now (window and queue room)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        room = self._max_buffered - self._out_bytes
        if room < 0:
            room = 0
        return st.send_window if st.send_window < room else room

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we send no more, the peer may keep sending."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int) -> None:
        """Abort both directions; idempotent because resets race with the peer."""
        if self._forget(stream_id) is not None:
            self._queue_control(_WU | FLAG_RST, stream_id, 0)

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """Return window to the peer for bytes the app has consumed.

        Credit is batched to half a window (as hashicorp does) so a stream of
        small reads does not cost one WindowUpdate each.
        """
        st = self._streams.get(stream_id)
        if st is None or n <= 0:
            return
        pending = st.pending + n
        window = st.window
        if st.recv_window + pending > window:
            raise ValueError(f"acknowledged more than was received on stream {stream_id}")
        if pending >= window >> 1 and not st.remote_closed:
            credit = pending
            if self._tuner is not None:
                extra, st.epoch = self._tuner.grow(window, st.epoch)
                if extra:
                    st.window = window + extra
                    credit += extra
            st.recv_window += credit
            st.pending = 0
            self._queue_control(_WU, stream_id, credit)
        else:
            st.pending = pending

    def _new_stream(self, send_window: int) -> _Stream:
        if self._tuner is None:
            return _Stream(send_window, self._window)
        return _Stream(send_window, self._window + self._tuner.start())

    def _forget(self, stream_id: int) -> _Stream | None:
        """Drop a finished stream; what its window grew by goes back to the tuner."""
        st = self._streams.pop(stream_id, None)
        if st is not None and st.window != self._window:
            self._tuner.release(st.window - self._window)
        return st

    def ping(self, opaque: int | None = None) -> int:
        """Queue a ping; match the returned opaque against ``PongReceived``."""
        if opaque is None:
            opaque = self._ping_id
            self._ping_id = (opaque + 1) & MAX_U32
        elif not 0 <= opaque <= MAX_U32:
            raise ValueError("ping opaque must fit in 32 bits")
        self._queue_control(_PING | FLAG_SYN, 0, opaque)
        return opaque

    def go_away(self, code: int = 0) -> None:
        """Refuse new streams (ours and the peer's); existing ones drain normally."""
        if not 0 <= code <= MAX_U32:
            raise ValueError("go-away code must fit in 32 bits")
        if self._local_go_away:
            return
        self._local_go_away = True
        self._queue_control(_GO_AWAY, 0, code)

    # ---------------------------------------------------------- introspection

    @property
    def open_stream_ids(self) -> frozenset[int]:
        return frozenset(self._streams)

    @property
    def go_away_sent(self) -> bool:
        return self._local_go_away

    @property
    def go_away_received(self) -> bool:
        return self._remote_go_away
