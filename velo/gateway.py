"""`velo gateway`: the far end of every tunnel (the traffic-proxy, in a cluster).

Forward streams are dialled only when the policy allows the target, so a
gateway is never an open proxy.  Reverse listeners belong to the client session
that asked for them and close the moment that client's tunnel is gone (a
reconnecting client re-announces them), so nothing stays bound for a laptop
that has lost power.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import hmac
import json
import logging
import os
import time

from velo import __version__, protocol
from velo.channel import MessageChannel
from velo.mux import SessionClosedError
from velo.plugins import backend_for_scheme
from velo.transport import GatewayListen
from velo.tunnel import (
    LISTEN_BACKLOG,
    MAX_ACCEPTING,
    MAX_STREAMS,
    AcceptedBridge,
    LogOnce,
    Refused,
    StreamStats,
    Tunnel,
    reset_transport,
)

log = logging.getLogger("velo.gateway")


def host_port(port: int) -> int:
    """The port to bind for a container port.

    In a real pod that is the port itself.  A test runner that plays the kubelet
    for several pods on one machine maps container ports to free host ports and
    says so in VELO_PORT_MAP (JSON {"containerPort": hostPort}).
    """
    mapping = json.loads(os.environ.get("VELO_PORT_MAP") or "{}")
    return int(mapping.get(str(port), port))


class AllowList:
    """Forward policy: fnmatch patterns over "host:port" (e.g. "backend:8080",
    "*.shop.svc.cluster.local:*").  Empty means nothing is allowed."""

    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)

    def check(self, host: str, port: int) -> None:
        target = f"{host}:{port}"
        if not any(fnmatch.fnmatchcase(target, pattern) for pattern in self.patterns):
            raise Refused(f"target {target} is not allowed by the gateway's policy")


class PortAllowList:
    """Reverse policy: which gateway ports a client may ask to listen on.

    Specs are "PORT" or "LOW-HIGH"; empty means no reverse listener at all, so a
    holder of the token cannot make the gateway bind whatever port it likes.  The
    traffic-proxy allows exactly the ports of the Services it intercepts.
    """

    def __init__(self, specs: list[str] | tuple[str, ...] = ()):
        self.ranges: list[tuple[int, int]] = []
        for spec in specs:
            low, sep, high = str(spec).strip().partition("-")
            try:
                lo, hi = int(low), int(high) if sep else int(low)
            except ValueError:
                raise ValueError(f"--allow-reverse {spec!r}: expected PORT or LOW-HIGH, e.g. 8080 or 30000-30100") from None
            if not 1 <= lo <= hi <= 65535:
                raise ValueError(f"--allow-reverse {spec!r}: ports are 1-65535, low before high")
            self.ranges.append((lo, hi))

    def allows(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges) or "none"


class Limits:
    """What one peer may use at most; a hit is one log line and that stream or tunnel closed."""

    NAMES = ("tunnels", "streams", "accepting", "control", "reverse")

    def __init__(self, *, tunnels: int = 64, streams: int = MAX_STREAMS, accepting: int = MAX_ACCEPTING,
                 control: int = 60, reverse: int = 256):
        self.tunnels = tunnels      # concurrent tunnels for the (single) token
        self.streams = streams      # open streams per tunnel
        self.accepting = accepting  # per tunnel: streams still sending their header or being dialled
        self.control = control      # control messages per tunnel per minute
        self.reverse = reverse      # reverse listeners per session

    @classmethod
    def parse(cls, items: list[str]) -> "Limits":
        """``["streams=100", ...]`` from ``--limit``; a bad item is a ValueError naming it."""
        values = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or name not in cls.NAMES:
                raise ValueError(f"--limit {item!r}: expected NAME=N with NAME one of {', '.join(cls.NAMES)}")
            try:
                values[name] = int(value)
            except ValueError:
                raise ValueError(f"--limit {item!r}: {value!r} is not a whole number") from None
            if values[name] < 1:
                raise ValueError(f"--limit {item!r}: must be at least 1")
        return cls(**values)


class ReverseListener:
    """A gateway port whose connections are sent to one client as new streams."""

    def __init__(self, name: str, port: int, session: "ClientSession"):
        self.name = name
        self.port = port
        self.session = session
        self.server: asyncio.AbstractServer | None = None
        self.stats = StreamStats()

    def accepted(self, bridge: AcceptedBridge, transport) -> None:
        tunnel = self.session.tunnel
        if tunnel is None or not tunnel.alive:
            reset_transport(transport)
            return
        peer = transport.get_extra_info("peername") or ("?", 0)
        try:
            tunnel.open(bridge, {"op": protocol.OP_REVERSE, "name": self.name, "peer": f"{peer[0]}:{peer[1]}"})
        except SessionClosedError:  # the tunnel is going away; the client reconnects
            reset_transport(transport)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class ClientSession:
    """One laptop, identified by the session id it announces on its control stream."""

    def __init__(self, gateway: "Gateway", session_id: str, client: str, tunnel: Tunnel, version: str = ""):
        self.gateway = gateway
        self.id = session_id
        self.client = client
        self.version = version  # the client's velo release (same protocol as ours)
        self.tunnel: Tunnel | None = tunnel
        self.channel: MessageChannel | None = None
        self.listeners: dict[str, ReverseListener] = {}
        self.since = time.time()
        self._window_start = time.monotonic()
        self._messages = 0

    def on_message(self, message: dict) -> None:
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._messages = now, 0
        self._messages += 1
        limits = self.gateway.limits
        if self._messages > limits.control:
            self._kick(f"more than {limits.control} control messages in a minute")
            return
        if message.get("op") == "reverse":
            wanted = message.get("listeners") or []
            if not isinstance(wanted, list) or len(wanted) > limits.reverse:
                self._kick(f"asked for more than {limits.reverse} reverse listeners")
                return
            self.gateway.tunnel_task(self.tunnel, self.set_reverse(wanted))
        else:
            self.gateway.log_once(log, logging.INFO, "op", "session %s: ignoring control message %r",
                                  self.id, str(message.get("op"))[:40])

    def _kick(self, why: str) -> None:
        """A cap was hit on the control stream: one line, and this client's tunnel is closed."""
        if self.tunnel is not None:
            self.tunnel.abort(f"session {self.id} ({self.client}): {why}")

    async def set_reverse(self, wanted: list[dict]) -> None:
        """Bring this session's reverse listeners to ``wanted``; report each one's state."""
        want = {}
        for item in wanted:
            try:
                want[str(item["name"])[:200]] = int(item["port"])
            except (KeyError, TypeError, ValueError):
                continue
        for name in list(self.listeners):
            if want.get(name) != self.listeners[name].port:
                self.listeners.pop(name).close()
        report = []
        for name, port in want.items():
            error = None
            if name not in self.listeners:
                error = await self.gateway.bind_reverse(self, name, port)
            report.append({"name": name, "port": port, "ok": error is None, "error": error})
        if self.channel is not None:
            self.channel.send({"op": "reverse-status", "listeners": report})

    def detach(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        if self.channel is not None:
            self.channel.close()
        self.tunnel = None


class Gateway:
    def __init__(
        self,
        token: str,
        policy: AllowList,
        *,
        reverse_host: str = "0.0.0.0",
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 15.0,
        reverse_policy: PortAllowList | None = None,
        limits: Limits | None = None,
    ):
        if not token:
            raise ValueError("a gateway needs a token")
        self._token = token.encode()
        self.policy = policy
        self.reverse_policy = reverse_policy or PortAllowList()
        self.limits = limits or Limits()
        self.log_once = LogOnce()
        self.reverse_host = reverse_host
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.sessions: dict[str, ClientSession] = {}
        self.tunnels: set[Tunnel] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.forward_stats = StreamStats()

    def authenticate(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self._token)

    async def listen(self, url: str, ssl_context=None) -> asyncio.AbstractServer:
        scheme, listen = parse_listen_url(url)
        if ssl_context is not None:
            listen = dataclasses.replace(listen, ssl=ssl_context)
        backend = backend_for_scheme(scheme)
        server = await backend.serve(listen, self.authenticate, self._new_tunnel)
        self.servers.append(server)
        return server

    def _new_tunnel(self) -> Tunnel:
        tunnel = Tunnel(
            client=False,
            keepalive_interval=self.keepalive_interval,
            keepalive_timeout=self.keepalive_timeout,
            label="gateway",
            max_streams=self.limits.streams,
            max_accepting=self.limits.accepting,
        )
        tunnel.stats = self.forward_stats
        tunnel.resolve = lambda header, t=tunnel: self._resolve(t, header)
        if len(self.tunnels) >= self.limits.tunnels:
            # Authenticated, but one token gets only so many tunnels: say so and hang up.
            tunnel.connected.add_done_callback(lambda _f, t=tunnel: self._refuse_tunnel(t))
            return tunnel
        self.tunnels.add(tunnel)
        tunnel.closed.add_done_callback(lambda _f, t=tunnel: self._tunnel_closed(t))
        return tunnel

    def _refuse_tunnel(self, tunnel: Tunnel) -> None:
        self.log_once(log, logging.WARNING, "tunnels", "refusing a tunnel from %s: %d tunnels are open (--limit tunnels)",
                      tunnel.peer, self.limits.tunnels)
        tunnel.close("too many tunnels")

    async def _resolve(self, tunnel: Tunnel, header: dict):
        op = header.get("op")
        if op == protocol.OP_CONNECT:
            host, port = header.get("host"), header.get("port")
            if not isinstance(host, str) or not isinstance(port, int):
                raise Refused("connect header needs a host and a port")
            self.policy.check(host, port)
            return host, port
        if op == protocol.OP_CONTROL:
            client = str(header.get("client") or "?")[:200]
            version, number = protocol.peer_release(header)
            if number != protocol.PROTOCOL:
                return self._incompatible(tunnel, client, version, number)
            return self._attach_session(tunnel, str(header.get("session") or "")[:100], client, version)
        raise Refused(f"unknown stream op {op!r}")

    def hello(self, error: str = "") -> dict:
        """The gateway's first control message: its release and protocol (and why it refuses)."""
        message = {"op": protocol.OP_HELLO, "version": __version__, "protocol": protocol.PROTOCOL}
        if error:
            message["error"] = error
        return message

    def _incompatible(self, tunnel: Tunnel, client: str, version: str, number: int) -> MessageChannel:
        """A client of another protocol: one line here, our hello there (so that it can say
        the same on its side), and its tunnel closed; it gets no session and no stream."""
        theirs = f"velo {version}" if version else "the release that client runs"
        why = (f"{protocol.describe_release(__version__, protocol.PROTOCOL)} cannot serve client {client}, "
               f"which runs {protocol.describe_release(version, number)}: install velo {__version__} there, "
               f"or run this gateway from {theirs} (for a traffic-proxy: that release's image)")
        self.log_once(log, logging.WARNING, f"incompatible:{client}:{version}:{number}", "refusing a tunnel from %s: %s",
                      tunnel.peer, why)
        channel = MessageChannel(lambda _message: None)
        channel.send(self.hello(why))  # queued: goes out right after the stream's reply
        asyncio.get_running_loop().call_soon(tunnel.close, why)  # after that reply and hello are queued
        return channel

    def _attach_session(self, tunnel: Tunnel, session_id: str, client: str, version: str = "") -> MessageChannel:
        if not session_id:
            raise Refused("control stream without a session id")
        if any(s.tunnel is tunnel for s in self.sessions.values()):
            raise Refused("this tunnel already has a control stream")
        old = self.sessions.pop(session_id, None)
        if old is not None:
            log.info("session %s (%s) reconnected; dropping its old tunnel", session_id, client)
            old_tunnel = old.tunnel
            old.detach()
            if old_tunnel is not None and old_tunnel is not tunnel:
                old_tunnel.abort("replaced by a newer tunnel of the same session")
        session = ClientSession(self, session_id, client, tunnel, version)
        session.channel = MessageChannel(session.on_message)
        session.channel.send(self.hello())  # before any reverse-status: it says which release answers
        self.sessions[session_id] = session
        log.info("session %s (%s, velo %s) attached from %s", session_id, client, version, tunnel.peer)
        return session.channel

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        for session_id, session in list(self.sessions.items()):
            if session.tunnel is tunnel:
                if tunnel.reason_logged:  # the reason is on the line just before
                    log.info("session %s (%s) gone", session_id, session.client)
                else:
                    log.info("session %s (%s) gone: %s", session_id, session.client, tunnel.close_reason)
                session.detach()
                del self.sessions[session_id]

    def tunnel_task(self, tunnel: Tunnel | None, coro) -> None:
        if tunnel is None or not tunnel.alive:
            coro.close()
            return
        tunnel.spawn(coro)

    async def bind_reverse(self, session: ClientSession, name: str, port: int) -> str | None:
        if not self.reverse_policy.allows(port):
            self.log_once(log, logging.WARNING, f"reverse:{port}",
                          "session %s (%s): reverse %s on port %d refused: not in --allow-reverse (%s)",
                          session.id, session.client, name[:80], port, self.reverse_policy)
            return f"port {port} is not allowed by the gateway's --allow-reverse ({self.reverse_policy})"
        for other in self.sessions.values():
            if other is not session:
                for listener in other.listeners.values():
                    if listener.port == port:
                        return f"port {port} is held by session {other.id} ({other.client})"
        listener = ReverseListener(name, port, session)
        try:
            listener.server = await asyncio.get_running_loop().create_server(
                lambda: AcceptedBridge(listener), self.reverse_host, host_port(port), reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:
            return f"cannot listen on {self.reverse_host}:{port}: {exc.strerror or exc}"
        if session.tunnel is None:  # the client left while we were binding
            listener.close()
            return "session closed"
        session.listeners[name] = listener
        log.info("session %s: reverse %s listening on %s:%d", session.id, name, self.reverse_host, port)
        return None

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for tunnel in list(self.tunnels):
            tunnel.close("gateway shutting down")
        for session in list(self.sessions.values()):
            session.detach()
        self.sessions.clear()


def parse_listen_url(url: str) -> tuple[str, GatewayListen]:
    """``ws://0.0.0.0:7070/velo`` -> ("ws", GatewayListen(...)).  The scheme picks the backend."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.scheme or parts.port is None:
        raise ValueError(f"--listen {url!r}: expected SCHEME://HOST:PORT[/PATH], e.g. ws://0.0.0.0:7070/velo")
    return parts.scheme, GatewayListen(host=parts.hostname or "0.0.0.0", port=host_port(parts.port), path=parts.path or "/")
