"""Every hook velo calls, in one place.

The engine knows backends and providers only through these hooks: built-in ones
(``velo.backends.*``, ``velo.providers.*``) register through the ``velo``
entry-point group exactly like a third-party package does, so nothing in the
engine branches on a plugin's name.
"""

from __future__ import annotations

import pluggy

PROJECT = "velo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def velo_tunnel_backends() -> list:
    """Return TunnelBackend instances this plugin provides.

    Each has a unique ``name`` (what ``[tunnel] backend`` selects) and the URL
    ``schemes`` it understands (what ``velo gateway --listen`` selects by).
    """


@hookspec
def velo_cluster_providers() -> list:
    """Return Provider instances this plugin provides.

    A provider turns ``velocity.toml`` plus whatever it can discover (a cluster
    API, or nothing for ``static``) into the inventory of remote services,
    the tunnel endpoint and the in-cluster side of the reverse path.
    """
