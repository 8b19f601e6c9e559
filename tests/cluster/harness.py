"""Local Kubernetes control plane for velo's cluster tests.

    python -m tests.cluster.harness start  STATE_DIR   # build (if needed) + start, prints KUBECONFIG
    python -m tests.cluster.harness status STATE_DIR   # JSON: components alive, apiserver ready
    python -m tests.cluster.harness stop   STATE_DIR   # kill everything, remove the netns

Components (all on 127.0.0.1, random free ports): etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok (fake node + kubelet port-forward endpoint), the pod runner
(tests/cluster/podrunner.py, plays the kubelet for velo traffic-proxy pods) and, when the machine
allows it, a network namespace that stands in for the cluster network (see README.md).

Layout of STATE_DIR:
    cluster.json        ports, paths, netns name (read by the pod runner and by `stop`)
    kubeconfig          admin client certificate (system:masters), self-contained
    pki/                CA, apiserver serving cert, admin cert, service-account key pair, tokens.csv
    logs/<component>.log, logs/audit.log (the apiserver's audit log: see AUDIT_POLICY)
    pids/<component>.pid    "PID STARTTIME" (starttime from /proc/PID/stat guards against pid reuse)
    pods/<ns>_<pod>.{log,pid,json} and pods/<ns>_<pod>/   (written by the pod runner)
    net/                in-cluster test services (pids, readiness files)

Only the standard library is needed to start and stop; the `kubernetes` client is imported lazily
for the convenience API clients.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
NODE_NAME = "kwok-node-0"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
# stop order: the watchdog first (so it does not race us), the runner before kwok (it deletes
# PortForwards), the control plane last, etcd at the very end
STOP_ORDER = ("watchdog", "podrunner", "kwok", "kube-scheduler", "kube-controller-manager",
              "kube-apiserver", "etcd")


class ClusterError(RuntimeError):
    pass


class ComponentFailed(ClusterError):
    """A component died or did not become ready (the message carries its log tail)."""


def log(msg: str) -> None:
    print(f"velo-cluster: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# binaries
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("VELO_K8S_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "velo", "k8s")
    return Path(base) / K8S_VERSION


def binaries_ready(bin_dir: Path | None = None) -> bool:
    d = bin_dir or cache_dir()
    return (d / ".velo-complete").is_file() and all(os.access(d / b, os.X_OK) for b in BINARIES)


def can_build() -> bool:
    return shutil.which("go") is not None


def ensure_binaries(stream=None) -> Path:
    """Run build.sh (a no-op when the version-keyed cache is complete); return the bin dir."""
    d = cache_dir()
    if binaries_ready(d):
        return d
    if not can_build():
        raise ClusterError(f"Kubernetes binaries missing in {d} and `go` (>= 1.26) is not on PATH")
    log(f"building Kubernetes binaries into {d} (cold build takes ~25 min)...")
    proc = subprocess.run(["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE,
                          stderr=stream if stream is not None else None, text=True)
    if proc.returncode != 0 or not binaries_ready(d):
        raise ClusterError(f"tests/cluster/build.sh failed (exit {proc.returncode})")
    return d


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (all held open until every one is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
             check: Callable[[], None] | None = None) -> Any:
    """Poll cond() until truthy or the deadline passes; check() may raise to abort early."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the condition is "not yet"
            last_exc = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # field 22 overall: starttime


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def pid_alive(pid: int, starttime: str | None = None) -> bool:
    st = proc_state(pid)
    if st is None or st in ("Z", "X"):
        return False
    return starttime is None or proc_starttime(pid) == starttime


def write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid} {proc_starttime(pid) or ''}\n")
    tmp.replace(path)


def read_pidfile(path: Path) -> tuple[int, str | None] | None:
    try:
        parts = path.read_text().split()
    except OSError:
        return None
    if not parts:
        return None
    return int(parts[0]), (parts[1] if len(parts) > 1 else None)


