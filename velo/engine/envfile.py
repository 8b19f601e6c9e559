"""The candidate's environment, spelled so that each reader gets back exactly the value.

Every program that reads an env file has its own rules, and they disagree:

- python-dotenv: ``'...'`` decodes ``\\\\`` and ``\\'``; ``"..."`` decodes ``\\n \\t \\\\ \\"``
  and friends; every value (quoted or not) has ``${NAME}`` / ``${NAME:-x}`` interpolated,
  and nothing escapes that.  The file is read with universal newlines (a raw CR is a LF).
- Node's ``dotenv``: ``'...'`` is literal; ``"..."`` decodes only ``\\n`` and ``\\r``; an
  unquoted value ends at ``#``; no interpolation; a raw CR becomes a LF.
- Docker Compose's ``env_file``: ``'...'`` is literal; ``"..."`` decodes escapes and
  interpolates ``$NAME``/``${NAME}`` (``$$`` is a ``$``); unquoted values interpolate too.
- ``docker run --env-file``: ``KEY=value`` taken literally up to the end of the line; a
  value cannot hold a newline.
- POSIX shells, fish and PowerShell: their own single-quote rules.

So each format is named for its readers.  The default ``dotenv`` format picks, per value,
the first spelling (bare, single-quoted, double-quoted) that python-dotenv, Node's dotenv
and Compose all read back exactly; when none exists, it writes the spelling most readers
get right and returns one warning naming the variable and the readers that would misread
it.  ``docker`` leaves out values it cannot carry, with a warning.  A value is never
silently changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MASK = "********"

PYTHON_DOTENV = "python-dotenv"
NODE_DOTENV = "Node's dotenv"
COMPOSE = "Docker Compose env_file"
DOTENV_READERS = (PYTHON_DOTENV, NODE_DOTENV, COMPOSE)

# python-dotenv's interpolation pattern (dotenv/variables.py): what it replaces, always.
_PY_INTERPOLATED = re.compile(r"\$\{[^}:]*(?::-[^}]*)?\}")


@dataclass
class Rendered:
    """The text of an env file plus one line per variable some reader cannot carry."""

    text: str
    warnings: list[str] = field(default_factory=list)
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # variable -> readers that misread it


@dataclass(frozen=True)
class Format:
    name: str
    readers: str  # who reads it, for help texts and the README
    render: Callable[[dict[str, str]], Rendered]


# ---- the default: one file for python-dotenv, Node's dotenv and Docker Compose ------


def _bare_ok(value: str) -> bool:
    """Unquoted: nothing any reader treats specially (#, $, an opening quote, edge spaces).

    No reader decodes escapes in an unquoted value, so backslashes and inner quotes are fine.
    """
    if value == "":
        return True
    if value[0].isspace() or value[-1].isspace() or value[0] in "'\"`":
        return False
    return all(ch.isprintable() and ch not in "#$" for ch in value)


def _single(value: str) -> str:
    return f"'{value}'"


def _double(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _single_readers(value: str) -> set[str]:
    if "'" in value or "\r" in value or value.endswith("\\"):
        return set()
    readers = {NODE_DOTENV, COMPOSE}
    if "\\\\" not in value and not _PY_INTERPOLATED.search(value):
        readers.add(PYTHON_DOTENV)
    return readers


def _double_readers(value: str) -> set[str]:
    readers = set()
    if not _PY_INTERPOLATED.search(value):
        readers.add(PYTHON_DOTENV)
    if "\\" not in value and '"' not in value:
        readers.add(NODE_DOTENV)
    # Compose decodes every \x, interpolates $, and trims a quote left at either end.
    if "$" not in value and not value.endswith(("\\", '"')):
        readers.add(COMPOSE)
    return readers


def _bare_readers(value: str) -> set[str]:
    if not _bare_ok(value):
        return set()
    return set(DOTENV_READERS)


def dotenv_spelling(value: str) -> tuple[str, set[str]]:
    """The spelling of ``value`` and the readers that read it back exactly.

    The first spelling every reader agrees on; failing that, the one most readers
    (python-dotenv first, then Node) read right.
    """
    options = [(_bare_ok(value) and value, _bare_readers(value)),
               (_single(value), _single_readers(value)),
               (_double(value), _double_readers(value))]
    options = [(text, readers) for text, readers in options if text is not False]
    for text, readers in options:
        if len(readers) == len(DOTENV_READERS):
            return text, readers
    rank = {reader: 2 ** (len(DOTENV_READERS) - i) for i, reader in enumerate(DOTENV_READERS)}
    return max(options, key=lambda option: sum(rank[r] for r in option[1]))


def _why(value: str) -> str:
    kinds = [what for what, present in (
        ("$", "$" in value), ("a ${...} reference", bool(_PY_INTERPOLATED.search(value))),
        ("'", "'" in value), ('"', '"' in value), ("a backslash", "\\" in value),
        ("a carriage return", "\r" in value),
    ) if present]
    return ", ".join(kinds) or "special characters"


def _render_dotenv(env: dict[str, str]) -> Rendered:
    rendered = Rendered("")
    lines, warnings = [], rendered.warnings
    for key, value in sorted(env.items()):
        text, readers = dotenv_spelling(value)
        lines.append(f"{key}={text}\n")
        missing = [r for r in DOTENV_READERS if r not in readers]
        if missing:
            rendered.unreadable[key] = missing
            hint = " (use `velo env --format compose` for Compose)" if COMPOSE in missing else ""
            warnings.append(
                f"{key}: no dotenv spelling of this value ({_why(value)}) is read back exactly by "
                f"{' or '.join(missing)}; the file holds the spelling {' and '.join(sorted(readers)) or 'no reader'} "
                f"read{'s' if len(readers) == 1 else ''} right{hint}"
            )
    rendered.text = "".join(lines)
    return rendered


# ---- one reader each -----------------------------------------------------------------


def _render_compose(env: dict[str, str]) -> Rendered:
    """Compose's env_file: single quotes are literal; double quotes escape and use $$."""
    lines = []
    for key, value in sorted(env.items()):
        if _bare_ok(value):
            text = value
        elif "'" not in value and "\r" not in value and not value.endswith("\\"):
            text = _single(value)
        else:
            text = _double(value).replace("$", "$$")
        lines.append(f"{key}={text}\n")
    return Rendered("".join(lines))


def _render_docker(env: dict[str, str]) -> Rendered:
    """``docker run --env-file``: literal to the end of the line; no way to spell a newline."""
    lines, warnings, unreadable = [], [], {}
    for key, value in sorted(env.items()):
        if "\n" in value or value.endswith("\r"):
            unreadable[key] = ["docker run --env-file"]
            warnings.append(
                f"{key}: left out of the docker env file: `docker run --env-file` cannot carry a value "
                "with a line break (pass it with -e, or use --format compose)"
            )
            continue
        lines.append(f"{key}={value}\n")
    return Rendered("".join(lines), warnings, unreadable)


def _render_sh(env: dict[str, str]) -> Rendered:
    """POSIX sh, bash, zsh: ``eval "$(velo env --export)"`` or ``. file``."""
    return Rendered("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))


def _fish_quote(value: str) -> str:
    """fish single quotes: only ``\\\\`` and ``\\'`` are escapes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _render_fish(env: dict[str, str]) -> Rendered:
    return Rendered("".join(f"set -gx {k} {_fish_quote(v)}\n" for k, v in sorted(env.items())))


# PowerShell takes the typographic single quotes as quote characters too.
_PWSH_QUOTES = re.compile("(['\u2018\u2019\u201a\u201b])")


def _render_powershell(env: dict[str, str]) -> Rendered:
    return Rendered("".join(
        f"$env:{k} = '{_PWSH_QUOTES.sub(lambda m: m.group(1) * 2, v)}'\n" for k, v in sorted(env.items())
    ))


def _render_json(env: dict[str, str]) -> Rendered:
    return Rendered(json.dumps(env, indent=2, sort_keys=True) + "\n")


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("dotenv", "python-dotenv, Node's dotenv and Docker Compose's env_file", _render_dotenv),
    Format("compose", "Docker Compose's env_file only (any value, $ as $$)", _render_compose),
    Format("docker", "docker run --env-file (literal values, no line breaks)", _render_docker),
    Format("sh", 'POSIX shells: . FILE or eval "$(velo env --export)"', _render_sh),
    Format("fish", "fish: velo env --format fish | source", _render_fish),
    Format("powershell", "PowerShell: velo env --format powershell | Invoke-Expression", _render_powershell),
    Format("json", "anything that reads JSON", _render_json),
)}
ALIASES = {"shell": "sh"}  # the name velo used before the shells were told apart
FORMAT_NAMES = (*FORMATS, *ALIASES)


def render(env: dict[str, str], fmt: str, *, secret_keys=frozenset(), reveal: bool = True) -> Rendered:
    shown = {k: (v if reveal or k not in secret_keys else MASK) for k, v in env.items()}
    return FORMATS[ALIASES.get(fmt, fmt)].render(shown)


def write(path: Path, env: dict[str, str], fmt: str) -> list[str]:
    """Atomic and private from the first byte: the file may hold secrets.

    Returns the warnings (one line per variable a reader of ``fmt`` cannot carry).
    """
    rendered = render(env, fmt)
    tmp = path.with_name(f".{path.name}.velo-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(rendered.text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return rendered.warnings
