"""`velo env` as a user meets it: every format, --export for eval, warnings on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import write_config

TRICKY_VARS = '[env.vars]\nDB_PASSWORD = "pa$word it\'s \\"x\\""\nCERT = "line1\\nline2"\nREF = "${HOME}"\n'


def velo(*args, cwd):
    return subprocess.run([sys.executable, "-m", "velo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env={**os.environ, "VELO_TEST_TOKEN": "x"})


@pytest.fixture
def project(tmp_path):
    write_config(tmp_path / "velocity.toml", gateway_url="ws://127.0.0.1:7070/velo",
                 remote={"backend": "10.0.0.5:8080"}, extra=TRICKY_VARS)
    return tmp_path


def test_export_is_evaluated_by_bash_exactly(project):
    out = subprocess.run(["bash", "-c", 'eval "$(velo env --export)" && printf %s "$DB_PASSWORD|$CERT|$REF"'],
                         capture_output=True, text=True, cwd=project, timeout=60,
                         env={**os.environ, "VELO_TEST_TOKEN": "x", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == 'pa$word it\'s "x"|line1\nline2|${HOME}'


@pytest.mark.parametrize("fmt", ["dotenv", "compose", "docker", "sh", "shell", "fish", "powershell", "json"])
def test_every_format_is_offered(project, fmt):
    result = velo("env", "--format", fmt, cwd=project)
    assert result.returncode == 0, result.stderr
    assert "DB_PASSWORD" in result.stdout and "Traceback" not in result.stderr


def test_values_no_reader_of_the_format_can_carry_are_named_once_on_stderr(project):
    docker = velo("env", "--format", "docker", cwd=project)
    assert "CERT=" not in docker.stdout
    assert docker.stderr.count("velo: CERT: left out of the docker env file") == 1
    dotenv = velo("env", cwd=project)
    assert dotenv.stderr.count("velo: REF: ") == 1 and "python-dotenv" in dotenv.stderr
    assert json.loads(velo("env", "--format", "json", cwd=project).stdout)["CERT"] == "line1\nline2"


def test_config_accepts_the_new_format_names(project):
    config = project / "velocity.toml"
    config.write_text(config.read_text().replace("[env.vars]", "[env]\nformat = \"fish\"\n\n[env.vars]"))
    result = velo("env", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "set -gx DB_PASSWORD 'pa$word it\\'s \"x\"'" in result.stdout


def test_direnv_envrc_from_the_readme_gives_the_exact_values(project):
    """The `.envrc` the README documents, loaded by the real direnv."""
    import shutil

    if shutil.which("direnv") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("direnv is not installed (tests/env_readers/install.sh installs it)")
        pytest.skip("direnv is not installed (tests/env_readers/install.sh installs it)")
    (project / ".envrc").write_text('watch_file velocity.toml\neval "$(velo env --export)"\n')
    env = {**os.environ, "VELO_TEST_TOKEN": "x", "HOME": str(project), "XDG_CONFIG_HOME": str(project / ".config"),
           "XDG_DATA_HOME": str(project / ".data"), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    subprocess.run(["direnv", "allow", str(project)], check=True, env=env, cwd=project, timeout=30)
    out = subprocess.run(["direnv", "exec", str(project), "env", "-0"], capture_output=True, env=env, cwd=project,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    assert got["DB_PASSWORD"] == 'pa$word it\'s "x"' and got["CERT"] == "line1\nline2" and got["REF"] == "${HOME}"
