"""The provider seam: where remote services, the tunnel endpoint and the
in-cluster half of the reverse path come from.

``static`` reads them from velocity.toml; ``kubernetes`` discovers them and
manages the traffic-proxy.  The engine only ever talks to this interface,
through providers registered by the ``velo_cluster_providers`` hook.
"""

from __future__ import annotations

from typing import AsyncIterator, ClassVar

from velo.plan import Inventory
from velo.transport import Endpoint

__all__ = ["Endpoint", "Provider", "ProviderError", "ProviderSession"]


class ProviderError(Exception):
    """A user-facing failure (unreachable cluster, missing permission...): one or two lines."""


class ProviderSession:
    """A provider's live connection for one `velo up`."""

    def __init__(self, config) -> None:
        self.config = config

    def update_config(self, config) -> None:
        """velocity.toml changed in ways that need no reconnect (services, env, locals)."""
        self.config = config

    async def reconfigure(self, config) -> None:
        """``update_config`` for a provider that must check the change remotely first:
        raising ProviderError refuses the edit before anything changed."""
        self.update_config(config)

    async def apply_live(self, say, path_ready) -> None:
        """After a live edit reached the mesh: act on it remotely (e.g. redirect a new
        candidate's traffic, give a removed one's back).  ``path_ready`` as for ``start``:
        redirect only once it returned None.  Raising ProviderError (with nothing changed)
        makes the engine go back to the last good config."""

    def reload_refused(self, config) -> str | None:
        """Why this running session cannot take ``config`` live (the user must restart), or None."""
        return None

    async def endpoints(self) -> list[Endpoint]:
        """Asked before every (re)connect, so a provider can follow a restarted pod.

        One per backend of ``config.tunnel.preference``, in that order; the client
        tries them in turn.
        """
        raise NotImplementedError

    async def inventory(self) -> Inventory:
        raise NotImplementedError

    async def watch(self) -> AsyncIterator[Inventory]:
        """Yield a new inventory whenever the remote side changes.  Default: never."""
        return
        yield  # unreachable; makes this an async generator that yields nothing

    async def start(self, say, path_ready=None) -> None:
        """`velo up` only: make the remote side (traffic-proxy, intercepts).  ``say`` prints progress.

        ``path_ready(timeout)`` waits until the tunnel is up and the gateway has bound the
        reverse listeners; it returns None, or why not.  A provider redirects cluster
        traffic only after it returned None, so nothing points at a dead end.
        """

    async def keepalive(self) -> None:
        """Runs for the life of `velo up` (e.g. renewing a lease); raising stops velo with its message."""

    def status(self) -> dict:
        """What `velo status` (and ``--json``, under ``cluster``) shows of the remote side.

        JSON-able data of the provider's own shape (kubernetes: ``api``, the cluster API's
        health while the session rides out an outage; ``drift``).  Two keys mean something
        to the core: ``notes``, lines for the human view (a degraded state such as a Service
        someone else changed back), and ``no_route``, {service name: why}: that Service's
        reverse routes show "no route: why" although their listeners are bound.
        """
        return {}

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
