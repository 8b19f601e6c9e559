"""The `velo` command as a user meets it: live reload, errors, env, down, demo."""

from __future__ import annotations

import hashlib
import signal
import json
import socket
import subprocess
import sys
import threading

import pytest

from tests.helpers import ROOT, free_port, http_get, wait_for, write_config
from tests.servers import blob_digest

MiB = 1 << 20


def velo(*args, cwd=None, env=None, timeout=60) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "velo", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def test_live_reload_adds_a_listener_while_a_download_runs(procs, tmp_path):
    size = 128 * MiB
    blob = procs.server("blob", size=size)
    http = procs.server("http", text="added-later")
    gateway = procs.gateway(f"127.0.0.1:{blob}", f"127.0.0.1:{http}")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"blob": f"127.0.0.1:{blob}"})
    up = procs.up(config)
    blob_port = up.port("blob")

    result = {}
    got_some = threading.Event()
    reloaded = threading.Event()

    def download():
        digest, total = hashlib.sha256(), 0
        with socket.create_connection(("127.0.0.1", blob_port), timeout=60) as sock:
            while chunk := sock.recv(256 * 1024):
                digest.update(chunk)
                total += len(chunk)
                if total > 4 * MiB and not got_some.is_set():
                    got_some.set()
                    reloaded.wait(30)  # hold the download mid-flight across the reload
        result["digest"], result["size"] = digest.hexdigest(), total

    reader = threading.Thread(target=download)
    reader.start()
    assert got_some.wait(30), "download did not start"
    write_config(config, gateway_url=gateway.url,
                 remote={"blob": f"127.0.0.1:{blob}", "web": f"127.0.0.1:{http}"})
    result["new_port"] = wait_for(lambda: up.port("web"), 10, "the new listener to appear")
    assert http_get(result["new_port"]).endswith(b"added-later")
    assert result.get("size") is None, "the download finished before the reload"
    reloaded.set()
    reader.join(120)
    assert result["size"] == size and result["digest"] == blob_digest(size)
    assert up.port("blob") == blob_port
    assert up.status()["reloads"] == 1
    assert up.env()["WEB_SERVICE_PORT"] == str(result["new_port"]), "the env file follows the reload"


def test_bad_edit_keeps_last_good_config(procs, tmp_path):
    up, _gateway, _http = procs.web_mesh("kept")
    config = up.config
    port = up.port("web")
    config.write_text(config.read_text().replace("[tunnel]", "[tunnel]\nprefr = 1"))
    up.proc.wait_log('tunnel.prefr: unknown key; did you mean "prefer"?')
    assert "last good config" in up.proc.log()
    assert up.status()["last_reload_error"]
    assert http_get(port).endswith(b"kept")


