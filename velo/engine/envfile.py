"""Rendering and writing the candidate's environment (dotenv, shell, json)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

MASK = "********"


def render(env: dict[str, str], fmt: str, *, secret_keys=frozenset(), reveal: bool = True) -> str:
    shown = {k: (v if reveal or k not in secret_keys else MASK) for k, v in env.items()}
    if fmt == "json":
        return json.dumps(shown, indent=2, sort_keys=True) + "\n"
    if fmt == "shell":
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(shown.items()))
    return "".join(f"{k}={_dotenv_quote(v)}\n" for k, v in sorted(shown.items()))


def _dotenv_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "_-.:/@+,=" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("$", "\\$")
    return f'"{escaped}"'


def write(path: Path, env: dict[str, str], fmt: str) -> None:
    """Atomic and private from the first byte: the file may hold secrets."""
    tmp = path.with_name(f".{path.name}.velo-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(render(env, fmt))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
