"""Every kind of mistake gives exactly one plain line per problem, at the right key."""

from __future__ import annotations

from pathlib import Path

import pytest

from velo.config import ConfigError, load_config, parse_config

HEAD = """\
[project]
name = "shop"

[tunnel]
url = "ws://127.0.0.1:7070/velo"
token_env = "VELO_TOKEN"
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("velocity.toml"))
    assert info.value.path == Path("velocity.toml")
    assert str(info.value) == "\n".join(info.value.messages)
    assert "Traceback" not in str(info.value) and "pydantic" not in str(info.value)
    return info.value.messages


# ------------------------------------------------------------------------------ TOML syntax


def test_toml_syntax_error_has_line_and_column() -> None:
    text = '[project]\nname = "shop"\n[tunnel]\nbackend = websocket\n'
    assert errors(text) == ["velocity.toml:4:11: invalid TOML: Invalid value"]


def test_toml_duplicate_key() -> None:
    assert errors('[project]\nname = "a"\nname = "b"\n') == [
        "velocity.toml:3:11: invalid TOML: Cannot overwrite a value"
    ]


# ---------------------------------------------------------------------------- value errors


def test_wrong_port_value() -> None:
    text = HEAD + '[local.website]\nport = "abc"\nexpose = 18080\n'
    assert errors(text) == ['velocity.toml: local.website.port: expected an integer 1-65535, got "abc"']


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("65536", "65536"), ("true", "true"), ("3000.0", "3000.0"), ("[1]", "[1]")],
)
def test_port_out_of_range_or_wrong_type(value: str, shown: str) -> None:
    text = HEAD + f"[local.website]\nport = {value}\nexpose = 18080\n"
    assert errors(text) == [f"velocity.toml: local.website.port: expected an integer 1-65535, got {shown}"]


def test_keepalive_timeout_must_exceed_interval() -> None:
    text = HEAD + "keepalive_interval = 5.0\nkeepalive_timeout = 5.0\n"
    assert errors(text) == [
        "velocity.toml: tunnel.keepalive_timeout: must be greater than keepalive_interval (5.0)"
    ]


def test_missing_required_key() -> None:
    assert errors('[project]\n[cluster]\nprovider = "kubernetes"\n') == [
        "velocity.toml: project.name: required key is missing"
    ]


def test_missing_required_table() -> None:
    assert errors('[cluster]\nprovider = "kubernetes"\n') == [
        "velocity.toml: project: required table is missing"
    ]


def test_wrong_type_for_a_table() -> None:
    assert errors('project = "shop"\nlocal = 3\n') == [
        'velocity.toml: project: expected a table, got "shop"',
        "velocity.toml: local: expected a table, got 3",
    ]


def test_assorted_value_messages() -> None:
    text = """\
