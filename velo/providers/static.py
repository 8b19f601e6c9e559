"""The static provider: no cluster API, everything written in velocity.toml.

Used by `velo demo`, by the data-plane tests, and by anyone who runs
`velo gateway` themselves (on a VM, behind their own Ingress).
"""

from __future__ import annotations

from velo.config.errors import show_value
from velo.config.models import port_clashes
from velo.config.tables import ProviderTable
from velo.hookspecs import hookimpl
from velo.plan import Inventory, Reverse, Service, ServicePort
from velo.provider import Endpoint, Provider, ProviderSession

NAME = "static"
_WHY = f"required when cluster.provider is {show_value(NAME)}"


class StaticTable(ProviderTable):
    """``[cluster]`` of the static provider: no keys of its own, but the rest of the
    file must spell out every address, since there is nothing to discover."""

    def check(self, config) -> list:
        problems: list = []
        tunnel = config.tunnel
        if not tunnel.preference:
            problems.append((("tunnel",), f'a backend table with a url, e.g. [tunnel.websocket] url = '
                                          f'"ws://HOST:7070/velo", is {_WHY}'))
        for name in tunnel.preference:
            table = tunnel.table(name)
            if table is not None and not table.gateway():
                problems.append((("tunnel", "prefer"), f"{show_value(name)} {table.no_gateway}"))
        if tunnel.token_source is None:
            problems.append((("tunnel",), f"one of token, token_env or token_file is {_WHY}"))
        for name, svc in config.local.items():
            if svc.expose is None:
                problems.append((("local", name, "expose"), _WHY))
        for name, svc in config.remote.services.items():
            if svc.target is None:
                problems.append((("remote", "services", name, "target"), _WHY))
        gateway = [
            (("local", name, "expose", *key), port)
            for name, svc in config.local.items()
            for key, port in svc.expose_ports()
        ]
        return problems + port_clashes(gateway)


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class StaticSession(ProviderSession):
    async def endpoints(self) -> list[Endpoint]:
        tunnel = self.config.tunnel
        token = self.config.resolve_token()
        tables = [(name, tunnel.table(name)) for name in tunnel.preference]
        return [Endpoint(name, getattr(table, "url", ""), token, settings=table, label=table.gateway())
                for name, table in tables if table is not None]

    async def inventory(self) -> Inventory:
        services = []
        for name, remote in self.config.remote.services.items():
            host, port = split_target(remote.target)
            services.append(Service(name, (ServicePort("", port, host, port),)))
        reverses = []
        for name, local in self.config.local.items():
            if local.port is not None:
                expose = local.expose if isinstance(local.expose, int) else None
                reverses.append(Reverse(name, "", expose, local.host, local.port))
            else:
                for pname, lport in local.ports.items():
                    reverses.append(Reverse(name, pname, local.expose[pname], local.host, lport))
        return Inventory(services=tuple(services), reverses=tuple(reverses))


class StaticProvider(Provider):
    name = NAME
    description = "targets and gateway URL written in velocity.toml"

    async def open(self, config) -> ProviderSession:
        return StaticSession(config)


@hookimpl
def velo_cluster_providers():
    return [StaticProvider()]


@hookimpl
def velo_config_tables():
    return {f"cluster.{NAME}": StaticTable}
