"""The pod runner: plays the kubelet for velo traffic-proxy pods on the kwok node.

kwok only pretends to run containers. For pods labelled
``app.kubernetes.io/component=velo-traffic-proxy`` (or carrying the label key
``velo.dev/traffic-proxy``) that kwok reports Running on the kwok node, this process starts a REAL
process from the first container's ``command`` + ``args`` (the image is ignored) and stops it
when the pod is deleted. Started by the harness (``python -m tests.cluster.podrunner STATE_DIR``).

What the process gets (like a container would):
  * the container ``env`` (literal values, secretKeyRef, configMapKeyRef, fieldRef) and ``envFrom``,
    ``$(VAR)`` expansion in command/args/env, plus KUBERNETES_SERVICE_HOST/PORT of the test
    apiserver;
  * a bound ServiceAccount token (TokenRequest API, refreshed) with ca.crt and namespace in a
    per-pod folder whose path is in ``VELO_SA_DIR`` (stands in for
    /var/run/secrets/kubernetes.io/serviceaccount);
  * ``VELO_PORT_MAP`` = JSON {"<containerPort>": <port to listen on>} and ``VELO_PORT_<containerPort>``;
    a kwok ``PortForward`` (same name/namespace as the pod) sends ``pods/portforward`` for each
    containerPort to that port, so port-forwarding through the apiserver reaches the process;
  * with a network namespace (see README.md): the process runs inside it, with a private
    /etc/hosts resolving Services (name, name.ns, name.ns.svc, name.ns.svc.cluster.local) to their
    ClusterIPs, and headless Services to their ready endpoints' pod IPs (EndpointSlices); the apiserver is reached through the ``kubernetes`` Service IP (10.96.0.1:443),
    relayed by this runner.

stdout/stderr go to STATE_DIR/pods/<ns>_<pod>.log; STATE_DIR/pods/<ns>_<pod>.json describes the
process (pid, state, port map). A process that exits is NOT restarted (restartPolicy is ignored):
tests that simulate a crash kill it with ``kill_pod_process`` and delete the pod; the ReplicaSet
creates a replacement which the runner starts.
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from tests.cluster.harness import (
    Cluster, kill_and_wait, netns_add_addr, pid_alive, read_pidfile, write_pidfile,
)

COMPONENT_LABEL = ("app.kubernetes.io/component", "velo-traffic-proxy")
PROXY_LABEL_KEY = "velo.dev/traffic-proxy"
TOKEN_SECONDS = 3600
KWOK_GROUP, KWOK_VERSION = "kwok.x-k8s.io", "v1alpha1"


def is_traffic_proxy(labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return labels.get(COMPONENT_LABEL[0]) == COMPONENT_LABEL[1] or PROXY_LABEL_KEY in labels


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} podrunner: {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# API for tests (work from any process: they only read the files the runner writes)
# --------------------------------------------------------------------------------------------
def pod_key(namespace: str, name: str) -> str:
    return f"{namespace}_{name}"


def pod_process(state_dir: str | os.PathLike, namespace: str, name: str) -> dict[str, Any] | None:
    """The runner's record of a pod's process, or None. Keys: pid, state ("running", "exited",
    "stopped"), exit_code, port_map {"containerPort": port}, log, sa_dir, hosts_file, uid."""
    f = Path(state_dir) / "pods" / f"{pod_key(namespace, name)}.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def wait_pod_process(state_dir: str | os.PathLike, namespace: str, name: str, timeout: float = 60,
                     state: str = "running") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec = pod_process(state_dir, namespace, name)
        if rec and rec.get("state") == state:
            return rec
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod {namespace}/{name}: process not {state} after {timeout}s (record: {rec})")
        time.sleep(0.1)


def kill_pod_process(state_dir: str | os.PathLike, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
    """Crash simulation: signal the pod's process group. The runner does not restart it."""
    rec = read_pidfile(Path(state_dir) / "pods" / f"{pod_key(namespace, name)}.pid")
    if not rec or not pid_alive(*rec):
        raise ProcessLookupError(f"no running process for pod {namespace}/{name}")
    os.killpg(rec[0], sig)
    return rec[0]