def kill_and_wait(pid: int, starttime: str | None, grace: float = 10.0, group: bool = True,
                  popen: subprocess.Popen | None = None) -> None:
    """SIGTERM the process (group), wait up to `grace`, then SIGKILL; wait until it is gone."""
    if not pid_alive(pid, starttime):
        if popen is not None:
            popen.poll()
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                try:
                    os.killpg(pid, sig)
                    return
                except ProcessLookupError:
                    pass
            os.kill(pid, sig)

    def gone() -> bool:
        if popen is not None:
            popen.poll()
        return not pid_alive(pid, starttime)

    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if gone():
            break
        time.sleep(0.05)
    else:
        send(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not gone():
            time.sleep(0.05)
    if group:  # stragglers left in the group (children that ignored SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --------------------------------------------------------------------------------------------
# PKI (openssl)
# --------------------------------------------------------------------------------------------
def make_pki(pki: Path, admin_token: str) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    ossl = shutil.which("openssl")
    if not ossl:
        raise ClusterError("openssl not found (apt-get install openssl)")

    def o(*args: str) -> None:
        run([ossl, *args], cwd=pki)

    o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
      "-days", "3650", "-subj", "/CN=velo-test-ca",
      "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
      "-addext", "basicConstraints=critical,CA:TRUE")

    def leaf(name: str, subj: str, ext: list[str]) -> None:
        o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
        (pki / f"{name}.ext").write_text("\n".join([
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",  # strict verifiers (Python 3.13) want an AKI
            *ext]) + "\n")
        o("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
          "-days", "3650", "-extfile", f"{name}.ext", "-out", f"{name}.crt")

    leaf("apiserver", "/CN=kube-apiserver", [
        "extendedKeyUsage=serverAuth",
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"])
    leaf("admin", "/O=system:masters/CN=kube-admin", ["extendedKeyUsage=clientAuth"])
    o("genrsa", "-out", "sa.key", "2048")
    o("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    # token,user,uid,"group1,group2"
    (pki / "tokens.csv").write_text(f'{admin_token},kube-admin,kube-admin,"system:masters"\n')
    for p in pki.iterdir():
        if p.suffix == ".key":
            p.chmod(0o600)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    b64 = lambda p: base64.b64encode((pki / p).read_bytes()).decode()  # noqa: E731
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "velo-test", "cluster": {"server": server,
                                                       "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": "kube-admin", "user": {"client-certificate-data": b64("admin.crt"),
                                                  "client-key-data": b64("admin.key")}}],
        "contexts": [{"name": "velo-test", "context": {"cluster": "velo-test", "user": "kube-admin"}}],
        "current-context": "velo-test",
    }, indent=1) + "\n")
    path.chmod(0o600)


# --------------------------------------------------------------------------------------------
# network namespace (the cluster network stand-in)
# --------------------------------------------------------------------------------------------
# The apiserver's audit log: every request of the tests' own users and ServiceAccounts, at
# level Metadata (who, verb, resource, response code; no bodies).  The control plane's and the
# admin's calls are left out, so it stays small.  Written before each response ("blocking"),
# so a test reads it right after the calls it checks.  Read it with ``audit_events``.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  userGroups: ["system:masters", "system:nodes", "system:serviceaccounts:kube-system"]
- level: None
  users: ["system:kube-controller-manager", "system:kube-scheduler", "system:apiserver", "system:kube-proxy"]
