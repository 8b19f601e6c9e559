"""HTTP/2 CONNECT tunnel backend: one CONNECT stream per proxied connection.

``h2://``-free URLs: ``http://host:port/path`` is h2c with prior knowledge (plain
TCP), ``https://host:port/path`` is TLS with ALPN ``h2``.  HTTP/2 already
multiplexes and flow-controls streams, so this backend does not carry velo's
yamux at all: the pipe offers ``new_session`` and the tunnel speaks through
``H2Session``, which has mux.Session's sans-IO API (bytes in -> the same events,
calls -> bytes out) over the sans-IO ``h2`` library.  Tunnel and Bridge are the
same code for every backend; each velo stream is one HTTP/2 stream.

Mapping (see ARCHITECTURE.md, "HTTP/2 backend"):
- Authentication: the client's first request is ``GET <path>`` with
  ``Authorization: Bearer``; 200 marks the connection authenticated, 401 closes
  it.  CONNECT streams on an unauthenticated connection get 401.
- Forward (laptop -> cluster): the client opens ``CONNECT`` (``:authority
  velo``); the gateway answers 200 at once and the stream is a velo stream.  The
  velo header (target) travels in-band as the stream's first bytes, exactly as
  over yamux, so the opener sends payload without waiting.
- Reverse (cluster -> laptop): only clients open HTTP/2 streams, so the client
  keeps ``PARKED`` CONNECT streams (``:authority velo-reverse``) open at the
  gateway.  The gateway's ``open_stream`` answers one of them with 200 and it
  becomes the new velo stream (the client replaces it at once); if none is
  parked the stream waits, with its first bytes buffered, for the next.
- Flow control: SETTINGS_INITIAL_WINDOW_SIZE raised from 64 KiB to the yamux
  default, a large connection window, and per-stream windows grown by the same
  WindowTuner as yamux (WINDOW_UPDATE adds credit).  Data is acknowledged only
  when the tunnel says it was written onward (``acknowledge_received_data``);
  ``send_data`` takes only what the window allows and WINDOW_UPDATE resumes it.
- GOAWAY becomes GoAwayReceived (the tunnel closes and the client reconnects);
  running out of stream ids raises SessionClosedError, which makes the client
  reconnect cleanly too.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame

from velo.hookspecs import hookimpl
from velo.mux import (
    INITIAL_WINDOW,
    DataReceived,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from velo.mux.window import WindowTuner
from velo import tls
from velo.config.tables import TLSBackendTable, url_for
from velo.transport import (
    Authenticator,
    Endpoint,
    GatewayListen,
    ProtocolPipe,
    SinkFactory,
    TunnelBackend,
    TunnelError,
)

# h2 formats every received frame for its trace log before the logger decides to drop
# it (``repr(frame)`` in H2Connection._receive_frame), and a DATA frame's repr
# hex-dumps its payload: half of the CPU a bulk transfer costs.  Name the size instead.
hyperframe.frame.DataFrame._body_repr = lambda self: f"<{len(self.data)} data bytes>"

FORWARD_AUTHORITY = "velo"
REVERSE_AUTHORITY = "velo-reverse"
PARKED = 8  # reverse streams the client keeps open at the gateway
MAX_FRAME = 256 << 10
CONNECTION_WINDOW = 128 << 20  # per-stream windows are the real limit; this only must not be
MAX_STREAMS = 1 << 16
UNBOUND_BUFFER = 64 * 1024  # what a gateway-opened stream may queue before a parked stream binds it
_ACK_CHUNK = 1 << 16

FAST_PATH = True
"""DATA and WINDOW_UPDATE frames on open streams are framed, parsed and flow-accounted
here instead of by h2 (see ``H2Session``): h2 spends about 20 us of Python per frame on
objects and state machines a DATA frame on an open stream does not need, which made this
backend cost 2.5 times the CPU per request of the yamux ones.  Everything else (HEADERS,
SETTINGS, END_STREAM, padding, errors, closed streams) still goes through h2, and the
accounting updates h2's own counters, so h2 stays the single source of truth.  Set to
False to run on h2 alone (a debugging aid; tests/test_h2.py checks both agree)."""

_FRAME_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_DATA_HEADER = struct.Struct(">IBL")     # length << 8 | type DATA (0), flags, stream id
_WINDOW_UPDATE = struct.Struct(">IBLL")  # 4 << 8 | type 8, flags, stream id, increment
_WU_LENGTH_TYPE = 4 << 8 | 0x8
_END_STREAM_OR_PADDED = 0x1 | 0x8
# Tuples, not sets: a set lookup hashes the enum member in Python code (enum.__hash__),
# a tuple compares by identity first; these run for every DATA frame.
_CONN_OPEN = (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN)
_RECV_OK = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)
_SEND_OK = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)
_fast_path_ok: bool | None = None


def _fast_path_supported() -> bool:
    """Does this h2 keep the internals the fast path relies on?  Checked once; without
    them every frame simply goes through h2 (slower, equally correct)."""
    global _fast_path_ok
    if _fast_path_ok is None:
        try:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "CONNECT"), (":authority", "velo")])
            stream = conn.streams[1]
            _fast_path_ok = (
                isinstance(conn._data_to_send, bytearray)
                and conn.state_machine.state in _CONN_OPEN
                and stream.state_machine.state in _SEND_OK
                and hasattr(conn._inbound_flow_control_window_manager, "window_consumed")
                and hasattr(stream._inbound_window_manager, "process_bytes")
                and stream._expected_content_length is None
                and isinstance(stream.outbound_flow_control_window, int)
                and conn.incoming_buffer._headers_buffer == []
                and isinstance(conn.incoming_buffer._preamble_len, int)
                and callable(conn._terminate_connection)
            )
        except Exception:  # noqa: BLE001 - any difference in h2's internals
            _fast_path_ok = False
    return _fast_path_ok


def _settings(client: bool) -> dict:
    s = h2.settings.SettingCodes
    return {
        s.INITIAL_WINDOW_SIZE: INITIAL_WINDOW,
        s.MAX_FRAME_SIZE: MAX_FRAME,
        s.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        s.ENABLE_PUSH: 0,
    } if client else {
        s.INITIAL_WINDOW_SIZE: INITIAL_WINDOW,
        s.MAX_FRAME_SIZE: MAX_FRAME,
        s.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    }


class _Stream:
    __slots__ = ("window", "epoch", "consumed", "local_closed", "remote_closed")

    def __init__(self) -> None:
        self.window = INITIAL_WINDOW
        self.epoch = 0.0
        self.consumed = 0
        self.local_closed = False
        self.remote_closed = False


class H2Session:
    """mux.Session's API over one HTTP/2 connection (sans-IO; see the module docstring).

    Stream ids seen by the tunnel are HTTP/2 stream ids, except streams the gateway
    opens towards the client: those get even ids of their own (HTTP/2 has no
    server-opened streams), mapped to the parked client stream that carries them.
    """

    def __init__(
        self,
        *,
        client: bool,
        tuner: WindowTuner | None = None,
        token: str | None = None,
        scheme: str = "http",
        authority: str = "velo",
        path: str = "/",
        authenticate: Authenticator | None = None,
        max_stream_id: int = h2.connection.H2Connection.HIGHEST_ALLOWED_STREAM_ID,
    ) -> None:
        self.client = client
        self._tuner = tuner
        self._path = path or "/"
        self._authority = authority
        self._authenticate = authenticate
        self._max_stream_id = max_stream_id
        config = h2.config.H2Configuration(client_side=client, header_encoding="utf-8",
                                           validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        # Pending until the peer acknowledges, which is when h2 applies them to its checks.
        self.conn.update_settings(_settings(client))
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._streams: dict[int, _Stream] = {}  # velo id -> state
        self._h2: dict[int, int] = {}  # velo id -> h2 id, only where they differ
        self._velo: dict[int, int] = {}  # h2 id -> velo id, likewise
        self._parked: list[int] = []  # gateway: parked reverse streams; client: ours, waiting
        self._unbound: dict[int, bytearray] = {}  # gateway: opened, no parked stream yet
        self._unbound_fin: set[int] = set()
        self._next_virtual = 2
        self._ping_id = 0
        self.auth_stream = 0
        self.auth_status: int | None = None  # client: the gateway's answer to our GET
        self.authenticated = False  # gateway: this connection presented the token
        self._go_away_sent = False
        self._go_away_received = False
        self._failed: ProtocolError | None = None
        self._fast = FAST_PATH and _fast_path_supported()
        self._split = False  # h2's input buffer is empty: frames are split here (see FAST_PATH)
        self._inbuf = bytearray()  # a partial frame, while splitting
        if client:
            self.auth_stream = self.conn.get_next_available_stream_id()
            headers = [(":method", "GET"), (":scheme", scheme), (":authority", authority), (":path", self._path)]
            if token is not None:
                headers.append(("authorization", f"Bearer {token}"))
            self.conn.send_headers(self.auth_stream, headers, end_stream=True)

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list:
        if self._failed is not None:
            raise self._failed
        out: list = []
        try:
            if self._split:
                self._receive_split(data, out)
            else:
                self._translate(self.conn.receive_data(bytes(data)), out)
                if self._fast:  # the server's preamble is behind us and h2 holds no partial frame
                    buffer = self.conn.incoming_buffer
                    self._split = not buffer._preamble_len and not buffer._data
        except h2.exceptions.ProtocolError as exc:
            if self._go_away_received or self._go_away_sent:
                return []  # h2 closes the connection at GOAWAY; the tunnel is closing it too
            self._failed = ProtocolError(f"HTTP/2: {exc}")
            raise self._failed from None
        return out

    def _receive_split(self, data, out: list) -> None:
        """Whole frames only: DATA on an open stream is handled here, every run of other
        frames is handed to h2 in order (so h2 never holds a partial frame)."""
        conn = self.conn
        buf = self._inbuf
        if buf:  # a partial frame from the last read
            buf += data
            src = buf
        else:  # usually: parse the read itself, slicing payloads out of it once
            src = data if type(data) is bytes else bytes(data)
        n = len(src)
        pos = run = 0
        unpack = _FRAME_HEADER.unpack_from
        while n - pos >= 9:
            high, low, ftype, flags, sid = unpack(src, pos)
            length = high << 16 | low
            if length > conn.max_inbound_frame_size:
                conn._terminate_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                raise h2.exceptions.FrameTooLargeError(
                    f"Received overlong frame: length {length}, max {conn.max_inbound_frame_size}")
            end = pos + 9 + length
            if end > n:
                break
            if ftype == 0 and not flags & _END_STREAM_OR_PADDED:
                if run < pos:
                    self._translate(conn.receive_data(bytes(src[run:pos])), out)
                run = end if self._fast_data(sid & 0x7FFFFFFF, src, pos + 9, end, out) else pos
            pos = end
        if run < pos:
            self._translate(conn.receive_data(bytes(src[run:pos])), out)
        if src is buf:
            del buf[:pos]
        elif pos < n:
            buf += src[pos:]

    def _fast_data(self, sid: int, buf: bytes | bytearray, start: int, end: int, out: list) -> bool:
        """DATA without END_STREAM or padding on a stream both h2 and we have open: what
        h2's _receive_data_frame does, minus its event objects.  False: let h2 do it."""
        conn = self.conn
        stream = conn.streams.get(sid)
        if (stream is None or stream.state_machine.state not in _RECV_OK or stream._expected_content_length is not None
                or conn.state_machine.state not in _CONN_OPEN or conn.incoming_buffer._headers_buffer):
            return False
        vid = self._velo.get(sid, sid)
        if vid not in self._streams or vid in self._unbound:
            return False
        length = end - start
        try:
            conn._inbound_flow_control_window_manager.window_consumed(length)
            stream._inbound_window_manager.window_consumed(length)
        except h2.exceptions.FlowControlError as exc:
            conn._terminate_connection(exc.error_code)
            raise
        if length:
            out.append(DataReceived(vid, bytes(buf[start:end])))
        return True

    def _translate(self, h2_events: list, out: list) -> None:
        for ev in h2_events:
            kind = type(ev)
            if kind is h2.events.DataReceived:
                self._on_data(ev, out)
            elif kind is h2.events.WindowUpdated:
                if ev.stream_id:
                    vid = self._velo.get(ev.stream_id, ev.stream_id)
                    st = self._streams.get(vid)
                    if st is not None and not st.local_closed:
                        out.append(WindowUpdated(vid, self.conn.local_flow_control_window(ev.stream_id)))
                else:
                    for vid, st in self._streams.items():
                        if not st.local_closed and vid not in self._unbound:
                            out.append(WindowUpdated(vid, 0))
            elif kind is h2.events.RequestReceived:
                self._on_request(ev, out)
            elif kind is h2.events.ResponseReceived:
                self._on_response(ev, out)
            elif kind is h2.events.StreamEnded:
                vid = self._velo.get(ev.stream_id, ev.stream_id)
                st = self._streams.get(vid)
                if st is not None and not st.remote_closed:
                    st.remote_closed = True
                    out.append(StreamEnded(vid))
                    if st.local_closed:
                        self._forget(vid)
            elif kind is h2.events.StreamReset:
                self._on_reset(ev.stream_id, out)
            elif kind is h2.events.PingAckReceived:
                out.append(PongReceived(int.from_bytes(ev.ping_data, "big")))
            elif kind is h2.events.PingReceived:
                out.append(PingReceived(int.from_bytes(ev.ping_data, "big")))
            elif kind is h2.events.ConnectionTerminated:
                self._go_away_received = True
                out.append(GoAwayReceived(ev.error_code or 0))

    def _on_data(self, ev, out: list) -> None:
        sid = ev.stream_id
        padding = ev.flow_controlled_length - len(ev.data)
        vid = self._velo.get(sid, sid)
        st = self._streams.get(vid)
        if st is None or vid in self._unbound:
            self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)  # nobody to give it to
            return
        if padding:
            self.conn.acknowledge_received_data(padding, sid)
        if ev.data:
            out.append(DataReceived(vid, ev.data))

    def _on_request(self, ev, out: list) -> None:
        sid = ev.stream_id
        headers = dict(ev.headers)
        method = headers.get(":method")
        if method == "GET":
            path = (headers.get(":path") or "").split("?", 1)[0]
            if path == "/healthz":
                self._respond(sid, 200, b"ok\n")
                return
            if path != self._path:
                self._respond(sid, 404, b"not found\n")
                return
            auth = headers.get("authorization") or ""
            scheme, _, value = auth.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
            if self._authenticate is not None and self._authenticate(token):
                self.authenticated = True
                self._respond(sid, 200, b"")
            else:
                self._respond(sid, 401, b"velo: invalid or missing bearer token\n")
                self.go_away(int(h2.errors.ErrorCodes.NO_ERROR))
            return
        if method != "CONNECT":
            self._respond(sid, 405, b"velo tunnels use CONNECT\n")
            return
        if not self.authenticated:
            self._respond(sid, 401, b"velo: authenticate first\n")
            return
        if self._go_away_sent:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if headers.get(":authority") == REVERSE_AUTHORITY:
            for vid in self._unbound:  # a gateway stream is waiting for exactly this
                self._bind(vid, sid, out)
                return
            self._parked.append(sid)
            return
        self._streams[sid] = self._new_stream()
        self.conn.send_headers(sid, [(":status", "200")])
        out.append(StreamOpened(sid))

    def _on_response(self, ev, out: list) -> None:
        sid = ev.stream_id
        status = int(dict(ev.headers).get(":status", "0"))
        if sid == self.auth_stream:
            self.auth_status = status
            if status == 200:
                for _ in range(PARKED):
                    self._park()
            return
        if sid in self._parked:  # the gateway opened a stream towards us
            self._parked.remove(sid)
            if status != 200:
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                return
            self._streams[sid] = self._new_stream()
            out.append(StreamOpened(sid))
            if not self._go_away_received and not self._go_away_sent:
                self._park()
            return
        if status != 200 and sid in self._streams:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self._forget(sid)
            out.append(StreamReset(sid))

    def _on_reset(self, sid: int, out: list) -> None:
        if sid in self._parked:
            self._parked.remove(sid)
            return
        vid = self._velo.get(sid, sid)
        if self._forget(vid) is not None:
            out.append(StreamReset(vid))

    def _respond(self, sid: int, status: int, body: bytes) -> None:
        self.conn.send_headers(sid, [(":status", str(status)), ("content-length", str(len(body)))],
                               end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)

    def _park(self) -> None:
        try:
            sid = self._next_h2_id()
        except SessionClosedError:
            return
        self.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", REVERSE_AUTHORITY)])
        self._parked.append(sid)

    def _bind(self, vid: int, sid: int, out: list) -> None:
        """Gateway: the waiting stream ``vid`` now rides on the parked client stream ``sid``."""
        self._h2[vid] = sid
        self._velo[sid] = vid
        self.conn.send_headers(sid, [(":status", "200")])
        buffered = self._unbound.pop(vid)
        fin = vid in self._unbound_fin
        self._unbound_fin.discard(vid)
        if buffered:
            self._send(sid, buffered, fin)
        elif fin:
            self.conn.end_stream(sid)
        if not self._streams[vid].local_closed:
            out.append(WindowUpdated(vid, self.conn.local_flow_control_window(sid)))

    # --------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    @property
    def send_buffer_full(self) -> bool:
        """Never: only flow-control windows limit send_data here, and WINDOW_UPDATE (or the
        binding of a waiting reverse stream) announces their room as WindowUpdated."""
        return False

    def has_data_to_send(self) -> bool:
        return bool(self.conn._data_to_send)  # h2 has no public peek

    # -------------------------------------------------------------- streams

    def _new_stream(self) -> _Stream:
        return _Stream()  # starts at SETTINGS_INITIAL_WINDOW_SIZE; the tuner grows it

    def _next_h2_id(self) -> int:
        if self._go_away_sent or self._go_away_received or self._failed is not None:
            raise SessionClosedError("session is going away")
        try:
            sid = self.conn.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            raise SessionClosedError("stream ids exhausted") from None
        if sid > self._max_stream_id:
            raise SessionClosedError("stream ids exhausted")
        return sid

    def open_stream(self) -> int:
        if not self.client:
            if self._go_away_sent or self._go_away_received or self._failed is not None:
                raise SessionClosedError("session is going away")
            vid = self._next_virtual
            self._next_virtual += 2
            self._streams[vid] = self._new_stream()
            if self._parked:
                self._unbound[vid] = bytearray()
                self._bind(vid, self._parked.pop(0), [])
            else:
                self._unbound[vid] = bytearray()
            return vid
        sid = self._next_h2_id()
        self.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", FORWARD_AUTHORITY)])
        self._streams[sid] = self._new_stream()
        return sid

    def _send(self, sid: int, data, fin: bool) -> int:
        conn = self.conn
        n = len(data)
        if self._fast and not fin:
            stream = conn.streams.get(sid)
            if (stream is not None and stream.state_machine.state in _SEND_OK
                    and conn.state_machine.state in _CONN_OPEN):
                # What send_data does for a DATA frame without END_STREAM, minus the objects.
                k = min(n, conn.outbound_flow_control_window, stream.outbound_flow_control_window)
                frame = conn.max_outbound_frame_size
                out = conn._data_to_send
                if 0 < k <= frame:  # the usual case: one frame
                    out += _DATA_HEADER.pack(k << 8, 0, sid)
                    out += data if k == n else memoryview(data)[:k]
                    conn.outbound_flow_control_window -= k
                    stream.outbound_flow_control_window -= k
                    return k
                view = memoryview(data)
                pack = _DATA_HEADER.pack
                for off in range(0, k, frame):
                    end = min(off + frame, k)
                    out += pack((end - off) << 8, 0, sid)
                    out += view[off:end]
                conn.outbound_flow_control_window -= k
                stream.outbound_flow_control_window -= k
                return k
        try:
            k = min(n, conn.local_flow_control_window(sid))
            frame = conn.max_outbound_frame_size
            view = memoryview(data)
            for off in range(0, k, frame):
                end = min(off + frame, k)
                conn.send_data(sid, bytes(view[off:end]), end_stream=fin and end == n)
            if fin and k == n and n == 0:
                conn.end_stream(sid)
        except h2.exceptions.StreamClosedError:
            raise StreamClosedError(f"HTTP/2 stream {sid} is closed") from None
        except h2.exceptions.ProtocolError:
            return 0  # the connection is closing; its loss resets every stream
        return k

    def send_data(self, stream_id: int, data, *, end_stream: bool = False) -> int:
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        buffered = self._unbound.get(stream_id)
        if buffered is not None:
            k = min(len(data), UNBOUND_BUFFER - len(buffered))
            buffered += data[:k]
            if end_stream and k == len(data):
                self._unbound_fin.add(stream_id)
                st.local_closed = True
            return k
        k = self._send(self._h2.get(stream_id, stream_id), data, end_stream)
        if end_stream and k == len(data):
            st.local_closed = True
            if st.remote_closed:
                self._forget(stream_id)
        return k

    def send_window(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        buffered = self._unbound.get(stream_id)
        if buffered is not None:
            return UNBOUND_BUFFER - len(buffered)
        return self.conn.local_flow_control_window(self._h2.get(stream_id, stream_id))

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int) -> None:
        sid = self._h2.get(stream_id, stream_id)  # before _forget drops a reverse stream's mapping
        if self._forget(stream_id) is None:
            return
        if self._unbound.pop(stream_id, None) is not None:
            self._unbound_fin.discard(stream_id)
            return
        self._h2.pop(stream_id, None)
        self._velo.pop(sid, None)
        try:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass

    def _forget(self, vid: int) -> _Stream | None:
        st = self._streams.pop(vid, None)
        if st is not None:
            if st.window != INITIAL_WINDOW and self._tuner is not None:
                self._tuner.release(st.window - INITIAL_WINDOW)
            if vid not in self._unbound:
                sid = self._h2.pop(vid, None)
                if sid is not None:
                    self._velo.pop(sid, None)
        return st

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """Credit the peer for bytes written onward; grow the window like yamux's tuner."""
        st = self._streams.get(stream_id)
        if st is None or n <= 0:
            return
        sid = self._h2.get(stream_id, stream_id)
        conn = self.conn
        stream = conn.streams.get(sid) if self._fast else None
        if stream is not None:
            # acknowledge_received_data, minus the frame objects.
            increment = conn._inbound_flow_control_window_manager.process_bytes(n)
            if increment:
                conn._data_to_send += _WINDOW_UPDATE.pack(_WU_LENGTH_TYPE, 0, 0, increment)
            if stream.open:
                increment = stream._inbound_window_manager.process_bytes(n)
                if increment:
                    conn._data_to_send += _WINDOW_UPDATE.pack(_WU_LENGTH_TYPE, 0, sid, increment)
        else:
            try:
                conn.acknowledge_received_data(n, sid)
            except h2.exceptions.StreamClosedError:
                return
        st.consumed += n
        if st.consumed >= st.window >> 1 and not st.remote_closed:
            st.consumed = 0
            if self._tuner is not None:
                extra, st.epoch = self._tuner.grow(st.window, st.epoch)
                if extra:
                    st.window += extra
                    self.conn.increment_flow_control_window(extra, stream_id=sid)

    def ping(self, opaque: int | None = None) -> int:
        if opaque is None:
            opaque = self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
        self.conn.ping(opaque.to_bytes(8, "big"))
        return opaque

    def go_away(self, code: int = 0) -> None:
        if self._go_away_sent:
            return
        self._go_away_sent = True
        self.conn.close_connection(error_code=code)

    @property
    def open_stream_ids(self) -> frozenset[int]:
        return frozenset(self._streams)

    @property
    def go_away_sent(self) -> bool:
        return self._go_away_sent

    @property
    def go_away_received(self) -> bool:
        return self._go_away_received


