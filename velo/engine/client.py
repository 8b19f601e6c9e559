"""Keeps one tunnel to the gateway up, for as long as `velo up` runs, and says how it is doing.

Connect, announce the session on a control stream, serve streams until the
tunnel dies, then reconnect with jittered exponential backoff capped at
``reconnect_max_delay``, however many attempts that takes.  Endpoints are asked
from the provider before every attempt (so a restarted traffic-proxy pod is
followed) and tried in the preference order every time; the reason each one
was skipped is kept for `velo status`.  Local connections that arrive while the
tunnel is down wait (up to ``wait_for_tunnel``) instead of being refused.

Anything a backend or provider raises is that attempt failing, never the loop
ending; only a cancellation (`velo up` stopping) ends it, and no await in the
loop turns a cancellation into a failure.  The one exception is a gateway of
another wire protocol (``protocol.PROTOCOL``): retrying cannot fix it, so the
loop ends with ``IncompatiblePeer``, whose one line names both releases and what
to do, and `velo up` stops with it.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import random
import socket
import time
from typing import Awaitable, Callable

from velo import __version__, protocol
from velo.channel import MessageChannel
from velo.mux import SessionClosedError
from velo.plugins import get_backend
from velo.provider import Endpoint
from velo.transport import TunnelError
from velo.tunnel import Bridge, StreamStats, Tunnel, reset_transport

log = logging.getLogger("velo.client")

INITIAL_DELAY = 0.05
AUTH_RETRY_DELAY = 5.0
STOP_TIMEOUT = 3.0
_MAX_DOUBLINGS = 32  # 0.05 s * 2**32 is far above any cap; more would only overflow


class IncompatiblePeer(TunnelError):
    """The gateway speaks another wire protocol: the session cannot work with it."""


class ControlStream:
    """The client's end of one tunnel's control stream.

    The gateway's first message is its hello (release, protocol); a gateway from before
    the version exchange answers the session's first message with reverse-status
    instead, which is how it is recognised.  Later messages wait until the client
    ``adopt``s the tunnel (the handshake is over), then go to ``on_message``.
    """

    def __init__(self, on_message) -> None:
        self.channel = MessageChannel(self._received, on_close=self._closed)
        self.bridge = Bridge(StreamStats())
        self.hello: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self.sent_reverse: list[dict] | None = None
        self._on_message = on_message
        self._early: list[dict] | None = []  # None once adopted

    def _received(self, message: dict) -> None:
        if not self.hello.done():
            self.hello.set_result(message if message.get("op") == protocol.OP_HELLO else {})
            if message.get("op") == protocol.OP_HELLO:
                return
        if self._early is not None:
            self._early.append(message)
        else:
            self._on_message(self, message)

    def adopt(self) -> None:
        early, self._early = self._early or [], None
        for message in early:
            self._on_message(self, message)

    def _closed(self) -> None:
        if not self.hello.done():
            why = self.bridge.stats.last_error or "it closed the control stream"
            self.hello.set_exception(TunnelError(f"the gateway did not say hello: {why}"))
            self.hello.exception()  # retrieved here: the dial may already have given up on it


def backoff_delay(attempt: int, cap: float) -> float:
    """Equal jitter: half fixed, half random, so many laptops do not retry in step.

    The exponent is bounded so that attempt 10,000 costs the same as attempt 32.
    """
    base = min(cap, INITIAL_DELAY * (2 ** min(max(attempt, 0), _MAX_DOUBLINGS)))
    return base / 2 + random.uniform(0, base / 2)


class TunnelClient:
    def __init__(
        self,
        endpoints: Callable[[], Awaitable[list[Endpoint]]],
        resolve_reverse,
        *,
        session_id: str,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 15.0,
        reconnect_max_delay: float = 1.0,
        wait_for_tunnel: float = 10.0,
    ) -> None:
        self._endpoints = endpoints
        self._resolve_reverse = resolve_reverse
        self.session_id = session_id
        self.client_name = f"{getpass.getuser()}@{socket.gethostname()}"
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.wait_for_tunnel = wait_for_tunnel
        self.tunnel: Tunnel | None = None
        self.state = "starting"
        self.backend = ""
        self.url = ""
        self.last_error = ""
        self.skipped: list[dict] = []
        self.connects = 0
        self.attempts = 0  # failed attempts since the tunnel was last up
        self.up_since: float | None = None
        self.down_since: float | None = None
        self.reverse_wanted: list[dict] = []
        self.reverse_status: dict[str, dict] = {}
        self.reverse_stats = StreamStats()
        self.peer_version = ""  # the gateway's release, from its hello
        self.peer_protocol: int | None = None
        self._control: ControlStream | None = None
        self._waiting: list[tuple[Bridge, dict, asyncio.TimerHandle]] = []
        self._up = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._said_down = False

    # ---- lifecycle --------------------------------------------------------------

    def start(self) -> asyncio.Task:
        """Start the loop; the task only ends by ``stop`` (or a bug, which the caller reports)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="the tunnel")
        return self._task

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
            if not done:  # something inside swallowed the cancellation: say so, do not hang
                log.error("the tunnel loop did not stop within %gs; leaving it", STOP_TIMEOUT)
        if self.tunnel is not None:
            self.tunnel.close("velo is stopping")
        for bridge, _header, timer in self._waiting:
            timer.cancel()
            if bridge.transport is not None:
                reset_transport(bridge.transport)
        self._waiting.clear()

    def restart(self) -> None:
        """Drop the current tunnel (e.g. the endpoint changed); the loop reconnects."""
        if self.tunnel is not None:
            self.tunnel.abort("tunnel settings changed")

    async def wait_up(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        self.state = "connecting"
        while not self._stopping:
            tunnel = await self._connect_once()
            if tunnel is not None:
                reason = await asyncio.shield(tunnel.closed)
                self._went_down(reason)
            else:
                self.attempts += 1
            delay = backoff_delay(self.attempts, self.reconnect_max_delay)
            if self.state == "unauthorized":  # retrying faster will not fix a token
                delay = max(delay, AUTH_RETRY_DELAY)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> Tunnel | None:
        """One pass over the preference order; the first backend that connects wins."""
        try:
            async with asyncio.timeout(self.connect_timeout):  # a hung apiserver is a failed attempt
                endpoints = await self._endpoints()
        except TimeoutError:
            self._not_connected(f"finding the gateway: no answer within {self.connect_timeout:g}s", [], auth=False)
            return None
        except Exception as exc:  # a provider problem is shown, then retried
            self._not_connected(f"finding the gateway: {exc}", [], auth=False)
            return None
        skipped: list[dict] = []
        auth = False
        incompatible: IncompatiblePeer | None = None
        for endpoint in endpoints:
            try:
                tunnel, control = await self._dial(endpoint)
            except IncompatiblePeer as exc:
                reason, incompatible = exc.reason, exc
            except TunnelError as exc:
                reason, auth = exc.reason, auth or exc.auth
            except Exception as exc:  # a bug or library error in one backend: that backend failed
                log.debug("tunnel via %s raised", endpoint.backend, exc_info=True)
                reason = f"{endpoint.shown}: {type(exc).__name__}: {exc}"
            else:
                self._went_up(tunnel, control, endpoint, skipped)
                return tunnel
            skipped.append({"backend": endpoint.backend, "url": endpoint.shown, "reason": reason})
        if incompatible is not None:  # no backend worked and one reached a gateway we cannot use
            self.last_error = incompatible.reason
            self.skipped = skipped
            self.state = "incompatible"
            raise incompatible  # ends the loop: `velo up` stops with this one line
        self._not_connected("; ".join(f"{s['backend']}: {s['reason']}" for s in skipped)
                            or "no tunnel backend to try", skipped, auth=auth)
        return None

    async def _dial(self, endpoint: Endpoint) -> tuple[Tunnel, ControlStream]:
        """Connect one backend, handshake and version exchange included, within ``connect_timeout``.

        Whatever goes wrong, nothing is left open; a cancellation stays a cancellation,
        even when a backend wrapped it in another exception.
        """
        if endpoint.problem:
            raise TunnelError(endpoint.problem)
        backend = get_backend(endpoint.backend)
        tunnel = Tunnel(
            client=True,
            resolve=self._resolve_reverse,
            keepalive_interval=self.keepalive_interval,
            keepalive_timeout=self.keepalive_timeout,
            dial_timeout=self.connect_timeout,
            label="client",
        )
        tunnel.stats = self.reverse_stats
        task = asyncio.current_task()
        pipe = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                pipe = await backend.connect(endpoint, lambda: tunnel, timeout=self.connect_timeout)
                await asyncio.shield(tunnel.connected)
                control = self._open_control(tunnel)
                self._check_peer(endpoint, await asyncio.shield(control.hello))
        except BaseException as exc:
            for opened in {id(p): p for p in (pipe, tunnel.pipe) if p is not None}.values():
                opened.abort()
            if isinstance(exc, TimeoutError):
                raise TunnelError(f"{endpoint.shown}: not connected within {self.connect_timeout:g}s") from None
            if not isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise asyncio.CancelledError() from exc  # the backend turned our cancel into an error
            raise
        return tunnel, control

    def _open_control(self, tunnel: Tunnel) -> ControlStream:
        """Announce the session (with our release and protocol) and the reverse listeners.

        The reverse list goes out at once, before the gateway's answer: a gateway from
        before the version exchange answers it (reverse-status) where a newer one says hello.
        """
        control = ControlStream(self._on_control)
        control.channel.attach(control.bridge)
        tunnel.open(control.bridge, {"op": protocol.OP_CONTROL, "session": self.session_id, "client": self.client_name,
                                     "version": __version__, "protocol": protocol.PROTOCOL})
        control.sent_reverse = list(self.reverse_wanted)
        control.channel.send({"op": "reverse", "listeners": control.sent_reverse})
        return control

    def _check_peer(self, endpoint: Endpoint, hello: dict) -> None:
        """Raise IncompatiblePeer, naming both releases and what to do, unless the protocols match."""
        version, number = protocol.peer_release(hello)
        self.peer_version, self.peer_protocol = version, number
        if number == protocol.PROTOCOL:
            return
        theirs = f"velo {version}" if version else "the velo release that gateway runs"
        raise IncompatiblePeer(
            f"{protocol.describe_release(__version__, protocol.PROTOCOL)} cannot use the gateway {endpoint.shown}, "
            f"which runs {protocol.describe_release(version, number)}: run the gateway from velo {__version__} "
            f"(kubernetes: leave [cluster] proxy_image unset, or give it the velo {__version__} image), "
            f"or install {theirs} here")

    def _not_connected(self, reason: str, skipped: list[dict], *, auth: bool) -> None:
        self.last_error = reason
        self.skipped = skipped
        self.state = "unauthorized" if auth else self._not_up
        if not self._said_down:  # once per outage; `velo status` has every attempt's reason
            self._said_down = True
            if self.down_since is None:
                self.down_since = time.monotonic()
            log.warning("tunnel not up: %s (retrying until it is)", reason)

    @property
    def _not_up(self) -> str:
        return "reconnecting" if self.connects else "connecting"

    def _went_up(self, tunnel: Tunnel, control: ControlStream, endpoint: Endpoint, skipped: list[dict]) -> None:
        self.tunnel = tunnel
        self.backend = endpoint.backend
        # where the backend actually went, if it resolved more (port-forward: the pod's namespace)
        self.url = getattr(tunnel.pipe, "shown", "") or endpoint.shown
        self.connects += 1
        self.state = "up"
        self.last_error = ""
        self.skipped = skipped
        self.up_since = time.time()
        self._control = control
        control.adopt()
        if control.sent_reverse != self.reverse_wanted:  # changed during the handshake
            self._send_reverse()
        why = "".join(f"; skipped {s['backend']}: {s['reason']}" for s in skipped)
        if self.peer_version != __version__:  # same protocol, another release: fine, said once
            why += f"; the gateway runs velo {self.peer_version or '?'} (this is {__version__}, both protocol {protocol.PROTOCOL})"
        if self.down_since is not None and self.connects > 1:
            down = time.monotonic() - self.down_since
            log.info("tunnel back via %s (%s) after %s down, %d attempts%s",
                     endpoint.backend, self.url, _duration(down), self.attempts + 1, why)
        else:
            log.info("tunnel up via %s (%s)%s", endpoint.backend, self.url, why)
        self.attempts = 0
        self.down_since = None
        self._said_down = False
        waiting, self._waiting = self._waiting, []
        for bridge, header, timer in waiting:
            timer.cancel()
            if not bridge.closed:
                tunnel.open(bridge, header)
        self._up.set()

    def _went_down(self, reason: str) -> None:
        self._up.clear()
        self.tunnel = None
        self._control = None
        self.up_since = None
        self.last_error = reason
        self.state = "reconnecting"
        self.reverse_status = {}
        self.down_since = time.monotonic()
        if not self._stopping:
            self._said_down = True
            log.warning("tunnel down: %s (reconnecting)", reason)
            if self.reverse_wanted:  # what the cluster sends to this laptop is lost meanwhile
                log.warning("no route to this laptop for %s until the tunnel is back",
                            ", ".join(r["name"] for r in self.reverse_wanted))

    # ---- streams ----------------------------------------------------------------

    def open(self, bridge: Bridge, header: dict) -> None:
        """Send a new local connection through the tunnel, or hold it until the tunnel is back."""
        tunnel = self.tunnel
        if tunnel is not None and tunnel.alive:
            try:
                tunnel.open(bridge, header)
                return
            except SessionClosedError as exc:
                # Stream ids ran out, or the gateway is going away: a clean reconnect,
                # and this connection waits for the new tunnel like any other.
                tunnel.close(f"no new streams on this tunnel: {exc}")
        if self.wait_for_tunnel <= 0:
            reset_transport(bridge.transport)
            return
        timer = asyncio.get_running_loop().call_later(self.wait_for_tunnel, self._expire, bridge)
        self._waiting.append((bridge, header, timer))

    def _expire(self, bridge: Bridge) -> None:
        self._waiting = [w for w in self._waiting if w[0] is not bridge]
        bridge.stats.errors += 1
        bridge.stats.last_error = f"tunnel not back within {self.wait_for_tunnel:g}s"
        if bridge.transport is not None:
            reset_transport(bridge.transport)

    # ---- control stream ---------------------------------------------------------

    def set_reverse(self, wanted: list[dict]) -> None:
        self.reverse_wanted = wanted
        self._send_reverse()

    def _send_reverse(self) -> None:
        if self._control is not None:
            self._control.sent_reverse = list(self.reverse_wanted)
            self._control.channel.send({"op": "reverse", "listeners": self._control.sent_reverse})

    def _on_control(self, control: ControlStream, message: dict) -> None:
        if control is not self._control:  # a tunnel still in its handshake, or an old one
            return
        if message.get("op") == "reverse-status":
            self.reverse_status = {item["name"]: item for item in message.get("listeners", []) if "name" in item}
            for item in self.reverse_status.values():
                if not item.get("ok"):
                    log.warning("gateway could not open reverse %s: %s", item["name"], item.get("error"))

    def status(self) -> dict:
        tunnel = self.tunnel
        return {
            "state": self.state,
            "backend": self.backend,
            "url": self.url,
            "rtt_ms": round(tunnel.rtt * 1000, 2) if tunnel is not None and tunnel.rtt is not None else None,
            "connects": self.connects,
            "reconnects": max(0, self.connects - 1),
            "up_since": self.up_since,
            "last_error": self.last_error,
            "skipped": self.skipped,
            "attempts": self.attempts,
            "down_for": round(time.monotonic() - self.down_since, 1) if self.down_since is not None else None,
            "waiting": len(self._waiting),
            "version": __version__,
            "protocol": protocol.PROTOCOL,
            "peer_version": self.peer_version,
            "peer_protocol": self.peer_protocol,
        }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
