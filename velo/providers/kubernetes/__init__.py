"""The kubernetes provider: discovery, env, the traffic-proxy, the selector swap.

`velo env` and `velo config check` only read (``open`` + ``inventory``); `velo up`
also calls ``start``, which creates the session's traffic-proxy, waits for it, takes
the Lease and swaps the candidates' selectors; ``close`` undoes all of it.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import secrets
import string
import threading
import time
from importlib import resources
from typing import AsyncIterator

import yaml
from kubernetes import watch
from kubernetes.client.rest import ApiException

from velo.hookspecs import hookimpl
from velo.plan import Inventory, Reverse, Service, ServicePort, build_plan, service_env
from velo.provider import Endpoint, Provider, ProviderError, ProviderSession

# The traffic-proxy's port-forward:// listener (on the pod's loopback, outside PROXY_PORTS) is the
# backend's own default port, so a [tunnel.port-forward] table and this provider agree.
from velo.backends.portforward import DEFAULT_PORT as PORTFORWARD_PORT

from . import intercept as ix
from .api import ApiHealth, Connection, call, call_sync, connect, explain

log = logging.getLogger("velo.kubernetes")

TUNNEL_PORT = 7070
WORKLOAD_KINDS = ("deployment", "statefulset")


def dns_name(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def rbac_role(namespace: str = "NAMESPACE") -> str:
    """The Role a developer needs for `velo up` in one namespace (printed by `velo rbac`)."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "velo-developer", "namespace": namespace},
        # Each rule is a call velo makes: tests/kube/test_platform.py runs a whole session as a
        # user bound to exactly this Role and checks the apiserver's audit log (every call
        # allowed and in a rule, every rule used).
        "rules": [
            # that the namespace exists (a Role in it can grant get on that one namespace only)
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
            # discovery (list + watch), the selector swap and restore (get + patch)
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "patch"]},
            # the candidate's env: configMapKeyRef/secretKeyRef/envFrom (get); the session token (create, delete)
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "delete"]},
            # the traffic-proxy's identity
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create", "delete"]},
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
             "verbs": ["create", "delete"]},
            # waiting for the traffic-proxy pod; the port-forward tunnel to it (its WebSocket
            # upgrade is a GET, authorized as get, and the apiserver checks create as well)
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
            # the candidate's workload (get, list); the traffic-proxy (create, scale up, delete)
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "create", "patch", "delete"]},
            {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get", "list"]},
            # the session's Lease: taken, renewed, found by `velo down`, removed
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "verbs": ["get", "list", "create", "patch", "delete"]},
        ],
    }
    return yaml.safe_dump(role, sort_keys=False)


