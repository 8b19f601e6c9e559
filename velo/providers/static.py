"""The static provider: no cluster API, everything written in velocity.toml.

Used by `velo demo`, by the data-plane tests, and by anyone who runs
`velo gateway` themselves (on a VM, behind their own Ingress).
"""

from __future__ import annotations

from velo.hookspecs import hookimpl
from velo.plan import Inventory, Reverse, Service, ServicePort
from velo.provider import Endpoint, Provider, ProviderSession


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class StaticSession(ProviderSession):
    async def endpoints(self) -> list[Endpoint]:
        tunnel = self.config.tunnel
        token = self.config.resolve_token()
        return [Endpoint(name, tunnel.url, token) for name in [tunnel.backend, *tunnel.fallback]]

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
    name = "static"
    description = "targets and gateway URL written in velocity.toml"

    async def open(self, config) -> ProviderSession:
        return StaticSession(config)


@hookimpl
def velo_cluster_providers():
    return [StaticProvider()]