# --------------------------------------------------------------------------------------------
# sockets inside a network namespace (setns is per thread; the socket keeps its namespace)
# --------------------------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def knobs_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "podrunner-knobs.json"


def set_start_delay(state_dir: str | os.PathLike, namespace: str, seconds: float) -> None:
    """Start the processes of ``namespace``'s traffic-proxy pods ``seconds`` after kwok reports
    them Running: a slow start (a cold image pull on a real node).  0 removes the delay."""
    path = knobs_path(state_dir)
    knobs: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        knobs = json.loads(path.read_text())
    delays = knobs.setdefault("start_delay", {})
    if seconds:
        delays[namespace] = seconds
    else:
        delays.pop(namespace, None)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(knobs))
    tmp.replace(path)


def _start_delay(state_dir: Path, namespace: str) -> float:
    with contextlib.suppress(OSError, ValueError):
        return float(json.loads(knobs_path(state_dir).read_text()).get("start_delay", {}).get(namespace, 0))
    return 0.0


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def netns_socket(netns: str | None) -> socket.socket:
    if not netns:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


class Relay:
    """Accept on `listener`, connect each client with `dial()`, pipe bytes both ways."""

    def __init__(self, listener: socket.socket, dial: Callable[[], socket.socket], name: str):
        self.listener, self.dial, self.name = listener, dial, name
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, name=f"relay {name}", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        try:
            u = self.dial()
        except OSError:
            c.close()  # target not listening: the client sees the connection closed (like a refused dial)
            return
        with self.lock:
            self.conns.update((c, u))
        done = threading.Event()

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)
            if done.is_set():
                for s in (a, b):
                    s.close()
                with self.lock:
                    self.conns.difference_update((a, b))
            done.set()
        threading.Thread(target=pipe, args=(c, u), daemon=True).start()
        pipe(u, c)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.conns.clear()


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: unknown references stay as they are, $$ escapes."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


class PodProc:
    def __init__(self, pod: Any):
        self.uid: str = pod.metadata.uid
        self.namespace: str = pod.metadata.namespace
        self.name: str = pod.metadata.name
        self.key = pod_key(self.namespace, self.name)
        self.popen: subprocess.Popen | None = None
        self.relays: list[Relay] = []
        self.port_map: dict[str, int] = {}
        self.state = "starting"
        self.exit_code: int | None = None
        self.token_at = 0.0
        self.sa_dir: Path | None = None
        self.hosts_file: Path | None = None
        self.hosts_content = ""
        self.pod = pod


def _slice_records(endpoint_slice: Any) -> tuple[str, list[tuple[str, str | None]]]:
    """(service name, [(address, hostname)]) of an EndpointSlice's ready IPv4 endpoints."""
    service = (endpoint_slice.metadata.labels or {}).get("kubernetes.io/service-name", "")
    records = []
    if endpoint_slice.address_type == "IPv4":
        for endpoint in endpoint_slice.endpoints or []:
            ready = endpoint.conditions.ready if endpoint.conditions else None
            if ready is False:  # nil means ready (EndpointSlice API)
                continue
            records += [(address, endpoint.hostname) for address in endpoint.addresses or []]
    return service, records


