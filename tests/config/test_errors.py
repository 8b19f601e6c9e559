"""Every kind of mistake gives exactly one plain line per problem, at the right key."""

from __future__ import annotations

from pathlib import Path

import pytest

from velo.config import ConfigError, installed_tables, load_config, parse_config
from velo.config.tables import BackendTable

HEAD = """\
[project]
name = "shop"

[tunnel.websocket]
url = "ws://127.0.0.1:7070/velo"

[tunnel]
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
    text = '[project]\nname = "shop"\n[tunnel]\nprefer = websocket\n'
    assert errors(text) == ["velocity.toml:4:10: invalid TOML: Invalid value"]


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
[tunnel]
token_env = "1BAD"
connect_timeout = 0
wait_for_tunnel = -1
prefer = "grpc"
[tunnel.websocket]
url = "not a url"
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
        'velocity.toml: tunnel.prefer: expected an array of strings, got "grpc"',
        'velocity.toml: tunnel.token_env: expected an environment variable name (letters, digits and "_", not '
        'starting with a digit), got "1BAD"',
        "velocity.toml: tunnel.connect_timeout: expected a number of seconds greater than 0, got 0",
        "velocity.toml: tunnel.wait_for_tunnel: expected a number of seconds 0 or more, got -1",
        'velocity.toml: tunnel.websocket.url: expected a URL with a host, like "ws://127.0.0.1:7070/velo", '
        'got "not a url"',
        'velocity.toml: local.website.ports.BAD: expected a port name (lowercase letters, digits and "-") or a port '
        'number, got "BAD"',
        'velocity.toml: local.website.workload: expected "<kind>/<name>" with kind deployment or statefulset, '
        'got "pod/website"',
        'velocity.toml: remote.services.db.target: expected "host:port" (or "[ipv6]:port") with a port 1-65535, '
        'got "db"',
        'velocity.toml: env.format: expected one of "dotenv", "compose", "docker", "sh", "fish", "powershell", "json", "shell", got "yaml"',
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
    assert errors(HEAD + 'prefr = ["websocket"]\n') == [
        'velocity.toml: tunnel.prefr: unknown key; did you mean "prefer"?'
    ]


def test_unknown_key_inside_a_backend_table() -> None:
    """[tunnel.websocket] is the websocket plugin's model, with the same "did you mean"."""
    assert errors(HEAD.replace('url = "ws', 'ulr = "ws')) == [
        "velocity.toml: tunnel.websocket.url: required key is missing",
        'velocity.toml: tunnel.websocket.ulr: unknown key; did you mean "url"?',
    ]


def test_unknown_backend_table_suggests_the_installed_one() -> None:
    assert errors(HEAD + '[tunnel.websockt]\nurl = "ws://h:1/v"\n') == [
        'velocity.toml: tunnel.websockt: unknown key; did you mean "websocket"?'
    ]


def test_backend_table_must_be_a_table() -> None:
    assert errors('[project]\nname = "shop"\n[tunnel]\ntoken = "t"\nwebsocket = "ws://h:1/v"\n') == [
        'velocity.toml: tunnel.websocket: expected a table, got "ws://h:1/v"'
    ]


def test_unknown_key_of_the_provider_is_checked_by_its_model() -> None:
    text = '[project]\nname = "shop"\n[cluster]\nprovider = "kubernetes"\nnamepsace = "shop"\n'
    assert errors(text) == ['velocity.toml: cluster.namepsace: unknown key; did you mean "namespace"?']
    text = '[project]\nname = "shop"\n[cluster]\nprovider = "kubernetes"\nzzz = 1\n'
    from velo.providers.kubernetes.settings import KubernetesTable  # keys the provider adds show up here

    allowed = ", ".join(["provider", *KubernetesTable.model_fields])
    assert allowed.startswith("provider, context, namespace, lease_seconds")
    assert errors(text) == [f"velocity.toml: cluster.zzz: unknown key; allowed keys: {allowed}"]


