"""A shared namespace must never route a teammate's traffic into the void: the session's
Lease is alive from the moment it exists, liveness never trusts two clocks, a live tunnel
is proof of life, and a Service is redirected only once the path to the laptop works.

Each test runs the real `velo up` against the local control plane; the traffic-proxy is
the real `velo gateway` started by the pod runner.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from kubernetes import client

from tests.cluster import podrunner
from tests.helpers import free_port, status_cli, wait_for
from tests.kube.ingress import request_in_cluster, request_via_service
from tests.kube.relay import CuttableRelay
from tests.kube.shop import coordination, kube_config, kube_up, kubeconfig_variant, service, velo, velo_objects
from velo.providers.kubernetes import intercept as ix

pytestmark = pytest.mark.cluster

REQUEST = b"GET / HTTP/1.1\r\nHost: website\r\nConnection: close\r\n\r\n"


def session_lease(cluster, namespace: str):
    leases = coordination(cluster).list_namespaced_lease(namespace, label_selector=f"{ix.LABEL_MANAGED}=velo").items
    return leases[0] if leases else None


def intercepted(cluster, namespace: str) -> bool:
    return service(cluster, namespace).spec.selector.get(ix.LABEL_COMPONENT) == ix.COMPONENT


@pytest.fixture
def slow_start(cluster, namespace):
    """The traffic-proxy's process starts late, like a pod waiting for a cold image pull."""
    state_dir = cluster.cluster.state_dir

    def delay(seconds: float) -> None:
        podrunner.set_start_delay(state_dir, namespace, seconds)

    yield delay
    delay(0)


def test_no_reachable_tunnel_stops_within_ready_timeout_and_changes_nothing(cluster, namespace, shop, procs,
                                                                            tmp_path):
    before = service(cluster, namespace)
    laptop = procs.server("http", text="laptop")
    nowhere = f"ws://127.0.0.1:{free_port()}/velo"  # no Ingress: the tunnel can never connect
    config = kube_config(tmp_path / "p", namespace, nowhere, candidate_port=laptop, ready_timeout=8)
    started = time.monotonic()
    result = velo("up", cwd=config.parent, kubeconfig=cluster.kubeconfig, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no path from the traffic-proxy to this laptop within 8s" in result.stderr
    assert "the tunnel is not connected" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("velo: no path from the traffic-proxy"), result.stderr
    assert result.stderr.count("no path") == 1, result.stderr
    assert "now sends its traffic" not in result.stdout
    assert elapsed < 8 + 30, f"took {elapsed:.1f}s"
    after = service(cluster, namespace)
    assert after.metadata.resource_version == before.metadata.resource_version, "the Service was never touched"
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be removed")


def test_lease_is_renewed_from_creation_through_a_slow_start(cluster, namespace, shop, procs, tmp_path, slow_start):
    lease_seconds = 5
    slow_start(4 * lease_seconds)
    laptop = procs.server("http", text="laptop after a slow start")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=lease_seconds)
    up = procs.up(config, env={"KUBECONFIG": str(cluster.kubeconfig)}, wait_up=False)
    created = wait_for(lambda: session_lease(cluster, namespace), 30, "the session's Lease")
    first_renewal = created.spec.renew_time
    session = created.metadata.labels[ix.LABEL_SESSION]
    pods = f"{ix.LABEL_SESSION}={session}"

    def proxy_started() -> bool:
        return any(cluster.pod_process(namespace, p.metadata.name)
                   for p in cluster.core.list_namespaced_pod(namespace, label_selector=pods).items)

    # Renewed while the traffic-proxy is still starting, as a teammate's kubectl would see it.
    renewed = wait_for(lambda: (lease := session_lease(cluster, namespace)) and lease.spec.renew_time > first_renewal
                       and lease, 2 * lease_seconds, "a renewal of the Lease during the slow start")
    assert not proxy_started() and not intercepted(cluster, namespace)
    # A teammate's velo, after more than a lease of slow start, must see a live session.
    waited = renewed.spec.renew_time.timestamp() - first_renewal.timestamp()
    time.sleep(max(0.0, lease_seconds + 1 - waited))  # let a full lease pass since creation
    assert not proxy_started(), "the start must still be slow for this test to mean anything"
    teammate = kube_config(tmp_path / "teammate", namespace, shop.url, exclude='"*"')
    repair = velo("down", cwd=teammate.parent, kubeconfig=cluster.kubeconfig, timeout=90)
    assert repair.returncode == 0, repair.stderr
    assert "cleaned up session" not in repair.stdout, repair.stdout
    # The slow start completes: the Service reaches the laptop.
    wait_for(lambda: intercepted(cluster, namespace), 4 * lease_seconds + 60, f"the intercept; log:\n{up.proc.log()}")
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20,
                      "a request to the Service website:80")
    assert answer.endswith(b"laptop after a slow start")
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def skewed(offset: str) -> dict[str, str]:
    """The environment that runs a process with its wall clock ``offset`` off (libfaketime)."""
    if not os.path.exists(LIBFAKETIME):
        pytest.fail(f"{LIBFAKETIME} missing: `make test` installs Debian's faketime package", pytrace=False)
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1"}