- level: Metadata
"""


def audit_log_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "logs" / "audit.log"


def audit_args(state_dir: str | os.PathLike) -> list[str]:
    policy = Path(state_dir) / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    return [f"--audit-policy-file={policy}", f"--audit-log-path={audit_log_path(state_dir)}",
            "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=0"]


def audit_events(state_dir: str | os.PathLike, user: str | None = None) -> list[dict[str, Any]]:
    """The audit events (ResponseComplete/ResponseStarted) so far, of ``user`` if given."""
    events = []
    try:
        lines = audit_log_path(state_dir).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:  # a line being written
            continue
        if user is None or event.get("user", {}).get("username") == user:
            events.append(event)
    return events


def netns_supported() -> tuple[bool, str]:
    if os.environ.get("VELO_CLUSTER_NETNS", "1") == "0":
        return False, "disabled by VELO_CLUSTER_NETNS=0"
    if os.geteuid() != 0:
        return False, "needs root (ip netns add)"
    for tool in ("ip", "unshare", "mount"):
        if not shutil.which(tool):
            return False, f"`{tool}` not found (apt-get install iproute2 util-linux mount)"
    return True, ""


def netns_create(name: str) -> None:
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
    except Exception:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        raise


def netns_add_addr(name: str, ip: str) -> None:
    r = subprocess.run(["ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "lo"], capture_output=True, text=True)
    if r.returncode != 0 and "File exists" not in r.stderr:
        raise ClusterError(f"ip -n {name} addr add {ip}: {r.stderr.strip()}")


def netns_exists(name: str) -> bool:
    return Path("/var/run/netns", name).exists() or Path("/run/netns", name).exists()


def netns_destroy(name: str) -> None:
    """Kill every process still inside the namespace, then delete it."""
    if not netns_exists(name):
        return
    for _ in range(3):
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        pids = [int(p) for p in r.stdout.split() if p.strip().isdigit()]
        if not pids:
            break
        for pid in pids:
            kill_and_wait(pid, proc_starttime(pid), grace=3, group=False)
    r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if r.returncode != 0 and netns_exists(name):
        log(f"warning: ip netns del {name}: {r.stderr.strip()}")


# --------------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------------
class Cluster:
    """One local control plane. Create with Cluster(state_dir), then start(); or Cluster.load()."""

    def __init__(self, state_dir: str | os.PathLike, bin_dir: str | os.PathLike | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.bin_dir = Path(bin_dir).resolve() if bin_dir else cache_dir()
        self.logs = self.state_dir / "logs"
        self.pids = self.state_dir / "pids"
        self.pki = self.state_dir / "pki"
        self.kubeconfig = str(self.state_dir / "kubeconfig")
        self.info_path = self.state_dir / "cluster.json"
        self.info: dict[str, Any] = {}
        self._popen: dict[str, subprocess.Popen] = {}
        self._api_client = None
        if self.info_path.exists():
            self.info = json.loads(self.info_path.read_text())
            self.bin_dir = Path(self.info.get("bin_dir", self.bin_dir))

    # ---- convenience ------------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> "Cluster":
        c = cls(state_dir)
        if not c.info:
            raise ClusterError(f"no cluster.json in {state_dir}")
        return c

    @property
    def server(self) -> str:
        return self.info["server"]

    @property
    def netns(self) -> str | None:
        return self.info.get("netns")

    @property
    def node_name(self) -> str:
        return self.info.get("node_name", NODE_NAME)

    @property
    def kubectl_path(self) -> str:
        return str(self.bin_dir / "kubectl")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args], check=check,
                              capture_output=True, text=True, timeout=timeout, **kw)

    @property
    def api_client(self):
        if self._api_client is None:
            from kubernetes import config
            self._api_client = config.new_client_from_config(config_file=self.kubeconfig)
        return self._api_client

    @property
    def core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api_client)

    @property
    def apps(self):
        from kubernetes import client
        return client.AppsV1Api(self.api_client)

    @property
    def rbac(self):
        from kubernetes import client
        return client.RbacAuthorizationV1Api(self.api_client)

    @property
    def discovery(self):
        from kubernetes import client
        return client.DiscoveryV1Api(self.api_client)

    @property
    def custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self.api_client)

    # ---- raw REST (stdlib only) -------------------------------------------------------------
    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 10,
             content_type: str = "application/json") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self._ssl(), timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    # ---- processes --------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        # recorded so that start_component() can bring it back exactly as it was (only the
        # variables that differ from ours: the state dir need not hold a copy of the environment)
        delta = None if env is None else {k: v for k, v in env.items() if os.environ.get(k) != v}
        (self.pids / f"{name}.cmd.json").write_text(json.dumps({"argv": argv, "env": delta, "cwd": cwd}))
        logf = open(self.logs / f"{name}.log", "ab")
        try:
            p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=env, cwd=cwd)
        finally:
            logf.close()
        self._popen[name] = p
        write_pidfile(self.pids / f"{name}.pid", p.pid)

    def _alive(self, name: str) -> bool:
        p = self._popen.get(name)
        if p is not None:
            return p.poll() is None
        rec = read_pidfile(self.pids / f"{name}.pid")
        return bool(rec) and pid_alive(*rec)

    def _fail(self, name: str, why: str) -> ComponentFailed:
        msg = f"{name}: {why}\n--- last lines of {self.logs / (name + '.log')} ---\n{tail(self.logs / f'{name}.log')}"
        log(msg)
        return ComponentFailed(msg)

    def _checker(self, *names: str) -> Callable[[], None]:
        def check() -> None:
            for n in names:
                if not self._alive(n):
                    raise self._fail(n, "exited during startup")
        return check

    def _wait(self, name: str, cond: Callable[[], Any], timeout: float, what: str, deps: Iterable[str] = ()) -> Any:
        try:
            return wait_for(cond, timeout, what, check=self._checker(name, *deps))
        except ComponentFailed:
            raise
        except ClusterError as e:
            raise self._fail(name, str(e)) from None

    def _https_ok(self, url: str, client_cert: bool = True) -> bool:
        ctx = self._ssl() if client_cert else ssl._create_unverified_context()  # noqa: S323 (kcm/scheduler self-signed)
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001
            return False

    # ---- start ------------------------------------------------------------------------------
    def start(self, timeout: float = 180, owner_pid: int | None = None, netns: bool | None = None,
              apiserver_args: Iterable[str] = (), fake_node: bool = True) -> "Cluster":
        """Start every component and wait for real readiness. On failure everything is stopped.

        owner_pid: if set, a detached watchdog stops the cluster when that process disappears
        (e.g. pytest killed with SIGKILL). netns: None = use a network namespace when possible.
        apiserver_args: extra kube-apiserver flags. fake_node=False: no kwok node and no pod runner
        (tests/cluster/node.py adds a real kubelet to such a cluster).
        """
        self._apiserver_args, self._fake_node = list(apiserver_args), fake_node
        if not binaries_ready(self.bin_dir):
            raise ClusterError(f"binaries missing in {self.bin_dir}; run tests/cluster/build.sh")
        if self.info_path.exists() and any(self._alive(n) for n in STOP_ORDER):
            raise ClusterError(f"a cluster is already running in {self.state_dir}")
        for d in (self.logs, self.pids, self.state_dir / "pods", self.state_dir / "net"):
            d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self._start(timeout, owner_pid, netns)
        except BaseException:
            self.stop(quiet=True)
            raise
        log(f"cluster ready in {time.monotonic() - t0:.1f}s: KUBECONFIG={self.kubeconfig}")
        return self

    def _start(self, timeout: float, owner_pid: int | None, want_netns: bool | None) -> None:
        b = self.bin_dir
        etcd_port, etcd_peer, api_port, kcm_port, sched_port, kwok_port = free_ports(6)
        admin_token = secrets.token_hex(16)
        server = f"https://127.0.0.1:{api_port}"
        self.info = {
            "state_dir": str(self.state_dir), "bin_dir": str(b), "k8s_version": K8S_VERSION,
            "server": server, "kubeconfig": self.kubeconfig, "node_name": NODE_NAME,
            "ports": {"etcd": etcd_port, "etcd_peer": etcd_peer, "apiserver": api_port,
                      "kube-controller-manager": kcm_port, "kube-scheduler": sched_port, "kwok": kwok_port},
            "admin_token": admin_token, "netns": None, "netns_unavailable_reason": None,
            "python": sys.executable,
        }
        ok, why = netns_supported()
        if want_netns is False:
            ok, why = False, "disabled by caller"
        if ok:
            name = "velo-" + secrets.token_hex(4)
            try:
                netns_create(name)
                self.info["netns"] = name
            except Exception as e:  # noqa: BLE001
                why = f"ip netns add failed: {getattr(e, 'stderr', '') or e}"
                if want_netns:
                    raise ClusterError(why) from e
        if not self.info["netns"]:
            self.info["netns_unavailable_reason"] = why
            log(f"no network namespace ({why}); in-cluster network isolation tests will be skipped")
        self._save_info()

        make_pki(self.pki, admin_token)
        write_kubeconfig(Path(self.kubeconfig), server, self.pki)
        p = self.pki

        # 1. etcd, always from an empty data dir: objects left by an earlier run in the same
        # folder (a Node advertising that run's kwok port, say) would break this one.
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
        self._spawn("etcd", [
            str(b / "etcd"), "--name=node0", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=node0=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync=true", "--auto-compaction-retention=1", "--quota-backend-bytes=8589934592",
            "--log-level=warn"])

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=3) as r:
                return json.loads(r.read()).get("health") == "true"
        self._wait("etcd", etcd_healthy, 60, "etcd /health")

        # 2. kube-apiserver
        self._spawn("kube-apiserver", [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}", f"--token-auth-file={p / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            # kwok's node has a Hostname address that does not resolve: reach its "kubelet" by IP
            "--kubelet-preferred-address-types=InternalIP",
            *audit_args(self.state_dir),
            *getattr(self, "_apiserver_args", ()),
        ])
        self._wait("kube-apiserver", lambda: self._https_ok(f"{server}/readyz"), timeout,
                   "kube-apiserver /readyz", deps=["etcd"])

        # 3. kwok's PortForward CRDs (kwok does not install them itself)
        self._install_crds()

        # 4. controller manager, scheduler, kwok
        self._spawn("kube-controller-manager", [
            str(b / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            "--use-service-account-credentials=false", "--node-monitor-grace-period=3m20s"])
        self._spawn("kube-scheduler", [
            str(b / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"])
        if not getattr(self, "_fake_node", True):
            self._wait_control_plane(timeout, kcm_port, sched_port)
            self._start_watchdog(owner_pid)
            return
        kwok_home = self.state_dir / "kwok-home"  # keep ~/.kwok/kwok.yaml out of the picture
        kwok_home.mkdir(exist_ok=True)
        self._spawn("kwok", [
            str(b / "kwok"), f"--kubeconfig={self.kubeconfig}", f"--config={b / 'kwok-stages.yaml'}",
            "--manage-all-nodes=true", "--node-ip=127.0.0.1", f"--node-name={NODE_NAME}",
            f"--node-port={kwok_port}", f"--server-address=127.0.0.1:{kwok_port}",
            f"--cidr={POD_CIDR}", "--node-lease-duration-seconds=200",
            "--enable-crds=PortForward,ClusterPortForward"], env={**os.environ, "HOME": str(kwok_home)})

        # 5. the kwok node (no status: kwok's node-initialize stage fills addresses, kubelet port, Ready)
        st, body = self.rest("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME,
                         "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                         "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64", "type": "kwok"}}})
        if st not in (201, 409):
            raise ClusterError(f"creating node {NODE_NAME}: HTTP {st}: {body}")

        # 6. real readiness
        self._wait_control_plane(timeout, kcm_port, sched_port)

        def node_ready() -> bool:
            st, n = self.rest("GET", f"/api/v1/nodes/{NODE_NAME}")
            return st == 200 and any(c.get("type") == "Ready" and c.get("status") == "True"
                                     for c in (n.get("status") or {}).get("conditions") or [])
        self._wait("kwok", node_ready, timeout, f"node {NODE_NAME} Ready (set by kwok)")

        # 7. the pod runner (plays the kubelet for traffic-proxy pods; relays into the netns)
        ready_file = self.state_dir / "podrunner.ready"
        ready_file.unlink(missing_ok=True)
        self._spawn("podrunner", [sys.executable, "-m", "tests.cluster.podrunner", str(self.state_dir)],
                    cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"})
        self._wait("podrunner", ready_file.exists, 60, "pod runner ready (watches established)")
        self._start_watchdog(owner_pid)

    def _wait_control_plane(self, timeout: float, kcm_port: int, sched_port: int) -> None:
        self._wait("kube-controller-manager",
                   lambda: self._https_ok(f"https://127.0.0.1:{kcm_port}/healthz", client_cert=False),
                   timeout, "kube-controller-manager /healthz")
        self._wait("kube-controller-manager",
                   lambda: self.rest("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                   timeout, "ServiceAccount default/default (created by kube-controller-manager)")
        self._wait("kube-scheduler",
                   lambda: self._https_ok(f"https://127.0.0.1:{sched_port}/readyz", client_cert=False),
                   timeout, "kube-scheduler /readyz")

    def _start_watchdog(self, owner_pid: int | None) -> None:
        """Optional watchdog: stop the cluster if the owner (pytest) dies without cleaning up."""
        if owner_pid:
            self._spawn("watchdog", [sys.executable, "-m", "tests.cluster.harness", "_watchdog",
                                     str(self.state_dir), str(owner_pid)],
                        cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    def _save_info(self) -> None:
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info, indent=1) + "\n")
        tmp.replace(self.info_path)

    def _install_crds(self) -> None:
        import yaml  # PyYAML (a dependency of the kubernetes client)
        for f in ("kwok.x-k8s.io_portforwards.yaml", "kwok.x-k8s.io_clusterportforwards.yaml"):
            crd = yaml.safe_load((self.bin_dir / f).read_text())
            st, body = self.rest("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            if st not in (201, 409):
                raise ClusterError(f"creating CRD {f}: HTTP {st}: {body}")

        def established(name: str) -> bool:
            st, c = self.rest("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            return st == 200 and any(x["type"] == "Established" and x["status"] == "True"
                                     for x in (c.get("status") or {}).get("conditions") or [])
        for name in ("portforwards.kwok.x-k8s.io", "clusterportforwards.kwok.x-k8s.io"):
            self._wait("kube-apiserver", lambda name=name: established(name), 60, f"CRD {name} Established")

    # ---- one component down and back (an apiserver restart during a test) -------------------
    def stop_component(self, name: str, grace: float = 20) -> None:
        """Terminate one component (SIGTERM, SIGKILL after ``grace``) and wait until it is gone:
        for kube-apiserver, connections to its port are refused from then on.  (On SIGTERM the
        apiserver closes its listener at once, then drains for about 60 s before it exits; the
        grace cuts that short.)"""
        rec = read_pidfile(self.pids / f"{name}.pid")
        if rec is None or not pid_alive(*rec):
            raise ClusterError(f"{name} is not running")
        kill_and_wait(rec[0], rec[1], grace=grace, popen=self._popen.get(name))
        if name == "kube-apiserver":
            port = self.info["ports"]["apiserver"]
            wait_for(lambda: not _accepts("127.0.0.1", port), 10, f"port {port} to refuse connections")

    def start_component(self, name: str, timeout: float = 120) -> None:
        """Start a stopped component again with the same command line (ports, certificates,
        flags) that started it; for kube-apiserver, return once /readyz answers."""
        recorded = json.loads((self.pids / f"{name}.cmd.json").read_text())
        if self._alive(name):
            raise ClusterError(f"{name} is already running")
        env = None if recorded["env"] is None else {**os.environ, **recorded["env"]}
        self._spawn(name, recorded["argv"], env=env, cwd=recorded["cwd"])
        if name == "kube-apiserver":
            self._wait(name, lambda: self._https_ok(f"{self.server}/readyz"), timeout, "kube-apiserver /readyz",
                       deps=["etcd"])

    def wait_clients_reconnected(self, timeout: float = 120) -> None:
        """After an apiserver restart: prove the components that watch it work again, for the
        tests that come next.  The controller-manager creates a new namespace's `default`
        ServiceAccount, kwok runs a pod on its node, and the pod runner is still alive (its
        watches relist on any error, tests/cluster/podrunner.py)."""
        probe = f"velo-reconnect-{secrets.token_hex(3)}"
        st, body = self.rest("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                            "metadata": {"name": probe}})
        if st != 201:
            raise ClusterError(f"creating namespace {probe}: HTTP {st}: {body}")
        try:
            self._wait("kube-controller-manager",
                       lambda: self.rest("GET", f"/api/v1/namespaces/{probe}/serviceaccounts/default")[0] == 200,
                       timeout, f"ServiceAccount {probe}/default after the apiserver restart")
            st, body = self.rest("POST", f"/api/v1/namespaces/{probe}/pods", {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
                "spec": {"nodeName": self.node_name, "containers": [{"name": "c", "image": "probe"}]}})
            if st != 201:
                raise ClusterError(f"creating pod {probe}/probe: HTTP {st}: {body}")
            self._wait("kwok", lambda: (self.rest("GET", f"/api/v1/namespaces/{probe}/pods/probe")[1] or {})
                       .get("status", {}).get("phase") == "Running",
                       timeout, f"pod {probe}/probe Running (set by kwok) after the apiserver restart")
            if (self.pids / "podrunner.pid").exists() and not self._alive("podrunner"):
                raise self._fail("podrunner", "exited during the apiserver restart")
        finally:
            self.rest("DELETE", f"/api/v1/namespaces/{probe}")

    # ---- stop / status ----------------------------------------------------------------------
    def stop(self, quiet: bool = False) -> None:
        """Kill every component (process group) and every pod/service process; remove the netns."""
        me = os.getpid()
        if (self.state_dir / "node" / "node.json").exists():  # a real node (tests/cluster/node.py)
            from tests.cluster.node import teardown_node
            teardown_node(self.state_dir / "node")
        for name in STOP_ORDER:
            rec = read_pidfile(self.pids / f"{name}.pid")
            if rec and rec[0] != me:
                kill_and_wait(rec[0], rec[1], grace=15 if name == "podrunner" else 10,
                              popen=self._popen.get(name))
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
        # processes the runner or the tests started (in case the runner died without cleaning up)
        for pidfile in list((self.state_dir / "pods").glob("*.pid")) + list((self.state_dir / "net").glob("*.pid")):
            rec = read_pidfile(pidfile)
            if rec:
                kill_and_wait(rec[0], rec[1], grace=5)
            pidfile.unlink(missing_ok=True)
        if self.netns:
            netns_destroy(self.netns)
        for p in self._popen.values():
            p.poll()
        self._popen.clear()
        if self.info:
            self.info["stopped"] = True
            self._save_info()
        if not quiet:
            log(f"cluster in {self.state_dir} stopped")

    def status(self) -> dict[str, Any]:
        comps = {}
        for name in reversed(STOP_ORDER):
            rec = read_pidfile(self.pids / f"{name}.pid")
            comps[name] = {"pid": rec[0] if rec else None, "alive": bool(rec) and pid_alive(*rec)}
        ready = False
        if self.info.get("server") and not self.info.get("stopped"):
            ready = self._https_ok(f"{self.server}/readyz")
        pods = {}
        for f in sorted((self.state_dir / "pods").glob("*.json")):
            with contextlib.suppress(ValueError, OSError):
                pods[f.stem] = json.loads(f.read_text())
        return {"state_dir": str(self.state_dir), "kubeconfig": self.kubeconfig, "server": self.info.get("server"),
                "apiserver_ready": ready, "netns": self.netns, "components": comps, "pods": pods}

    # ---- in-cluster test services (only reachable inside the netns) -------------------------
    def start_in_cluster_service(self, name: str, namespace: str, kind: str = "http", port: int = 80,
                                 timeout: float = 30) -> dict[str, Any]:
        """Create a Service `name` in `namespace` (ClusterIP allocated by the apiserver) and run a
        test server on CLUSTER_IP:port inside the network namespace. kind: "http" (answers every
        GET with JSON naming the service) or "tcp-echo" (echoes bytes). The pod runner maps
        name, name.ns, name.ns.svc, name.ns.svc.cluster.local to the ClusterIP in each pod's hosts
        file. Nothing outside the netns can reach it. Returns {"name","namespace","ip","port","pid"}."""
        if not self.netns:
            raise ClusterError(f"no network namespace: {self.info.get('netns_unavailable_reason')}")
        if kind not in ("http", "tcp-echo"):
            raise ValueError(kind)
        st, svc = self.rest("POST", f"/api/v1/namespaces/{namespace}/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": {"velo.dev/test-service": kind}},
            "spec": {"ports": [{"name": "main", "port": port, "protocol": "TCP"}]}})
        if st == 409:
            st, svc = self.rest("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
        if st not in (200, 201):
            raise ClusterError(f"creating Service {namespace}/{name}: HTTP {st}: {svc}")
        ip = svc["spec"]["clusterIP"]
        netns_add_addr(self.netns, ip)
        net = self.state_dir / "net"
        key = f"{namespace}_{name}"
        ready = net / f"{key}.ready"
        ready.unlink(missing_ok=True)
        logf = open(net / f"{key}.log", "ab")
        try:
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "tests.cluster.harness", "_netsvc",
                 kind, ip, str(port), f"{namespace}/{name}", str(ready)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"})
        finally:
            logf.close()
        self._popen[f"net:{key}"] = p
        write_pidfile(net / f"{key}.pid", p.pid)

        def check() -> None:
            if p.poll() is not None:
                raise ClusterError(f"in-cluster service {key} exited:\n{tail(net / f'{key}.log')}")
        wait_for(ready.exists, timeout, f"in-cluster service {key} listening", check=check)
        return {"name": name, "namespace": namespace, "ip": ip, "port": port, "pid": p.pid}

    def stop_in_cluster_service(self, name: str, namespace: str) -> None:
        pidfile = self.state_dir / "net" / f"{namespace}_{name}.pid"
        rec = read_pidfile(pidfile)
        if rec:
            kill_and_wait(rec[0], rec[1], grace=5, popen=self._popen.pop(f"net:{namespace}_{name}", None))
        pidfile.unlink(missing_ok=True)
        self.rest("DELETE", f"/api/v1/namespaces/{namespace}/services/{name}")


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# helpers run as subprocesses
# --------------------------------------------------------------------------------------------
def _netsvc(kind: str, host: str, port: int, label: str, ready_file: str) -> None:
    """A tiny in-cluster test service (runs inside the netns)."""
    import http.server
    import socketserver
    import threading

    if kind == "http":
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"service": label, "path": self.path,
                                   "host_header": self.headers.get("Host")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                print(f"{self.client_address[0]} {fmt % args}", flush=True)
        srv: socketserver.TCPServer = http.server.ThreadingHTTPServer((host, port), H)
    else:
        class E(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        class S(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
        srv = S((host, port), E)
    Path(ready_file).write_text(str(os.getpid()))
    print(f"{kind} service {label} listening on {host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    srv.serve_forever()


def _watchdog(state_dir: str, owner_pid: int) -> None:
    """Stop the cluster when the owner process is gone (pytest killed hard)."""
    info = Path(state_dir) / "cluster.json"
    while True:
        if not info.exists() or json.loads(info.read_text()).get("stopped"):
            return
        if not pid_alive(owner_pid):
            log(f"owner pid {owner_pid} is gone; stopping cluster in {state_dir}")
            Cluster.load(state_dir).stop()
            return
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.harness", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status", "build", "_netsvc", "_watchdog"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--no-netns", action="store_true", help="do not create a network namespace")
    a = ap.parse_args(argv)
    if a.command == "_netsvc":
        kind, host, port, label, ready = a.args
        _netsvc(kind, host, int(port), label, ready)
        return 0
    if a.command == "_watchdog":
        _watchdog(a.args[0], int(a.args[1]))
        return 0
    if a.command == "build":
        print(ensure_binaries())
        return 0
    if len(a.args) != 1:
        ap.error(f"{a.command} needs STATE_DIR")
    state_dir = a.args[0]
    try:
        if a.command == "start":
            bin_dir = ensure_binaries()
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            c = Cluster(state_dir, bin_dir).start(timeout=a.timeout, netns=False if a.no_netns else None)
            print(f"export KUBECONFIG={c.kubeconfig}")
        elif a.command == "stop":
            Cluster.load(state_dir).stop()
        else:
            st = Cluster.load(state_dir).status()
            print(json.dumps(st, indent=1))
            return 0 if st["apiserver_ready"] else 1
    except ClusterError as e:
        print(f"velo-cluster: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