def test_provider_keys_get_the_same_value_messages() -> None:
    text = '[project]\nname = "shop"\n[cluster]\nprovider = "kubernetes"\nlease_seconds = 2\nready_timeout = 0\n'
    assert errors(text) == [
        "velocity.toml: cluster.lease_seconds: expected an integer 5-3600, got 2",
        "velocity.toml: cluster.ready_timeout: expected a number of seconds greater than 0, got 0",
    ]


def test_kubernetes_keys_under_the_static_provider() -> None:
    assert errors(HEAD + '[cluster]\ncontext = "kind"\n') == [
        'velocity.toml: cluster.context: unknown key; allowed keys: provider'
    ]


def test_old_backend_and_fallback_keys_say_what_to_write() -> None:
    assert errors(HEAD + 'backend = "websocket"\nfallback = ["tcp"]\n') == [
        'velocity.toml: tunnel.backend: replaced by [tunnel] prefer (the backends in order); '
        'write prefer = ["websocket", "tcp"]'
    ]
    assert errors(HEAD + 'fallback = ["tcp"]\n') == [
        'velocity.toml: tunnel.fallback: replaced by [tunnel] prefer (the backends in order); '
        'write prefer = ["tcp"]'
    ]


def test_old_tunnel_url_names_the_table_it_moved_to() -> None:
    text = '[project]\nname = "shop"\n[tunnel]\nurl = "wss://gw.example/velo"\ntoken = "t"\n'
    assert errors(text) == [
        'velocity.toml: tunnel.url: moved into the backend\'s own table; write [tunnel.websocket] '
        'url = "wss://gw.example/velo"'
    ]


def test_url_scheme_must_be_one_the_backend_serves() -> None:
    assert errors(HEAD.replace("ws://127.0.0.1:7070/velo", "ftp://x")) == [
        'velocity.toml: tunnel.websocket.url: expected a ws:// or wss:// URL (this backend serves no ftp://), '
        'got "ftp://x"'
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
        'velocity.toml: tunnel: a backend table with a url, e.g. [tunnel.websocket] url = "ws://HOST:7070/velo", '
        'is required when cluster.provider is "static"',
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


def test_prefer_must_not_repeat_a_backend() -> None:
    assert errors(HEAD + 'prefer = ["websocket", "grpc", "websocket"]\n') == [
        'velocity.toml: tunnel.prefer[2]: "websocket" is listed twice',
    ]
    assert errors(HEAD + "prefer = []\n") == ["velocity.toml: tunnel.prefer: must name at least one backend"]


class _NoUrlTable(BackendTable):
    """A backend that dials through the provider (like port-forward) and has no url."""


def test_static_provider_cannot_use_a_backend_without_url() -> None:
    tables = {**installed_tables(), "tunnel.through-api": _NoUrlTable}
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + 'prefer = ["websocket", "through-api"]\n', Path("velocity.toml"), tables=tables)
    assert info.value.messages == [
        'velocity.toml: tunnel.prefer: "through-api" has no url; the static provider reaches a gateway only by URL'
    ]


def test_a_preferred_backend_without_its_table_needs_its_keys() -> None:
    text = '[project]\nname = "shop"\n[cluster]\nprovider = "kubernetes"\n[tunnel]\nprefer = ["websocket"]\n'
    assert errors(text) == ["velocity.toml: tunnel.websocket.url: required key is missing"]


def test_tunnel_url_needs_a_host_and_port() -> None:
    assert errors(HEAD.replace("ws://127.0.0.1:7070/velo", "ws:///velo")) == [
        'velocity.toml: tunnel.websocket.url: expected a URL with a host, like "ws://127.0.0.1:7070/velo", '
        'got "ws:///velo"'
    ]
    assert errors(HEAD.replace("7070", "70700")) == [
        'velocity.toml: tunnel.websocket.url: expected a URL with a port 1-65535, got "ws://127.0.0.1:70700/velo"'
    ]


# ---------------------------------------------------------------------------- several at once


def test_multiple_errors_are_reported_together() -> None:
    text = """\
[project]
nmae = "shop"

[tunnel]
token_env = "VELO_TOKEN"
keepalive_interval = 20.0

[tunnel.websocket]
url = "ws://127.0.0.1:7070/velo"

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