def renewals(cluster, namespace: str, count: int, timeout: float) -> None:
    """Wait until the session's Lease was written ``count`` more times (time passing, measured
    by the laptop's own renewals)."""
    seen = {session_lease(cluster, namespace).metadata.resource_version}
    wait_for(lambda: seen.add(session_lease(cluster, namespace).metadata.resource_version) or len(seen) > count,
             timeout, f"{count} renewals of the Lease", interval=0.2)


def test_a_laptop_clock_ten_minutes_slow_keeps_its_session(cluster, namespace, shop, procs, tmp_path):
    """Its renewTime looks ten minutes old to everyone else: neither the traffic-proxy nor a
    teammate's `velo down` may take that as a dead session."""
    lease_seconds = 5
    laptop = procs.server("http", text="slow clock laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=lease_seconds)
    kubeconfig = kubeconfig_variant(cluster.kubeconfig, tmp_path / "kubeconfig", insecure=True)
    up = procs.up(config, env={"KUBECONFIG": str(kubeconfig), **skewed("-10m")}, wait_up=False)
    up.wait_state("up", timeout=90)
    wait_for(lambda: intercepted(cluster, namespace), 30, f"the intercept; log:\n{up.proc.log()[-3000:]}")
    lease = session_lease(cluster, namespace)
    assert lease.spec.renew_time.timestamp() < time.time() - 500, "the skew must be real"
    renewals(cluster, namespace, 3, 10 * lease_seconds)
    teammate = kube_config(tmp_path / "teammate", namespace, shop.url, exclude='"*"')
    repair = velo("down", cwd=teammate.parent, kubeconfig=cluster.kubeconfig, timeout=90)
    assert repair.returncode == 0 and "cleaned up session" not in repair.stdout, repair.stdout + repair.stderr
    assert intercepted(cluster, namespace)
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20,
                      "a request to the Service website:80")
    assert answer.endswith(b"slow clock laptop")
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert not intercepted(cluster, namespace)


def test_a_laptop_clock_ten_minutes_fast_is_still_noticed_gone(cluster, namespace, shop, procs, tmp_path):
    """Its renewTime lies ten minutes in the future: after kill -9 the traffic-proxy must still
    restore the Service within about a lease, judging by what it saw change."""
    lease_seconds = 5
    laptop = procs.server("http", text="fast clock laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=lease_seconds)
    up = procs.up(config, env={"KUBECONFIG": str(cluster.kubeconfig), **skewed("+10m")}, wait_up=False)
    up.wait_state("up", timeout=90)
    wait_for(lambda: intercepted(cluster, namespace), 30, f"the intercept; log:\n{up.proc.log()[-3000:]}")
    assert session_lease(cluster, namespace).spec.renew_time.timestamp() > time.time() + 500, "the skew must be real"
    up.proc.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: service(cluster, namespace).spec.selector == {"app": "website"}, lease_seconds + 15,
             "the traffic-proxy to restore the Service after the laptop died")
    print(f"restored {time.monotonic() - killed:.1f}s after kill -9 (lease {lease_seconds}s, laptop clock +10 min)")
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be removed")


