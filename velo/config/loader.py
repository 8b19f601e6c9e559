"""Finding, reading and validating ``velocity.toml``, with one plain line per problem.

Why the translation layer: pydantic's own messages ("Input should be a valid integer",
locations like ``local.website.ports.http.[key]``) are written for Python developers. Users
edit TOML, so every problem is rewritten as ``<file>: <dotted.key>: <plain English>``,
pointing at the key they have to change.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from collections.abc import Mapping

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, display_path, format_key_path, show_value
from .models import DEFAULT_PROVIDER, ClusterConfig, TunnelConfig, VelocityConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project targets 3.11, tomli keeps older interpreters working
    import tomli as tomllib

__all__ = ["CONFIG_FILENAME", "find_config", "installed_tables", "load_config", "parse_config"]

Tables = Mapping[str, type[BaseModel]]
"""``"tunnel.<backend>"`` / ``"cluster.<provider>"`` -> the model of that plugin's table."""

_TOP_ORDER = list(VelocityConfig.model_fields)
_REPLACED = ("backend", "fallback")  # [tunnel] keys that prefer replaced

CONFIG_FILENAME = "velocity.toml"

_TOML_POSITION = re.compile(r"^(?P<msg>.*?) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_TOML_AT_END = re.compile(r"^(?P<msg>.*?) \(at end of document\)$", re.S)
_KEY_MARKER = "[key]"  # pydantic's location suffix for an invalid dict key


def find_config(start: str | os.PathLike[str]) -> Path:
    """The nearest ``velocity.toml`` in ``start`` or its parents (absolute path).

    Walking up lets velo run from any subdirectory of the project, like git does.
    """
    here = Path(os.path.abspath(start))
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILENAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {CONFIG_FILENAME} in {os.fspath(start)} or its parents; "
        f"create one from {CONFIG_FILENAME}.example"
    )


def installed_tables() -> dict[str, type[BaseModel]]:
    """The tables the installed plugins own, from the ``velo_config_tables`` hook.

    The only place the config layer looks outside itself, and only through the hook:
    it never imports a plugin.
    """
    from velo.plugins import config_tables

    return config_tables()


def load_config(path: str | os.PathLike[str], *, tables: Tables | None = None) -> VelocityConfig:
    """Read and validate a config file; every problem ends up in one ConfigError."""
    file = Path(path)
    shown = display_path(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: file not found", file) from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, expected a file", file) from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {(exc.strerror or str(exc)).lower()}", file) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{shown}: cannot read: not valid UTF-8 (bad byte at offset {exc.start})", file
        ) from None
    return parse_config(text, file, tables=tables)


def parse_config(
    text: str, path: str | os.PathLike[str], *, tables: Tables | None = None
) -> VelocityConfig:
    """Validate TOML text; ``path`` names the file in messages and anchors relative paths.

    ``tables`` are the plugin-owned tables (default: those of the installed plugins).
    """
    file = Path(path)
    shown = display_path(file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_message(exc, text, shown), file) from None
    config = _Validation(data, installed_tables() if tables is None else tables, shown).run()
    if isinstance(config, list):
        raise ConfigError(config, file)
    config._source_path = Path(os.path.abspath(file))
    return config


