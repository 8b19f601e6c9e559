"""Plugin discovery: one pluggy manager, entry points of group ``velo``."""

from __future__ import annotations

import difflib
import functools

import pluggy

from velo import hookspecs
from velo.transport import TunnelBackend


class PluginError(Exception):
    """A configured plugin name is not installed; the message lists what is."""


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def _collect(hook_results: list[list]) -> list:
    return [item for result in hook_results for item in (result or [])]


def backends() -> dict[str, TunnelBackend]:
    found: dict[str, TunnelBackend] = {}
    for backend in _collect(plugin_manager().hook.velo_tunnel_backends()):
        found.setdefault(backend.name, backend)
    return found


def providers() -> dict:
    found: dict = {}
    for provider in _collect(plugin_manager().hook.velo_cluster_providers()):
        found.setdefault(provider.name, provider)
    return found


def config_tables() -> dict:
    """``"tunnel.<backend>"`` / ``"cluster.<provider>"`` -> model, from every plugin."""
    from velo.config.tables import check_table_models

    found: dict = {}
    for result in plugin_manager().hook.velo_config_tables():
        for key, model in (result or {}).items():
            found.setdefault(key, model)
    check_table_models(found)
    return found


def _unknown(kind: str, key: str, name: str, installed: dict) -> PluginError:
    names = sorted(installed)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return PluginError(
        f'{key}: unknown {kind} "{name}"; {hint}installed: {", ".join(names) or "none"}'
    )


def get_backend(name: str, key: str = "tunnel.prefer") -> TunnelBackend:
    installed = backends()
    if name not in installed:
        raise _unknown("tunnel backend", key, name, installed)
    return installed[name]


def get_provider(name: str, key: str = "cluster.provider"):
    installed = providers()
    if name not in installed:
        raise _unknown("cluster provider", key, name, installed)
    return installed[name]


def backend_for_scheme(scheme: str) -> TunnelBackend:
    for backend in backends().values():
        if scheme in backend.schemes:
            return backend
    schemes = sorted(s for b in backends().values() for s in b.schemes)
    raise PluginError(f'no installed tunnel backend serves "{scheme}://"; known schemes: {", ".join(schemes)}')
