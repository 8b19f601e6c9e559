"""The schema of ``velocity.toml``, as pydantic v2 models.

Why custom validators instead of pydantic's built-in coercion: the file is TOML, so values
already have types, and silently accepting ``port = true`` (as 1) or ``port = "3000"`` would
hide mistakes. Each value validator raises a ``PydanticCustomError`` whose message is the
final user-facing text ("expected an integer 1-65535, got \"abc\""); the loader only adds
the file name and key path.

Cross-field rules that concern several keys raise one ``velo_rules`` error carrying a list
of ``(relative key path, message)`` problems in its context, so every broken rule is
reported on its own line at the right key (see ``_rules``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError, display_path, format_key_path, show_value

__all__ = [
    "ProjectConfig",
    "ClusterConfig",
    "TunnelConfig",
    "LocalService",
    "RemoteService",
    "RemoteConfig",
    "EnvConfig",
    "ComposeConfig",
    "VelocityConfig",
    "DEFAULT_PROVIDER",
]

DEFAULT_PROVIDER = "static"
"""What ``[cluster] provider`` is when not written (the core never branches on it)."""

# --------------------------------------------------------------------------- value checks

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORKLOAD = re.compile(r"(deployment|statefulset)/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)")

Problem = tuple[tuple[str | int, ...], str]


def _fail(message: str) -> PydanticCustomError:
    """A value error whose text is shown to the user verbatim (braces escaped)."""
    return PydanticCustomError("velo_value", message.replace("{", "{{").replace("}", "}}"))


def _rules(problems: list[Problem]) -> PydanticCustomError:
    """One error for several cross-field problems; the loader splits it back into lines.

    A validator can raise only one error, but the user should see every broken rule at
    once, each at its own key. The readable summary keeps ``str(ValidationError)`` useful
    for anyone validating without the loader.
    """
    summary = "; ".join(f"{format_key_path(loc) or '(here)'}: {msg}" for loc, msg in problems)
    return PydanticCustomError("velo_rules", "{summary}", {"summary": summary, "problems": problems})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_range(low: int, high: int) -> Any:
    def check(value: object) -> int:
        if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
            raise _fail(f"expected an integer {low}-{high}, got {show_value(value)}")
        return value  # type: ignore[return-value]

    return check


def _seconds(*, allow_zero: bool) -> Any:
    def check(value: object) -> float:
        ok = (_is_int(value) or isinstance(value, float)) and (
            value >= 0 if allow_zero else value > 0  # type: ignore[operator]
        )
        if not ok or value != value or value == float("inf"):  # reject nan / inf too
            bound = "0 or more" if allow_zero else "greater than 0"
            raise _fail(f"expected a number of seconds {bound}, got {show_value(value)}")
        return float(value)  # type: ignore[arg-type]

    return check


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _fail(f"expected a string, got {show_value(value)}")
    return value


def _nonempty(value: object) -> str:
    if _string(value).strip() == "":
        raise _fail("must not be empty")
    return value  # type: ignore[return-value]


def _dns_name(value: object) -> str:
    text = _string(value)
    if len(text) > 63 or not _DNS_LABEL.fullmatch(text):
        raise _fail(
            'expected lowercase letters, digits and "-" (starting and ending with a letter '
            f"or digit, at most 63 characters), got {show_value(value)}"
        )
    return text


def _port_key(value: object) -> str:
    """A Service port name, or its number written as a string ("8080")."""
    text = _string(value)
    if text.isdigit():
        if not 1 <= int(text) <= 65535:
            raise _fail(f"expected a port name or a port number 1-65535, got {show_value(value)}")
        return text
    if len(text) > 63 or not _DNS_LABEL.fullmatch(text):
        raise _fail(
            'expected a port name (lowercase letters, digits and "-") or a port number, '
            f"got {show_value(value)}"
        )
    return text


def _env_name(value: object) -> str:
    text = _string(value)
    if not _ENV_NAME.fullmatch(text):
        raise _fail(
            'expected an environment variable name (letters, digits and "_", not starting '
            f"with a digit), got {show_value(value)}"
        )
    return text


def _env_value(value: object) -> str:
    """Env values are strings; numbers and booleans are accepted as their TOML spelling."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if _is_int(value) or isinstance(value, float):
        return repr(value)
    raise _fail(f"expected a string, number or boolean, got {show_value(value)}")


