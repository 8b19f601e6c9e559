"""Every env format, written by velo and read back by the real program it is named for.

Readers: python-dotenv (PyPI), Node's dotenv (npm, run with the machine's Node; installed
by tests/env_readers/install.sh), `docker compose config` (the Compose v2 CLI, when it is
built), `docker run --env-file` (a real engine and the busybox test image of
tests/docker/), bash and fish sourcing the sh/fish output, json.loads.  PowerShell is not on this
machine (no Debian package), so the powershell format has no reader test here.

A value either comes back exactly, or velo named that reader as unable to carry it and
warned: never a silently different value.
"""

from __future__ import annotations

import glob
import re
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velo.engine import envfile
from velo.engine.envfile import COMPOSE, NODE_DOTENV, PYTHON_DOTENV

HERE = Path(__file__).resolve().parent / "env_readers"
NODE_DOTENV_DIR = Path(os.environ.get("VELO_NPM_CACHE", Path.home() / ".cache/velo/npm")) / "dotenv-18.0.10"
CI = os.environ.get("CI") == "true"

PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUQ2x0Y3Rlc3Qrc3ViamVjdC9rZXk9PTAKBggqhkjOPQQD\n"
    "AjAPMQ0wCwYDVQQDDAR2ZWxvMB4XDTI2MTIwMTAwMDAwMFoXDTI3MTIwMTAwMDAw\n"
    "-----END CERTIFICATE-----\n"
)

# The values that broke readers before: each is one variable in one file, so a value
# whose spelling leaks into the next line breaks the neighbours too.
TRICKY = {
    "ISSUE_EXAMPLE": "$HOME and ${PATH}",
    "DOLLAR": "pa$word",
    "DOLLAR_END": "cost$",
    "DOLLAR_DOLLAR": "a$$b",
    "BRACED": "${NOT_SET}",
    "BRACED_DEFAULT": "${NOT_SET:-fallback}",
    "DOUBLE_QUOTES": 'say "hi"',
    "SINGLE_QUOTE": "it's",
    "BOTH_QUOTES": "it's \"quoted\"",
    "BACKSLASH": "C:\\Users\\velo",
    "BACKSLASHES": "a\\\\b",
    "BACKSLASH_N": "not\\na newline",
    "BACKSLASH_END": "ends\\",
    "BACKSLASH_QUOTE": "a\\'b",
    "HASH": "color #fff",
    "HASH_START": "#hash",
    "EQUALS": "a=b=c",
    "URL": "postgres://u:p@db:5432/x?sslmode=disable&a=b",
    "LEADING_SPACE": "  leading",
    "TRAILING_SPACE": "trailing  ",
    "TABS": "\ttab\tinside\t",
    "NEWLINES": "line one\nline two\n",
    "PEM": PEM,
    "CRLF": "windows\r\nline",
    "NON_ASCII": "héllo wörld ✓ 日本語",
    "EMOJI": "🚀",
    "EMPTY": "",
    "SPACE_ONLY": " ",
    "JSON": '{"a": [1, "b"], "c": null}',
    "QUOTED_LOOKING": "'quoted'",
    "DOUBLE_QUOTED_LOOKING": '"quoted"',
    "BACKTICK": "`cmd`",
    "SHELLISH": "$(rm -rf /) `id` ; && |",
    "EXPORT_WORD": "export X=1",
}


# ---- the readers ----------------------------------------------------------------------


def need(what: str, ok: bool) -> None:
    if not ok:
        message = f"{what} is not installed (tests/env_readers/install.sh installs it; `make test` runs it)"
        if CI:
            pytest.fail(message + " - required under CI=true")
        pytest.skip(message)


