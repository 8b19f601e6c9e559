"""Client and gateway exchange their releases and wire protocol when the tunnel opens.

The other side is always a real `velo gateway` or `velo up` process run from another
copy of velo (PYTHONPATH): this checkout with its ``PROTOCOL`` or ``__version__``
rewritten, or the last commit from before the exchange existed (a real older build,
taken from this repository's history with `git archive`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, http_get, status_cli, wait_for, write_config
from velo import __version__
from velo.protocol import PROTOCOL

# The last commit of main before the version exchange: a peer that says nothing.
BEFORE_EXCHANGE = "0b22b9508b1e37ead96435d3e4720adfad30d523"


def velo_copy(dest: Path, *, protocol: int | None = None, version: str | None = None) -> dict:
    """This checkout's velo package copied to ``dest`` with its constants rewritten; the env
    that makes a process import it (run it from a folder without a velo/ of its own)."""
    import shutil

    package = dest / "velo"
    shutil.copytree(ROOT / "velo", package, ignore=shutil.ignore_patterns("__pycache__"))
    if protocol is not None:
        _rewrite(package / "protocol.py", r"^PROTOCOL = \d+$", f"PROTOCOL = {protocol}")
    if version is not None:
        _rewrite(package / "__init__.py", r'^__version__ = ".*"$', f'__version__ = "{version}"')
    return {"PYTHONPATH": str(dest)}


def velo_before_exchange(dest: Path) -> dict:
    """The velo package as it was before the exchange (git history), for a process's env; with
    the velo-tcp plugin of the same commit, which the installed entry point then loads."""
    dest.mkdir()
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "cat-file", "-e", f"{BEFORE_EXCHANGE}^{{commit}}"], capture_output=True).returncode:
        # a shallow clone (CI checkouts often are): fetch just that commit from where it came
        subprocess.run([*git, "fetch", "--quiet", "--depth=1", "origin", BEFORE_EXCHANGE], capture_output=True,
                       timeout=120)
    try:
        archive = subprocess.run([*git, "archive", BEFORE_EXCHANGE, "velo", "plugins/velo-tcp"],
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"this test needs commit {BEFORE_EXCHANGE} from the repository's history "
                    f"(a full clone, or `git fetch --unshallow`): {exc}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    assert "PROTOCOL" not in (dest / "velo" / "protocol.py").read_text()  # really from before
    return {"PYTHONPATH": f"{dest}:{dest / 'plugins' / 'velo-tcp'}"}


def _rewrite(path: Path, pattern: str, replacement: str) -> None:
    text, count = re.subn(pattern, replacement, path.read_text(), flags=re.MULTILINE)
    assert count == 1, f"{path}: {pattern!r} not found"
    path.write_text(text)


def _setup(procs, tmp_path, gateway_env: dict | None = None):
    http = procs.server("http", text="through the tunnel")
    expose = free_port()
    # cwd: `python -m` puts the working directory (this checkout, when pytest runs in it) first on sys.path
    gateway = procs.gateway(f"127.0.0.1:{http}", allow_reverse=[expose], env=gateway_env, cwd=tmp_path)
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"web": f"127.0.0.1:{http}"},
                          local={"website": (free_port(), expose)}, free_ports=True)
    return gateway, config


def _up_until_exit(procs, config: Path, env: dict | None = None, timeout: float = 60) -> str:
    proc = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)], env=env, cwd=config.parent)
    code = proc.wait(timeout)
    log = proc.log()
    assert code == 1, f"exit code {code}:\n{log}"
    assert "Traceback" not in log, log
    return log


def test_a_gateway_of_another_protocol_stops_velo_up_with_one_line_naming_both(procs, tmp_path):
    gateway, config = _setup(procs, tmp_path, velo_copy(tmp_path / "gw", protocol=PROTOCOL + 1, version="9.9.9"))
    log = _up_until_exit(procs, config)
    mine, theirs = f"velo {__version__} (protocol {PROTOCOL})", f"velo 9.9.9 (protocol {PROTOCOL + 1})"
    line = f"{mine} cannot use the gateway {gateway.url}, which runs {theirs}"
    assert log.count(line) == 1, log
    stop_line = next(l for l in log.splitlines() if line in l)
    assert f"run the gateway from velo {__version__}" in stop_line and "or install velo 9.9.9 here" in stop_line
    assert stop_line.startswith("velo: ") and stop_line.endswith("; stopping"), stop_line
    assert "tunnel up" not in log and "tunnel not up" not in log, log  # no retry loop, no other story
    gateway.proc.wait_log("refusing a tunnel from")
    assert f"{theirs} cannot serve client " in gateway.proc.log() and f"which runs {mine}" in gateway.proc.log()


def test_a_client_of_another_protocol_is_refused_by_the_gateway_and_stops(procs, tmp_path):
    """The same pair the other way round: the client is the newer one."""
    gateway, config = _setup(procs, tmp_path)
    log = _up_until_exit(procs, config, env=velo_copy(tmp_path / "up", protocol=PROTOCOL + 1, version="9.9.9"))
    mine, theirs = f"velo 9.9.9 (protocol {PROTOCOL + 1})", f"velo {__version__} (protocol {PROTOCOL})"
    assert log.count(f"{mine} cannot use the gateway {gateway.url}, which runs {theirs}") == 1, log
    gateway_log = gateway.proc.log()
    line = f"{theirs} cannot serve client "
    assert gateway_log.count(line) == 1, gateway_log
    assert f"which runs {mine}: install velo {__version__} there, or run this gateway from velo 9.9.9" in gateway_log
    assert "attached" not in gateway_log  # no session, no reverse listener for it
    assert gateway.proc.running()


def test_a_gateway_from_before_the_exchange_is_incompatible(procs, tmp_path):
    """A peer that sends no version at all counts as protocol 0."""
    gateway, config = _setup(procs, tmp_path, velo_before_exchange(tmp_path / "old"))
    log = _up_until_exit(procs, config)
    line = (f"velo {__version__} (protocol {PROTOCOL}) cannot use the gateway {gateway.url}, "
            "which runs a velo too old to say its version (protocol 0)")
    assert log.count(line) == 1, log
    assert "or install the velo release that gateway runs here" in log


def test_a_client_from_before_the_exchange_gets_one_gateway_line_not_a_flood(procs, tmp_path):
    """The old client cannot be taught to stop: it keeps reconnecting, and the gateway
    refuses each tunnel, with one log line (and later a count), never one per attempt."""
    gateway, config = _setup(procs, tmp_path)
    up = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)],
                     env=velo_before_exchange(tmp_path / "old"), cwd=config.parent)
    # each refused tunnel is one reconnect of the old client; wait for several
    wait_for(lambda: up.log().count("tunnel down") >= 5, 60, f"the old client to retry:\n{up.log()[-2000:]}")
    gateway_log = gateway.proc.log()
    assert gateway_log.count("which runs a velo too old to say its version (protocol 0)") == 1, gateway_log
    assert "attached" not in gateway_log
    assert gateway.proc.running()


def test_another_release_of_the_same_protocol_works_and_is_said_once(procs, tmp_path):
    gateway, config = _setup(procs, tmp_path, velo_copy(tmp_path / "gw", version="0.0.99"))
    up = procs.up(config)
    assert http_get(up.port("web")).endswith(b"through the tunnel")
    tunnel = status_cli(config)["tunnel"]
    assert (tunnel["peer_version"], tunnel["peer_protocol"]) == ("0.0.99", PROTOCOL), tunnel
    assert (tunnel["version"], tunnel["protocol"]) == (__version__, PROTOCOL)
    said = f"the gateway runs velo 0.0.99 (this is {__version__}, both protocol {PROTOCOL})"
    assert up.proc.log().count(said) == 1, up.proc.log()
    gateway.proc.wait_log(f"velo {__version__}) attached from")
    table = subprocess.run([sys.executable, "-m", "velo", "status", "-c", str(config)], capture_output=True,
                           text=True, timeout=30).stdout
    assert "gateway velo 0.0.99" in table, table
