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

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, display_path, format_key_path, show_value
from .models import VelocityConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project targets 3.11, tomli keeps older interpreters working
    import tomli as tomllib

__all__ = ["CONFIG_FILENAME", "find_config", "load_config", "parse_config"]

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


def load_config(path: str | os.PathLike[str]) -> VelocityConfig:
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
    return parse_config(text, file)


def parse_config(text: str, path: str | os.PathLike[str]) -> VelocityConfig:
    """Validate TOML text; ``path`` names the file in messages and anchors relative paths."""
    file = Path(path)
    shown = display_path(file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_message(exc, text, shown), file) from None
    try:
        config = VelocityConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_messages(exc, shown), file) from None
    config._source_path = Path(os.path.abspath(file))
    return config


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


def _validation_messages(exc: ValidationError, shown: str) -> list[str]:
    """One line per pydantic error; ``velo_rules`` errors expand to one line per rule."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "velo_rules":
            entries = [(loc + tuple(sub), msg) for sub, msg in error["ctx"]["problems"]]
        else:
            entries = [(loc, _describe(error, loc))]
        for where, message in entries:
            key = format_key_path([part for part in where if part != _KEY_MARKER])
            line = f"{shown}: {key}: {message}" if key else f"{shown}: {message}"
            if line not in lines:
                lines.append(line)
    return lines


def _describe(error: Any, loc: tuple[Any, ...]) -> str:
    """Plain English for one pydantic error."""
    kind = error["type"]
    value = error.get("input")
    if kind == "velo_value":
        return error["msg"]
    if kind == "missing":
        expected = _type_at(loc)
        is_table = isinstance(expected, type) and issubclass(expected, BaseModel)
        return "required table is missing" if is_table else "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(loc)
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


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """Suggest the closest field name, or list them all when nothing is close."""
    model = _type_at(tuple(part for part in loc[:-1] if part != _KEY_MARKER))
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "unknown key"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown key; did you mean {show_value(close[0])}?"
    return f"unknown key; allowed keys: {', '.join(allowed)}"


def _type_at(loc: tuple[Any, ...]) -> Any:
    """The schema type expected at a key path (dict keys and list indexes are skipped)."""
    current: Any = VelocityConfig
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
