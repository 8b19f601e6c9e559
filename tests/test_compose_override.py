"""What `velo compose` writes, from the services `docker compose config` reports (pure, no engine)."""

from __future__ import annotations

import pytest

from tests.helpers import write_config
from velo.config import load_config
from velo.integrations.compose import HOST_GATEWAY, ComposeError, build_override
from velo.plan import Forward, Plan


def _config(tmp_path, extra=""):
    path = write_config(tmp_path / "velocity.toml", gateway_url="ws://127.0.0.1:7070/velo",
                        local={"app": (3000, 18080), "worker": (3100, 18081)},
                        extra='[remote.services.web]\ntarget = "127.0.0.1:9000"\n' + extra)
    return load_config(path)


PLAN = Plan(forwards=(Forward("web", "", 80, "172.17.0.1", 21000, "127.0.0.1", 9000),),
            env={"WEB_URL": "http://172.17.0.1:21000", "TOKEN": "a$b"})


def test_each_candidate_in_compose_gets_env_host_gateway_and_its_port(tmp_path):
    config = _config(tmp_path)
    services = {"app": {"ports": [{"target": 8080, "published": "", "protocol": "tcp"}]}, "db": {}}
    doc, lines = build_override(config, PLAN, services)
    app = doc["services"]["app"]
    assert app["extra_hosts"] == [HOST_GATEWAY]
    assert app["environment"]["WEB_URL"] == "http://host.docker.internal:21000"
    assert app["environment"]["TOKEN"] == "a$$b"                 # Compose would interpolate "$b"
    assert app["ports"] == ["127.0.0.1:3000:8080"]
    assert set(doc["services"]) == {"app"}                       # db is not a candidate, worker not in Compose
    assert len(lines) == 1 and "reverse 127.0.0.1:3000:8080" in lines[0]


def test_a_port_the_project_already_publishes_is_not_published_twice(tmp_path):
    services = {"app": {"ports": [{"target": 8080, "published": "3000", "protocol": "tcp"}]}}
    doc, _ = build_override(_config(tmp_path), PLAN, services)
    assert "ports" not in doc["services"]["app"]


def test_a_mapped_name_and_the_errors(tmp_path):
    config = _config(tmp_path, '[compose.services]\napp = "website"\n')
    doc, _ = build_override(config, PLAN, {"website": {"expose": ["80"]}})
    assert doc["services"]["website"]["ports"] == ["127.0.0.1:3000:80"]
    with pytest.raises(ComposeError, match="compose.services.app: no Compose service 'website'"):
        build_override(config, PLAN, {"app": {}})
    with pytest.raises(ComposeError, match="none of the candidates"):
        build_override(_config(tmp_path), PLAN, {"db": {}})
