"""A real Kubernetes node for the end-to-end tests: kubelet, containerd + runc, CNI, kube-proxy.

The kwok tier (harness.py + podrunner.py) stays for speed; this node runs real pods from images
imported into its own containerd, under their security context, with readiness probes, restarts
and the kubelet's port-forward streaming path. It joins a control plane started with
``Cluster.start(fake_node=False, apiserver_args=node_apiserver_args(...))``.

Network layout (everything with an address is inside the cluster's network namespace):

    host netns                           node netns (Cluster.netns)
    ----------                           --------------------------------------------------
    kube-apiserver 127.0.0.1:API  <----  relay 127.0.0.1:API  (kubelet, kube-proxy kubeconfig)
                                  <----  relay NODE_IP:6443   (pods: kubernetes Service ->
                                                               kube-proxy -> this endpoint)
    apiserver --egress (HTTP CONNECT  -> dials NODE_IP:KUBELET_PORT inside the netns
      over a unix socket, like            (logs, exec, port-forward: the real kubelet path)
      konnectivity)
                                         veth velo0 NODE_IP/32, default route on it
                                         bridge cni0 10.244.0.1/24 <-> pod netns (CNI bridge)
                                         containerd, kubelet, kube-proxy (iptables), all in this
                                         netns but in the host's mount namespace (nsenter --net)
                                         so the kubelet's volume mounts are visible to runc

cgroups: this machine is a v1/v2 hybrid (controllers on v1, an empty cgroup2 at
/sys/fs/cgroup/unified). The controllers cannot move to v2 while v1 hierarchies are in use, so the
node runs cgroup v1 honestly: kubelet ``failCgroupV1: false`` + ``cgroupDriver: cgroupfs`` under a
per-node ``cgroupRoot``; containerd 2.2 (still supports v1) with runc's cgroupfs driver.

Security: the kubelet serves anonymous + AlwaysAllow (a test node on a private netns; the
apiserver is its only client), and uses the admin kubeconfig.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.cluster.harness import (REPO_ROOT, ClusterError, kill_and_wait, log, pid_alive, read_pidfile, tail,
                                   wait_for, write_pidfile)

K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
CONTAINERD_VERSION = os.environ.get("CONTAINERD_VERSION", "v2.2.9")
NODE_NAME = "velo-node-0"
NODE_IP = "172.31.250.2"          # only ever exists inside the node's network namespace
POD_SUBNET = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
API_POD_PORT = 6443               # the `kubernetes` Service's endpoint on NODE_IP
PAUSE_IMAGE = "localhost/velo-test/pause:1"
NODE_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr")
STOP_ORDER = ("kube-proxy", "kubelet", "containerd", "node-net")
HERE = Path(__file__).resolve().parent


def node_bin_dir() -> Path:
    base = os.environ.get("VELO_K8S_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "velo", "k8s")
    return Path(base) / f"node-{K8S_VERSION}-containerd-{CONTAINERD_VERSION}"


def node_binaries_ready() -> bool:
    d = node_bin_dir()
    return (d / ".velo-complete").is_file() and all(os.access(d / b, os.X_OK) for b in NODE_BINARIES)


def ensure_node_binaries() -> Path:
    """tests/cluster/build-node.sh (a no-op when cached)."""
    if not node_binaries_ready():
        log(f"building the real node's binaries into {node_bin_dir()} (cold: ~5 min after build.sh)...")
        r = subprocess.run(["bash", str(HERE / "build-node.sh")], stdout=subprocess.PIPE, text=True)
        if r.returncode != 0 or not node_binaries_ready():
            raise ClusterError(f"tests/cluster/build-node.sh failed (exit {r.returncode})")
    return node_bin_dir()


def short_runtime_dir(state: Path) -> Path:
    """unix socket paths are limited to 108 bytes: keep the sockets under /run."""
    return Path("/run/velo-node") / state.resolve().parent.name


def node_apiserver_args(state_dir: Path) -> list[str]:
    """kube-apiserver flags for a cluster that will get a real node: its connections to the
    kubelet go through the node's egress proxy (HTTP CONNECT over a unix socket)."""
    node_state = Path(state_dir) / "node"
    node_state.mkdir(parents=True, exist_ok=True)
    run_dir = short_runtime_dir(node_state)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = node_state / "egress.yaml"
    cfg.write_text(json.dumps({
        "apiVersion": "apiserver.k8s.io/v1beta1", "kind": "EgressSelectorConfiguration",
        "egressSelections": [{"name": "cluster", "connection": {
            "proxyProtocol": "HTTPConnect", "transport": {"uds": {"udsName": str(run_dir / "egress.sock")}}}}],
    }, indent=1))
    return [f"--egress-selector-config-file={cfg}"]