def _host(value: object) -> str:
    text = _nonempty(value)
    if any(ch.isspace() for ch in text):
        raise _fail(f"expected a host name or IP address, got {show_value(value)}")
    return text


def _target(value: object) -> str:
    """``host:port`` or ``[ipv6]:port``; a bare IPv6 address would be ambiguous."""
    text = _string(value)
    host, port = "", ""
    if text.startswith("["):
        end = text.find("]")
        if end > 1 and text[end + 1 : end + 2] == ":":
            host, port = text[1:end], text[end + 2 :]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or any(ch.isspace() for ch in host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _fail(f'expected "host:port" (or "[ipv6]:port") with a port 1-65535, got {show_value(value)}')
    return text


def _url(value: object) -> str:
    """Any scheme (the tunnel plugin decides), but it has to be a URL with a host."""
    text = _string(value)
    try:
        parts = urlsplit(text)
        ok = bool(parts.scheme) and bool(parts.hostname) and not any(ch.isspace() for ch in text)
    except ValueError:  # e.g. an unbalanced "[" in the host
        ok = False
    if not ok:
        raise _fail(f'expected a URL with a host, like "ws://127.0.0.1:7070/velo", got {show_value(value)}')
    try:
        if parts.port == 0:
            raise ValueError("port 0")
    except ValueError:
        raise _fail(f"expected a URL with a port 1-65535, got {show_value(value)}") from None
    return text


def _workload(value: object) -> str:
    text = _string(value)
    if not _WORKLOAD.fullmatch(text):
        raise _fail(f'expected "<kind>/<name>" with kind deployment or statefulset, got {show_value(value)}')
    return text


def _str_list(value: object) -> object:
    if not isinstance(value, list):
        raise _fail(f"expected an array of strings, got {show_value(value)}")
    return value


ENV_FORMATS = ("dotenv", "compose", "docker", "sh", "fish", "powershell", "json", "shell")  # shell = sh


def _env_format(value: object) -> str:
    choices = ENV_FORMATS
    if value not in choices:
        raise _fail(f"expected one of {', '.join(show_value(c) for c in choices)}, got {show_value(value)}")
    return value  # type: ignore[return-value]


Port = Annotated[int, BeforeValidator(_int_range(1, 65535))]
LeaseSeconds = Annotated[int, BeforeValidator(_int_range(5, 3600))]
Seconds = Annotated[float, BeforeValidator(_seconds(allow_zero=False))]
SecondsOrZero = Annotated[float, BeforeValidator(_seconds(allow_zero=True))]
Text = Annotated[str, BeforeValidator(_string)]
NonEmpty = Annotated[str, BeforeValidator(_nonempty)]
DnsName = Annotated[str, BeforeValidator(_dns_name)]
PortKey = Annotated[str, BeforeValidator(_port_key)]
EnvName = Annotated[str, BeforeValidator(_env_name)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]
Host = Annotated[str, BeforeValidator(_host)]
Target = Annotated[str, BeforeValidator(_target)]
Url = Annotated[str, BeforeValidator(_url)]
Workload = Annotated[str, BeforeValidator(_workload)]
NameList = Annotated[list[NonEmpty], BeforeValidator(_str_list)]
PortMap = dict[PortKey, Port]


def _expose(value: object) -> object:
    """``expose`` is one gateway port, or a table of them keyed like ``ports``.

    Checked by hand (not as a pydantic union) so a mistake gives one clear message instead
    of one per union member.
    """
    if isinstance(value, dict):
        problems: list[Problem] = []
        check_port = _int_range(1, 65535)
        for key, port in value.items():
            for check, item, loc in ((_port_key, key, (key, "[key]")), (check_port, port, (key,))):
                try:
                    check(item)
                except PydanticCustomError as exc:
                    problems.append((loc, exc.message()))
        if problems:
            raise _rules(problems)
        return value
    if _is_int(value):
        return _int_range(1, 65535)(value)
    raise _fail(f"expected a port number 1-65535 or a table of port name = port, got {show_value(value)}")


Expose = Annotated[int | dict[str, int], BeforeValidator(_expose)]

# --------------------------------------------------------------------------------- models


class _Model(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class ProjectConfig(_Model):
    """``[project]``: the name prefixes cluster object names and env variable names."""

    name: DnsName


class ClusterConfig(_Model):
    """``[cluster]``: which provider plugin talks to the cluster.

    Every other key of the table belongs to that provider and is validated by the model
    it registers (``velo_config_tables``); the loader stores the result in ``settings``,
    and the keys read like core ones: ``config.cluster.namespace``.
    """

    provider: NonEmpty = DEFAULT_PROVIDER
    _settings: Any = PrivateAttr(default=None)

    @property
    def settings(self) -> Any:
        """The provider's validated table, or None (no table model, or built in code)."""
        return self._settings

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            pass
        settings = (object.__getattribute__(self, "__pydantic_private__") or {}).get("_settings")
        if settings is not None and name in type(settings).model_fields:
            return getattr(settings, name)
        raise AttributeError(f"[cluster] of provider {self.provider!r} has no key {name!r}")


class TunnelConfig(_Model):
    """``[tunnel]``: how the laptop reaches the cluster-side traffic proxy.

    Each backend's own settings are in its table (``[tunnel.websocket] url = ...``),
    validated by the backend's model; ``prefer`` orders the backends.
    """

    prefer: NameList | None = None
    token: NonEmpty | None = None
    token_env: EnvName | None = None
    token_file: NonEmpty | None = None
    connect_timeout: Seconds = 10.0
    keepalive_interval: Seconds = 5.0
    keepalive_timeout: Seconds = 15.0
    reconnect_max_delay: Seconds = 1.0
    wait_for_tunnel: SecondsOrZero = 10.0
    _tables: dict = PrivateAttr(default_factory=dict)
    _preference: tuple = PrivateAttr(default=())

    @property
    def preference(self) -> list[str]:
        """The backends to try, in order: ``prefer``, else the backend tables in file order,
        else the provider's default (the loader fills this in)."""
        return list(self._preference) if self._preference else list(self.prefer or [])

    def table(self, name: str) -> Any:
        """The validated ``[tunnel.<name>]`` (its defaults when not written), or None."""
        return self._tables.get(name)

    @property
    def token_source(self) -> str | None:
        """Which key holds the token ("token", "token_env", "token_file"), or None.

        None means velo should make a session token (kubernetes provider).
        """
        for key in ("token", "token_env", "token_file"):
            if getattr(self, key) is not None:
                return key
        return None

    @model_validator(mode="after")
    def _check(self) -> TunnelConfig:
        problems: list[Problem] = []
        if self.keepalive_timeout <= self.keepalive_interval:
            problems.append(
                (
                    ("keepalive_timeout",),
                    f"must be greater than keepalive_interval ({self.keepalive_interval!r})",
                )
            )
        sources = [k for k in ("token", "token_env", "token_file") if getattr(self, k) is not None]
        if len(sources) > 1:
            problems.append(
                ((), f"set only one of token, token_env or token_file (found {', '.join(sources)})")
            )
        if self.prefer is not None and not self.prefer:
            problems.append((("prefer",), "must name at least one backend"))
        seen: set[str] = set()
        for i, name in enumerate(self.prefer or []):
            if name in seen:
                problems.append((("prefer", i), f"{show_value(name)} is listed twice"))
            seen.add(name)
        if problems:
            raise _rules(problems)
        return self


def _command(value: object) -> object:
    """``run``: a command line (for /bin/sh -c) or an argv list of non-empty strings."""
    if isinstance(value, str):
        return _nonempty(value)
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise _fail(f'expected a command line or a non-empty array of strings like ["npm", "run", "dev"], got {show_value(value)}')


Command = Annotated[str | list[str], BeforeValidator(_command)]


class LocalService(_Model):
    """``[local.<service>]``: one development candidate running on the laptop."""

    port: Port | None = None
    ports: PortMap | None = None
    host: Host = "127.0.0.1"
    expose: Expose | None = None
    workload: Workload | None = None
    run: Command | None = None  # a shell command line, or an argv list run as is
    cwd: Text | None = None  # where run starts, relative to velocity.toml's folder
    watch: NameList = Field(default_factory=list)  # globs, relative to cwd: a change restarts run
    ignore: NameList = Field(default_factory=list)  # globs added to .git, node_modules, ...

    @model_validator(mode="after")
    def _check(self) -> LocalService:
        problems: list[Problem] = []
        if self.port is not None and self.ports is not None:
            problems.append(((), "set either port or ports, not both"))
        elif self.port is None and self.ports is None:
            problems.append(((), "one of port or ports is required"))
        if self.ports is not None and not self.ports:
            problems.append((("ports",), "must not be empty"))
        if self.expose is not None and (self.port is None) != (self.ports is None):
            if self.ports and isinstance(self.expose, int):
                keys = ", ".join(self.ports)
                problems.append(
                    (("expose",), f"must be a table with the same keys as ports ({keys}), got {self.expose}")
                )
            elif self.ports and isinstance(self.expose, dict):
                missing = [k for k in self.ports if k not in self.expose]
                extra = [k for k in self.expose if k not in self.ports]
                if missing or extra:
                    parts = []
                    if missing:
                        parts.append("missing " + ", ".join(show_value(k) for k in missing))
                    if extra:
                        parts.append("unexpected " + ", ".join(show_value(k) for k in extra))
                    problems.append((("expose",), "keys must match ports: " + "; ".join(parts)))
            elif self.port is not None and isinstance(self.expose, dict):
                problems.append(
                    (
                        ("expose",),
                        f"must be a single port number when port is set, got {show_value(self.expose)}",
                    )
                )
        if problems:
            raise _rules(problems)
        return self

    def expose_ports(self) -> list[tuple[tuple[str, ...], int]]:
        """The gateway ports as (key path under expose, port), for clash checks."""
        if isinstance(self.expose, dict):
            return [((name,), port) for name, port in self.expose.items()]
        return [((), self.expose)] if self.expose is not None else []


class RemoteService(_Model):
    """``[remote.services.<service>]``: an explicit forward target or per-service override."""

    target: Target | None = None
    local_port: Port | None = None
    ports: PortMap | None = None

    @model_validator(mode="after")
    def _check(self) -> RemoteService:
        problems: list[Problem] = []
        if self.local_port is not None and self.ports is not None:
            problems.append(((), "set either local_port or ports, not both"))
        if self.ports is not None and not self.ports:
            problems.append((("ports",), "must not be empty"))
        if problems:
            raise _rules(problems)
        return self

    def listener_ports(self) -> list[tuple[tuple[str, ...], int]]:
        """The fixed local listener ports as (key path, port), for clash checks."""
        if self.local_port is not None:
            return [(("local_port",), self.local_port)]
        return [(("ports", name), port) for name, port in (self.ports or {}).items()]


class RemoteConfig(_Model):
    """``[remote]``: which cluster services get a local forward proxy."""

    include: NameList = Field(default_factory=lambda: ["*"])
    exclude: NameList = Field(default_factory=list)
    services: dict[DnsName, RemoteService] = Field(default_factory=dict)
    # Address the forward listeners bind to. Loopback by default; "0.0.0.0" opens them to
    # the network (velo up says so). `velo up --compose` binds the docker bridge instead.
    listen: Host = "127.0.0.1"


class EnvConfig(_Model):
    """``[env]``: where velo writes the environment for the candidates, and overrides."""

    file: Text = ".env"
    format: Annotated[str, BeforeValidator(_env_format)] = "dotenv"  # named for its reader: velo/engine/envfile.py
    vars: dict[EnvName, EnvValue] = Field(default_factory=dict)


class ComposeConfig(_Model):
    """``[compose]``: containerized candidates run by Docker Compose (`velo compose`)."""

    files: NameList = Field(default_factory=list)   # default: Compose's own lookup
    override: NonEmpty = "docker-compose.velo.yml"
    # candidate name = Compose service name, where they differ
    services: dict[DnsName, NonEmpty] = Field(default_factory=dict)


class VelocityConfig(_Model):
    """The whole ``velocity.toml``; ``source_path``/``root`` say where it was loaded from.

    Relative paths in the file (``env.file``, ``tunnel.token_file``) are relative to the
    file's folder, not to the current directory, so velo works from any subdirectory.
    """

    project: ProjectConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tunnel: TunnelConfig = Field(default_factory=TunnelConfig)
    local: dict[DnsName, LocalService] = Field(default_factory=dict)
    remote: RemoteConfig = Field(default_factory=RemoteConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    compose: ComposeConfig = Field(default_factory=ComposeConfig)

    _source_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> VelocityConfig:
        problems: list[Problem] = []
        for name in self.local:
            if name in self.remote.services:
                problems.append(
                    (
                        ("remote", "services", name),
                        f"{show_value(name)} is a development candidate ([local.{name}]); "
                        "it cannot also be a remote service",
                    )
                )
        for name in self.compose.services:
            if name not in self.local:
                problems.append((("compose", "services", name),
                                 f"{show_value(name)} is not a development candidate (add [local.{name}])"))
        # Two forward proxies on one local port would only fail later at bind time; say
        # so here, at the key to change. (A provider's own rules, such as the static
        # provider's gateway ports, come from its table's ``check``.)
        listeners = [
            (("remote", "services", name, *key), port)
            for name, svc in self.remote.services.items()
            for key, port in svc.listener_ports()
        ]
        problems += port_clashes(listeners)
        if problems:
            raise _rules(problems)
        return self

    # ------------------------------------------------------------------ file-relative helpers

    @property
    def source_path(self) -> Path | None:
        """Absolute path of the file this config came from (None if built in code)."""
        return self._source_path

    @property
    def root(self) -> Path:
        """The project root: the folder holding velocity.toml (cwd if built in code)."""
        return self._source_path.parent if self._source_path is not None else Path.cwd()

    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """A path from the file, made absolute against ``root`` (``~`` is expanded)."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def env_file_path(self) -> Path | None:
        """Where the env file goes, or None when ``env.file = ""`` disables it."""
        return self.resolve_path(self.env.file) if self.env.file else None

    def resolve_token(self, env: Mapping[str, str] = os.environ) -> str:
        """The tunnel token from ``token``, ``token_env`` or ``token_file`` (no network).

        Raises ConfigError naming the key when the variable is unset or empty, the file is
        missing or empty, or no source is configured (check ``tunnel.token_source`` first
        when a session token may be generated instead).
        """
        tunnel = self.tunnel
        if tunnel.token is not None:
            return tunnel.token
        if tunnel.token_env is not None:
            value = env.get(tunnel.token_env)
            if value is None:
                self._raise("tunnel.token_env", f"environment variable {tunnel.token_env} is not set")
            if not value.strip():
                self._raise("tunnel.token_env", f"environment variable {tunnel.token_env} is empty")
            return value.strip()
        if tunnel.token_file is not None:
            path = self.resolve_path(tunnel.token_file)
            try:
                value = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                self._raise("tunnel.token_file", f"{display_path(path)}: file not found")
            except IsADirectoryError:
                self._raise("tunnel.token_file", f"{display_path(path)}: is a directory, expected a file")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self._raise("tunnel.token_file", f"{display_path(path)}: cannot read: {reason}")
            if not value:
                self._raise("tunnel.token_file", f"{display_path(path)}: file is empty")
            return value
        self._raise("tunnel", "no token configured; set one of token, token_env or token_file")

    def _raise(self, key: str, message: str) -> NoReturn:
        """Raise a one-line ConfigError in the same shape as load errors."""
        prefix = f"{display_path(self._source_path)}: " if self._source_path is not None else ""
        raise ConfigError(f"{prefix}{key}: {message}", self._source_path)


def port_clashes(entries: Any) -> list[Problem]:
    """Report a listener port used twice; the later use points at the earlier one."""
    seen: dict[int, tuple] = {}
    problems: list[Problem] = []
    for loc, port in entries:
        if port in seen:
            problems.append((loc, f"port {port} is already used by {format_key_path(seen[port])}"))
        else:
            seen[port] = loc
    return problems