[project]
name = "Shop"
[cluster]
provider = ""
lease_seconds = 2
[tunnel]
url = "not a url"
token_env = "1BAD"
connect_timeout = 0
wait_for_tunnel = -1
fallback = "grpc"
[local.website]
ports = { http = 3000, BAD = 1 }
workload = "pod/website"
[remote.services.db]
target = "db"
[env]
format = "yaml"
[env.vars]
LIST = [1, 2]
"""
    assert errors(text) == [
        'velocity.toml: project.name: expected lowercase letters, digits and "-" (starting and ending with a letter '
        'or digit, at most 63 characters), got "Shop"',
        "velocity.toml: cluster.provider: must not be empty",
        "velocity.toml: cluster.lease_seconds: expected an integer 5-3600, got 2",
        'velocity.toml: tunnel.fallback: expected an array of strings, got "grpc"',
        'velocity.toml: tunnel.url: expected a URL with a host, like "ws://127.0.0.1:7070/velo", got "not a url"',
        'velocity.toml: tunnel.token_env: expected an environment variable name (letters, digits and "_", not '
        'starting with a digit), got "1BAD"',
        "velocity.toml: tunnel.connect_timeout: expected a number of seconds greater than 0, got 0",
        "velocity.toml: tunnel.wait_for_tunnel: expected a number of seconds 0 or more, got -1",
        'velocity.toml: local.website.ports.BAD: expected a port name (lowercase letters, digits and "-") or a port '
        'number, got "BAD"',
        'velocity.toml: local.website.workload: expected "<kind>/<name>" with kind deployment or statefulset, '
        'got "pod/website"',
        'velocity.toml: remote.services.db.target: expected "host:port" (or "[ipv6]:port") with a port 1-65535, '
        'got "db"',
        'velocity.toml: env.format: expected one of "dotenv", "shell", "json", got "yaml"',
        "velocity.toml: env.vars.LIST: expected a string, number or boolean, got [1, 2]",
    ]


def test_invalid_service_name_points_at_the_table() -> None:
    text = HEAD + "[local.Web_Site]\nport = 1\nexpose = 2\n"
    assert errors(text) == [
        'velocity.toml: local.Web_Site: expected lowercase letters, digits and "-" (starting and ending with a '
        'letter or digit, at most 63 characters), got "Web_Site"'
    ]


# ---------------------------------------------------------------------------- unknown keys


def test_unknown_key_top_level() -> None:
    assert errors(HEAD + "[projet]\n") == ['velocity.toml: projet: unknown key; did you mean "project"?']


def test_unknown_key_nested() -> None:
    assert errors(HEAD + 'bakend = "websocket"\n') == [
        'velocity.toml: tunnel.bakend: unknown key; did you mean "backend"?'
    ]


def test_unknown_key_inside_local_table() -> None:
    text = HEAD + "[local.website]\nport = 3000\nexpose = 18080\nexpsoe = 1\n"
    assert errors(text) == ['velocity.toml: local.website.expsoe: unknown key; did you mean "expose"?']


def test_unknown_key_inside_remote_service_table() -> None:
    text = HEAD + '[remote.services.backend]\ntarget = "h:1"\nlocal_prot = 3\n'
    assert errors(text) == [
        'velocity.toml: remote.services.backend.local_prot: unknown key; did you mean "local_port"?'
    ]


def test_unknown_key_without_a_close_match_lists_allowed_keys() -> None:
    assert errors(HEAD + "[remote]\nzzz = 1\n") == [
        "velocity.toml: remote.zzz: unknown key; allowed keys: include, exclude, services, listen"
    ]
    assert errors(HEAD + "[env]\nwhatever = 1\n") == [
        "velocity.toml: env.whatever: unknown key; allowed keys: file, format, vars"
    ]


# ---------------------------------------------------------------------------- cross-field rules


def test_exactly_one_of_port_and_ports() -> None:
    assert errors(
        HEAD + "[local.a]\nexpose = 1\n[local.b]\nport = 1\nports = { http = 2 }\nexpose = 3\n"
    ) == [
        "velocity.toml: local.a: one of port or ports is required",
        "velocity.toml: local.b: set either port or ports, not both",
    ]


def test_expose_keys_must_match_ports() -> None:
    text = (
        HEAD
        + "[local.web]\nports = { http = 3000, metrics = 9100 }\nexpose = { http = 18080, admin = 18081 }\n"
    )
    assert errors(text) == [
        'velocity.toml: local.web.expose: keys must match ports: missing "metrics"; unexpected "admin"'
    ]
    text = HEAD + "[local.web]\nports = { http = 3000, metrics = 9100 }\nexpose = 18080\n"
    assert errors(text) == [
        "velocity.toml: local.web.expose: must be a table with the same keys as ports (http, metrics), got 18080"
    ]
    text = HEAD + "[local.web]\nport = 3000\nexpose = { http = 18080 }\n"
    assert errors(text) == [
        "velocity.toml: local.web.expose: must be a single port number when port is set, got { http = 18080 }"
    ]


def test_static_provider_needs_addresses() -> None:
    text = '[project]\nname = "shop"\n[local.web]\nport = 3000\n[remote.services.db]\nlocal_port = 5432\n'
    assert errors(text) == [
        'velocity.toml: tunnel.url: required when cluster.provider is "static"',
        'velocity.toml: tunnel: one of token, token_env or token_file is required when cluster.provider is "static"',
        'velocity.toml: local.web.expose: required when cluster.provider is "static"',
        'velocity.toml: remote.services.db.target: required when cluster.provider is "static"',
    ]


def test_only_one_token_source() -> None:
    assert errors(HEAD + 'token = "x"\n') == [
        "velocity.toml: tunnel: set only one of token, token_env or token_file (found token, token_env)"
    ]


def test_candidate_cannot_also_be_remote() -> None:
    text = HEAD + '[local.web]\nport = 3000\nexpose = 18080\n[remote.services.web]\ntarget = "h:1"\n'
    assert errors(text) == [
        'velocity.toml: remote.services.web: "web" is a development candidate ([local.web]); '
        "it cannot also be a remote service"
    ]


def test_listener_ports_must_be_unique() -> None:
    text = HEAD + (
        '[remote.services.a]\ntarget = "h:1"\nlocal_port = 9000\n'
        '[remote.services.b]\ntarget = "h:2"\nports = { http = 9000 }\n'
    )
    assert errors(text) == [
        "velocity.toml: remote.services.b.ports.http: port 9000 is already used by remote.services.a.local_port"
    ]


def test_fallback_must_not_repeat_backend() -> None:
    assert errors(HEAD + 'fallback = ["grpc", "websocket", "grpc"]\n') == [
        'velocity.toml: tunnel.fallback[1]: "websocket" is the main backend',
        'velocity.toml: tunnel.fallback[2]: "grpc" is listed twice',
    ]


def test_tunnel_url_scheme_is_free_but_needs_a_host() -> None:
    parse_config(HEAD.replace("ws://", "quic://"), Path("velocity.toml"))
    assert errors(HEAD.replace("ws://127.0.0.1:7070/velo", "ws:///velo")) == [
        'velocity.toml: tunnel.url: expected a URL with a host, like "ws://127.0.0.1:7070/velo", got "ws:///velo"'
    ]
    assert errors(HEAD.replace("7070", "70700")) == [
        'velocity.toml: tunnel.url: expected a URL with a port 1-65535, got "ws://127.0.0.1:70700/velo"'
    ]


# ---------------------------------------------------------------------------- several at once


def test_multiple_errors_are_reported_together() -> None:
    text = """\