class _Validation:
    """Core schema plus plugin tables, with every problem as one line in file order.

    Plugin-owned keys are taken out of the data before the core models see it, checked
    against the plugin's model, and attached to the validated config afterwards.
    """

    def __init__(self, data: dict, tables: Tables, shown: str) -> None:
        self.data = data
        self.tables = tables
        self.shown = shown
        self.entries: list[tuple[tuple, str]] = []  # (key path, line)
        self.plugin_entries: list[tuple[tuple, str]] = []  # shown after the core lines of their table
        self.backend_tables: dict[str, BaseModel] = {}
        self.provider_model: type[BaseModel] | None = None
        self.provider_settings: BaseModel | None = None

    def run(self) -> VelocityConfig | list[str]:
        core = dict(self.data)
        if isinstance(core.get("cluster"), dict):
            core["cluster"] = self._cluster(core["cluster"])
        elif "cluster" not in core:
            self.provider_model = self.tables.get(f"cluster.{DEFAULT_PROVIDER}")
            self.provider_settings = self._table(self.provider_model, {}, ("cluster",))
        if isinstance(core.get("tunnel"), dict):
            core["tunnel"] = self._tunnel(core["tunnel"])
        config = None
        try:
            config = VelocityConfig.model_validate(core)
        except ValidationError as exc:
            self.entries += _validation_messages(exc, self.shown)
        if config is not None and not self.entries and not self.plugin_entries:
            self._attach(config)
        if self.entries or self.plugin_entries:
            order = {name: i for i, name in enumerate(_TOP_ORDER)}
            tagged = [(e, 0) for e in self.entries] + [(e, 1) for e in self.plugin_entries]
            ranked = [e for e, _ in sorted(tagged, key=lambda t: (order.get(t[0][0][0] if t[0][0] else "", -1), t[1]))]
            lines: list[str] = []
            for _loc, line in ranked:
                if line not in lines:
                    lines.append(line)
            return lines
        return config

    def _say(self, loc: tuple, message: str) -> None:
        key = format_key_path(list(loc))
        self.entries.append((loc, f"{self.shown}: {key}: {message}" if key else f"{self.shown}: {message}"))

    def _table(self, model: type[BaseModel] | None, raw: Any, loc: tuple, also: tuple = ()) -> BaseModel | None:
        if model is None:
            return None
        if not isinstance(raw, dict):
            self._say(loc, f"expected a table, got {show_value(raw)}")
            return None
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            self.plugin_entries += _validation_messages(exc, self.shown, root=model, prefix=loc, also=also)
            return None

    def _cluster(self, raw: dict) -> dict:
        core = {k: v for k, v in raw.items() if k in ClusterConfig.model_fields}
        own = {k: v for k, v in raw.items() if k not in ClusterConfig.model_fields}
        provider = raw.get("provider", DEFAULT_PROVIDER)
        self.provider_model = self.tables.get(f"cluster.{provider}") if isinstance(provider, str) else None
        if self.provider_model is not None:
            self.provider_settings = self._table(self.provider_model, own, ("cluster",), also=("provider",))
        elif isinstance(provider, str) and provider:
            for key in own:
                allowed = list(ClusterConfig.model_fields)
                self._say(("cluster", key), f"unknown key; provider {show_value(provider)} has no settings "
                                            f"(allowed keys: {', '.join(allowed)})")
        return core

    def _tunnel(self, raw: dict) -> dict:
        core: dict = {}
        backends = [key.partition(".")[2] for key in self.tables if key.startswith("tunnel.")]
        for key, value in raw.items():
            loc = ("tunnel", key)
            if key in TunnelConfig.model_fields:
                core[key] = value
            elif key in _REPLACED:
                if key == next(k for k in raw if k in _REPLACED):  # one line for backend + fallback
                    self._say(loc, self._replaced_message(raw))
            elif key == "url":
                self._say(loc, self._moved_url_message(value))
            elif key in backends:
                table = self._table(self.tables[f"tunnel.{key}"], value, loc)
                if table is not None:
                    self.backend_tables[key] = table
            else:
                allowed = [*TunnelConfig.model_fields, *backends]
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {show_value(close[0])}?" if close else f"allowed keys: {', '.join(allowed)}"
                self._say(loc, f"unknown key; {hint}")
        return core

    @staticmethod
    def _replaced_message(raw: dict) -> str:
        names = [raw["backend"]] if isinstance(raw.get("backend"), str) else []
        fallback = raw.get("fallback")
        if isinstance(fallback, list):
            names += [n for n in fallback if isinstance(n, str) and n not in names]
        example = show_value(names) if names else '["websocket"]'
        return f"replaced by [tunnel] prefer (the backends in order); write prefer = {example}"

    def _moved_url_message(self, value: object) -> str:
        """Name the table the URL belongs in: the first backend whose model takes it."""
        where = "[tunnel.<backend>]"
        for key, model in self.tables.items():
            if key.startswith("tunnel.") and "url" in model.model_fields:
                try:
                    model.model_validate({"url": value})
                except ValidationError as exc:
                    if any(tuple(e["loc"]) == ("url",) for e in exc.errors()):
                        continue
                where = f"[{key}]"
                break
        return f"moved into the backend's own table; write {where} url = {show_value(value)}"

    def _attach(self, config: VelocityConfig) -> None:
        tunnel = config.tunnel
        preference = list(tunnel.prefer or self.backend_tables or getattr(self.provider_model, "default_prefer", ()))
        tables = dict(self.backend_tables)
        for name in preference:
            if name not in tables:
                table = self._table(self.tables.get(f"tunnel.{name}"), {}, ("tunnel", name))
                if table is not None:
                    tables[name] = table
        tunnel._tables = tables
        tunnel._preference = tuple(preference)
        config.cluster._settings = self.provider_settings
        if self.plugin_entries:
            return
        checks = [self.provider_settings, *(tables.get(name) for name in preference)]
        for table in checks:
            if table is not None and hasattr(table, "check"):
                for loc, message in table.check(config):
                    self._say(tuple(loc), message)


