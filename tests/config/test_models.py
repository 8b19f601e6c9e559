"""Valid configurations parse into the expected models, with defaults filled in."""

from __future__ import annotations

from pathlib import Path

import pytest

from velo.config import (
    ClusterConfig,
    ConfigError,
    EnvConfig,
    LocalService,
    RemoteService,
    TunnelConfig,
    VelocityConfig,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]

MINIMAL_STATIC = """\
[project]
name = "shop"

[tunnel]
token = "secret"

[tunnel.websocket]
url = "ws://127.0.0.1:7070/velo"

[local.website]
port = 3000
expose = 18080

[remote.services.backend]
target = "127.0.0.1:9001"
"""

KUBERNETES = """\
[project]
name = "shop"

[cluster]
provider = "kubernetes"
context = "kind-shop"
namespace = "shop"
lease_seconds = 60

[local.website]
ports = { http = 3000, "9100" = 9100 }
workload = "statefulset/website"
run = "npm start"
watch = ["src/**/*.js"]

[remote]
include = ["*"]
exclude = ["website-*"]

[remote.services.backend]
ports = { http = 19001 }
"""


def parse(text: str) -> VelocityConfig:
    return parse_config(text, Path("velocity.toml"))


def test_minimal_static_config() -> None:
    config = parse(MINIMAL_STATIC)
    assert config.project.name == "shop"
    assert config.cluster.provider == "static"
    assert config.tunnel.prefer is None and config.tunnel.preference == ["websocket"]
    assert config.tunnel.table("websocket").url == "ws://127.0.0.1:7070/velo"
    assert config.tunnel.token_source == "token"
    assert (config.tunnel.connect_timeout, config.tunnel.keepalive_interval) == (10.0, 5.0)
    assert (config.tunnel.keepalive_timeout, config.tunnel.reconnect_max_delay) == (15.0, 1.0)
    assert config.tunnel.wait_for_tunnel == 10.0
    assert config.local == {"website": LocalService(port=3000, expose=18080)}
    assert config.local["website"].host == "127.0.0.1"
    assert config.remote.include == ["*"] and config.remote.exclude == []
    assert config.remote.services == {"backend": RemoteService(target="127.0.0.1:9001")}
    assert config.env == EnvConfig(file=".env", format="dotenv", vars={})


def test_kubernetes_needs_no_url_or_token() -> None:
    config = parse(KUBERNETES)
    assert config.cluster.provider == "kubernetes"
    assert config.cluster.lease_seconds == 60 and config.cluster.settings.lease_seconds == 60
    assert config.cluster.namespace == "shop" and config.cluster.ready_timeout == 120.0  # defaults filled in
    assert config.tunnel.preference == ["port-forward"]  # the provider's default: no url needed
    assert config.tunnel.token_source is None
    website = config.local["website"]
    assert website.port is None and website.ports == {"http": 3000, "9100": 9100}
    assert website.expose is None
    assert website.workload == "statefulset/website"
    assert website.run == "npm start" and website.watch == ["src/**/*.js"]
    assert config.remote.services["backend"].ports == {"http": 19001}


def test_any_provider_name_is_accepted_for_plugins() -> None:
    config = parse('[project]\nname = "shop"\n[cluster]\nprovider = "nomad"\n')
    assert config.cluster.provider == "nomad"
    with pytest.raises(AttributeError):
        config.cluster.namespace  # noqa: B018 - the static/nomad providers own no such key


def test_prefer_orders_the_backends_and_each_keeps_its_own_url() -> None:
    config = parse(
        MINIMAL_STATIC.replace('token = "secret"', 'token = "secret"\nprefer = ["tcp", "websocket"]')
        + '[tunnel.tcp]\nurl = "tcp://127.0.0.1:7071"\n'
    )
    assert config.tunnel.preference == ["tcp", "websocket"]
    assert config.tunnel.table("tcp").url == "tcp://127.0.0.1:7071"
    assert config.tunnel.table("websocket").url == "ws://127.0.0.1:7070/velo"


def test_without_prefer_the_backend_tables_are_tried_in_file_order() -> None:
    config = parse(MINIMAL_STATIC.replace("[tunnel.websocket]", '[tunnel.tcp]\nurl = "tcp://h:1"\n[tunnel.websocket]'))
    assert config.tunnel.preference == ["tcp", "websocket"]