def test_a_live_tunnel_keeps_the_session_while_the_laptop_cannot_reach_the_apiserver(cluster, namespace, shop,
                                                                                      procs, tmp_path):
    """Renewals fail for several leases (the laptop lost the cluster API), but its tunnel is
    connected the whole time: the traffic-proxy must keep routing to it."""
    from urllib.parse import urlsplit

    lease_seconds = 5
    api = urlsplit(cluster.server)
    relay = CuttableRelay(api.hostname, api.port)
    try:
        kubeconfig = kubeconfig_variant(cluster.kubeconfig, tmp_path / "kubeconfig",
                                        server=f"https://127.0.0.1:{relay.port}")
        laptop = procs.server("http", text="laptop still here")
        config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=lease_seconds)
        up = kube_up(procs, config, env={"KUBECONFIG": str(kubeconfig)})
        assert intercepted(cluster, namespace)
        before = session_lease(cluster, namespace).metadata.resource_version
        relay.cut()
        up.proc.wait_log("the cluster API is failing", timeout=6 * lease_seconds)
        outage = time.monotonic()
        # Several leases without a renewal; the tunnel stays up and keeps carrying requests.
        while time.monotonic() - outage < 3 * lease_seconds:
            answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20,
                              f"a request to the Service during the outage; log:\n{up.proc.log()[-1500:]}")
            assert answer.endswith(b"laptop still here")
            assert intercepted(cluster, namespace), "the traffic-proxy restored a Service whose laptop is connected"
            time.sleep(0.5)
        assert session_lease(cluster, namespace).metadata.resource_version == before, "no renewal got through"
        assert up.status()["tunnel"]["state"] == "up"
        relay.mend()
        renewals(cluster, namespace, 1, 4 * lease_seconds)
        assert intercepted(cluster, namespace)
        up.proc.signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
        assert not intercepted(cluster, namespace)
    finally:
        relay.close()


def holder(cluster, namespace: str, name: str) -> str | None:
    return (service(cluster, namespace, name).metadata.annotations or {}).get(ix.ANN_SESSION)


def versions(cluster, namespace: str) -> dict[str, str]:
    """Every Service's resourceVersion: equal before and after means nothing was touched."""
    return {s.metadata.name: s.metadata.resource_version for s in cluster.core.list_namespaced_service(namespace).items}


def rewrite_until(config, text: str, done, timeout: float, what: str, up):
    """(Re)written until ``done()``: the file watcher starts just as `velo up` says it runs."""
    return wait_for(lambda: config.write_text(text) and done(), timeout,
                    f"{what}; log:\n{up.proc.log()[-2500:]}", interval=0.5)