WS = '[tunnel.websocket]\nurl = "ws://h:1/v"\n'
BAD_CONFIGS = {
    "syntax": ('[project]\nname = "x"\n[tunnel\n', "velocity.toml:3:8: invalid TOML"),
    "schema": (
        '[project]\nname = "x"\n[tunnel]\ntoken = "t"\n' + WS + '[local.website]\nport = "abc"\nexpose = 1\n',
        'velocity.toml: local.website.port: expected an integer 1-65535, got "abc"',
    ),
    "typo": (
        '[project]\nname = "x"\n[tunnel]\nprefr = ["websocket"]\ntoken = "t"\n' + WS,
        'velocity.toml: tunnel.prefr: unknown key; did you mean "prefer"?',
    ),
    "missing": ('[project]\n[tunnel]\ntoken = "t"\n' + WS, "velocity.toml: project.name: required key is missing"),
    "backend": (
        '[project]\nname = "x"\n[tunnel]\nprefer = ["websockt"]\ntoken = "t"\n' + WS,
        'velo: tunnel.prefer[0]: unknown tunnel backend "websockt"; did you mean "websocket"? installed: ',
    ),
    "scheme": (
        '[project]\nname = "x"\n[tunnel]\ntoken = "t"\n[tunnel.websocket]\nurl = "ftp://x"\n',
        'velocity.toml: tunnel.websocket.url: expected a ws:// or wss:// URL (this backend serves no ftp://), '
        'got "ftp://x"',
    ),
    "old-keys": (
        '[project]\nname = "x"\n[tunnel]\nbackend = "websocket"\nurl = "ws://h:1/v"\ntoken = "t"\n',
        'velocity.toml: tunnel.backend: replaced by [tunnel] prefer (the backends in order); '
        'write prefer = ["websocket"]',
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", [["config", "check"], ["up"]])
def test_bad_config_gives_one_clear_line_and_exit_2(tmp_path, kind, command):
    text, message = BAD_CONFIGS[kind]
    (tmp_path / "velocity.toml").write_text(text)
    result = velo(*command, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_no_config_anywhere(tmp_path):
    result = velo("up", cwd=tmp_path)
    assert result.returncode == 2
    assert "no velocity.toml in" in result.stderr and "velocity.toml.example" in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "velocity.toml", gateway_url="ws://127.0.0.1:1/velo",
                              remote={"web": "127.0.0.1:9"})
        config.write_text(config.read_text().replace('target = "127.0.0.1:9"', f'target = "127.0.0.1:9"\nlocal_port = {port}'))
        result = velo("up", cwd=tmp_path, env={"VELO_TEST_TOKEN": "x"})
    assert result.returncode == 2
    assert f"local port {port} for web is already in use" in result.stderr
    assert "local_port" in result.stderr and "Traceback" not in result.stderr


def test_config_check_and_env_print_the_plan(tmp_path):
    config = write_config(tmp_path / "velocity.toml", gateway_url="ws://127.0.0.1:7070/velo",
                          remote={"backend": "10.0.0.5:8080"}, local={"website": (3000, 18080)},
                          extra='[env.vars]\nLOG_LEVEL = "debug"\n')
    check = velo("config", "check", cwd=tmp_path, env={"VELO_TEST_TOKEN": "x"})
    assert check.returncode == 0, check.stderr
    assert "forward backend " in check.stdout and "-> 10.0.0.5:8080" in check.stdout
    assert "reverse website" in check.stdout and "gateway :18080 -> 127.0.0.1:3000" in check.stdout
    env = json.loads(velo("env", "--format", "json", cwd=tmp_path, env={"VELO_TEST_TOKEN": "x"}).stdout)
    assert env["LOG_LEVEL"] == "debug"
    assert env["BACKEND_SERVICE_HOST"] == "127.0.0.1"
    port = env["BACKEND_SERVICE_PORT"]
    assert env["BACKEND_PORT_8080_TCP"] == f"tcp://127.0.0.1:{port}"
    again = json.loads(velo("env", "--format", "json", cwd=tmp_path, env={"VELO_TEST_TOKEN": "x"}).stdout)
    assert again["BACKEND_SERVICE_PORT"] == port, "local ports are stable across runs"
    shell = velo("env", "--format", "shell", cwd=tmp_path, env={"VELO_TEST_TOKEN": "x"}).stdout
    assert "export LOG_LEVEL=debug" in shell


def test_down_stops_a_running_up(procs, tmp_path):
    up, _gateway, _http = procs.web_mesh("x")
    result = velo("down", cwd=tmp_path)
    assert result.returncode == 0 and "stopped" in result.stdout
    assert up.proc.wait(10) == 0
    assert "nothing running" in velo("down", cwd=tmp_path).stdout
    assert velo("status", cwd=tmp_path).returncode == 1


def test_every_command_explains_itself():
    for command in (["--help"], ["up", "--help"], ["down", "--help"], ["status", "--help"], ["env", "--help"],
                    ["config", "check", "--help"], ["gateway", "--help"], ["demo", "--help"], ["plugins", "--help"]):
        result = velo(*command)
        assert result.returncode == 0 and "usage: velo" in result.stdout, command


def test_gateway_without_token_refuses_to_start():
    result = velo("gateway", "--listen", "ws://127.0.0.1:0/velo", env={"VELO_TOKEN": ""})
    assert result.returncode == 2 and "needs a token" in result.stderr


def test_demo_shows_forward_and_reverse_and_leaves_nothing(tmp_path):
    result = velo("demo", "--duration", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "forward request ok" in result.stdout
    assert "reverse request ok" in result.stdout
    leftover = subprocess.run(["pgrep", "-f", "velo gateway.*demo"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_run_command_gets_the_env_and_stops_with_velo(procs, tmp_path):
    http = procs.server("http", text="remote")
    candidate_port, expose = free_port(), free_port()
    gateway = procs.gateway(f"127.0.0.1:{http}", allow_reverse=[expose])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"web": f"127.0.0.1:{http}"},
                          local={"website": (candidate_port, expose)})
    ready = tmp_path / "candidate.port"
    config.write_text(config.read_text().replace(
        f"port = {candidate_port}\n",
        f"port = {candidate_port}\n"
        f"run = '{sys.executable} -m tests.servers http --port {candidate_port} --text \"web is at $WEB_URL\" "
        f"--ready-file {ready}'\n"))
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    up = procs.up(config)
    wait_for(ready.exists, 15, "velo to start the candidate")
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    body = http_get(expose)
    assert body.endswith(f"web is at http://127.0.0.1:{up.port('web')}".encode())
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(15) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", candidate_port), timeout=2)
