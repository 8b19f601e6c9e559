"""The provider seam: where remote services, the tunnel endpoint and the
in-cluster half of the reverse path come from.

``static`` reads them from velocity.toml; ``kubernetes`` discovers them and
manages the traffic-proxy.  The engine only ever talks to this interface,
through providers registered by the ``velo_cluster_providers`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, ClassVar

from velo.plan import Inventory


@dataclass(frozen=True)
class Endpoint:
    """One way to reach a gateway: try them in order."""

    backend: str
    url: str
    token: str = field(repr=False)  # never in a repr, a log line or an error


class ProviderError(Exception):
    """A user-facing failure (unreachable cluster, missing permission...): one or two lines."""


class ProviderSession:
    """A provider's live connection for one `velo up`."""

    def __init__(self, config) -> None:
        self.config = config

    def update_config(self, config) -> None:
        """velocity.toml changed in ways that need no reconnect (services, env, locals)."""
        self.config = config

    async def endpoints(self) -> list[Endpoint]:
        """Asked before every (re)connect, so a provider can follow a restarted pod."""
        raise NotImplementedError

    async def inventory(self) -> Inventory:
        raise NotImplementedError

    async def watch(self) -> AsyncIterator[Inventory]:
        """Yield a new inventory whenever the remote side changes.  Default: never."""
        return
        yield  # unreachable; makes this an async generator that yields nothing

    async def start(self, say) -> None:
        """`velo up` only: make the remote side (traffic-proxy, intercepts).  ``say`` prints progress."""

    async def keepalive(self) -> None:
        """Runs for the life of `velo up` (e.g. renewing a lease); raising stops velo with its message."""

    async def repair(self, everything: bool = False) -> list[str]:
        """Undo what crashed sessions left behind; ``everything``: all of this user's sessions."""
        return []

    async def close(self) -> None:
        """Undo everything this session changed remotely."""


class Provider:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    async def open(self, config) -> ProviderSession:
        raise NotImplementedError