def test_live_edits_add_and_remove_candidates_and_refuse_what_needs_a_restart(cluster, namespace, shop, procs,
                                                                              tmp_path):
    """A [local.x] added while `velo up` runs is intercepted over the running tunnel (no
    new traffic-proxy), its Service's traffic reaches it while the first candidate keeps its
    own; an add velo cannot carry is refused with nothing changed; a removal restores at once."""
    website = procs.server("http", text="website on this laptop")
    api = procs.server("http", text="api on this laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=website)
    # A project name of its own: its derived local ports never meet another `velo up` of "shop"
    # on this machine (each forwards every Service of the namespace).
    config.write_text(config.read_text().replace('name = "shop"', 'name = "shop-live-edits"', 1))
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert intercepted(cluster, namespace)
    session = holder(cluster, namespace, "website")
    proxy = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items
    first = service(cluster, namespace)
    base = config.read_text()

    # Added live: intercepted once the gateway bound its listeners, by the same traffic-proxy pod.
    with_api = base + f"\n[local.api]\nport = {api}\n"
    rewrite_until(config, with_api, lambda: holder(cluster, namespace, "api") == session, 30,
                  "the added candidate's Service to be intercepted", up)
    up.proc.wait_log("velo: Service api now sends its traffic to this laptop")
    for port in (80, 9090):  # both ports of the Service, each through its own proxy port
        answer = wait_for(lambda port=port: request_in_cluster(cluster, namespace, "api", port, REQUEST), 20,
                          f"a request from inside the cluster to the Service api:{port}")
        assert answer.endswith(b"api on this laptop"), answer
    answer = wait_for(lambda: request_in_cluster(cluster, namespace, "website", 80, REQUEST), 20,
                      "a request to the Service website:80")
    assert answer.endswith(b"website on this laptop"), answer
    assert service(cluster, namespace).metadata.resource_version == first.metadata.resource_version, \
        "the first candidate's Service was left alone (same proxy port)"
    now = cluster.core.list_namespaced_pod(namespace, label_selector=f"{ix.LABEL_SESSION}={session}").items
    assert [p.metadata.uid for p in now] == [p.metadata.uid for p in proxy], "no new traffic-proxy pod"
    assert up.status()["last_reload_error"] == ""

    # Adds velo cannot carry: one line each, the last good config keeps running, nothing changes.
    before = versions(cluster, namespace)
    routes = sorted(r["name"] for r in up.status()["reverses"])
    for candidate, why in (("nope", "[local.nope]: no Service nope in namespace"),
                           ("dns", "[local.dns]: Service dns has a UDP port dns")):
        config.write_text(with_api + f"\n[local.{candidate}]\nport = {free_port()}\n")
        line = f"velocity.toml not applied, still running the last good config: {why}"
        up.proc.wait_log(line, timeout=20)
        assert up.proc.log().count(line) == 1 and "Traceback" not in up.proc.log()
        assert up.status()["last_reload_error"].startswith(why)
        assert sorted(r["name"] for r in up.status()["reverses"]) == routes, "no reverse route for it"
    # Its Service's targetPorts were swapped for both ports: intercepting only one is a re-add.
    config.write_text(with_api.replace(f"port = {api}", f"ports = {{ http = {api} }}"))
    up.proc.wait_log("not applied, still running the last good config: [local.api]: changing which ports of "
                     "Service api are intercepted needs removing [local.api]", timeout=20)
    assert sorted(r["name"] for r in up.status()["reverses"]) == routes
    assert versions(cluster, namespace) == before, "a refused edit touches nothing in the cluster"
    assert up.proc.running()

    # Removed live: its Service is restored at once, the other one stays.
    rewrite_until(config, base, lambda: service(cluster, namespace, "api").spec.selector == {"app": "api"}, 30,
                  "the removed candidate's Service to be restored", up)
    up.proc.wait_log("velo: Service api: original selector restored")
    restored = service(cluster, namespace, "api")
    assert ix.ANN_SESSION not in (restored.metadata.annotations or {})
    assert [p.target_port for p in restored.spec.ports] == ["web", 9090]
    assert intercepted(cluster, namespace)
    assert request_in_cluster(cluster, namespace, "website", 80, REQUEST).endswith(b"website on this laptop")
    without = base.replace(f"\n[local.website]\nport = {website}\n", "\n")
    assert without != base
    rewrite_until(config, without, lambda: service(cluster, namespace).spec.selector == {"app": "website"}, 30,
                  "the removed candidate's Service to be restored", up)
    up.proc.wait_log("velo: Service website: original selector restored")
    assert up.proc.log().count("original selector restored") == 2, "one line per event"

    # [cluster] and [tunnel] belong to the traffic-proxy: a restart.
    config.write_text(base.replace("lease_seconds = 30", "lease_seconds = 60"))
    up.proc.wait_log("[cluster] and [tunnel] changes need a restart of `velo up`", timeout=20)
    assert not intercepted(cluster, namespace) and up.proc.running()
    assert up.status()["last_reload_error"].startswith("[cluster] and [tunnel] changes need a restart")
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be removed")
    assert all(not holder(cluster, namespace, name) for name in ("website", "api"))


def test_a_live_add_whose_reverse_path_never_comes_keeps_the_last_good_config(cluster, namespace, shop, procs,
                                                                              tmp_path):
    """The tunnel is down when a candidate is added: within ready_timeout the gateway never
    confirms its listeners, so its Service is not touched and the mesh forgets its routes
    (the reconnected tunnel asks only for the old ones). A Service created while the add
    waits is forwarded all the same: the rollback does not take it back with the edit."""
    from urllib.parse import urlsplit

    website = procs.server("http", text="website on this laptop")
    ingress = urlsplit(shop.url)
    relay = CuttableRelay(ingress.hostname, ingress.port)
    try:
        config = kube_config(tmp_path / "p", namespace, f"ws://127.0.0.1:{relay.port}/velo", candidate_port=website,
                             ready_timeout=6)
        config.write_text(config.read_text().replace('name = "shop"', 'name = "shop-live-no-path"', 1))
        up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
        routes = sorted(r["name"] for r in up.status()["reverses"])
        before = versions(cluster, namespace)
        relay.cut()
        wait_for(lambda: up.status()["tunnel"]["state"] != "up", 20, "the tunnel to be down")
        reloads = up.status()["reloads"]
        config.write_text(config.read_text() + f"\n[local.api]\nport = {free_port()}\n")
        wait_for(lambda: up.status()["reloads"] > reloads, 20, "the edit to be taken up")
        cluster.core.create_namespaced_service(namespace, client.V1Service(  # while the add waits
            metadata=client.V1ObjectMeta(name="late"),
            spec=client.V1ServiceSpec(selector={"app": "late"}, ports=[client.V1ServicePort(port=8080)])))
        line = ("velocity.toml not applied, still running the last good config: no path from the traffic-proxy "
                "to this laptop for [local.api] within 6s (cluster.ready_timeout): the tunnel is not connected")
        up.proc.wait_log(line, timeout=30)
        assert sorted(r["name"] for r in up.status()["reverses"]) == routes
        wait_for(lambda: "late" in [f["name"] for f in up.status()["forwards"]], 10,
                 f"the Service created meanwhile to be forwarded; log:\n{up.proc.log()[-2000:]}")
        relay.mend()
        wait_for(lambda: up.status()["tunnel"]["state"] == "up", 30, "the tunnel to be back")
        answer = wait_for(lambda: request_in_cluster(cluster, namespace, "website", 80, REQUEST), 20,
                          "a request to the Service website:80")
        assert answer.endswith(b"website on this laptop")
        after = versions(cluster, namespace)
        del after["late"]
        assert after == before, "nothing in the cluster changed"
        assert up.proc.log().count("not applied") == 1 and "Traceback" not in up.proc.log()
        up.proc.signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
    finally:
        relay.close()
        try:
            cluster.core.delete_namespaced_service("late", namespace)
        except client.ApiException:
            pass
    assert not holder(cluster, namespace, "api") and not intercepted(cluster, namespace)


def put_back(cluster, namespace: str) -> None:
    """What a GitOps sync or `kubectl apply` of the original manifest does."""
    cluster.core.patch_namespaced_service("website", namespace, [
        {"op": "replace", "path": "/spec/selector", "value": {"app": "website"}},
        {"op": "replace", "path": "/spec/ports/0/targetPort", "value": "http"}])


@pytest.mark.parametrize("on_drift", ["reapply", "warn"])
def test_drift_is_noticed_from_the_watch(cluster, namespace, shop, procs, tmp_path, on_drift):
    laptop = procs.server("http", text="laptop after drift")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop,
                         cluster_extra=f'on_drift = "{on_drift}"\n')
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert intercepted(cluster, namespace)
    assert status_cli(config)["cluster"]["drift"] == []
    changed = time.time()
    put_back(cluster, namespace)
    up.proc.wait_log("Service website was changed back by someone else", timeout=20)
    if on_drift == "reapply":
        wait_for(lambda: intercepted(cluster, namespace), 20, "velo to intercept the Service again")
        answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20,
                          "a request to the Service website:80")
        assert answer.endswith(b"laptop after drift")
    else:
        assert 'cluster.on_drift = "warn"' in up.proc.log() and not intercepted(cluster, namespace)
    assert up.proc.log().count("changed back by someone else") == 1, "one line per event"
    # ... and `velo status` says which Service, when, and what became of it
    status = wait_for(lambda: (s := status_cli(config)) and s["cluster"]["drift"]
                      and s["cluster"]["drift"][0]["state"] in ("reapplied", "no route") and s,
                      20, "the drift in velo status")
    (event,) = status["cluster"]["drift"]
    assert event["service"] == "website" and event["on_drift"] == on_drift
    assert changed - 1 <= event["at"] <= time.time(), event
    (reverse,) = status["reverses"]
    table = " ".join(velo("status", cwd=config.parent, kubeconfig=cluster.kubeconfig).stdout.split())  # unwrapped
    assert "Service website was changed back by someone else at " in table, table
    if on_drift == "reapply":
        assert event["state"] == "reapplied" and event["at"] <= event["reapplied_at"] <= time.time(), event
        assert reverse["state"] == "listening" and status["cluster"]["no_route"] == {}
        assert "velo re-applied its swap at" in table, table
    else:
        assert event["state"] == "no route" and event["reapplied_at"] is None, event
        assert reverse["state"].startswith("no route: changed back by someone else"), reverse
        assert "website" in status["cluster"]["no_route"]
        assert "its traffic goes to its own pods, not this laptop" in table, table
    assert up.proc.log().count("changed back by someone else") == 1, "status asks add no log lines"
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    svc = service(cluster, namespace)
    assert svc.spec.selector == {"app": "website"} and svc.spec.ports[0].target_port == "http"
    assert not any(k.startswith("velo.dev/") for k in (svc.metadata.annotations or {}))