class PodRunner:
    def __init__(self, state_dir: str):
        from kubernetes import client, config
        self.cluster = Cluster.load(state_dir)
        self.state_dir = self.cluster.state_dir
        self.pods_dir = self.state_dir / "pods"
        self.pods_dir.mkdir(exist_ok=True)
        self.netns: str | None = self.cluster.netns
        self.node = self.cluster.node_name
        self.api_port = int(self.cluster.info["ports"]["apiserver"])
        self.api = config.new_client_from_config(config_file=self.cluster.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.client = client
        self.venv_bin = Path(sys.executable).parent
        self.ca = (self.cluster.pki / "ca.crt").read_text()
        self.lock = threading.Lock()
        self.pods: dict[str, Any] = {}             # uid -> latest V1Pod on our node
        self.services: dict[tuple[str, str], str] = {}  # (ns, name) -> ClusterIP
        self.headless: set[tuple[str, str]] = set()     # (ns, name) of Services with clusterIP None
        self.slices: dict[tuple[str, str], tuple[str, list]] = {}  # (ns, slice) -> (service, [(ip, hostname)])
        self.procs: dict[str, PodProc] = {}        # uid -> process record
        self.failed_at: dict[str, float] = {}      # uid -> last failed start (retry backoff)
        self.first_seen: dict[str, float] = {}     # uid -> when it was first wanted (start delay knob)
        self.dirty = threading.Event()
        self.stopping = threading.Event()
        self.synced = {"pods": threading.Event(), "services": threading.Event(), "endpointslices": threading.Event()}
        self.api_relay: Relay | None = None
        self.kube_host, self.kube_port = "127.0.0.1", self.api_port

    # ---- watches ----------------------------------------------------------------------------
    def _watch_loop(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        if kind == "pods":
            lister = self.core.list_pod_for_all_namespaces
            kw = {"field_selector": f"spec.nodeName={self.node}"}
        elif kind == "endpointslices":  # headless Services' records, as CoreDNS builds them
            lister = self.client.DiscoveryV1Api(self.api).list_endpoint_slice_for_all_namespaces
            kw = {}
        else:
            lister = self.core.list_service_for_all_namespaces
            kw = {}
        while not self.stopping.is_set():
            try:
                lst = lister(**kw)
                with self.lock:
                    if kind == "pods":
                        self.pods = {p.metadata.uid: p for p in lst.items}
                    elif kind == "endpointslices":
                        self.slices = {(e.metadata.namespace, e.metadata.name): _slice_records(e) for e in lst.items}
                    else:
                        self.headless = {(s.metadata.namespace, s.metadata.name) for s in lst.items
                                         if s.spec.cluster_ip == "None"}
                        self.services = {(s.metadata.namespace, s.metadata.name): s.spec.cluster_ip
                                         for s in lst.items if s.spec.cluster_ip not in (None, "", "None")}
                self.synced[kind].set()
                self.dirty.set()
                w = watch.Watch()
                for ev in w.stream(lister, resource_version=lst.metadata.resource_version,
                                   timeout_seconds=240, allow_watch_bookmarks=False, **kw):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    obj, typ = ev["object"], ev["type"]
                    with self.lock:
                        if kind == "pods":
                            if typ == "DELETED":
                                self.pods.pop(obj.metadata.uid, None)
                            else:
                                self.pods[obj.metadata.uid] = obj
                        elif kind == "endpointslices":
                            k = (obj.metadata.namespace, obj.metadata.name)
                            if typ == "DELETED":
                                self.slices.pop(k, None)
                            else:
                                self.slices[k] = _slice_records(obj)
                        else:
                            k = (obj.metadata.namespace, obj.metadata.name)
                            if typ != "DELETED" and obj.spec.cluster_ip == "None":
                                self.headless.add(k)
                            else:
                                self.headless.discard(k)
                            if typ == "DELETED" or obj.spec.cluster_ip in (None, "", "None"):
                                self.services.pop(k, None)
                            else:
                                self.services[k] = obj.spec.cluster_ip
                    self.dirty.set()
            except ApiException as e:
                if e.status != 410:
                    _log(f"{kind} watch: {e.status} {e.reason}; relisting")
                    self.stopping.wait(1)
            except Exception as e:  # noqa: BLE001 - connection drops: relist
                if not self.stopping.is_set():
                    _log(f"{kind} watch error: {e!r}; relisting")
                    self.stopping.wait(1)

    # ---- reconcile --------------------------------------------------------------------------
    def _wanted(self, pod: Any) -> bool:
        return (is_traffic_proxy(pod.metadata.labels) and pod.spec.node_name == self.node
                and pod.metadata.deletion_timestamp is None and pod.status is not None
                and pod.status.phase == "Running" and bool(pod.status.pod_ip))

    def _reconcile_loop(self) -> None:
        while not self.stopping.is_set():
            self.dirty.wait(1.0)
            self.dirty.clear()
            if self.stopping.is_set():
                return
            try:
                self._reconcile()
            except Exception:  # noqa: BLE001
                _log("reconcile failed:\n" + traceback.format_exc())

    def _reconcile(self) -> None:
        with self.lock:
            pods = dict(self.pods)
            services = dict(self.services)
        # pods gone or terminating -> stop
        for uid, rec in list(self.procs.items()):
            pod = pods.get(uid)
            if pod is None or pod.metadata.deletion_timestamp is not None:
                del self.procs[uid]
                threading.Thread(target=self._stop_proc, args=(rec, pod), daemon=True).start()
        for uid in [u for u in self.first_seen if u not in pods]:
            del self.first_seen[uid]
        # new Running traffic-proxy pods -> start
        now = time.monotonic()
        for uid, pod in pods.items():
            if uid in self.procs or not self._wanted(pod):
                continue
            if now - self.failed_at.get(uid, -1e9) < 2:
                continue
            seen = self.first_seen.setdefault(uid, now)
            if now - seen < _start_delay(self.state_dir, pod.metadata.namespace):
                continue
            rec = PodProc(pod)
            try:
                self._start_proc(rec, services)
                self.procs[uid] = rec
                self.failed_at.pop(uid, None)
            except Exception:  # noqa: BLE001
                self.failed_at[uid] = now
                _log(f"starting {rec.key} failed (retrying):\n{traceback.format_exc()}")
                self._cleanup(rec)
        # exited processes (not restarted), hosts files, token refresh
        for rec in self.procs.values():
            if rec.state == "running" and rec.popen is not None and rec.popen.poll() is not None:
                rec.state, rec.exit_code = "exited", rec.popen.returncode
                _log(f"{rec.key}: process {rec.popen.pid} exited with {rec.exit_code} (not restarted)")
                (self.pods_dir / f"{rec.key}.pid").unlink(missing_ok=True)
                self._write_record(rec)
            if rec.hosts_file is not None:
                self._write_hosts(rec, services)
            if rec.sa_dir is not None and time.time() - rec.token_at > 0.8 * TOKEN_SECONDS:
                with contextlib.suppress(Exception):
                    self._write_token(rec)

    # ---- starting a pod's process -----------------------------------------------------------
    def _resolve_env(self, pod: Any, container: Any) -> dict[str, str]:
        ns = pod.metadata.namespace
        env: dict[str, str] = {}

        def secret(name: str) -> dict[str, str]:
            s = self.core.read_namespaced_secret(name, ns)
            return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()} | dict(s.string_data or {})

        def configmap(name: str) -> dict[str, str]:
            return dict(self.core.read_namespaced_config_map(name, ns).data or {})

        def optional_get(fn: Callable[[str], dict[str, str]], name: str, key: str | None, optional: bool) -> Any:
            from kubernetes.client.exceptions import ApiException
            try:
                d = fn(name)
            except ApiException as e:
                if e.status == 404 and optional:
                    return None
                raise
            if key is None:
                return d
            if key not in d:
                if optional:
                    return None
                raise KeyError(f"key {key!r} not in {name}")
            return d[key]

        for ef in container.env_from or []:
            prefix = ef.prefix or ""
            if ef.config_map_ref is not None:
                d = optional_get(configmap, ef.config_map_ref.name, None, bool(ef.config_map_ref.optional))
            elif ef.secret_ref is not None:
                d = optional_get(secret, ef.secret_ref.name, None, bool(ef.secret_ref.optional))
            else:
                d = None
            for k, v in (d or {}).items():
                env[prefix + k] = v

        def field(path: str) -> str:
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return (getattr(pod.metadata, m.group(1)) or {}).get(m.group(2), "")
            return {
                "metadata.name": pod.metadata.name, "metadata.namespace": ns, "metadata.uid": pod.metadata.uid,
                "spec.nodeName": pod.spec.node_name, "spec.serviceAccountName": pod.spec.service_account_name,
                "status.podIP": pod.status.pod_ip, "status.hostIP": pod.status.host_ip,
            }.get(path) or ""

        for e in container.env or []:
            if e.value_from is None:
                env[e.name] = expand(e.value or "", env)
                continue
            vf = e.value_from
            v: Any = None
            if vf.secret_key_ref is not None:
                r = vf.secret_key_ref
                v = optional_get(secret, r.name, r.key, bool(r.optional))
            elif vf.config_map_key_ref is not None:
                r = vf.config_map_key_ref
                v = optional_get(configmap, r.name, r.key, bool(r.optional))
            elif vf.field_ref is not None:
                v = field(vf.field_ref.field_path)
            elif vf.resource_field_ref is not None:
                v = "0"
            if v is not None:
                env[e.name] = v
        return env

    def _write_token(self, rec: PodProc) -> None:
        c = self.client
        pod = rec.pod
        sa = pod.spec.service_account_name or "default"
        tr = self.core.create_namespaced_service_account_token(sa, rec.namespace, c.AuthenticationV1TokenRequest(
            spec=c.V1TokenRequestSpec(
                audiences=["https://kubernetes.default.svc.cluster.local"], expiration_seconds=TOKEN_SECONDS,
                bound_object_ref=c.V1BoundObjectReference(api_version="v1", kind="Pod", name=rec.name, uid=rec.uid))))
        assert rec.sa_dir is not None
        for fname, content in (("token", tr.status.token), ("ca.crt", self.ca), ("namespace", rec.namespace)):
            tmp = rec.sa_dir / f".{fname}.tmp"
            tmp.write_text(content)
            tmp.replace(rec.sa_dir / fname)
        rec.token_at = time.time()

    def _hosts_content(self, rec: PodProc, services: dict[tuple[str, str], str]) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{rec.pod.status.pod_ip}\t{rec.name}"]
        for (ns, name), ip in sorted(services.items()):
            names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == rec.namespace:
                names.append(name)  # a bare name resolves in the pod's own namespace (search path)
            lines.append(f"{ip}\t{' '.join(names)}")
        # Headless Services: the name resolves to each ready endpoint's pod IP (one line per
        # address), and a StatefulSet pod's hostname to its own (pod.svc.ns.svc.cluster.local).
        with self.lock:
            headless, slices = set(self.headless), dict(self.slices)
        for (ns, _slice), (name, records) in sorted(slices.items()):
            if (ns, name) not in headless:
                continue
            names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == rec.namespace:
                names.append(name)
            for ip, hostname in records:
                lines.append(f"{ip}\t{' '.join(names)}")
                if hostname:
                    lines.append(f"{ip}\t{hostname}.{name}.{ns}.svc.cluster.local {hostname}.{name}.{ns}.svc")
        return "# written by tests/cluster/podrunner.py (stands in for cluster DNS)\n" + "\n".join(lines) + "\n"

    def _write_hosts(self, rec: PodProc, services: dict[tuple[str, str], str]) -> None:
        content = self._hosts_content(rec, services)
        if content != rec.hosts_content and rec.hosts_file is not None:
            with open(rec.hosts_file, "w") as f:  # in place: the file is bind-mounted (same inode)
                f.write(content)
            rec.hosts_content = content

    def _resolve_cmd(self, word: str) -> str:
        if "/" in word:
            return word
        cand = self.venv_bin / word  # `velo`, `python3`: the project's venv first
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
        return shutil.which(word) or word

    def _alloc_port(self) -> tuple[int, socket.socket | None]:
        """A port free on the host (and, with a netns, inside it too). Returns (port, host
        listener for the relay, or None without a netns)."""
        for _ in range(50):
            host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            host.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            host.bind(("127.0.0.1", 0))
            port = host.getsockname()[1]
            if not self.netns:
                host.close()
                return port, None
            probe = netns_socket(self.netns)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                host.close()
                continue
            finally:
                probe.close()
            host.listen(64)
            return port, host
        raise RuntimeError("no free port")

    def _start_proc(self, rec: PodProc, services: dict[tuple[str, str], str]) -> None:
        pod = rec.pod
        container = pod.spec.containers[0]
        argv = list(container.command or []) + list(container.args or [])
        if not container.command:
            raise ValueError(f"{rec.key}: container {container.name!r} has no `command` (the image is ignored)")
        pod_dir = self.pods_dir / rec.key
        pod_dir.mkdir(parents=True, exist_ok=True)

        # ports: containerPort -> local port (+ relay from the host into the netns)
        netns = self.netns
        for cp in container.ports or []:
            if (cp.protocol or "TCP") != "TCP":
                continue
            port, listener = self._alloc_port()
            rec.port_map[str(cp.container_port)] = port
            if listener is not None:
                def dial(port: int = port) -> socket.socket:
                    s = netns_socket(netns)
                    try:
                        s.connect(("127.0.0.1", port))
                    except OSError:
                        s.close()
                        raise
                    return s
                rec.relays.append(Relay(listener, dial, f"{rec.key}:{cp.container_port}->{port}"))

        # environment
        env = {
            "PATH": f"{self.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"), "HOSTNAME": rec.name, "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": self.kube_host, "KUBERNETES_SERVICE_PORT": str(self.kube_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.kube_port),
            "KUBERNETES_PORT": f"tcp://{self.kube_host}:{self.kube_port}",
        }
        env.update({k: v for k, v in os.environ.items() if k.startswith(("COVERAGE_", "VELO_TEST_"))})
        for cp, port in rec.port_map.items():
            env[f"VELO_PORT_{cp}"] = str(port)
        env["VELO_PORT_MAP"] = json.dumps(rec.port_map)
        if pod.spec.automount_service_account_token is not False:
            rec.sa_dir = pod_dir / "serviceaccount"
            rec.sa_dir.mkdir(exist_ok=True)
            self._write_token(rec)
            env["VELO_SA_DIR"] = str(rec.sa_dir)
        env.update(self._resolve_env(pod, container))
        # runner-owned values win over the container's env
        env["VELO_PORT_MAP"] = json.dumps(rec.port_map)
        if rec.sa_dir is not None:
            env["VELO_SA_DIR"] = str(rec.sa_dir)
        argv = [expand(a, env) for a in argv]
        argv[0] = self._resolve_cmd(argv[0])
        if self.netns:
            rec.hosts_file = pod_dir / "hosts"
            self._write_hosts(rec, services)
            # `ip netns exec` enters the netns (and a new mount namespace); unshare makes extra
            # sure our bind mount of the pod's hosts file never propagates to the host.
            argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                    "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(rec.hosts_file), *argv]
        cwd = container.working_dir if container.working_dir and os.path.isdir(container.working_dir) else str(pod_dir)

        # the PortForward first, so port-forwarding works as soon as the process listens
        if rec.port_map:
            self._put_portforward(rec)
        logf = open(self.pods_dir / f"{rec.key}.log", "ab")
        try:
            logf.write(f"--- podrunner: starting {argv!r} (port map {rec.port_map})\n".encode())
            logf.flush()
            rec.popen = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd, start_new_session=True)
        finally:
            logf.close()
        rec.state = "running"
        write_pidfile(self.pods_dir / f"{rec.key}.pid", rec.popen.pid)
        self._write_record(rec, argv=argv)
        short = [a if len(a) <= 80 else a[:77].replace("\n", " ") + "..." for a in argv]
        _log(f"{rec.key}: started pid {rec.popen.pid}: {short} ports {rec.port_map}")

    def _put_portforward(self, rec: PodProc) -> None:
        from kubernetes.client.exceptions import ApiException
        body = {
            "apiVersion": f"{KWOK_GROUP}/{KWOK_VERSION}", "kind": "PortForward",
            "metadata": {"name": rec.name, "namespace": rec.namespace,
                         "labels": {"velo.dev/podrunner": "true"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": rec.name,
                                              "uid": rec.uid}]},
            "spec": {"forwards": [{"ports": [int(cp)], "target": {"address": "127.0.0.1", "port": port}}
                                  for cp, port in rec.port_map.items()]},
        }
        for _ in range(2):
            try:
                self.custom.create_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, rec.namespace,
                                                            "portforwards", body)
                return
            except ApiException as e:
                if e.status != 409:
                    raise
                self._delete_portforward(rec)
        raise RuntimeError(f"could not create PortForward {rec.key}")

    def _delete_portforward(self, rec: PodProc) -> None:
        from kubernetes.client.exceptions import ApiException
        try:
            self.custom.delete_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, rec.namespace, "portforwards",
                                                        rec.name, _request_timeout=5)
        except ApiException as e:
            if e.status != 404:
                _log(f"{rec.key}: deleting PortForward: {e.status} {e.reason}")
        except Exception as e:  # noqa: BLE001
            _log(f"{rec.key}: deleting PortForward: {e!r}")

    def _write_record(self, rec: PodProc, **extra: Any) -> None:
        path = self.pods_dir / f"{rec.key}.json"
        old: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text())
            if old.get("uid") != rec.uid:
                old = {}
        old.update({
            "namespace": rec.namespace, "name": rec.name, "uid": rec.uid, "state": rec.state,
            "pid": rec.popen.pid if rec.popen else None, "exit_code": rec.exit_code, "port_map": rec.port_map,
            "log": str(self.pods_dir / f"{rec.key}.log"), "sa_dir": str(rec.sa_dir) if rec.sa_dir else None,
            "hosts_file": str(rec.hosts_file) if rec.hosts_file else None, "netns": self.netns, **extra})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(old, indent=1) + "\n")
        tmp.replace(path)

    # ---- stopping ---------------------------------------------------------------------------
    def _cleanup(self, rec: PodProc) -> None:
        for r in rec.relays:
            r.close()
        rec.relays.clear()

    def _stop_proc(self, rec: PodProc, pod: Any = None, delete_portforward: bool = True) -> None:
        grace = 10.0
        if pod is not None and pod.spec.termination_grace_period_seconds is not None:
            grace = min(grace, float(pod.spec.termination_grace_period_seconds))
        if rec.popen is not None:
            kill_and_wait(rec.popen.pid, None, grace=grace, popen=rec.popen)
            if rec.state == "running":
                rec.exit_code = rec.popen.returncode
            _log(f"{rec.key}: stopped pid {rec.popen.pid} (exit {rec.popen.returncode})")
        rec.state = "stopped"
        self._cleanup(rec)
        pidfile = self.pods_dir / f"{rec.key}.pid"
        cur = read_pidfile(pidfile)
        if cur and rec.popen is not None and cur[0] == rec.popen.pid:
            pidfile.unlink(missing_ok=True)
        if delete_portforward and rec.port_map:
            self._delete_portforward(rec)
        self._write_record(rec)

    # ---- main -------------------------------------------------------------------------------
    def _setup_api_relay(self) -> None:
        """Inside the netns, the apiserver is at the `kubernetes` Service's ClusterIP:443."""
        if not self.netns:
            return
        svc = self.core.read_namespaced_service("kubernetes", "default")
        ip = svc.spec.cluster_ip or "10.96.0.1"
        netns_add_addr(self.netns, ip)
        lst = netns_socket(self.netns)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((ip, 443))
        lst.listen(128)
        api_port = self.api_port

        def dial() -> socket.socket:
            return socket.create_connection(("127.0.0.1", api_port), timeout=10)
        self.api_relay = Relay(lst, dial, f"apiserver {ip}:443 -> 127.0.0.1:{api_port}")
        self.kube_host, self.kube_port = ip, 443

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        self._setup_api_relay()
        for kind in ("pods", "services", "endpointslices"):
            threading.Thread(target=self._watch_loop, args=(kind,), name=f"watch {kind}", daemon=True).start()
        for ev in self.synced.values():
            while not ev.wait(0.5):
                if self.stopping.is_set():
                    return 0
        rt = threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True)
        rt.start()
        (self.state_dir / "podrunner.ready").write_text(str(os.getpid()))
        _log(f"ready: node {self.node}, netns {self.netns or '(none)'}, apiserver for pods at "
             f"{self.kube_host}:{self.kube_port}")
        while not self.stopping.wait(1):
            pass
        _log("stopping: killing pod processes")
        rt.join(timeout=10)
        threads = [threading.Thread(target=self._stop_proc, args=(rec, None, False)) for rec in self.procs.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        if self.api_relay:
            self.api_relay.close()
        (self.state_dir / "podrunner.ready").unlink(missing_ok=True)
        _log("stopped")
        return 0


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m tests.cluster.podrunner STATE_DIR", file=sys.stderr)
        return 2
    return PodRunner(sys.argv[1]).run()


if __name__ == "__main__":
    sys.exit(main())
