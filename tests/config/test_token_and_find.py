"""Token resolution (no network) and finding velocity.toml from a subdirectory."""

from __future__ import annotations

from pathlib import Path

import pytest

from velo.config import ConfigError, find_config, load_config, parse_config

BASE = """\
[project]
name = "shop"

[tunnel.websocket]
url = "ws://127.0.0.1:7070/velo"

[tunnel]
{token}
"""

KUBERNETES = '[project]\nname = "shop"\n[cluster]\nprovider = "kubernetes"\n'


def write(folder: Path, token_line: str) -> Path:
    path = folder / "velocity.toml"
    path.write_text(BASE.format(token=token_line))
    return path


def test_inline_token(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'token = "abc"')).resolve_token(env={}) == "abc"


def test_token_from_env(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'token_env = "VELO_TOKEN"'))
    assert config.resolve_token(env={"VELO_TOKEN": "s3cret\n"}) == "s3cret"


def test_token_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELO_TEST_TOKEN", "from-os")
    config = load_config(write(tmp_path, 'token_env = "VELO_TEST_TOKEN"'))
    assert config.resolve_token() == "from-os"


def test_token_env_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, 'token_env = "VELO_TOKEN"'))
    with pytest.raises(ConfigError) as info:
        config.resolve_token(env={})
    assert info.value.messages == [
        "velocity.toml: tunnel.token_env: environment variable VELO_TOKEN is not set"
    ]
    with pytest.raises(ConfigError) as info:
        config.resolve_token(env={"VELO_TOKEN": "  "})
    assert info.value.messages == [
        "velocity.toml: tunnel.token_env: environment variable VELO_TOKEN is empty"
    ]


def test_token_file_is_relative_to_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "secrets").mkdir(parents=True)
    (project / "secrets" / "token").write_text("from-file\n")
    config = load_config(write(project, 'token_file = "secrets/token"'))
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    assert config.resolve_token(env={}) == "from-file"


def test_token_file_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, 'token_file = ".velo-token"'))
    with pytest.raises(ConfigError) as info:
        config.resolve_token(env={})
    assert info.value.messages == ["velocity.toml: tunnel.token_file: .velo-token: file not found"]
    (tmp_path / ".velo-token").write_text("\n")
    with pytest.raises(ConfigError) as info:
        config.resolve_token(env={})
    assert info.value.messages == ["velocity.toml: tunnel.token_file: .velo-token: file is empty"]


def test_no_token_source_for_kubernetes() -> None:
    config = parse_config(KUBERNETES, Path("velocity.toml"))
    assert config.tunnel.token_source is None
    with pytest.raises(ConfigError) as info:
        config.resolve_token(env={})
    assert (
        str(info.value)
        == "velocity.toml: tunnel: no token configured; set one of token, token_env or token_file"
    )


def test_find_config_walks_up(tmp_path: Path) -> None:
    (tmp_path / "velocity.toml").write_text(KUBERNETES)
    deep = tmp_path / "src" / "app"
    deep.mkdir(parents=True)
    assert find_config(deep) == tmp_path / "velocity.toml"
    assert find_config(tmp_path) == tmp_path / "velocity.toml"


def test_find_config_prefers_the_nearest(tmp_path: Path) -> None:
    (tmp_path / "velocity.toml").write_text(KUBERNETES)
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "velocity.toml").write_text(KUBERNETES)
    assert find_config(tmp_path / "inner") == tmp_path / "inner" / "velocity.toml"


def test_find_config_relative_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "velocity.toml").write_text(KUBERNETES)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    found = find_config(Path("."))
    assert found == tmp_path / "velocity.toml" and found.is_absolute()
    assert load_config(found).root == tmp_path


def test_find_config_ignores_a_directory_named_like_the_file(tmp_path: Path) -> None:
    (tmp_path / "velocity.toml").write_text(KUBERNETES)
    (tmp_path / "sub" / "velocity.toml").mkdir(parents=True)
    assert find_config(tmp_path / "sub") == tmp_path / "velocity.toml"


def test_find_config_none(tmp_path: Path) -> None:
    start = tmp_path / "empty"
    start.mkdir()
    if any((parent / "velocity.toml").is_file() for parent in start.parents):
        pytest.skip("a velocity.toml exists above the temp dir")
    with pytest.raises(ConfigError) as info:
        find_config(start)
    assert str(info.value) == (
        f"no velocity.toml in {start} or its parents; create one from velocity.toml.example"
    )