def test_ctrl_c_during_the_wait_leaves_nothing_behind(cluster, namespace, shop, procs, tmp_path, slow_start):
    slow_start(60)
    before = service(cluster, namespace).metadata.resource_version
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=free_port())
    up = procs.up(config, env={"KUBECONFIG": str(cluster.kubeconfig)}, wait_up=False)
    up.proc.wait_log("velo: traffic-proxy velo-proxy-", timeout=60)  # the pod is there; waiting for the tunnel
    assert velo_objects(cluster, namespace)
    up.proc.signal(signal.SIGINT)
    assert up.proc.wait(60) in (0, 1, 2, 130), up.proc.log()
    assert "Traceback" not in up.proc.log(), up.proc.log()
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "every object of the interrupted start to be removed")
    assert service(cluster, namespace).metadata.resource_version == before


@pytest.mark.slow
def test_the_apiserver_stopped_for_30s_ends_nothing(cluster, namespace, shop, procs, tmp_path):
    """The kube-apiserver frozen (SIGSTOP) for 30 s, twice the lease: open and new forward
    connections and reverse requests keep working (the tunnel needs no apiserver), the
    traffic-proxy keeps the live session, and within 10 s of the apiserver's return the
    Lease is renewed again and the Service watch sees new Services."""
    import socket
    from pathlib import Path

    from tests.cluster.harness import read_pidfile
    from tests.helpers import http_get
    from tests.kube.ingress import service_backend

    lease_seconds = 15
    laptop = procs.server("http", text="laptop through the outage")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=lease_seconds)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert intercepted(cluster, namespace)
    backend, cache = up.port("backend"), up.port("cache")
    proxy_port = wait_for(lambda: service_backend(cluster, namespace, "website", 80), 20, "the traffic-proxy's port")
    held = socket.create_connection(("127.0.0.1", cache), timeout=10)
    apiserver = read_pidfile(Path(cluster.cluster.state_dir) / "pids" / "kube-apiserver.pid")[0]
    os.kill(apiserver, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while time.monotonic() - stopped < 30:  # the outage lasts 30 s; check every path meanwhile
            held.sendall(b"still open")
            assert held.recv(100) == b"still open"
            assert f"{namespace}/backend".encode() in http_get(backend, timeout=10)
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
                sock.sendall(REQUEST)
                assert b"laptop through the outage" in b"".join(iter(lambda: sock.recv(65536), b""))
            time.sleep(1)
        # a hung apiserver is a degraded state too: calls time out instead of being refused
        assert up.status()["cluster"]["api"]["state"] == "failing", up.proc.log()[-2000:]
    finally:
        os.kill(apiserver, signal.SIGCONT)
    back = time.monotonic()
    renewals(cluster, namespace, 1, 10 + 5)
    cluster.start_in_cluster_service("after", namespace, kind="http", port=80)
    created = time.monotonic()
    try:
        wait_for(lambda: up.port("after"), 10, "the watch to see a Service created after the outage")
        print(f"lease renewed {created - back:.1f}s after the apiserver returned; watch {time.monotonic() - created:.1f}s")
    finally:
        cluster.stop_in_cluster_service("after", namespace)
    assert intercepted(cluster, namespace) and up.status()["tunnel"]["state"] == "up"
    wait_for(lambda: up.status()["cluster"]["api"]["state"] == "ok", 10, "the cluster API state to be ok again")
    assert up.proc.log().count("the cluster API is failing") == 1, up.proc.log()[-3000:]
    held.close()
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert not intercepted(cluster, namespace)


def wait_until(deadline: float, predicate, what: str, interval: float = 0.2):
    """``wait_for`` against a monotonic deadline shared by several checks."""
    return wait_for(predicate, max(0.1, deadline - time.monotonic()), what, interval=interval)


@pytest.mark.slow
def test_the_apiserver_terminated_for_30s_and_started_again_ends_nothing(cluster, namespace, shop, procs, tmp_path):
    """The kube-apiserver process terminated (SIGTERM: gone, connections refused) for 30 s,
    the default lease, then started again with the same command line, ports and certificates
    (an apiserver restart, a control-plane upgrade).  Meanwhile the open forward connection
    carries bytes both ways, new forward connections and reverse requests work, and
    `velo status` says the cluster API is failing (one log line); within 10 s of the
    apiserver being ready again the Service watch, the Lease renewal and drift detection
    work, and the intercepted Service still points at the traffic-proxy."""
    import socket
    import subprocess
    import sys

    from tests.helpers import http_get, status_cli
    from tests.kube.ingress import service_backend

    harness = cluster.cluster
    # The websocket backend through the Ingress (shop.url), on purpose: the port-forward
    # backend's tunnel rides the apiserver (pods/portforward), so it cannot outlive an
    # apiserver that is gone. What this test proves is that nothing *else* in the session
    # needs the apiserver while the tunnel has its own path.
    laptop = procs.server("http", text="laptop through the restart")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=30)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert intercepted(cluster, namespace)
    backend, cache = up.port("backend"), up.port("cache")
    proxy_port = wait_for(lambda: service_backend(cluster, namespace, "website", 80), 20, "the traffic-proxy's port")
    proxy_pods = {p.metadata.name for p in cluster.core.list_namespaced_pod(
        namespace, label_selector=f"{ix.LABEL_COMPONENT}={ix.COMPONENT}").items}
    held = socket.create_connection(("127.0.0.1", cache), timeout=10)
    held.sendall(b"before")
    assert held.recv(100) == b"before"
    api_port = harness.info["ports"]["apiserver"]

    started, outage_ok = time.monotonic(), False
    harness.stop_component("kube-apiserver")
    try:
        gone, gone_wall = time.monotonic(), time.time()
        print(f"apiserver terminated in {gone - started:.1f}s")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", api_port), timeout=5)
        degraded = None
        while time.monotonic() - gone < 30:  # the outage lasts 30 s; every path is checked meanwhile
            held.sendall(b"still open")
            assert held.recv(100) == b"still open"
            assert f"{namespace}/backend".encode() in http_get(backend, timeout=10)
            with socket.create_connection(("127.0.0.1", cache), timeout=10) as fresh:
                fresh.sendall(b"new connection")
                assert fresh.recv(100) == b"new connection"
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
                sock.sendall(REQUEST)
                assert b"laptop through the restart" in b"".join(iter(lambda: sock.recv(65536), b""))
            if degraded is None and (api := status_cli(config).get("cluster", {}).get("api", {})).get("state") == "failing":
                degraded = time.monotonic() - gone
                shown = subprocess.run([sys.executable, "-m", "velo", "status", "-c", str(config)],
                                       capture_output=True, text=True, timeout=30).stdout
                assert "cluster API failing" in shown, shown
                assert api["error"], api
            time.sleep(0.5)
        assert degraded is not None, f"`velo status` never showed the cluster API failing; log:\n{up.proc.log()[-2000:]}"
        print(f"`velo status` showed the cluster API failing {degraded:.1f}s into the outage")
        assert up.proc.running() and up.status()["tunnel"]["state"] == "up"
        outage_ok = True
    finally:
        harness.start_component("kube-apiserver")
        if not outage_ok:  # the tests that come next share this cluster
            harness.wait_clients_reconnected()
    ready = time.monotonic()
    print(f"apiserver down {ready - gone:.1f}s, ready again")
    deadline = ready + 10
    try:
        # Drift, put back by hand the moment the apiserver answers, and a new Service.
        put_back(cluster, namespace)
        cluster.start_in_cluster_service("after", namespace, kind="http", port=80)
        created = time.monotonic()
        wait_until(deadline, lambda: up.port("after"), "the watch to see a Service created after the restart")
        seen = time.monotonic()
        # stamped after the apiserver was gone, so written to the one started again
        wait_until(deadline, lambda: session_lease(cluster, namespace).spec.renew_time.timestamp() > gone_wall,
                   "the Lease to be renewed after the restart (its renewTime advances)")
        renewed = time.monotonic()
        wait_until(deadline, lambda: "Service website was changed back by someone else" in up.proc.log(),
                   "velo to notice the drift")
        wait_until(deadline, lambda: intercepted(cluster, namespace), "velo to intercept the Service again")
        wait_until(deadline, lambda: status_cli(config)["cluster"]["api"]["state"] == "ok",
                   "`velo status` to show the cluster API working again")
        done = time.monotonic()
        print(f"after the apiserver was ready: new Service forwarded {seen - created:.1f}s after its creation, "
              f"lease renewed by {renewed - ready:.1f}s, drift reapplied and status ok "
              f"by {done - ready:.1f}s")
        assert f"{namespace}/after".encode() in http_get(up.port("after"), timeout=10)
    finally:
        cluster.stop_in_cluster_service("after", namespace)
        harness.wait_clients_reconnected()
    # Consistent: the same traffic-proxy (it did not restore the Services and leave), still routing.
    assert {p.metadata.name for p in cluster.core.list_namespaced_pod(
        namespace, label_selector=f"{ix.LABEL_COMPONENT}={ix.COMPONENT}").items} == proxy_pods
    assert intercepted(cluster, namespace) and service(cluster, namespace).spec.ports[0].target_port != "http"
    answer = wait_for(lambda: request_via_service(cluster, namespace, "website", 80, REQUEST), 20,
                      "a request to the Service website:80")
    assert answer.endswith(b"laptop through the restart")
    held.sendall(b"after")
    assert held.recv(100) == b"after"
    held.close()
    log_text = up.proc.log()
    assert log_text.count("cluster API is failing") == 1, f"one line for the outage:\n{log_text[-3000:]}"
    assert log_text.count("cluster API works again") == 1, log_text[-3000:]
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert service(cluster, namespace).spec.selector == {"app": "website"}