class KubernetesSession(ProviderSession):
    def __init__(self, config, conn: Connection):
        super().__init__(config)
        self.conn = conn
        self.session = secrets.token_hex(5)
        self.token = secrets.token_urlsafe(32)
        self.started = False
        self.portforward_port = PORTFORWARD_PORT
        self.intercepted: list[str] = []
        self._warned: set[str] = set()  # warn once per Service, not on every re-discovery
        # "service/port name" of headless Services whose named targetPort no running pod declares
        # yet: while there are any, the watch re-reads every NAMED_PORT_RECHECK seconds (pods
        # coming up change no Service, so no Service event would say they did).
        self._unresolved: set[str] = set()
        self._watch: watch.Watch | None = None
        self._stopping = threading.Event()
        self._renewing: asyncio.Task | None = None
        self._drift: set[str] = set()   # intercepted Services someone else put back
        self.drift_events: dict[str, dict] = {}  # per Service, the last drift: for `velo status`
        self._last_reverses: tuple[Reverse, ...] = ()
        self.api_health = ApiHealth(conn.server)

    @property
    def namespace(self) -> str:
        return self.conn.namespace

    # ---- discovery ----------------------------------------------------------------

    async def _services(self) -> list:
        result = await call(self.conn, f"listing Services in namespace {self.namespace}",
                            self.conn.core.list_namespaced_service, self.namespace)
        return result.items

    async def inventory(self) -> Inventory:
        services = await self._services()
        by_name = {s.metadata.name: s for s in services}
        inventory_services = []
        unresolved: set[str] = set()
        for svc in services:
            ports = self._service_ports(svc, self._warned, await self._named_target_ports(svc), unresolved)
            if ports:
                inventory_services.append(Service(svc.metadata.name, tuple(ports)))
        for key in self._unresolved - unresolved:
            self._warned.discard(key)  # resolved (or gone): should it come back, say so again
            if key.split("/")[0] in by_name:
                log.info("Service %s: a running pod declares its targetPort %s now; dialling that", *key.split("/", 1))
        self._unresolved = unresolved
        reverses: list[Reverse] = []
        env: dict[str, str] = {}
        secret_keys: set[str] = set()
        # The service-link variables the plan will give the candidate (pointing at the local
        # listeners), so that `$(BACKEND_SERVICE_PORT)` in its env expands like the kubelet's.
        links = service_env(list(build_plan(self.config, Inventory(tuple(inventory_services))).forwards))
        for name, local in self.config.local.items():
            svc = candidate_service(name, by_name, self.namespace)
            workload = await self._workload(name, svc, local.workload)
            reverses += self._reverses(name, svc, local)
            if workload is not None:
                candidate = await self._candidate_env(svc, workload, links)
                for key, value in candidate.env:
                    env[key] = value
                secret_keys |= set(candidate.secret_keys)
                for warning in candidate.warnings:  # said once, by `velo env` and `velo up` alike
                    if warning not in self._warned:
                        self._warned.add(warning)
                        log.warning("[local.%s] env: %s", name, warning)
        # Ports already given out stay put: a candidate added live must not move the path of
        # a Service that is intercepted already (its targetPort points at that port).
        kept = {(r.service, r.service_port): r.gateway_port for r in self._last_reverses}
        self._last_reverses = tuple(assign_proxy_ports(reverses, kept))
        return Inventory(tuple(inventory_services), self._last_reverses, tuple(env.items()), frozenset(secret_keys))

    async def _named_target_ports(self, svc) -> dict[str, int]:
        """A headless Service's pods are dialled directly, so a named targetPort must become
        the number its pods declare, as the EndpointSlice controller resolves it: taken from
        the running pods its selector picks (one list, only for such Services)."""
        spec = svc.spec
        names = {p.target_port for p in spec.ports or [] if isinstance(p.target_port, str)}
        if spec.cluster_ip != "None" or not names or not spec.selector:
            return {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))
        pods = (await call(self.conn, f"listing the pods of Service {svc.metadata.name}",
                           self.conn.core.list_namespaced_pod, self.namespace, label_selector=selector)).items
        found: dict[str, set[int]] = {}
        for pod in pods:
            if pod.status.phase != "Running":
                continue
            for container in pod.spec.containers or []:
                for port in container.ports or []:
                    if port.name in names and (port.protocol or "TCP") == "TCP":
                        found.setdefault(port.name, set()).add(port.container_port)
        resolved = {}
        for name, numbers in found.items():
            resolved[name] = min(numbers)
            key = f"{svc.metadata.name}/{name}/{sorted(numbers)}"
            if len(numbers) > 1 and key not in self._warned:
                self._warned.add(key)
                log.warning("Service %s: its pods declare port %s as %s; dialling %d", svc.metadata.name, name,
                            ", ".join(map(str, sorted(numbers))), resolved[name])
        return resolved

    def _service_ports(self, svc, warned: set, named: dict[str, int], unresolved: set[str]) -> list[ServicePort]:
        """``unresolved`` gets "service/name" of each named targetPort no running pod declares."""
        name = svc.metadata.name
        spec = svc.spec
        if spec.type == "ExternalName":
            host = spec.external_name
        else:
            host = dns_name(name, self.namespace)
        headless = spec.cluster_ip == "None"
        ports = []
        for port in spec.ports or []:
            if (port.protocol or "TCP") != "TCP":
                if name not in warned:
                    warned.add(name)
                    log.warning("Service %s: %s port %s skipped (velo forwards TCP only)", name, port.protocol, port.port)
                continue
            target = port.port
            if headless:  # no proxying: pods are dialled directly, at their own port
                if isinstance(port.target_port, int):
                    target = port.target_port
                elif port.target_port and named.get(port.target_port):
                    target = named[port.target_port]
                elif port.target_port:
                    key = f"{name}/{port.target_port}"
                    unresolved.add(key)
                    if key not in warned:
                        warned.add(key)
                        log.warning("Service %s: no running pod declares its targetPort %s yet; dialling port %d "
                                    "until one does", name, port.target_port, port.port)
            ports.append(ServicePort(port.name or "", port.port, host, target))
        return ports

    async def _workload(self, name: str, svc, explicit: str | None):
        if explicit:
            kind, _, wname = explicit.partition("/")
            reader = {"deployment": self.conn.apps.read_namespaced_deployment,
                      "statefulset": self.conn.apps.read_namespaced_stateful_set}[kind]
            try:
                return await asyncio.to_thread(reader, wname, self.namespace, _request_timeout=15)
            except ApiException as exc:
                if exc.status == 404:
                    raise ProviderError(f"local.{name}.workload: no {kind} {wname} in namespace {self.namespace}") from None
                raise explain(exc, self.conn, f"reading {explicit}") from None
        selector = original_selector(svc)
        if not selector:
            return None
        matches = []
        for kind, lister in (("deployment", self.conn.apps.list_namespaced_deployment),
                             ("statefulset", self.conn.apps.list_namespaced_stateful_set)):
            items = (await call(self.conn, f"listing {kind}s", lister, self.namespace)).items
            for item in items:
                labels = item.spec.template.metadata.labels or {}
                if (item.metadata.labels or {}).get(ix.LABEL_MANAGED) == "velo":
                    continue
                if all(labels.get(k) == v for k, v in selector.items()):
                    matches.append((kind, item))
        if len(matches) > 1:
            names = ", ".join(f"{k}/{i.metadata.name}" for k, i in matches)
            raise ProviderError(f"[local.{name}]: Service {name} selects pods of several workloads ({names}); "
                                f'set local.{name}.workload = "<kind>/<name>" to pick one')
        return matches[0][1] if matches else None

    async def _candidate_env(self, svc, workload, links: dict[str, str]):
        from .env import pick_container, resolve_env

        template = workload.spec.template
        target_ports = ix.original_target_ports(svc)
        container = pick_container(template.spec, target_ports)
        pod_name = f"{workload.metadata.name}-velo-local"
        return await asyncio.to_thread(resolve_env, self.conn.core, self.namespace, template, container,
                                       pod_name=pod_name, service_env=links)

    def _reverses(self, name: str, svc, local) -> list[Reverse]:
        """One reverse route per intercepted Service port, each with its own traffic-proxy
        port (``assign_proxy_ports``): two candidates on targetPort 8080 never share one."""
        ports = [p for p in svc.spec.ports or [] if (p.protocol or "TCP") == "TCP"]
        reverses = []
        for port in ports:
            key = port.name or str(port.port)
            if local.ports is not None:
                local_port = local.ports.get(key) or local.ports.get(str(port.port))
                if local_port is None:  # the swap would move it too, to a proxy port nobody listens on
                    raise ProviderError(
                        f"[local.{name}]: Service {name} port {key} has no entry in local.{name}.ports: a selector "
                        f"swap moves every port of the Service, so its traffic would go nowhere; give it a local "
                        f"port too ({key} = PORT)")
            else:
                local_port = local.port
            reverses.append(Reverse(name, port.name if len(ports) > 1 else "", 0, local.host, local_port, port.port))
        return reverses

    WATCH_SECONDS = 30  # the server ends each watch then; a connection dead without a FIN is noticed after +15 s

    async def watch(self) -> AsyncIterator[Inventory]:
        """Services that appear, change or go: a real watch, not a poll.  It survives the
        apiserver going away (laptop sleep, a restart): each failure is retried with backoff
        and shown in `velo status` (``api_health``); back, it lists again and re-reads the
        cluster, so nothing that changed while nobody watched is missed."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        health, doing = self.api_health, "watching Services"

        def run() -> None:
            resource_version = None
            delay = 0.5
            quiet_at = float("-inf")  # the last failure retried at once without a word
            while not self._stopping.is_set():
                try:
                    if resource_version is None:  # first, or after a failure: list, then watch from there
                        listed = self.conn.core.list_namespaced_service(self.namespace, _request_timeout=(5, 15))
                        resource_version = listed.metadata.resource_version
                        health.ok(doing)
                        delay = 0.5
                        loop.call_soon_threadsafe(changed.set)
                    self._watch = watch.Watch()
                    for event in self._watch.stream(self.conn.core.list_namespaced_service, self.namespace,
                                                    resource_version=resource_version,
                                                    timeout_seconds=self.WATCH_SECONDS,
                                                    _request_timeout=(5, self.WATCH_SECONDS + 15)):
                        resource_version = event["object"].metadata.resource_version
                        loop.call_soon_threadsafe(changed.set)
                except ApiException as exc:
                    if exc.status == 410:  # too old to resume: list again
                        resource_version = None
                        continue
                    failure = exc
                except Exception as exc:  # noqa: BLE001 - refused, reset, timed out: the apiserver is away
                    failure = exc
                else:
                    continue  # the server ended the watch on time: resume where it was
                if self._stopping.is_set():
                    return
                resource_version = None
                if time.monotonic() - quiet_at > QUIET_RETRY_EVERY:
                    # One broken connection is not an outage (a proxy's or VPN's reset): list
                    # again at once, unsaid; only a failure that repeats is the API failing.
                    quiet_at = time.monotonic()
                    continue
                health.failed(doing, failure)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 4.0)

        thread = threading.Thread(target=run, name="velo-watch-services", daemon=True)
        thread.start()
        last = None
        doing_reread, delay = "re-reading the cluster", 0.5
        while True:
            if self._unresolved:
                try:
                    await asyncio.wait_for(changed.wait(), NAMED_PORT_RECHECK)
                except TimeoutError:
                    pass  # read again: the pods that declare the port may be running now
            else:
                await changed.wait()
            await asyncio.sleep(0.2)  # coalesce a burst of events
            changed.clear()
            try:
                if self.intercepted:
                    await self._mind_drift()
                inventory = await self.inventory()
            except ProviderError as exc:  # a transient API error never ends the session: retry
                health.failed(doing_reread, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
                changed.set()
                continue
            health.ok(doing_reread)
            delay = 0.5
            if inventory != last:
                last = inventory
                yield inventory

    async def _mind_drift(self) -> None:
        """An intercepted Service put back by someone else is said once per change and, with
        ``on_drift = "reapply"``, intercepted again (its new selector becomes the original)."""
        reapply = self.config.cluster.on_drift == "reapply"
        services = {s.metadata.name: s for s in await self._services()}
        for name in list(self.intercepted):
            svc = services.get(name)
            if svc is None or not ix.drifted(svc, self.session):
                if name in self._drift and name in self.drift_events:  # pointed at the proxy again
                    self.drift_events[name]["state"] = "intercepted again"
                self._drift.discard(name)
                continue
            if name not in self._drift:
                log.warning("Service %s was changed back by someone else (a GitOps sync or kubectl apply?)%s", name,
                            "; intercepting it again" if reapply else "; its traffic no longer reaches this laptop "
                            '(cluster.on_drift = "warn")')
                times = self.drift_events.get(name, {}).get("times", 0) + 1
                self.drift_events[name] = {"service": name, "at": time.time(), "times": times,
                                           "on_drift": self.config.cluster.on_drift,
                                           "state": "re-applying" if reapply else "no route", "reapplied_at": None}
            self._drift.add(name)
            if reapply:
                event = self.drift_events[name]
                try:
                    await asyncio.to_thread(ix.release, self.conn, name, self.session)
                    await self._intercept(name)
                except ProviderError as exc:  # the watch retries; status says why meanwhile
                    event["state"] = f"re-applying failed: {str(exc).splitlines()[0]}"
                    raise
                event.update(state="reapplied", reapplied_at=time.time())
                self._drift.discard(name)

    async def _intercept(self, name: str) -> None:
        """Swap Service ``name`` to the traffic-proxy, each port to the proxy port it was given."""
        ports = {r.service_port: r.gateway_port for r in self._last_reverses if r.service == name}
        await asyncio.to_thread(ix.intercept, self.conn, name, self.session, lambda s: ix.lease_alive(self.conn, s),
                                ports)

    def status(self) -> dict:
        """For `velo status`: the cluster API's health, and each intercepted Service someone
        else changed back, when, and whether velo re-applied its swap or it has no route."""
        def clock(at: float) -> str:
            return time.strftime("%H:%M:%S", time.localtime(at))

        events = {name: event for name, event in sorted(self.drift_events.items()) if name in self.intercepted}
        notes, no_route = [], {}
        for name, event in events.items():
            line = f"Service {name} was changed back by someone else at {clock(event['at'])}"
            if event["times"] > 1:
                line += f" ({event['times']} times this session)"
            if event["state"] == "reapplied":
                line += f"; velo re-applied its swap at {clock(event['reapplied_at'])}"
            elif event["state"] == "intercepted again":
                line += "; it points at this laptop again"
            else:
                no_route[name] = "changed back by someone else"  # short: a table cell; the note says more
                line += (": its traffic goes to its own pods, not this laptop (cluster.on_drift = \"warn\"; "
                         "restart `velo up` to intercept it again)" if event["state"] == "no route"
                         else f": no route to this laptop ({event['state']})")
            notes.append(line)
        return {"api": self.api_health.status(), "drift": [dict(e) for e in events.values()], "notes": notes,
                "no_route": no_route}

    # ---- the in-cluster side -------------------------------------------------------

    async def endpoints(self) -> list[Endpoint]:
        """Backends with a url (an Ingress) dial it; the others go through the apiserver's
        pods/portforward to the session's pod, found again by its labels every time."""
        from . import portforward

        tunnel = self.config.tunnel
        found = []
        for name in tunnel.preference:
            table = tunnel.table(name)
            if getattr(table, "url", None):
                found.append(Endpoint(name, table.url, self.token, settings=table))
            else:
                found.append(await portforward.endpoint(
                    self.conn, self.namespace, f"{ix.LABEL_SESSION}={self.session}", self.portforward_port,
                    backend=name, token=self.token, settings=table))
        return found

    async def start(self, say, path_ready=None) -> None:
        """Create the traffic-proxy and the Lease, wait until the tunnel and the reverse
        listeners work, then swap the selectors: a Service never points at a dead end."""
        timeout = self.config.cluster.ready_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        repaired = await asyncio.to_thread(self._repair, False, None)
        for line in repaired:
            say(f"velo: {line}")
        inventory = await self.inventory()
        for name in self.config.local:
            await asyncio.to_thread(self._check_free, name)
        self.started = True  # from here on, close() removes whatever exists
        await asyncio.to_thread(self._create_objects, inventory)
        # Renewed from the moment it exists: a slow start (a cold image pull) must not look
        # like a dead laptop to the traffic-proxy or to a teammate's velo.
        self._renewing = asyncio.create_task(self._renew(), name="renewing the session's lease")
        await self._wait_ready(say, deadline)
        if path_ready is not None and self.config.local:
            why = await path_ready(max(0.0, deadline - asyncio.get_running_loop().time()))
            if why:
                raise ProviderError(f"no path from the traffic-proxy to this laptop within {timeout:g}s "
                                    f"(cluster.ready_timeout): {why}; no Service was changed")
        for name in self.config.local:
            await self._intercept(name)
            self.intercepted.append(name)
            say(f"velo: Service {name} now sends its traffic to this laptop")

    # ---- live edits -----------------------------------------------------------------
    #
    # A live edit goes through the same steps as a start, in the same order: check the
    # new candidates (``reconfigure``, nothing changes yet), the engine's mesh asks the
    # gateway for their reverse listeners over the running tunnel (the traffic-proxy
    # allows every port of PROXY_PORTS, so no pod restart), then ``apply_live`` swaps their
    # Services once ``path_ready`` confirmed the listeners are bound.

    def reload_refused(self, config) -> str | None:
        """The traffic-proxy and its tunnel belong to [cluster] and [tunnel]: such changes
        need a new session, which only a restart makes cleanly."""
        if not self.started:
            return None
        if config.cluster != self.config.cluster or config.tunnel != self.config.tunnel:
            return "[cluster] and [tunnel] changes need a restart of `velo up` (Ctrl-C, then `velo up`)"
        return None

    async def reconfigure(self, config) -> None:
        """Check each candidate a live edit adds the way ``start`` does (the Service exists,
        velo can carry it, nobody else holds it), before anything changes; raising refuses
        the edit.  The cluster is changed by ``apply_live``."""
        added = [name for name in config.local if name not in self.intercepted] if self.started else []
        kept = [name for name in self.intercepted if name in config.local
                and (config.local[name].ports, config.local[name].port) != (self.config.local[name].ports,
                                                                             self.config.local[name].port)]
        if added or kept:
            services = {s.metadata.name: s for s in await self._services()}
            for name in kept:  # its Service's targetPorts were swapped for exactly those ports
                svc = services.get(name)
                if svc is not None and _carried(svc, config.local[name]) != _carried(svc, self.config.local[name]):
                    raise ProviderError(f"[local.{name}]: changing which ports of Service {name} are intercepted "
                                        f"needs removing [local.{name}] (save), then adding it back")
            for name in added:
                candidate_service(name, services, self.namespace)
                await asyncio.to_thread(self._check_free, name)
        self.config = config

    async def apply_live(self, say, path_ready) -> None:
        """After the mesh took the edit: a candidate added is intercepted once the gateway has
        bound its reverse listeners (else ProviderError, and nothing was changed); one removed
        gets its Service back at once."""
        if not self.started:
            return
        added = [name for name in self.config.local if name not in self.intercepted]
        removed = [name for name in self.intercepted if name not in self.config.local]
        if added:
            timeout = self.config.cluster.ready_timeout
            why = await path_ready(timeout)
            if why:
                raise ProviderError(f"no path from the traffic-proxy to this laptop for "
                                    f"{', '.join(f'[local.{n}]' for n in added)} within {timeout:g}s "
                                    f"(cluster.ready_timeout): {why}; no Service was changed")
            done: list[str] = []
            try:
                for name in added:
                    await self._intercept(name)
                    done.append(name)
            except ProviderError:  # all of the edit or none of it: undo this edit's swaps
                for name in done:
                    await asyncio.to_thread(ix.restore, self.conn, name, self.session)
                raise
            for name in added:
                self.intercepted.append(name)
                say(f"velo: Service {name} now sends its traffic to this laptop")
        for name in removed:  # ix.restore says "Service X: original selector restored"
            await asyncio.to_thread(ix.restore, self.conn, name, self.session)
            self.intercepted.remove(name)

    def _check_free(self, name: str) -> None:
        """Refuse before creating anything, rather than after the traffic-proxy is up."""
        svc = self.conn.core.read_namespaced_service(name, self.namespace, _request_timeout=15)
        ix.refuse_if_held(svc, self.session, lambda s: ix.lease_alive(self.conn, s))

    def _manifests(self, inventory: Inventory) -> list[dict]:
        text = resources.files(__package__).joinpath("traffic-proxy.yaml").read_text()
        rendered = string.Template(text).substitute(
            session=self.session, namespace=self.namespace, user=ix.user_label(),
            token=self.token, image=self.config.cluster.proxy_image, **proxy_resources(self.config.cluster),
        )
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        proxy_ports = sorted({r.gateway_port for r in inventory.reverses})
        tunnel_port = TUNNEL_PORT  # outside PROXY_PORTS
        self.tunnel_port = tunnel_port
        self.portforward_port = PORTFORWARD_PORT
        for doc in docs:
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                # The namespace's own Services, and what its ExternalName Services alias.
                aliases = sorted({f"{p.target_host}:{p.target_port}" for svc in inventory.services for p in svc.ports
                                  if not p.target_host.endswith(f".{self.namespace}.svc.cluster.local")})
                container["args"] = [
                    "--listen", f"ws://0.0.0.0:{tunnel_port}/velo",
                    "--listen", f"port-forward://127.0.0.1:{self.portforward_port}", "--token-env", "VELO_TOKEN",
                    "--allow", f"*.{self.namespace}.svc.cluster.local:*",
                    *[arg for alias in aliases for arg in ("--allow", alias)],
                    "--session", self.session, "--lease-check", "2",
                    # The whole range: the pod serves this one token-authenticated session, and a
                    # candidate added while `velo up` runs gets its listener with no pod restart.
                    "--allow-reverse", f"{PROXY_PORTS[0]}-{PROXY_PORTS[1] - 1}",
                ]
                # Declared for the ports known at start; containerPorts are informational (a
                # numeric targetPort reaches an undeclared port too, as a live-added one does).
                container["ports"] = [{"name": "velo-tunnel", "containerPort": tunnel_port},
                                      {"name": "velo-pf", "containerPort": self.portforward_port}] + [
                    {"containerPort": p} for p in proxy_ports
                ]
                pull_secrets = self.config.cluster.image_pull_secrets
                if pull_secrets:
                    doc["spec"]["template"]["spec"]["imagePullSecrets"] = [{"name": n} for n in pull_secrets]
                probe = container.get("readinessProbe", {}).get("httpGet")
                if probe:
                    probe["port"] = tunnel_port
        lease = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": ix.lease_name(self.session), "namespace": self.namespace,
                         "labels": docs[0]["metadata"]["labels"],
                         "annotations": {ix.ANN_HOLDER: ix.holder_name()}},
            "spec": {"holderIdentity": ix.holder_name(),
                     "leaseDurationSeconds": int(self.config.cluster.lease_seconds),
                     "acquireTime": _micro_now(), "renewTime": _micro_now()},
        }
        return [lease, *docs]

    def _create_objects(self, inventory: Inventory) -> None:
        from kubernetes import utils

        conn = self.conn
        docs = self._manifests(inventory)

        def create(doc):
            doing = f"creating {doc['kind']} {doc['metadata']['name']}"
            try:  # bounded like every other call: a frozen apiserver must not hang the start
                return utils.create_from_dict(conn.api, doc, namespace=self.namespace, _request_timeout=15)[0]
            except utils.FailToCreateError as exc:
                raise explain(exc.api_exceptions[0], conn, doing) from None
            except Exception as exc:  # a timeout, a refused connection
                raise explain(exc, conn, doing) from None

        # The Deployment first, scaled to zero: everything else is created owned by it, so
        # deleting that one object (by name) removes the session whatever step failed.
        deployment_doc = next(d for d in docs if d["kind"] == "Deployment")
        deployment_doc["spec"]["replicas"] = 0
        deployment = create(deployment_doc)
        owner = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment.metadata.name,
                  "uid": deployment.metadata.uid, "blockOwnerDeletion": False}]
        for doc in docs:
            if doc is not deployment_doc:
                doc["metadata"]["ownerReferences"] = owner
                create(doc)
        call_sync(conn, f"scaling Deployment {deployment.metadata.name}", conn.apps.patch_namespaced_deployment,
                  deployment.metadata.name, self.namespace, {"spec": {"replicas": 1}})

    async def _wait_ready(self, say, deadline: float) -> None:
        timeout = self.config.cluster.ready_timeout
        loop = asyncio.get_running_loop()
        started = deadline - timeout
        selector = f"{ix.LABEL_SESSION}={self.session}"
        said = -10.0
        last_reason = "no pod yet"
        while True:
            pods = (await call(self.conn, "listing the traffic-proxy pod", self.conn.core.list_namespaced_pod,
                               self.namespace, label_selector=selector)).items
            for pod in pods:
                conditions = {c.type: c.status for c in (pod.status.conditions or [])}
                if pod.status.phase == "Running" and conditions.get("Ready") == "True" and not pod.metadata.deletion_timestamp:
                    say(f"velo: traffic-proxy {pod.metadata.name} is ready ({loop.time() - started:.1f}s)")
                    return
                last_reason = _pod_reason(pod)
            elapsed = loop.time() - started
            if elapsed > timeout:
                raise ProviderError(f"the traffic-proxy pod was not ready after {timeout:g}s ({last_reason}); "
                                    f"see `kubectl -n {self.namespace} describe pod -l {selector}`")
            if elapsed - said >= 5:
                say(f"velo: waiting for the traffic-proxy pod ({last_reason}, {elapsed:.0f}s)")
                said = elapsed
            await asyncio.sleep(0.5)

    async def keepalive(self) -> None:
        """The lease renewal started by ``start``; its failure (the lease is gone) stops velo."""
        if self._renewing is not None:
            await asyncio.shield(self._renewing)

    async def _renew(self) -> None:
        """Renew the lease every lease/3, and while the API fails sooner (with backoff), so
        that the lease is fresh again within seconds of the apiserver's return.  If the
        Lease is gone anyway (it lapsed while the tunnel was down too, or someone deleted
        it), say so and stop: the Services were or will be restored."""
        interval = max(1.0, self.config.cluster.lease_seconds / 3)
        name = ix.lease_name(self.session)
        doing = "renewing the lease"
        wait, retry = interval, 0.5
        while True:
            await asyncio.sleep(wait)
            try:
                await asyncio.to_thread(
                    self.conn.coordination.patch_namespaced_lease, name, self.namespace,
                    {"spec": {"renewTime": _micro_now()}}, _request_timeout=(5, 10))
            except ApiException as exc:
                if exc.status == 404:
                    raise ProviderError(f"this session's Lease {name} is gone (it lapsed while this laptop was "
                                        "away, or someone deleted it): the session ends and its Services are "
                                        "restored; run `velo up` again") from None
                failure = exc
            except Exception as exc:  # noqa: BLE001 - the apiserver is away: try again soon, the lease has slack
                failure = exc
            else:
                self.api_health.ok(doing)
                wait, retry = interval, 0.5
                continue
            self.api_health.failed(doing, failure)
            wait, retry = min(retry, interval), min(retry * 2, 4.0)

    async def close(self) -> None:
        self._stopping.set()
        if self._renewing is not None:
            self._renewing.cancel()
            try:
                await self._renewing
            except (asyncio.CancelledError, Exception):
                pass
            self._renewing = None
        if self._watch is not None:
            self._watch.stop()
        if self.started:
            await asyncio.to_thread(ix.clean_session, self.conn, self.session)
            self.started = False

    # ---- repair ------------------------------------------------------------------

    def _repair(self, everything: bool, user: str | None) -> list[str]:
        """Clean sessions whose lease lapsed (or, with ``everything``, all of ``user``'s)."""
        lines = []
        found, now = ix.sessions(self.conn, user)
        for session, lease in found.items():
            if session == self.session:
                continue
            if not everything and lease is not None and not ix.lease_expired(lease, now):
                continue
            restored = ix.clean_session(self.conn, session)
            lines.append(f"cleaned up session {session}" + (f" (restored {', '.join(restored)})" if restored else ""))
        return lines

    async def repair(self, everything: bool = False) -> list[str]:
        user = ix.user_label() if everything else None
        return await asyncio.to_thread(self._repair, everything, user)


