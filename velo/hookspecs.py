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

    Each has a unique ``name`` (what ``[tunnel] prefer`` lists and ``[tunnel.<name>]``
    configures) and the URL ``schemes`` it serves (what ``velo gateway --listen``
    selects by).
    """


@hookspec
def velo_cluster_providers() -> list:
    """Return Provider instances this plugin provides.

    A provider turns ``velocity.toml`` plus whatever it can discover (a cluster
    API, or nothing for ``static``) into the inventory of remote services,
    the tunnel endpoint and the in-cluster side of the reverse path.
    """


@hookspec
def velo_config_tables() -> dict:
    """Return the pydantic models of the ``velocity.toml`` tables this plugin owns.

    Keys are ``"tunnel.<backend name>"`` for a backend's table (``[tunnel.websocket]``)
    and ``"cluster.<provider name>"`` for a provider's keys, written flat under
    ``[cluster]`` next to ``provider``. Models subclass ``velo.config.tables.BackendTable``
    or ``ProviderTable``: unknown keys get the same "did you mean" error as core keys,
    and ``check(config)`` adds rules that look at the whole file.
    """