# --------------------------------------------------------------------------------------------
# the node's network helper process: egress proxy + apiserver relays (python -m tests.cluster.node _net)
# --------------------------------------------------------------------------------------------
def _pipe_both(a: socket.socket, b: socket.socket) -> None:
    def pipe(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            y.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=pipe, args=(a, b), daemon=True)
    t.start()
    pipe(b, a)
    t.join()
    a.close()
    b.close()


def _net_main(state: Path) -> int:
    from tests.cluster.podrunner import Relay, netns_socket

    info = json.loads((state / "node.json").read_text())
    netns, api_port = info["netns"], info["api_port"]

    def dial_api() -> socket.socket:
        return socket.create_connection(("127.0.0.1", api_port), timeout=10)

    relays = []
    for host, port in (("127.0.0.1", api_port), (NODE_IP, API_POD_PORT)):
        lst = netns_socket(netns)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((host, port))
        lst.listen(128)
        relays.append(Relay(lst, dial_api, f"{host}:{port} (node netns) -> apiserver"))

    egress = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path = Path(info["egress_sock"])
    sock_path.unlink(missing_ok=True)
    egress.bind(str(sock_path))
    egress.listen(128)

    def handle(c: socket.socket) -> None:
        """HTTP CONNECT host:port -> a TCP connection made inside the node's netns."""
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = c.recv(4096)
                if not chunk or len(buf) > 16384:
                    c.close()
                    return
                buf += chunk
            head, rest = buf.split(b"\r\n\r\n", 1)
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            host, _, port = target.rpartition(":")
            if method != "CONNECT":
                raise ValueError(method)
            u = netns_socket(netns)
            u.settimeout(10)
            u.connect((host.strip("[]"), int(port)))
            u.settimeout(None)
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                c.sendall(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n".encode())
                print(f"node-net: egress {buf[:80]!r}: {e}", flush=True)
            c.close()
            return
        c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            u.sendall(rest)
        _pipe_both(c, u)

    def accept() -> None:
        while True:
            try:
                c, _ = egress.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    _start_dns(netns, info)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    (state / "node-net.ready").write_text(str(os.getpid()))
    print(f"node-net: ready (egress {sock_path}, apiserver relays in {netns})", flush=True)
    stop.wait()
    return 0


def _start_dns(netns: str, info: dict) -> None:
    """Cluster DNS stand-in (no CoreDNS image here): A records for `svc.ns.svc.cluster.local`
    from the Services in the cluster (polled each second), served on NODE_IP:53 inside the
    netns, which is the kubelet's clusterDNS. Anything else: NXDOMAIN."""
    import ssl
    import struct
    import urllib.request
    from tests.cluster.podrunner import netns_socket  # noqa: F401 (same setns trick, UDP)

    records: dict[str, str] = {}
    pki = Path(info["pki"])
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def poll() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{info['api_port']}/api/v1/services",
                                            context=ctx, timeout=10) as r:
                    items = json.loads(r.read())["items"]
                new = {}
                for svc in items:
                    ip = svc["spec"].get("clusterIP")
                    if ip and ip != "None":
                        new[f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"] = ip
                records.clear()
                records.update(new)
            except Exception as e:  # noqa: BLE001 - apiserver not up yet / stopping
                print(f"node-net: dns poll: {e!r}", flush=True)
            time.sleep(1)

    def answer(q: bytes) -> bytes | None:
        if len(q) < 12:
            return None
        qid, flags, qd = struct.unpack("!HHH", q[:6])
        if qd != 1:
            return None
        i, labels = 12, []
        while i < len(q) and q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode(errors="replace"))
            i += 1 + q[i]
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
        question = q[12:i + 5]
        name = ".".join(labels).lower().rstrip(".")
        ip = records.get(name)
        rcode = 0 if ip else 3
        ans = b""
        if ip and qtype == 1:
            ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)
        hdr = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100) | rcode, 1, 1 if ans else 0, 0, 0)
        return hdr + question + ans

    from tests.cluster.podrunner import _setns
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    udp.bind((NODE_IP, 53))

    def serve() -> None:
        while True:
            data, addr = udp.recvfrom(4096)
            with contextlib.suppress(Exception):
                reply = answer(data)
                if reply:
                    udp.sendto(reply, addr)

    threading.Thread(target=poll, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()


# --------------------------------------------------------------------------------------------
# the node
# --------------------------------------------------------------------------------------------
class RealNode:
    """kubelet + containerd + CNI + kube-proxy inside `cluster.netns`. start() / stop()."""

    def __init__(self, cluster: Any, bin_dir: Path | None = None):
        self.cluster = cluster
        self.state = cluster.state_dir / "node"
        self.bin = bin_dir or node_bin_dir()
        self.k8s_bin = cluster.bin_dir
        self.run_dir = short_runtime_dir(self.state)
        self.logs = self.state / "logs"
        self.pids = self.state / "pids"
        self.sock = self.run_dir / "containerd.sock"
        self.name = NODE_NAME
        self.ip = NODE_IP
        self.cgroup_root = f"/velo-node-{secrets.token_hex(3)}"
        self._popen: dict[str, subprocess.Popen] = {}

    @property
    def netns(self) -> str:
        return self.cluster.netns

    # ---- processes --------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], in_netns: bool = True, env: dict | None = None) -> None:
        if in_netns:  # network namespace only: keep the host's mount namespace (see module doc)
            argv = ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv]
        logf = open(self.logs / f"{name}.log", "ab")
        try:
            p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env={**os.environ, **(env or {})}, cwd=str(self.state))
        finally:
            logf.close()
        self._popen[name] = p
        write_pidfile(self.pids / f"{name}.pid", p.pid)

    def _check(self, *names: str):
        def check() -> None:
            for n in names:
                p = self._popen.get(n)
                if p is not None and p.poll() is not None:
                    raise ClusterError(f"{n} exited ({p.returncode}); last lines of its log:\n"
                                       f"{tail(self.logs / f'{n}.log')}")
        return check

    def ip_netns(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", self.netns, *args], check=True, capture_output=True, text=True)

    def in_netns(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/var/run/netns/{self.netns}", *argv], check=check,
                              capture_output=True, text=True, timeout=timeout)

    def ctr(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ctr"), "--address", str(self.sock), "--namespace", "k8s.io", *args],
                              check=check, capture_output=True, text=True, **kw)

    # ---- start ------------------------------------------------------------------------------
    def start(self, images: list[str] = (), timeout: float = 180) -> "RealNode":
        if not self.netns:
            raise ClusterError("the real node needs the cluster's network namespace (root + iproute2)")
        for d in (self.logs, self.pids, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._start(list(images), timeout)
        except BaseException:
            teardown_node(self.state)
            raise
        return self

    def _start(self, images: list[str], timeout: float) -> None:
        t0 = time.monotonic()
        api_port = self.cluster.info["ports"]["apiserver"]
        kubelet_port, healthz_port, proxy_health, proxy_metrics = _free_ports_in(self.netns, 4)
        info = {"netns": self.netns, "api_port": api_port, "egress_sock": str(self.run_dir / "egress.sock"),
                "node_name": self.name, "node_ip": self.ip, "cgroup_root": self.cgroup_root,
                "run_dir": str(self.run_dir), "kubelet_port": kubelet_port, "bin_dir": str(self.bin),
                "pki": str(self.cluster.pki)}
        (self.state / "node.json").write_text(json.dumps(info, indent=1))

        # 1. addresses: the node IP on its own device (default route on it), forwarding on
        # (no `dummy` module in this kernel: a veth pair with both ends in the netns does the same)
        self.ip_netns("link", "add", "velo0", "type", "veth", "peer", "name", "velo1")
        self.ip_netns("link", "set", "velo1", "up")
        self.ip_netns("link", "set", "velo0", "up")
        self.ip_netns("addr", "add", f"{self.ip}/32", "dev", "velo0")
        self.ip_netns("route", "add", "default", "dev", "velo0")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.route_localnet=1"):
            self.in_netns("sysctl", "-qw", key)

        # 2. the relays to the apiserver and the apiserver's egress proxy
        self._spawn("node-net", [sys.executable, "-m", "tests.cluster.node", "_net", str(self.state)],
                    in_netns=False, env={"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: (self.state / "node-net.ready").exists(), 30, "node-net ready", check=self._check("node-net"))

        # 3. containerd, then the images (nothing is pulled: a pull would fail here anyway)
        self._write_containerd_config()
        self._spawn("containerd", [str(self.bin / "containerd"), "--config", str(self.state / "containerd.toml")],
                    env={"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"})
        wait_for(lambda: self.ctr("version", check=False, timeout=10).returncode == 0, 60, "containerd answering",
                 check=self._check("containerd"))
        for image in images:
            self.import_image(image)

        # 4. CNI, kubelet, kube-proxy
        self._write_cni_config()
        self._write_kubelet_config(kubelet_port, healthz_port)
        _make_cgroup_root(self.cgroup_root)
        self._spawn("kubelet", [str(self.bin / "kubelet"),
                                f"--config={self.state / 'kubelet.yaml'}",
                                f"--kubeconfig={self.cluster.kubeconfig}", f"--hostname-override={self.name}",
                                f"--node-ip={self.ip}", f"--root-dir={self.state / 'kubelet'}",
                                f"--cert-dir={self.state / 'kubelet-pki'}", "--v=2"])
        self._write_kube_proxy_config(proxy_health, proxy_metrics)
        self._spawn("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={self.state / 'kube-proxy.yaml'}",
                                   "--v=2"])
        self._publish_apiserver_endpoint()

        def ready() -> bool:
            st, n = self.cluster.rest("GET", f"/api/v1/nodes/{self.name}")
            return st == 200 and any(c.get("type") == "Ready" and c.get("status") == "True"
                                     for c in (n.get("status") or {}).get("conditions") or [])
        wait_for(ready, timeout, f"node {self.name} Ready (kubelet)", interval=0.5,
                 check=self._check("containerd", "kubelet", "kube-proxy", "node-net"))
        log(f"real node {self.name} ready in {time.monotonic() - t0:.1f}s (netns {self.netns}, IP {self.ip})")

    # ---- configuration ----------------------------------------------------------------------
    def _write_containerd_config(self) -> None:
        d = self.state / "containerd"
        (self.state / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (self.state / "containerd.toml").write_text(f"""\
version = 3
root = "{d / 'root'}"
state = "{self.run_dir / 'containerd-state'}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.erofs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = "{self.run_dir / 'debug.sock'}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # this machine's root lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (the pause
  # container asks for -998), so keep every container's at or above containerd's own
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{self.state / 'cni' / 'net.d'}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
""")

    def _write_cni_config(self) -> None:
        (self.state / "cni" / "net.d" / "10-velo.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "velo-pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.state / "cni" / "ipam"),
                          "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))

    def _write_kubelet_config(self, port: int, healthz_port: int) -> None:
        resolv = self.state / "resolv.conf"
        resolv.write_text("# pods of the velo test node: no cluster DNS\nnameserver 127.0.0.1\noptions ndots:1\n")
        (self.state / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.ip, "port": port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            # cgroup v1 (see the module docstring): allowed explicitly, cgroupfs, a root of our own
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "cgroupsPerQOS": True, "enforceNodeAllocatable": ["pods"],
            "failSwapOn": False, "resolvConf": str(resolv), "clusterDomain": "cluster.local",
            "clusterDNS": [self.ip],  # node-net's DNS stand-in
            "podLogsDir": str(self.state / "pod-logs"),
            "registerNode": True, "serializeImagePulls": False,
            # the imported images must never be garbage-collected (they cannot be pulled again)
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "maxPods": 50, "protectKernelDefaults": False,
        }, indent=1))

    def _write_kube_proxy_config(self, health_port: int, metrics_port: int) -> None:
        (self.state / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.cluster.kubeconfig},
            "hostnameOverride": self.name, "mode": "iptables", "clusterCIDR": "10.244.0.0/16",
            "healthzBindAddress": f"127.0.0.1:{health_port}", "metricsBindAddress": f"127.0.0.1:{metrics_port}",
            # no br_netfilter in a network namespace: SNAT service traffic so replies come back
            # through the node (and its conntrack) even between pods on the same bridge
            "iptables": {"masqueradeAll": True},
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }, indent=1))

    def _publish_apiserver_endpoint(self) -> None:
        """The apiserver runs with --endpoint-reconciler-type=none: point the `kubernetes`
        Service at the relay on NODE_IP:6443, so pods reach it through kube-proxy."""
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "kubernetes-velo-node", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "kubernetes",
                                        "endpointslice.kubernetes.io/managed-by": "velo-test-node"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [self.ip], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": API_POD_PORT, "protocol": "TCP"}]}
        st, resp = self.cluster.rest("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", body)
        if st not in (201, 409):
            raise ClusterError(f"creating the kubernetes EndpointSlice: HTTP {st}: {resp}")

    # ---- images -----------------------------------------------------------------------------
    def import_image(self, image: str) -> None:
        """docker save IMAGE | ctr images import: the kubelet finds it in the local store."""
        t0 = time.monotonic()
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        try:
            r = subprocess.run([str(self.bin / "ctr"), "--address", str(self.sock), "--namespace", "k8s.io",
                                "images", "import", "--snapshotter", "overlayfs", "-"],
                               stdin=save.stdout, capture_output=True, text=True, timeout=300)
        finally:
            save.stdout.close()
            save.wait()
        if save.returncode != 0 or r.returncode != 0:
            raise ClusterError(f"importing {image} into the node's containerd failed: {r.stderr.strip()}")
        log(f"imported {image} into the node in {time.monotonic() - t0:.1f}s")

    # ---- helpers for tests ------------------------------------------------------------------
    def container_pid(self, namespace: str, pod: str, container: str) -> int:
        """The host pid of a running container's main process (through the CRI's view)."""
        r = self.ctr("containers", "ls", "-q")
        for cid in r.stdout.split():
            info = json.loads(self.ctr("containers", "info", cid).stdout)
            labels = info.get("Labels") or {}
            if (labels.get("io.kubernetes.pod.namespace") == namespace and labels.get("io.kubernetes.pod.name") == pod
                    and labels.get("io.kubernetes.container.name") == container):
                t = self.ctr("tasks", "ls", check=False).stdout.splitlines()
                for line in t[1:]:
                    parts = line.split()
                    if parts and parts[0] == cid and parts[-1] == "RUNNING":
                        return int(parts[1])
        raise ClusterError(f"no running container {container} of pod {namespace}/{pod}")

    def stop(self) -> None:
        teardown_node(self.state)


