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


def test_a_candidate_added_live_never_moves_a_proxy_port_already_given_out():
    """Its Service's targetPort points at that port: a newcomer that hashes to the same port
    (and sorts first) probes around it instead of taking it."""
    import zlib

    from velo.plan import Reverse
    from velo.providers.kubernetes import PROXY_PORTS, assign_proxy_ports

    def slot(name: str) -> int:
        return zlib.crc32(f"{name}/80".encode()) % (PROXY_PORTS[1] - PROXY_PORTS[0])

    website = Reverse("website", "", 0, "127.0.0.1", 3000, 80)
    rival = next(f"a{i}" for i in range(10**6) if slot(f"a{i}") == slot("website"))
    first = {(r.service, r.service_port): r.gateway_port for r in assign_proxy_ports([website])}
    newcomer = Reverse(rival, "", 0, "127.0.0.1", 3001, 80)
    fresh = {r.service: r.gateway_port for r in assign_proxy_ports([website, newcomer])}
    assert fresh[rival] == first[("website", 80)], "the hash alone gives the newcomer website's port"
    after = {r.service: r.gateway_port for r in assign_proxy_ports([website, newcomer], first)}
    assert after["website"] == first[("website", 80)] and after[rival] != after["website"]