[project]
nmae = "shop"

[tunnel]
url = "ws://127.0.0.1:7070/velo"
token_env = "VELO_TOKEN"
keepalive_interval = 20.0

[local.website]
port = "abc"
expose = 18080
hots = "127.0.0.1"
"""
    assert errors(text) == [
        "velocity.toml: project.name: required key is missing",
        'velocity.toml: project.nmae: unknown key; did you mean "name"?',
        "velocity.toml: tunnel.keepalive_timeout: must be greater than keepalive_interval (20.0)",
        'velocity.toml: local.website.port: expected an integer 1-65535, got "abc"',
        'velocity.toml: local.website.hots: unknown key; did you mean "host"?',
    ]


# ---------------------------------------------------------------------------- files


def test_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("velocity.toml")
    assert info.value.messages == ["velocity.toml: file not found"]
    assert info.value.path == Path("velocity.toml")


def test_path_is_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "velocity.toml").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(Path("velocity.toml"))
    assert info.value.messages == ["velocity.toml: is a directory, expected a file"]


def test_file_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "velocity.toml").write_bytes(b'[project]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config("velocity.toml")
    assert info.value.messages == ["velocity.toml: cannot read: not valid UTF-8 (bad byte at offset 18)"]


def test_absolute_path_inside_cwd_is_shown_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "velocity.toml").write_text("[project]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "sub" / "velocity.toml")
    assert info.value.messages == [f"{Path('sub', 'velocity.toml')}: project.name: required key is missing"]


def test_path_outside_cwd_is_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "b" / "velocity.toml")
    assert info.value.messages == [f"{tmp_path / 'b' / 'velocity.toml'}: file not found"]


def test_bom_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "velocity.toml").write_bytes(
        b'\xef\xbb\xbf[project]\nname = "shop"\n[cluster]\nprovider = "kubernetes"\n'
    )
    assert load_config(tmp_path / "velocity.toml").project.name == "shop"