# ------------------------------------------------------------------------------ TOML syntax


def _toml_message(exc: Exception, text: str, shown: str) -> str:
    """``file:line:col: invalid TOML: <message>``, position taken from tomllib's text."""
    message = str(exc)
    found = _TOML_POSITION.match(message)
    if found:
        return f"{shown}:{found['line']}:{found['col']}: invalid TOML: {found['msg']}"
    found = _TOML_AT_END.match(message)
    if found:
        lines = text.split("\n")
        return f"{shown}:{len(lines)}:{len(lines[-1]) + 1}: invalid TOML: {found['msg']}"
    return f"{shown}: invalid TOML: {message}"


# -------------------------------------------------------------------------- schema errors


def _validation_messages(
    exc: ValidationError, shown: str, *, root: Any = VelocityConfig, prefix: tuple = (), also: tuple = ()
) -> list[tuple[tuple, str]]:
    """One line per pydantic error; ``velo_rules`` errors expand to one line per rule.

    ``root`` is the model that was validated, found at key path ``prefix`` of the file
    (a plugin's table); ``also`` are keys allowed next to its own (``provider``).
    """
    lines: list[tuple[tuple, str]] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "velo_rules":
            entries = [(loc + tuple(sub), msg) for sub, msg in error["ctx"]["problems"]]
        else:
            entries = [(loc, _describe(error, loc, root, also))]
        for where, message in entries:
            where = prefix + tuple(part for part in where if part != _KEY_MARKER)
            key = format_key_path(list(where))
            line = f"{shown}: {key}: {message}" if key else f"{shown}: {message}"
            lines.append((where, line))
    return lines


def _describe(error: Any, loc: tuple[Any, ...], root: Any = VelocityConfig, also: tuple = ()) -> str:
    """Plain English for one pydantic error."""
    kind = error["type"]
    value = error.get("input")
    if kind == "velo_value":
        return error["msg"]
    if kind == "missing":
        expected = _type_at(loc, root)
        is_table = isinstance(expected, type) and issubclass(expected, BaseModel)
        return "required table is missing" if is_table else "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(loc, root, also if len(loc) == 1 else ())
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a table, got {show_value(value)}"
    if kind in ("list_type", "tuple_type", "iterable_type"):
        return f"expected an array, got {show_value(value)}"
    if kind in ("string_type", "str_type"):
        return f"expected a string, got {show_value(value)}"
    if kind.startswith("int_"):
        return f"expected an integer, got {show_value(value)}"
    if kind.startswith("float_"):
        return f"expected a number, got {show_value(value)}"
    if kind.startswith("bool_"):
        return f"expected true or false, got {show_value(value)}"
    # Anything else: pydantic's sentence, de-capitalised, with the offending value.
    message = str(error["msg"])
    message = message[:1].lower() + message[1:]
    return f"{message}, got {show_value(value)}"


def _unknown_key(loc: tuple[Any, ...], root: Any = VelocityConfig, also: tuple = ()) -> str:
    """Suggest the closest field name, or list them all when nothing is close."""
    model = _type_at(tuple(part for part in loc[:-1] if part != _KEY_MARKER), root)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "unknown key"
    allowed = [*also, *model.model_fields]
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown key; did you mean {show_value(close[0])}?"
    return f"unknown key; allowed keys: {', '.join(allowed)}"


def _type_at(loc: tuple[Any, ...], root: Any = VelocityConfig) -> Any:
    """The schema type expected at a key path (dict keys and list indexes are skipped)."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) is list:
            current = get_args(current)[0]
        else:
            return None
    return _unwrap(current)


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated[...]`` and ``Optional[...]`` down to the real type."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp
