"""A stand-in for an Ingress in front of velo's traffic-proxy.

Until the port-forward backend exists, `[tunnel] url` is how velo reaches the
traffic-proxy (an Ingress or LoadBalancer in a real cluster).  This relay listens on
a fixed local port and sends each connection to the tunnel port of whichever
traffic-proxy pod of the namespace is running now, the way an Ingress follows a
Service's endpoints: across pod restarts, with no velo code involved.
"""

from __future__ import annotations

import socket
import threading

from velo.providers.kubernetes.intercept import COMPONENT, LABEL_COMPONENT

TUNNEL_PORT = "7070"


class Ingress:
    def __init__(self, cluster, namespace: str):
        self.cluster = cluster
        self.namespace = namespace
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/velo"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _backend(self) -> int | None:
        pods = self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"{LABEL_COMPONENT}={COMPONENT}").items
        for pod in pods:
            if pod.metadata.deletion_timestamp or pod.status.phase != "Running":
                continue
            record = self.cluster.pod_process(self.namespace, pod.metadata.name)
            if record and record.get("state") == "running" and TUNNEL_PORT in record.get("port_map", {}):
                return int(record["port_map"][TUNNEL_PORT])
        return None

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            port = self._backend()
            upstream = socket.create_connection(("127.0.0.1", port), timeout=5) if port else None
        except OSError:
            upstream = None
        if upstream is None:  # like an Ingress with no ready endpoints
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            client.close()
            return
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closed = True
        self.server.close()


def service_endpoint(cluster, namespace: str, service: str, port: int) -> tuple[dict, int] | None:
    """What kube-proxy does for a Service: EndpointSlice -> a ready pod and its target port.
    (the pod runner's record of that pod's process, the target port) or None."""
    from kubernetes import client

    svc = cluster.core.read_namespaced_service(service, namespace)
    spec_port = next(p for p in svc.spec.ports if p.port == port)
    slices = client.DiscoveryV1Api(cluster.core.api_client).list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}").items
    for endpoint_slice in slices:
        target = next((p.port for p in endpoint_slice.ports or [] if p.name == (spec_port.name or "")), None)
        for endpoint in endpoint_slice.endpoints or []:
            if not (endpoint.conditions and endpoint.conditions.ready) or not endpoint.target_ref:
                continue
            record = cluster.pod_process(namespace, endpoint.target_ref.name)
            if record and record.get("state") == "running" and target is not None:
                return record, target
    return None


def service_backend(cluster, namespace: str, service: str, port: int) -> int | None:
    """The host port that reaches Service ``service:port``'s pod (the port the pod runner
    mapped its declared containerPort to), or None."""
    found = service_endpoint(cluster, namespace, service, port)
    if found is not None and str(found[1]) in found[0].get("port_map", {}):
        return int(found[0]["port_map"][str(found[1])])
    return None


def request_via_service(cluster, namespace: str, service: str, port: int, payload: bytes) -> bytes | None:
    """Send ``payload`` to Service ``service:port`` as another pod would; None if no endpoint serves it."""
    backend = service_backend(cluster, namespace, service, port)
    if backend is None:
        return None
    with socket.create_connection(("127.0.0.1", backend), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def request_in_cluster(cluster, namespace: str, service: str, port: int, payload: bytes) -> bytes | None:
    """Send ``payload`` to Service ``service:port`` from inside the cluster network, as another
    pod would; None if no endpoint serves it.  Unlike ``request_via_service`` this reaches a
    port the pod never declared (containerPorts are informational; a numeric targetPort works
    without one): the pod runner maps declared ports only, others are the pod's own port."""
    from tests.cluster.podrunner import netns_socket

    found = service_endpoint(cluster, namespace, service, port)
    if found is None:
        return None
    record, target = found
    sock = netns_socket(cluster.require_netns())
    try:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", int(record.get("port_map", {}).get(str(target), target))))
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    return data