class _H2Pipe(ProtocolPipe):
    """One TCP (or TLS) connection carrying HTTP/2; TunnelPipe for velo's Tunnel."""

    def __init__(self, sink_factory: SinkFactory, *, client: bool, token: str | None = None,
                 scheme: str = "http", authority: str = "velo", path: str = "/", authenticate: Authenticator | None = None) -> None:
        super().__init__(sink_factory)
        self._client = client
        self._token = token
        self._scheme = scheme
        self._authority = authority
        self._path = path
        self._authenticate = authenticate
        self.session: H2Session | None = None
        # client: the gateway's answer to our authenticated GET (the handshake)
        self.answered: asyncio.Future[int] | None = asyncio.get_running_loop().create_future() if client else None

    # the tunnel asks for the stream layer (see velo/transport.py)
    def new_session(self, *, client: bool, tuner: WindowTuner | None = None) -> H2Session:
        self.session = H2Session(client=client, tuner=tuner, token=self._token, scheme=self._scheme,
                                 authority=self._authority,
                                 path=self._path, authenticate=self._authenticate)
        return self.session

    # asyncio -> velo
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() != "h2":
            transport.abort()
            if self.answered is not None and not self.answered.done():
                self.answered.set_exception(TunnelError("the server did not agree to HTTP/2 (ALPN h2)"))
            return
        self.start_sink()

    def data_received(self, data: bytes) -> None:
        self.sink.data_received(data)
        answered = self.answered
        if answered is not None and not answered.done() and self.session.auth_status is not None:
            answered.set_result(self.session.auth_status)

    def connection_lost(self, exc) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_exception(ConnectionError(f"connection closed{': ' + str(exc) if exc else ''}"))
        super().connection_lost(exc)