def test_a_plugin_table_change_makes_the_tunnel_differ() -> None:
    """`velo up` reconnects when [tunnel] changed; a backend table is part of it."""
    one = parse(MINIMAL_STATIC)
    two = parse(MINIMAL_STATIC.replace("7070", "7071"))
    assert one.tunnel != two.tunnel and one.tunnel == parse(MINIMAL_STATIC).tunnel
    kube = parse(KUBERNETES)
    assert kube.cluster != parse(KUBERNETES.replace("lease_seconds = 60", "lease_seconds = 61")).cluster


def test_multi_port_expose_and_ipv6_target() -> None:
    config = parse(
        MINIMAL_STATIC.replace(
            "port = 3000\nexpose = 18080",
            "ports = { http = 3000, metrics = 9100 }\nexpose = { http = 18080, metrics = 19100 }",
        ).replace('"127.0.0.1:9001"', '"[::1]:9001"')
    )
    assert config.local["website"].expose == {"http": 18080, "metrics": 19100}
    assert config.remote.services["backend"].target == "[::1]:9001"


def test_numbers_accept_ints_for_seconds_and_env_values_become_strings() -> None:
    config = parse(
        MINIMAL_STATIC
        + '[env]\nfile = ""\nformat = "json"\n[env.vars]\nA = "x"\nB = 3\nC = true\nD = false\nE = 1.5\n'
    )
    text = MINIMAL_STATIC.replace(
        'token = "secret"', 'token = "secret"\nconnect_timeout = 3\nwait_for_tunnel = 0'
    )
    tunnel = parse(text).tunnel
    assert tunnel.connect_timeout == 3.0 and isinstance(tunnel.connect_timeout, float)
    assert tunnel.wait_for_tunnel == 0.0
    assert config.env.vars == {"A": "x", "B": "3", "C": "true", "D": "false", "E": "1.5"}
    assert config.env.format == "json"


def test_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "velocity.toml").write_text(MINIMAL_STATIC + '[env]\nfile = "config/.env"\n')
    config = load_config(tmp_path / "velocity.toml")
    assert config.source_path == tmp_path / "velocity.toml"
    assert config.root == tmp_path
    assert config.env_file_path == tmp_path / "config" / ".env"
    assert config.resolve_path("/abs/file") == Path("/abs/file")


def test_empty_env_file_disables_it() -> None:
    config = parse(MINIMAL_STATIC + '[env]\nfile = ""\n')
    assert config.env_file_path is None


def test_models_validate_on_their_own() -> None:
    """Sub-models are usable directly (e.g. by tests of other components)."""
    assert TunnelConfig(keepalive_interval=1, keepalive_timeout=2).keepalive_timeout == 2.0
    with pytest.raises(ValueError, match="must be greater than keepalive_interval"):
        TunnelConfig(keepalive_interval=5, keepalive_timeout=5)


def test_example_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = load_config("velocity.toml.example")
    assert config.project.name == "shop"
    assert config.cluster.provider == "static"
    assert config.tunnel.token_source == "token_env"
    assert config.tunnel.preference == ["websocket"]
    assert set(config.local) == {"website"} and config.local["website"].expose == 18080
    assert config.remote.services["backend"].target == "127.0.0.1:9001"
    assert config.env.vars == {"LOG_LEVEL": "debug"}


def test_example_file_mentions_every_key() -> None:
    """The example is the documentation: each schema key must appear in it."""
    text = (REPO / "velocity.toml.example").read_text()
    models = [VelocityConfig, ClusterConfig, TunnelConfig, LocalService, RemoteService, EnvConfig]
    from velo.config import ProjectConfig, RemoteConfig, installed_tables

    from velo.config.models import ComposeConfig

    models += [ProjectConfig, RemoteConfig, ComposeConfig]
    # the built-in plugins' tables are documented there too (not third-party ones)
    models += [model for key, model in installed_tables().items() if model.__module__.startswith("velo.")]
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name in model.model_fields
        if f"{name} =" not in text
        and f"[{name}" not in text
        and f".{name}]" not in text
        and f".{name}." not in text
    ]
    assert missing == []


def test_config_error_is_an_exception_with_lines() -> None:
    error = ConfigError(["a: b", "c: d"], Path("x.toml"))
    assert str(error) == "a: b\nc: d"
    assert error.messages == ["a: b", "c: d"]
    assert error.path == Path("x.toml")
    assert ConfigError("one").messages == ["one"]
