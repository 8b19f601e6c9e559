"""What the mesh should look like: pure data computed from velocity.toml and the
provider's inventory.  No I/O here, so the reconciler can diff two plans and
`velo config check` / `velo env` can show a plan without starting anything.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from dataclasses import dataclass, field

LOCAL_HOST = "127.0.0.1"
PORT_RANGE = (20000, 30000)  # stable hashed local ports live here


@dataclass(frozen=True)
class ServicePort:
    """One port of a remote service as the gateway reaches it."""

    name: str           # the Service's port name ("" for a lone unnamed port)
    port: int           # the Service's port (what in-cluster clients use)
    target_host: str    # what the gateway dials
    target_port: int


@dataclass(frozen=True)
class Service:
    name: str
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True)
class Reverse:
    """Traffic arriving at the gateway's ``gateway_port`` goes to the local candidate."""

    service: str
    port_name: str
    gateway_port: int
    local_host: str
    local_port: int
    service_port: int = 0   # the Service port whose traffic this is (a provider may repoint its targetPort)

    @property
    def key(self) -> str:
        return port_key(self.service, self.port_name)


@dataclass(frozen=True)
class Inventory:
    """What a provider discovered: remote services, reverse ports, candidate env."""

    services: tuple[Service, ...] = ()
    reverses: tuple[Reverse, ...] = ()
    env: tuple[tuple[str, str], ...] = ()   # the candidate's own configuration, in order
    secret_keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Forward:
    """A local listener for one remote service port."""

    service: str
    port_name: str
    service_port: int
    local_host: str
    local_port: int
    target_host: str
    target_port: int
    single: bool = True   # the service's only port: named by the service alone

    @property
    def key(self) -> str:
        return port_key(self.service, "" if self.single else self.port_name or str(self.service_port))


@dataclass(frozen=True)
class Plan:
    forwards: tuple[Forward, ...] = ()
    reverses: tuple[Reverse, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    secret_keys: frozenset[str] = frozenset()


def port_key(service: str, port_name: str) -> str:
    """``backend`` for a single unnamed port, ``backend/http`` otherwise."""
    return f"{service}/{port_name}" if port_name else service


def describe(plan: Plan) -> list[str]:
    """The plan as the user reads it (`velo up`, `velo config check`, reloads)."""
    return [describe_forward(f) for f in plan.forwards] + [
        f"  reverse {r.key:24} gateway :{r.gateway_port} -> {r.local_host}:{r.local_port}" for r in plan.reverses
    ]


def describe_forward(f: Forward) -> str:
    return f"  forward {f.key:24} {f.local_host}:{f.local_port} -> {f.target_host}:{f.target_port}"


def stable_port(key: str, taken: set[int], project: str = "") -> int:
    """A local port derived from the project and the name: the same on every run and
    machine, and different for two projects that forward the same Service names."""
    low, high = PORT_RANGE
    port = low + zlib.crc32(f"{project}/{key}".encode() if project else key.encode()) % (high - low)
    while port in taken:
        port = low + (port - low + 1) % (high - low)
    return port


def selected(name: str, include: list[str], exclude: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
        fnmatch.fnmatchcase(name, p) for p in exclude
    )


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def build_plan(config, inventory: Inventory, *, listen_host: str | None = None) -> Plan:
    """Turn config + inventory into listeners, reverse routes and env.

    ``listen_host`` overrides ``remote.listen`` (``velo up --compose`` binds the docker bridge).
    """
    remote = config.remote
    host = listen_host or remote.listen
    overrides = remote.services
    candidates = set(config.local)
    chosen = [
        s for s in sorted(inventory.services, key=lambda s: s.name)
        if s.name not in candidates and selected(s.name, remote.include, remote.exclude)
    ]
    fixed: dict[str, int] = {}
    for service in chosen:
        override = overrides.get(service.name)
        if override is None:
            continue
        for port in service.ports:
            if override.ports and port.name in override.ports:
                fixed[port_key(service.name, port.name)] = override.ports[port.name]
            elif override.local_port and len(service.ports) == 1:
                fixed[port_key(service.name, port.name)] = override.local_port
    taken = set(fixed.values())
    forwards = []
    for service in chosen:
        single = len(service.ports) == 1
        for port in service.ports:
            key = port_key(service.name, "" if single else port.name or str(port.port))
            local_port = fixed.get(key) or fixed.get(port_key(service.name, port.name)) or stable_port(key, taken, config.project.name)
            taken.add(local_port)
            forwards.append(Forward(service.name, port.name, port.port, host, local_port,
                                    port.target_host, port.target_port, single))
    env = dict(inventory.env)
    env.update(service_env(forwards))
    env.update(config.env.vars)
    return Plan(tuple(forwards), tuple(inventory.reverses), env, inventory.secret_keys)


def env_name(name: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", name.upper())


def service_env(forwards: list[Forward]) -> dict[str, str]:
    """Kubernetes' service-link variables, pointing at the local listeners, plus NAME_URL."""
    env: dict[str, str] = {}
    by_service: dict[str, list[Forward]] = {}
    for forward in forwards:
        by_service.setdefault(forward.service, []).append(forward)
    for service, ports in by_service.items():
        prefix = env_name(service)
        first = ports[0]
        host = connect_host(first.local_host)
        env[f"{prefix}_SERVICE_HOST"] = host
        env[f"{prefix}_SERVICE_PORT"] = str(first.local_port)
        env[f"{prefix}_PORT"] = f"tcp://{host}:{first.local_port}"
        env[f"{prefix}_URL"] = f"http://{host}:{first.local_port}"
        for forward in ports:
            if forward.port_name and not forward.port_name.isdigit():
                env[f"{prefix}_SERVICE_PORT_{env_name(forward.port_name)}"] = str(forward.local_port)
            link = f"{prefix}_PORT_{forward.service_port}_TCP"
            env[link] = f"tcp://{host}:{forward.local_port}"
            env[f"{link}_PROTO"] = "tcp"
            env[f"{link}_PORT"] = str(forward.local_port)
            env[f"{link}_ADDR"] = host
    return env


def connect_host(listen_host: str) -> str:
    """Where a client on this machine connects to a listener bound to ``listen_host``."""
    return LOCAL_HOST if listen_host in WILDCARD_HOSTS else listen_host