class H2Table(TLSBackendTable):
    """``[tunnel.h2]``: the gateway's HTTP/2 endpoint (``http://`` h2c or ``https://``)."""

    url: url_for("http", "https")  # type: ignore[valid-type]


class H2Backend(TunnelBackend):
    name = "h2"
    schemes = ("http", "https")
    description = "HTTP/2 CONNECT (http:// h2c prior knowledge, https:// TLS with ALPN h2)"

    async def connect(self, endpoint: Endpoint, sink_factory: SinkFactory, *, timeout: float):
        url, token = endpoint.url, endpoint.token
        parts = urlsplit(url)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise TunnelError(f"{url}: the h2 backend needs http:// or https://HOST[:PORT][/PATH]")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ctx, server_name = tls.for_endpoint(endpoint, secure=parts.scheme == "https", alpn=["h2"])
        except tls.TLSConfigError as exc:
            raise TunnelError(str(exc)) from None
        loop = asyncio.get_running_loop()
        authority = f"{parts.hostname}:{port}"
        try:
            async with asyncio.timeout(timeout):
                _, pipe = await loop.create_connection(
                    lambda: _H2Pipe(sink_factory, client=True, token=token, scheme=parts.scheme, authority=authority,
                                    path=parts.path or "/"),
                    parts.hostname, port, ssl=ctx,
                    server_hostname=(server_name or parts.hostname) if ctx else None,
                )
                status = await pipe.answered
        except (TimeoutError, asyncio.TimeoutError):
            raise TunnelError(f"{url}: no answer within {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise TunnelError(f"{url}: TLS failed: {tls.explain(exc)}") from None
        except TunnelError as exc:
            raise TunnelError(f"{url}: {exc.reason}") from None
        except (OSError, ConnectionError) as exc:
            raise TunnelError(f"{url}: {getattr(exc, 'strerror', None) or exc}") from None
        if status in (401, 403):
            pipe.abort()
            raise TunnelError(f"{url}: the gateway rejected the token (HTTP {status})", auth=True)
        if status != 200:
            pipe.abort()
            raise TunnelError(f"{url}: the gateway answered HTTP {status}")
        return pipe

    async def serve(self, listen: GatewayListen, authenticate: Authenticator, sink_factory: SinkFactory):
        ctx = listen.ssl
        if ctx is not None:
            ctx.set_alpn_protocols(["h2"])
        return await asyncio.get_running_loop().create_server(
            lambda: _H2Pipe(sink_factory, client=False, path=listen.path or "/", authenticate=authenticate),
            listen.host, listen.port, ssl=ctx, reuse_address=True,
        )


@hookimpl
def velo_tunnel_backends():
    return [H2Backend()]


@hookimpl
def velo_config_tables():
    return {"tunnel.h2": H2Table}