def _carried(svc, local) -> set[int]:
    """The Service ports a candidate's reverse routes carry (what ``_reverses`` intercepts)."""
    ports = [p for p in svc.spec.ports or [] if (p.protocol or "TCP") == "TCP"]
    if local.ports is None:
        return {p.port for p in ports}
    return {p.port for p in ports if (p.name or str(p.port)) in local.ports or str(p.port) in local.ports}


def proxy_resources(cluster) -> dict[str, str]:
    """The traffic-proxy container's requests and limits ([cluster] proxy_cpu_request ...)."""
    return {key: str(getattr(cluster, f"proxy_{key}"))
            for key in ("cpu_request", "memory_request", "cpu_limit", "memory_limit")}


def candidate_service(name: str, services: dict, namespace: str):
    """The Service ``[local.name]`` intercepts, if velo can carry it (else the one line why)."""
    svc = services.get(name)
    if svc is None:
        close = difflib.get_close_matches(name, list(services), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ProviderError(f"[local.{name}]: no Service {name} in namespace {namespace}{hint}")
    refuse_candidate(name, svc, original_selector(svc))
    return svc


def refuse_candidate(name: str, svc, selector: dict) -> None:
    """Only what velo can carry is redirected: a selector swap moves every port of the
    Service, and needs a selector to swap.  Said before anything is created."""
    where = f"[local.{name}]: Service {name}"
    if svc.spec.type == "ExternalName":
        raise ProviderError(f"{where} is an ExternalName alias for {svc.spec.external_name}: it has no pods, "
                            "so velo cannot send its traffic to this laptop")
    if not selector:
        raise ProviderError(f"{where} has no selector (its endpoints are managed by hand), "
                            "so velo cannot send its traffic to this laptop")
    for port in svc.spec.ports or []:
        if (port.protocol or "TCP") != "TCP":
            raise ProviderError(f"{where} has a {port.protocol} port {port.name or port.port}: intercepting it would "
                                f"move that traffic too, and velo carries TCP only; put the {port.protocol} port "
                                "in a Service of its own")


PROXY_PORTS = (10000, 20000)  # [low, high): the traffic-proxy's ports for intercepted Service ports

QUIET_RETRY_EVERY = 5.0
"""Seconds between two failures of the Service watch that are retried at once and unsaid (a
reset connection); within them a failure is reported and retried with backoff, so a watch
the apiserver refuses every time (RBAC) cannot spin."""
NAMED_PORT_RECHECK = 3.0
"""Seconds between re-reads while a headless Service's named targetPort has no running pod
declaring it (its pods starting change no Service, so no Service event would say so)."""


def assign_proxy_ports(reverses: list[Reverse], kept: dict[tuple[str, int], int] | None = None) -> list[Reverse]:
    """A distinct traffic-proxy port per intercepted Service port, stable across runs (the
    Service's targetPort is pointed at it during the intercept and restored after).

    ``kept`` maps (service, service port) to a port already given out in this session: those
    keep it, whatever is added beside them; new ones probe around them."""
    import dataclasses
    import zlib

    low, high = PROXY_PORTS
    kept = {key: port for key, port in (kept or {}).items()
            if any((r.service, r.service_port) == key for r in reverses)}
    taken: set[int] = set(kept.values())
    assigned = []
    for reverse in sorted(reverses, key=lambda r: (r.service, r.service_port)):
        port = kept.get((reverse.service, reverse.service_port))
        if port is None:
            port = low + zlib.crc32(f"{reverse.service}/{reverse.service_port}".encode()) % (high - low)
            while port in taken:
                port = low + (port - low + 1) % (high - low)
            taken.add(port)
        assigned.append(dataclasses.replace(reverse, gateway_port=port))
    return assigned


def original_selector(svc) -> dict:
    """The selector the Service had before velo pointed it at a traffic-proxy."""
    annotations = svc.metadata.annotations or {}
    if ix.ANN_ORIGINAL in annotations:
        try:
            return json.loads(annotations[ix.ANN_ORIGINAL]) or {}
        except ValueError:
            pass
    return svc.spec.selector or {}


def _micro_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pod_reason(pod) -> str:
    for status in pod.status.container_statuses or []:
        waiting = status.state and status.state.waiting
        if waiting and waiting.reason:
            return waiting.reason
    return pod.status.phase or "Pending"


class KubernetesProvider(Provider):
    name = "kubernetes"
    description = "discovers Services, runs the traffic-proxy and swaps selectors (kubeconfig)"

    async def open(self, config) -> ProviderSession:
        cluster = config.cluster
        conn = await asyncio.to_thread(connect, cluster.context, cluster.namespace)
        try:
            await asyncio.to_thread(conn.core.read_namespace, conn.namespace, _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                raise ProviderError(f"namespace {conn.namespace} does not exist (context {conn.context}); "
                                    "set cluster.namespace") from None
            if exc.status != 403:  # reading namespaces is often not allowed; listing services tells
                raise explain(exc, conn, f"reading namespace {conn.namespace}") from None
        except Exception as exc:
            raise explain(exc, conn, "connecting") from None
        return KubernetesSession(config, conn)

    def rbac(self, namespace: str) -> str:
        return rbac_role(namespace)


@hookimpl
def velo_cluster_providers():
    return [KubernetesProvider()]


@hookimpl
def velo_config_tables():
    from .settings import KubernetesTable

    return {"cluster.kubernetes": KubernetesTable}