def test_the_sessions_lease_deleted_by_hand_stops_the_session_with_one_line(cluster, namespace, shop, procs,
                                                                              tmp_path):
    """The Lease renewal is a background task of the session; its Lease deleted by hand (`kubectl
    delete lease`, a teammate's cleanup script) is not a blip to ride out: the renewal fails
    for real, and velo stops loudly, with one line, within a renewal interval, restoring what
    it changed; it never keeps running without a Lease."""
    lease_seconds = 6
    laptop = procs.server("http", text="laptop")
    config = kube_config(tmp_path / "p", namespace, shop.url, candidate_port=laptop, lease=lease_seconds)
    up = kube_up(procs, config, env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert intercepted(cluster, namespace)
    lease = session_lease(cluster, namespace).metadata.name
    coordination(cluster).delete_namespaced_lease(lease, namespace)
    deleted = time.monotonic()
    code = up.proc.wait(lease_seconds + 60)
    print(f"velo up stopped {time.monotonic() - deleted:.1f}s after its Lease was deleted (lease {lease_seconds}s)")
    log_text = up.proc.log()
    assert code == 1, log_text
    line = f"velo: this session's Lease {lease} is gone (it lapsed while this laptop was away, or someone deleted it)"
    assert log_text.count(line) == 1 and "Traceback" not in log_text, log_text
    said = next(entry for entry in log_text.splitlines() if entry.startswith(line))
    assert said.endswith("run `velo up` again; stopping"), said
    svc = service(cluster, namespace)
    assert svc.spec.selector == {"app": "website"} and svc.spec.ports[0].target_port == "http"
    wait_for(lambda: not velo_objects(cluster, namespace), 30, "the session's objects to be removed")


def test_a_dropped_api_connection_is_resumed_at_once_and_quietly(cluster, namespace, shop, procs, tmp_path):
    """Something between the laptop and the apiserver resets every connection once (a proxy's
    idle timeout, a VPN that reconnects): the Service watch lists again at once and sees what
    changes next, without a word, because one reset is not an outage."""
    from urllib.parse import urlsplit

    api = urlsplit(cluster.server)
    relay = CuttableRelay(api.hostname, api.port)
    try:
        kubeconfig = kubeconfig_variant(cluster.kubeconfig, tmp_path / "kubeconfig",
                                        server=f"https://127.0.0.1:{relay.port}")
        config = kube_config(tmp_path / "p", namespace, shop.url)
        up = kube_up(procs, config, env={"KUBECONFIG": str(kubeconfig)})
        relay.cut()
        relay.mend()
        cut = time.monotonic()
        cluster.start_in_cluster_service("late", namespace, kind="http", port=80)
        try:
            wait_for(lambda: up.port("late"), 20, f"the watch to see a Service created after the reset; log:\n"
                                                  f"{up.proc.log()[-2000:]}", interval=0.2)
            print(f"a Service created after the reset was forwarded {time.monotonic() - cut:.1f}s after it")
        finally:
            cluster.stop_in_cluster_service("late", namespace)
        assert "cluster API is failing" not in up.proc.log(), up.proc.log()[-2000:]
        assert up.status()["cluster"]["api"]["state"] == "ok"
        up.proc.signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
    finally:
        relay.close()
