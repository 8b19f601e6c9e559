"""The one exception the config layer raises.

Every problem is a single user-facing line (``<file>: <key.path>: <what is wrong>``) so
the CLI can print ``str(error)`` as is, without a traceback, and tests can compare lines.
"""

from __future__ import annotations

import json
import os
import re
from datetime import date, datetime, time
from pathlib import Path

__all__ = ["ConfigError", "display_path", "show_value", "format_key_path"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """A configuration problem, with every message already formatted for the user.

    ``messages`` holds one line per problem (several problems are reported at once so the
    user can fix them in one go); ``path`` is the config file involved, if any.
    """

    def __init__(self, messages: str | list[str], path: Path | None = None) -> None:
        self.messages: list[str] = [messages] if isinstance(messages, str) else list(messages)
        self.path: Path | None = Path(path) if path is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(self.messages)


def display_path(path: str | os.PathLike[str]) -> str:
    """The path as the user should read it in messages.

    A path inside the current directory is shown relative to it (``velocity.toml`` rather
    than ``/home/me/shop/velocity.toml``, even when ``find_config`` made it absolute);
    anything else is shown as given.
    """
    text = os.fspath(path)
    if os.path.isabs(text):
        try:
            rel = os.path.relpath(text, os.getcwd())
        except ValueError:  # another drive on Windows
            return text
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel
    return text


def show_value(value: object, limit: int = 60) -> str:
    """Render a TOML value the way the user wrote it, for "got ..." in messages.

    Strings get double quotes, booleans are ``true``/``false``, tables and arrays are
    shown inline (TOML style) and cut short when long, so one message stays one line.
    """
    text = _render(value)
    if len(text) > limit:
        if isinstance(value, dict):
            return "a table"
        if isinstance(value, (list, tuple)):
            return "an array"
        return text[: limit - 3] + "..."
    return text


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_render_key(k)} = {_render(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if value is None:
        return "nothing"
    return repr(value)


def _render_key(key: object) -> str:
    text = str(key)
    return text if _BARE_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def format_key_path(loc: tuple[object, ...] | list[object]) -> str:
    """Dotted TOML key path for a location: ``local.website.port``, ``tunnel.fallback[0]``.

    Keys that are not bare TOML keys are quoted (``local."my.svc"``) so the path is
    unambiguous and can be pasted back into the file.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _render_key(part)
    return out