def read_python_dotenv(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return dict(dotenv_values(path))  # defaults, as frameworks call it: interpolation on


def read_node_dotenv(path: Path) -> dict[str, str]:
    need("Node's dotenv", shutil.which("node") is not None and (NODE_DOTENV_DIR / ".velo-complete").exists())
    out = subprocess.run(["node", str(HERE / "read_node_dotenv.js"), str(path)], capture_output=True, text=True,
                         env={**os.environ, "NODE_PATH": str(NODE_DOTENV_DIR / "node_modules")}, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def compose_command() -> list[str] | None:
    """The Compose v2 CLI: $VELO_COMPOSE, the docker plugin, or the build in ~/.cache/velo/tools."""
    candidates = []
    if os.environ.get("VELO_COMPOSE"):
        candidates.append([os.environ["VELO_COMPOSE"]])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    tools = os.environ.get("VELO_TOOLS_CACHE", str(Path.home() / ".cache/velo/tools"))
    candidates += [[p] for p in sorted(glob.glob(f"{tools}/*compose*/**/docker-compose", recursive=True))]
    for command in candidates:
        try:
            out = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return command
    return None


def read_compose(path: Path) -> dict[str, str]:
    command = compose_command()
    need("the Docker Compose v2 CLI", command is not None)
    project = path.parent / "compose-reader"
    project.mkdir(exist_ok=True)
    (project / "compose.yaml").write_text(f"services:\n  reader:\n    image: scratch\n    env_file: [{json.dumps(str(path))}]\n")
    out = subprocess.run([*command, "--project-directory", str(project), "-f", str(project / "compose.yaml"),
                          "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")})
    assert out.returncode == 0, out.stderr
    environment = json.loads(out.stdout)["services"]["reader"].get("environment") or {}
    # `config` prints a Compose file, in which a literal $ is written $$.
    return {k: (v or "").replace("$$", "$") for k, v in environment.items()}


_DOCKER_IMAGE: list[str] = []


def docker_image() -> str | None:
    """A runnable image on a live engine: tests/docker/image.sh builds it (a no-op once built).

    Only a success is remembered: the engine may be restarting when first asked."""
    if _DOCKER_IMAGE:
        return _DOCKER_IMAGE[0]
    for _attempt in range(3):
        image = _find_docker_image()
        if image:
            _DOCKER_IMAGE.append(image)
            return image
        time.sleep(2)  # an engine restarting (another suite's setup) comes back in seconds
    return None


def _find_docker_image() -> str | None:
    script = HERE.parent / "docker" / "image.sh"
    if shutil.which("docker") is None or not script.exists():
        return None
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
            return None
        out = subprocess.run([str(script)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def read_docker_run(path: Path) -> dict[str, str]:
    image = docker_image()
    need("a Docker engine with the test image (tests/docker/engine.sh, tests/docker/image.sh)", image is not None)
    out = subprocess.run(["docker", "run", "--rm", "--env-file", str(path), image, "env", "-0"],
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return _env0(out.stdout)


def _env0(out: bytes) -> dict[str, str]:
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def read_bash(path: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", '. "$1" && exec env -0', "bash", str(path)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return _env0(out.stdout)


def read_fish(path: Path) -> dict[str, str]:
    need("fish", shutil.which("fish") is not None)
    out = subprocess.run(["fish", "--no-config", "-c", "source $VELO_ENV_FILE; and env -0"], capture_output=True,
                         env={**os.environ, "VELO_ENV_FILE": str(path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    return _env0(out.stdout)


def read_json(path: Path) -> dict[str, str]:
    return json.loads(path.read_text(encoding="utf-8"))


READERS = {
    PYTHON_DOTENV: ("dotenv", read_python_dotenv),
    NODE_DOTENV: ("dotenv", read_node_dotenv),
    COMPOSE: ("dotenv", read_compose),
    "compose only": ("compose", read_compose),
    "docker run --env-file": ("docker", read_docker_run),
    "bash": ("sh", read_bash),
    "fish": ("fish", read_fish),
    "json": ("json", read_json),
}


def check_round_trip(tmp: Path, env: dict[str, str], reader: str) -> dict[str, str]:
    """Write ``env`` as velo does, read it back; every value equal or warned for this reader."""
    fmt, read = READERS[reader]
    path = tmp / f"velo.{fmt}"
    warnings = envfile.write(path, env, fmt)
    rendered = envfile.render(env, fmt)
    assert warnings == rendered.warnings
    got = read(path)
    wrong = {}
    for key, value in env.items():
        if got.get(key) == value:
            continue
        flagged = reader in rendered.unreadable.get(key, []) or (
            reader == "compose only" and COMPOSE in rendered.unreadable.get(key, []))
        if not flagged:
            wrong[key] = (value, got.get(key))
        else:
            assert any(w.startswith(f"{key}: ") for w in warnings), f"{key} flagged but no warning"
    assert not wrong, f"{reader} read back different values, and velo did not warn:\n" + "\n".join(
        f"  {k}: wrote {v!r}, read {g!r}" for k, (v, g) in wrong.items()) + f"\nfile:\n{path.read_text()}"
    return rendered.unreadable


@pytest.mark.parametrize("reader", list(READERS))
def test_tricky_values_come_back_exactly(tmp_path, reader):
    unreadable = check_round_trip(tmp_path, TRICKY, reader)
    if READERS[reader][0] == "docker":
        assert set(unreadable) == {"NEWLINES", "PEM", "CRLF"}, "only line breaks are beyond docker's env file"
    elif READERS[reader][0] != "dotenv":
        assert not unreadable, "formats for one reader carry every value"


def test_default_dotenv_warns_only_where_no_spelling_exists():
    """The three dotenv readers agree on all but the values no common spelling exists for."""
    rendered = envfile.render(TRICKY, "dotenv")
    assert set(rendered.unreadable) == {"ISSUE_EXAMPLE", "BRACED", "BRACED_DEFAULT"}, rendered.unreadable
    # python-dotenv interpolates every ${NAME}, quoted or not: nothing spells it literally.
    assert rendered.unreadable["BRACED"] == [PYTHON_DOTENV]
    assert len(rendered.warnings) == len(rendered.unreadable)
    assert all("\n" not in w for w in rendered.warnings)


def test_docker_env_file_leaves_out_what_it_cannot_carry():
    rendered = envfile.render({"PEM": PEM, "PLAIN": "a b", "DOLLAR": "$x"}, "docker")
    assert rendered.text == "DOLLAR=$x\nPLAIN=a b\n"
    assert rendered.unreadable == {"PEM": ["docker run --env-file"]}
    assert len(rendered.warnings) == 1 and rendered.warnings[0].startswith("PEM: left out")


def test_powershell_doubles_every_single_quote_character():
    text = envfile.render({"Q": "it's \u2019x\u2019 $env:HOME"}, "powershell").text
    assert text == "$env:Q = 'it''s \u2019\u2019x\u2019\u2019 $env:HOME'\n"


VALUE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"), max_size=40)
PRINTABLE = st.text(st.sampled_from([chr(c) for c in range(32, 127)] + ["\t", "\n", "é", "✓"]), max_size=40)


@pytest.mark.parametrize("reader", list(READERS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(PRINTABLE, VALUE), min_size=1, max_size=12))
def test_random_values_come_back_exactly(tmp_path, reader, values):
    env = {f"V{i}": value for i, value in enumerate(values)}
    check_round_trip(tmp_path, env, reader)
