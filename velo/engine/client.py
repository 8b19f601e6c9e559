"""Keeps one tunnel to the gateway up, forever, and says how it is doing.

Connect, announce the session on a control stream, serve streams until the
tunnel dies, then reconnect with jittered exponential backoff.  Endpoints are
asked from the provider before every attempt, so a restarted traffic-proxy pod
is followed.  Local connections that arrive while the tunnel is down wait (up to
``wait_for_tunnel``) instead of being refused.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import random
import socket
import time
from typing import Awaitable, Callable

from velo import protocol
from velo.channel import MessageChannel
from velo.plugins import PluginError, get_backend
from velo.provider import Endpoint
from velo.transport import TunnelError
from velo.tunnel import Bridge, StreamStats, Tunnel, reset_transport

log = logging.getLogger("velo.client")

INITIAL_DELAY = 0.05
AUTH_RETRY_DELAY = 5.0


def backoff_delay(attempt: int, cap: float) -> float:
    """Equal jitter: half fixed, half random, so many laptops do not retry in step."""
    base = min(cap, INITIAL_DELAY * (2 ** attempt))
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
        self.connects = 0
        self.up_since: float | None = None
        self.reverse_wanted: list[dict] = []
        self.reverse_status: dict[str, dict] = {}
        self.reverse_stats = StreamStats()
        self._control: MessageChannel | None = None
        self._waiting: list[tuple[Bridge, dict, asyncio.TimerHandle]] = []
        self._up = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ---- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="velo-tunnel")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
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
            await asyncio.wait_for(self._up.wait(), timeout)
            return True
        except (TimeoutError, asyncio.TimeoutError):
            return False

    async def _run(self) -> None:
        attempt = 0
        while True:
            tunnel = await self._connect_once()
            if tunnel is not None:
                attempt = 0
                reason = await asyncio.shield(tunnel.closed)
                self._went_down(reason)
                self.state = "reconnecting"
            else:
                attempt += 1
            delay = backoff_delay(attempt, self.reconnect_max_delay)
            if self.state == "unauthorized":  # retrying faster will not fix a token
                delay = max(delay, AUTH_RETRY_DELAY)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> Tunnel | None:
        try:
            endpoints = await self._endpoints()
        except Exception as exc:  # a provider problem is shown, then retried
            self.last_error = str(exc)
            self.state = "error"
            return None
        for endpoint in endpoints:
            try:
                backend = get_backend(endpoint.backend)
            except PluginError as exc:
                self.last_error = str(exc)
                continue
            tunnel = Tunnel(
                client=True,
                resolve=self._resolve_reverse,
                keepalive_interval=self.keepalive_interval,
                keepalive_timeout=self.keepalive_timeout,
                dial_timeout=self.connect_timeout,
                label="client",
            )
            tunnel.stats = self.reverse_stats
            try:
                await backend.connect(endpoint.url, endpoint.token, lambda: tunnel, timeout=self.connect_timeout)
                await asyncio.wait_for(asyncio.shield(tunnel.connected), self.connect_timeout)
            except TunnelError as exc:
                if exc.reason != self.last_error:  # say it once per streak, `velo status` has the rest
                    log.warning("tunnel via %s failed: %s (retrying)", endpoint.backend, exc.reason)
                self.last_error = exc.reason
                self.state = "unauthorized" if exc.auth else self._not_up
                continue
            except (ConnectionError, TimeoutError, asyncio.TimeoutError, OSError) as exc:
                self.last_error = f"{endpoint.url}: {exc or type(exc).__name__}"
                self.state = self._not_up
                continue
            self._went_up(tunnel, endpoint)
            return tunnel
        return None

    @property
    def _not_up(self) -> str:
        return "reconnecting" if self.connects else "connecting"

    def _went_up(self, tunnel: Tunnel, endpoint: Endpoint) -> None:
        self.tunnel = tunnel
        self.backend = endpoint.backend
        self.url = endpoint.url
        self.connects += 1
        self.state = "up"
        self.last_error = ""
        self.up_since = time.time()
        self.reverse_status = {}
        self._control = MessageChannel(self._on_control, on_close=None)
        control = Bridge(StreamStats())
        self._control.attach(control)
        tunnel.open(control, {"op": protocol.OP_CONTROL, "session": self.session_id, "client": self.client_name})
        self._send_reverse()
        log.info("tunnel up via %s (%s)", endpoint.backend, endpoint.url)
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
        self.reverse_status = {}
        log.warning("tunnel down: %s", reason)

    # ---- streams ----------------------------------------------------------------

    def open(self, bridge: Bridge, header: dict) -> None:
        """Send a new local connection through the tunnel, or hold it until the tunnel is back."""
        tunnel = self.tunnel
        if tunnel is not None and tunnel.alive:
            tunnel.open(bridge, header)
            return
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
            self._control.send({"op": "reverse", "listeners": self.reverse_wanted})

    def _on_control(self, message: dict) -> None:
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
            "waiting": len(self._waiting),
        }
