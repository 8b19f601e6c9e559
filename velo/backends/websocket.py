"""WebSocket tunnel backend: passes through any Ingress or load balancer.

Built on picows, chosen by measurement (see bench/ and README): frames arrive in
a synchronous callback and the library exposes pause/resume-writing, so the
tunnel keeps its callback-only hot path and real backpressure.  The WebSocket is
a byte pipe: message boundaries mean nothing to the multiplexer above.
"""

from __future__ import annotations

from http import HTTPStatus

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from velo.backends.wsdial import MAX_MESSAGE, dial

from velo.config.tables import TLSBackendTable, url_for
from velo import tls
from velo.hookspecs import hookimpl
from velo.transport import (
    Authenticator,
    Endpoint,
    GatewayListen,
    SinkFactory,
    TunnelBackend,
    TunnelError,
    TunnelSink,
)

_DATA = (WSMsgType.BINARY, WSMsgType.CONTINUATION)
WS_MESSAGE = 256 * 1024  # largest WebSocket message velo sends


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class _WebSocketPipe(WSListener):
    """Adapts one picows connection to velo's TunnelPipe/TunnelSink pair."""

    def __init__(self, sink: TunnelSink) -> None:
        super().__init__()
        self.sink = sink
        self.ws: WSTransport | None = None
        self.peer = "?"

    # picows -> velo
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.sink.connection_made(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in _DATA:
            self.sink.data_received(frame.get_payload_as_bytes())
        elif kind is WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif kind is WSMsgType.TEXT:
            transport.send_close(WSCloseCode.UNSUPPORTED_DATA, b"velo tunnels carry binary frames only")
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.sink.connection_lost(None)

    def pause_writing(self) -> None:
        self.sink.pause_writing()

    def resume_writing(self) -> None:
        self.sink.resume_writing()

    # velo -> picows
    def write(self, data: bytes | memoryview) -> None:
        # picows hands the far end a message only once all of it arrived, so one big message
        # (a flush can be MBs) delays every frame and acknowledgement inside it by its whole
        # transmission time; bounded messages keep the far end's view streaming.
        if len(data) <= WS_MESSAGE:
            self.ws.send(WSMsgType.BINARY, data)
            return
        view = memoryview(data)
        send = self.ws.send
        for start in range(0, len(view), WS_MESSAGE):
            send(WSMsgType.BINARY, view[start : start + WS_MESSAGE])

    def pause_reading(self) -> None:
        self.ws.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        self.ws.underlying_transport.resume_reading()

    def close(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.send_close(WSCloseCode.OK)
            self.ws.disconnect()

    def abort(self) -> None:
        if self.ws is not None:
            self.ws.disconnect(graceful=False)


class WebSocketTable(TLSBackendTable):
    """``[tunnel.websocket]``: where the gateway's WebSocket endpoint is (an Ingress, say)."""

    url: url_for("ws", "wss")  # type: ignore[valid-type]


class WebSocketBackend(TunnelBackend):
    name = "websocket"
    schemes = ("ws", "wss")
    description = "WebSocket (ws:// or wss://), passes through any Ingress"

    async def connect(self, endpoint: Endpoint, sink_factory: SinkFactory, *, timeout: float):
        headers = {"Authorization": f"Bearer {endpoint.token}", **dict(endpoint.headers)}
        try:
            ctx, server_name = tls.for_endpoint(endpoint, secure=endpoint.url.startswith("wss:"))
        except tls.TLSConfigError as exc:
            raise TunnelError(str(exc)) from None
        return await dial(endpoint.url, lambda: _WebSocketPipe(sink_factory()), timeout=timeout,
                          headers=headers, ssl_context=ctx, server_hostname=server_name)

    async def serve(self, listen: GatewayListen, authenticate: Authenticator, sink_factory: SinkFactory):
        path = listen.path.encode() or b"/"

        def route(request: WSUpgradeRequest):
            target = request.path.split(b"?", 1)[0]
            if target == b"/healthz":
                return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(b"ok\n"), None)
            if target != path:
                return None  # 404
            if not authenticate(bearer_token(request.headers.get("Authorization"))):
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_error_response(
                        HTTPStatus.UNAUTHORIZED, b"velo: invalid or missing bearer token\n"
                    ),
                    None,
                )
            return _WebSocketPipe(sink_factory())

        return await ws_create_server(
            route,
            listen.host,
            listen.port,
            ssl=listen.ssl,
            max_frame_size=MAX_MESSAGE,
            logger_name="velo.websocket",
        )


@hookimpl
def velo_tunnel_backends():
    return [WebSocketBackend()]


@hookimpl
def velo_config_tables():
    return {"tunnel.websocket": WebSocketTable}
