"""Port-forward tunnel backend: the Kubernetes apiserver's ``pods/portforward``, from asyncio.

No Ingress, no LoadBalancer, no ``kubectl`` subprocess: one WebSocket to the apiserver
(subprotocol ``v4.channel.k8s.io``) reaches one port of the traffic-proxy pod, and velo's
multiplexer rides inside that single connection, so every proxied connection shares it.
Which pod: the kubernetes provider finds its traffic-proxy by labels and hands over the URL
of its ``portforward`` subresource with the kubeconfig's credentials (``Endpoint.ssl_context``,
``Endpoint.headers``). With any other provider (static: a gateway the user runs in a pod of
their own), ``[tunnel.port-forward] pod = "NAME"`` names the pod and this backend finds it
itself, again on every (re)connect, through the same code
(``velo.providers.kubernetes.portforward``; the kubernetes client is imported only then).

Wire format of ``v4.channel.k8s.io`` for one port: every WebSocket message starts with a
channel byte, 0 for data and 1 for errors; the server's first message on each channel is
the port number as 2 little-endian bytes. An error channel message after that is the
kubelet's text for a failed forward ("connection refused" and the like).

Inside the forwarded stream, velo's gateway listens on ``port-forward://127.0.0.1:PORT``
(loopback of the pod: only port-forward reaches it) and still wants the session token:
``VELO/1 <token>\\n`` answered by ``OK\\n``, then the bytes are the multiplexer's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Annotated, ClassVar

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from pydantic import BeforeValidator

from velo.backends.websocket import WS_MESSAGE
from velo.backends.wsdial import dial
from velo.config.errors import show_value
from velo.config.tables import BackendTable, NonEmpty, Port, Text, problem
from velo.hookspecs import hookimpl
from velo.transport import (
    Authenticator,
    Endpoint,
    GatewayListen,
    ProtocolPipe,
    SinkFactory,
    SinkFlowControl,
    TunnelBackend,
    TunnelError,
    TunnelSink,
)

log = logging.getLogger("velo.portforward")

NAME = "port-forward"
SUBPROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
DATA_PREFIX = bytes([DATA])
MAGIC = b"VELO/1"
OK = b"OK\n"
DENIED = b"DENIED\n"
MAX_LINE = 1024
GREETING_TIMEOUT = 5.0   # gateway side: seconds a client has to greet
CLOSE_DEADLINE = 2.0     # a polite close that is not done by then is an abort (a hung apiserver)
GREETING_MIN = 0.5
"""The gateway's OK must come within max(this, 3 x the WebSocket dial time). A pod port with
nothing listening yet (a pod Ready before its gateway binds, as kwok reports it) is not
always refused through the apiserver: the stream can just stay silent, and waiting the
whole connect timeout for it would delay following a new pod by that much."""


DEFAULT_PORT = 7071
"""The pod port ``port`` defaults to: where the traffic-proxy's gateway listens
(``--listen port-forward://127.0.0.1:7071``), so a gateway run the same way needs no ``port``."""
LOCATING_KEYS = ("pod", "namespace", "port", "kubeconfig", "context")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _object_name(pattern: re.Pattern, limit: int, what: str):
    def check(value: object) -> object:
        if isinstance(value, str) and (len(value) > limit or not pattern.match(value)):
            raise problem(f"expected a Kubernetes {what} (lowercase letters, digits and '-', at most {limit} "
                          f"characters), got {show_value(value)}")
        return value
    return BeforeValidator(check)


PodName = Annotated[NonEmpty, _object_name(_DNS_SUBDOMAIN, 253, "pod name")]
NamespaceName = Annotated[Text, _object_name(_DNS_LABEL, 63, "namespace name")]


class PortForwardTable(BackendTable):
    """``[tunnel.port-forward]``. With the kubernetes provider: nothing to set (it finds its
    traffic-proxy pod; credentials come from the kubeconfig of ``cluster.context``). With any
    other provider: ``pod`` names the pod whose gateway listens on ``port-forward://``."""

    no_gateway: ClassVar[str] = ('names no pod; write [tunnel.port-forward] pod = "NAME" (the pod whose '
                                 "gateway listens on port-forward://)")

    pod: PodName | None = None
    """The pod to port-forward to (re-read on every reconnect: a pod recreated under this name is followed)."""
    namespace: NamespaceName = ""
    """The pod's namespace; default: the kubeconfig context's (else "default")."""
    port: Port = DEFAULT_PORT
    """The pod port the gateway listens on (``velo gateway --listen port-forward://127.0.0.1:PORT``)."""
    kubeconfig: NonEmpty | None = None
    """The kubeconfig file; default: $KUBECONFIG, else ~/.kube/config."""
    context: Text = ""
    """The kubeconfig context; default: its current context."""

    def gateway(self) -> str:
        if self.pod is None:
            return ""
        return f"pod {self.namespace + '/' if self.namespace else ''}{self.pod} port {self.port}"

    def check(self, config) -> list:
        here = ("tunnel", NAME)
        written = [key for key in LOCATING_KEYS if key in self.model_fields_set]
        if config.cluster.provider == "kubernetes":
            return [((*here, key), "the kubernetes provider reaches its own traffic-proxy pod (by its labels, "
                                   "with cluster.context); this key is for a gateway you run in a pod yourself, "
                                   'with cluster.provider = "static"') for key in written]
        if self.pod is None:
            return [((*here, key), "only means something with pod (which pod to port-forward to)")
                    for key in written]
        return []


class _PortForwardPipe(SinkFlowControl, WSListener):
    """One port-forward WebSocket as velo's TunnelPipe, after the in-stream greeting."""

    def __init__(self, sink_factory: SinkFactory, token: str, label: str, done: asyncio.Future) -> None:
        super().__init__()
        self._sink_factory = sink_factory
        self._token = token
        self._label = label
        self._done = done
        self.sink: TunnelSink | None = None
        self.ws: WSTransport | None = None
        self.peer = label
        self.shown = label  # "pod NAMESPACE/NAME port N": the namespace used, written or not
        self._port_seen = {DATA: False, ERROR: False}
        self._greeting = bytearray()
        self._write_paused = False
        self._close_timer: asyncio.TimerHandle | None = None

    # ---- picows -> velo ------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        transport.send(WSMsgType.BINARY, bytes([DATA]) + MAGIC + b" " + self._token.encode() + b"\n")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if kind not in (WSMsgType.BINARY, WSMsgType.CONTINUATION) or frame.payload_size == 0:
            return
        payload = frame.get_payload_as_memoryview()
        channel, data = payload[0], payload[1:]
        if channel in self._port_seen and not self._port_seen[channel]:
            self._port_seen[channel] = True  # the port number, 2 bytes, once per channel
            data = data[2:]
        if not data:
            return
        if channel == DATA:
            if self.sink is not None:
                self.sink.data_received(bytes(data))
            else:
                self._greeted(bytes(data))
        elif channel == ERROR:
            self._fail(TunnelError(f"{self._label}: {bytes(data).decode('utf-8', 'replace').strip()}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.sink is not None:
            self.sink.connection_lost(None)
        elif not self._done.done():
            self._done.set_exception(TunnelError(f"{self._label}: closed during the velo handshake"))

    # ---- the greeting ---------------------------------------------------------------

    def _greeted(self, data: bytes) -> None:
        self._greeting += data
        end = self._greeting.find(b"\n")
        if end < 0:
            if len(self._greeting) >= MAX_LINE:
                self._fail(TunnelError(f"{self._label}: no velo gateway behind this port"))
            return
        line, rest = bytes(self._greeting[:end]), bytes(self._greeting[end + 1:])
        self._greeting = bytearray()
        if line == OK.rstrip():
            if self._done.done():  # connect() gave up meanwhile
                self.abort()
                return
            self._done.set_result(None)
            sink = self._sink_factory()
            self.sink = sink
            sink.connection_made(self)
            if self._write_paused:
                sink.pause_writing()
            if rest:
                sink.data_received(rest)
        elif line == DENIED.rstrip():
            self._fail(TunnelError(f"{self._label}: the gateway rejected the token", auth=True))
        else:
            self._fail(TunnelError(f"{self._label}: unexpected reply {line[:60]!r} (is a velo gateway "
                                   "listening on port-forward:// in the pod?)"))

    def _fail(self, error: TunnelError) -> None:
        if not self._done.done():
            self._done.set_exception(error)
        elif self.sink is not None:
            log.warning("port-forward: %s", error.reason)
        self.abort()

    # ---- velo -> picows --------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        # Bounded messages, as the WebSocket backend sends: the far end (the kubelet's, or
        # kwok's, port-forward stream server) passes a message on only once all of it
        # arrived, and golang.org/x/net/websocket refuses one over 32 MiB outright; a
        # flush can be MBs.
        send = self.ws.send
        if len(data) <= WS_MESSAGE:
            send(WSMsgType.BINARY, DATA_PREFIX + data)
            return
        view = memoryview(data)
        for start in range(0, len(view), WS_MESSAGE):
            send(WSMsgType.BINARY, DATA_PREFIX + view[start : start + WS_MESSAGE])

    def pause_reading(self) -> None:
        self.ws.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        self.ws.underlying_transport.resume_reading()

    def close(self) -> None:
        """Polite, with a deadline: a hung apiserver must not keep the socket forever."""
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.send_close(WSCloseCode.OK)
            self.ws.disconnect()
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_DEADLINE, self.abort)

    def abort(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.disconnect(graceful=False)


class _GatewayPipe(ProtocolPipe):
    """Gateway side: a connection that came through port-forward, greeting first."""

    def __init__(self, sink_factory: SinkFactory, authenticate: Authenticator) -> None:
        super().__init__(sink_factory)
        self._authenticate = authenticate
        self.peer = "port-forward"
        self._buffer = bytearray()
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"port-forward {peer[0]}:{peer[1]}"
        self._deadline = asyncio.get_running_loop().call_later(GREETING_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.data_received(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) >= MAX_LINE:
                self.transport.abort()
            return
        line, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 1:])
        self._buffer = bytearray()
        if self._deadline is not None:
            self._deadline.cancel()
        magic, _, token = line.partition(b" ")
        if magic != MAGIC:
            self.transport.abort()
            return
        if not self._authenticate(token.strip().decode("utf-8", "replace") or None):
            log.warning("port-forward: %s presented an invalid or missing token", self.peer)
            self.transport.write(DENIED)
            self.transport.close()
            return
        self.transport.write(OK)
        sink = self.start_sink()
        if rest:
            sink.data_received(rest)

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


class PortForwardBackend(TunnelBackend):
    name = NAME
    schemes = ("port-forward",)
    description = "Kubernetes pods/portforward through the apiserver (kubeconfig credentials, no Ingress)"

    def __init__(self) -> None:
        self._connections: dict[tuple, object] = {}

    async def connect(self, endpoint: Endpoint, sink_factory: SinkFactory, *, timeout: float):
        if not endpoint.url:
            pod = getattr(endpoint.settings, "pod", None)
            if pod is None:
                raise TunnelError(f"{endpoint.shown or NAME}: no pod to port-forward to (the provider found none "
                                  "and [tunnel.port-forward] names no pod)")
            try:
                async with asyncio.timeout(timeout):
                    endpoint = await self._named_pod(endpoint)
            except TimeoutError:
                raise TunnelError(f"{endpoint.shown}: no answer from the apiserver within {timeout:g}s") from None
        label = endpoint.shown
        done = asyncio.get_running_loop().create_future()
        pipe_holder: list[_PortForwardPipe] = []

        def listener() -> _PortForwardPipe:
            pipe = _PortForwardPipe(sink_factory, endpoint.token, label, done)
            pipe_holder.append(pipe)
            return pipe

        headers = {"Sec-WebSocket-Protocol": SUBPROTOCOL, **dict(endpoint.headers)}
        loop = asyncio.get_running_loop()
        greeting = None
        try:
            async with asyncio.timeout(timeout):
                started = loop.time()
                await dial(endpoint.url, listener, timeout=timeout, headers=headers,
                           ssl_context=endpoint.ssl_context, logger_name="velo.portforward",
                           rejected="the apiserver rejected the kubeconfig credentials")
                greeting = max(GREETING_MIN, 3 * (loop.time() - started))
                async with asyncio.timeout(greeting):
                    await done
        except BaseException as exc:
            for pipe in pipe_holder:
                pipe.abort()
            if isinstance(exc, TimeoutError):
                if greeting is not None:
                    raise TunnelError(f"{label}: no velo gateway answered on the pod's port within "
                                      f"{greeting:.1f}s (still starting?)") from None
                raise TunnelError(f"{label}: no answer through the apiserver within {timeout:g}s") from None
            if isinstance(exc, TunnelError) and "(HTTP 403)" in exc.reason:
                raise TunnelError(f"{label}: permission denied by the apiserver (HTTP 403); port-forward needs "
                                  "the get and create verbs on pods/portforward (`velo rbac` prints the Role)",
                                  auth=True) from None
            raise
        return pipe_holder[0]

    async def _named_pod(self, endpoint: Endpoint) -> Endpoint:
        """``[tunnel.port-forward] pod``: read the pod now (it may have been recreated, or
        gone) and return the Endpoint to dial; TunnelError with one line when there is none."""
        from velo.provider import ProviderError
        from velo.providers.kubernetes import portforward

        table = endpoint.settings
        try:
            conn = await asyncio.to_thread(self._connection, table.kubeconfig, table.context)
        except ProviderError as exc:
            raise TunnelError(f"[tunnel.{NAME}] {str(exc).replace('cluster.context: ', 'context: ')}") from None
        found = await portforward.named_pod_endpoint(
            conn, table.namespace or conn.namespace, table.pod, table.port, backend=endpoint.backend,
            token=endpoint.token, settings=table)
        if found.problem:
            raise TunnelError(found.problem)
        return found

    def _connection(self, kubeconfig: str | None, context: str):
        """One API client per kubeconfig and context, made again when a kubeconfig file
        changed (a new login) so its credentials are the current ones. Blocking."""
        from velo.providers.kubernetes.api import connect

        files = [kubeconfig] if kubeconfig else (os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep)
        stamps = []
        for name in files:
            try:
                stamps.append(os.stat(os.path.expanduser(name)).st_mtime_ns)
            except OSError:
                stamps.append(None)
        key = (kubeconfig, tuple(files), context, tuple(stamps))
        conn = self._connections.get(key)
        if conn is None:
            conn = connect(context, "", config_file=kubeconfig)
            old, self._connections = self._connections, {key: conn}
            for stale in old.values():  # its pooled connections to the apiserver are not used again
                stale.api.rest_client.pool_manager.clear()
        return conn

    async def serve(self, listen: GatewayListen, authenticate: Authenticator, sink_factory: SinkFactory):
        return await asyncio.get_running_loop().create_server(
            lambda: _GatewayPipe(sink_factory, authenticate), listen.host, listen.port, reuse_address=True,
        )


@hookimpl
def velo_tunnel_backends():
    return [PortForwardBackend()]


@hookimpl
def velo_config_tables():
    return {f"tunnel.{NAME}": PortForwardTable}
