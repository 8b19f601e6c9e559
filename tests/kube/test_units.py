"""The pure parts of the kubernetes provider's promises: per-project stable local ports
and a token that never shows in a repr."""

from __future__ import annotations

from velo.config import parse_config
from velo.plan import Inventory, Service, ServicePort, build_plan
from velo.transport import Endpoint

INVENTORY = Inventory((Service("backend", (ServicePort("", 80, "backend.shop.svc.cluster.local", 80),)),
                       Service("cache", (ServicePort("", 6379, "cache.shop.svc.cluster.local", 6379),))))


def ports(project: str) -> dict[str, int]:
    config = parse_config(f'[project]\nname = "{project}"\n[cluster]\nprovider = "kubernetes"\n', "velocity.toml")
    return {f.key: f.local_port for f in build_plan(config, INVENTORY).forwards}


def test_two_projects_forwarding_the_same_services_get_different_local_ports():
    shop, blog = ports("shop"), ports("blog")
    assert shop == ports("shop"), "stable: the same on every run"
    assert set(shop.values()).isdisjoint(blog.values()), (shop, blog)


def test_an_endpoint_never_shows_its_token():
    endpoint = Endpoint("websocket", "wss://velo.example/velo", "s3cret-token-value")
    assert "s3cret-token-value" not in repr(endpoint) and "s3cret-token-value" not in str(endpoint)
    assert endpoint.token == "s3cret-token-value"