def _free_ports_in(netns: str, n: int) -> list[int]:
    from tests.cluster.podrunner import netns_socket
    socks = []
    try:
        for _ in range(n):
            s = netns_socket(netns)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cgroup_dirs(root: str) -> list[Path]:
    base = Path("/sys/fs/cgroup")
    out = []
    for ctl in sorted(base.iterdir()) if base.is_dir() else []:
        d = ctl / root.lstrip("/")
        if d.is_dir():
            out.append(d)
    return out


def _make_cgroup_root(root: str) -> None:
    """The kubelet wants its cgroupRoot to exist in every v1 hierarchy; a new cpuset cgroup
    starts with no CPUs or memory nodes, so copy the parent's."""
    base = Path("/sys/fs/cgroup")
    for ctl in sorted(base.iterdir()):
        if not (ctl / "cgroup.procs").exists() or ctl.name == "unified":
            continue
        d = ctl / root.lstrip("/")
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (ctl / f).exists():
                (d / f).write_text((ctl / f).read_text())


def teardown_node(state: Path) -> None:
    """Stop the node and remove every trace: processes, containers (by cgroup), mounts, netns
    mounts, cgroups. Safe to call twice and after a crash (reads node.json)."""
    state = Path(state)
    try:
        info = json.loads((state / "node.json").read_text())
    except (OSError, ValueError):
        return
    pids = state / "pids"
    for name in STOP_ORDER:
        rec = read_pidfile(pids / f"{name}.pid")
        if rec:
            kill_and_wait(rec[0], rec[1], grace=10)
        (pids / f"{name}.pid").unlink(missing_ok=True)
    # every container process and shim lives in a cgroup under the node's cgroupRoot
    root = info.get("cgroup_root")
    if root:
        for _ in range(5):
            procs = set()
            for d in _cgroup_dirs(root):
                for f in d.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        procs.update(int(p) for p in f.read_text().split())
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.2)
    # shims are started by containerd outside the pod cgroups: kill those of this node
    run_dir = info.get("run_dir", "")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes()
            if b"containerd-shim-runc-v2" in cmd and run_dir.encode() in cmd:
                os.kill(int(proc.name), signal.SIGKILL)
    # mounts under the state and runtime dirs (kubelet volumes, overlay rootfs, netns), deepest first
    prefixes = [str(state.resolve()), run_dir]
    for _ in range(3):
        mounts = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mounts").read_text().splitlines():
                mp = line.split()[1].replace("\\040", " ")
                if any(p and (mp == p or mp.startswith(p + "/")) for p in prefixes):
                    mounts.append(mp)
        if not mounts:
            break
        for mp in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    if root:
        for d in _cgroup_dirs(root):
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(state / "containerd", ignore_errors=True)
    (state / "node.json").rename(state / "node.json.stopped")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_net":
        sys.exit(_net_main(Path(sys.argv[2])))
    print("usage: python -m tests.cluster.node _net NODE_STATE_DIR", file=sys.stderr)
    sys.exit(2)
