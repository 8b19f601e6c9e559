"""The reconciler: brings listeners and reverse routes to match a Plan.

Applying a plan touches only what changed: a forward whose spec is unchanged
keeps its listening socket and every connection open through it.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from velo import protocol
from velo.engine.client import TunnelClient
from velo.plan import Forward, Plan, Reverse
from velo.tunnel import LISTEN_BACKLOG, AcceptedBridge, Refused, StreamStats

log = logging.getLogger("velo.mesh")


class ApplyError(Exception):
    """Part of a plan could not be applied (e.g. a port in use); the rest was."""


class ForwardListener:
    def __init__(self, spec: Forward, client: TunnelClient):
        self.spec = spec
        self.client = client
        self.stats = StreamStats()
        self.server: asyncio.AbstractServer | None = None
        self.header = protocol.encode({"op": protocol.OP_CONNECT, "host": spec.target_host, "port": spec.target_port})

    async def start(self) -> None:
        spec = self.spec
        try:
            self.server = await asyncio.get_running_loop().create_server(
                lambda: AcceptedBridge(self), spec.local_host, spec.local_port, reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:
            why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise ApplyError(
                f"local port {spec.local_port} for {spec.key} {why}; "
                f'set remote.services.{spec.service}.local_port in velocity.toml or free the port'
            ) from None

    def accepted(self, bridge: AcceptedBridge, transport) -> None:
        transport.pause_reading()  # until the stream exists; the tunnel may be reconnecting
        bridge.reading_paused = True
        self.client.open(bridge, self.header)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Mesh:
    def __init__(self, client: TunnelClient):
        self.client = client
        self.forwards: dict[str, ForwardListener] = {}
        self.reverses: dict[str, Reverse] = {}
        self.plan = Plan()

    async def resolve_reverse(self, header: dict):
        """Client side of a reverse stream: which local candidate it goes to."""
        reverse = self.reverses.get(str(header.get("name")))
        if header.get("op") != protocol.OP_REVERSE or reverse is None:
            raise Refused(f"no local candidate for {header.get('name')!r}")
        return reverse.local_host, reverse.local_port

    async def apply(self, plan: Plan) -> list[str]:
        """Reconcile; returns the problems (each one line) of the parts that failed."""
        problems = []
        wanted = {f.key: f for f in plan.forwards}
        for key in list(self.forwards):
            if key not in wanted or wanted[key] != self.forwards[key].spec:
                self.forwards.pop(key).close()
                log.debug("forward %s removed", key)
        for key, spec in wanted.items():
            if key in self.forwards:
                continue
            listener = ForwardListener(spec, self.client)
            try:
                await listener.start()
            except ApplyError as exc:
                problems.append(str(exc))
                continue
            self.forwards[key] = listener
            log.debug("forward %s on %s:%d -> %s:%d", key, spec.local_host, spec.local_port, spec.target_host, spec.target_port)
        self.reverses = {r.key: r for r in plan.reverses}
        self.client.set_reverse(
            [{"name": r.key, "port": r.gateway_port} for r in plan.reverses if r.gateway_port]
        )
        self.plan = plan
        return problems

    def close(self) -> None:
        for listener in self.forwards.values():
            listener.close()
        self.forwards.clear()

    def status(self) -> dict:
        reverse_status = self.client.reverse_status
        return {
            "tunnel": self.client.status(),
            "forwards": [
                {
                    "name": key,
                    "listen": f"{l.spec.local_host}:{l.spec.local_port}",
                    "target": f"{l.spec.target_host}:{l.spec.target_port}",
                    **l.stats.as_dict(),
                }
                for key, l in sorted(self.forwards.items())
            ],
            "reverses": [
                {
                    "name": key,
                    "gateway_port": r.gateway_port,
                    "local": f"{r.local_host}:{r.local_port}",
                    "state": ("no route: tunnel down" if self.client.state != "up" else
                              "listening" if reverse_status.get(key, {}).get("ok") else
                              reverse_status.get(key, {}).get("error") or "pending"),
                }
                for key, r in sorted(self.reverses.items())
            ],
            "reverse_streams": self.client.reverse_stats.as_dict(),
        }
