"""The backends every conformance test runs against, and a CA made for the TLS ones.

Each backend is driven exactly as a user would: `velo gateway --listen <scheme>://`
(plus --tls-cert/--tls-key for TLS) and `velo up` with a `[tunnel.<backend>]`
table, both real processes.  The TLS variants trust only the test's own CA
(`ca_file`) and reach the gateway by 127.0.0.1 while its certificate names only
`gateway.velo.test` (`server_name`), so both settings are exercised.

The port-forward case goes through the test cluster's real kube-apiserver: the gateway
listens on `port-forward://127.0.0.1:P` on this machine, a pod on the kwok node has a kwok
`PortForward` sending its pods/portforward traffic to P, and `velo up` (static provider)
names that pod in `[tunnel.port-forward] pod`, with the cluster's kubeconfig.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import KwokPod, Procs, write_config

SERVER_NAME = "gateway.velo.test"


@dataclass(frozen=True)
class BackendCase:
    id: str
    backend: str  # [tunnel.<backend>]
    scheme: str  # velo gateway --listen <scheme>://
    tls: bool = False
    plugin: str | None = None  # distribution that must be installed
    cluster: bool = False  # reaches the gateway through the test cluster's apiserver (pods/portforward)


CASES = [
    BackendCase("websocket", "websocket", "ws"),
    BackendCase("websocket-tls", "websocket", "wss", tls=True),
    BackendCase("h2", "h2", "http"),
    BackendCase("h2-tls", "h2", "https", tls=True),
    BackendCase("tcp-plugin", "tcp", "tcp", plugin="velo-tcp"),
    BackendCase("port-forward", "port-forward", "port-forward", cluster=True),
]


@dataclass
class TestCA:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_ca(folder: Path, server_name: str = SERVER_NAME) -> TestCA:
    """A throw-away CA and a server certificate for ``server_name`` signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "velo test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = TestCA(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    out.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return out


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(params=[pytest.param(case, id=case.id, marks=[pytest.mark.cluster] if case.cluster else [])
                        for case in CASES])
def backend(request) -> BackendCase:
    case: BackendCase = request.param
    if case.plugin:
        try:
            importlib.metadata.distribution(case.plugin)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{case.plugin} is not installed: run `make install` (it installs plugins/ too)")
    return case


@dataclass
class Mesh:
    """One gateway and one `velo up` over the backend under test."""

    procs: Procs
    case: BackendCase
    ca: TestCA
    tmp: Path
    pod: KwokPod | None = None  # the port-forward case: the pod velo up names
    gateway: object = None
    up: object = None
    allow: tuple = ()
    allow_reverse: tuple = ()
    config: Path | None = None
    runs: int = field(default=0)

    def start_gateway(self, *allow: str, port: int = 0, allow_reverse=()):
        extra = ["--tls-cert", str(self.ca.cert_file), "--tls-key", str(self.ca.key_file)] if self.case.tls else []
        self.allow = allow or self.allow
        self.allow_reverse = allow_reverse or self.allow_reverse
        self.gateway = self.procs.gateway(*self.allow, port=port, scheme=self.case.scheme, extra=extra,
                                          allow_reverse=self.allow_reverse)
        if self.pod is not None:
            self.pod.forward_to(self.gateway.port)
        return self.gateway

    def write_config(self, remote=None, local=None, **kw) -> Path:
        settings = {"ca_file": str(self.ca.ca_file), "server_name": SERVER_NAME} if self.case.tls else {}
        url = self.gateway.url
        if self.pod is not None:  # no url: the table names the pod, and the cluster to find it in
            url, settings = None, {"pod": self.pod.name, "namespace": self.pod.namespace,
                                   "kubeconfig": str(self.pod.cluster.kubeconfig)}
        self.runs += 1
        folder = self.tmp / f"project-{self.runs}"
        folder.mkdir()
        self.config = write_config(folder / "velocity.toml", gateway_url=url, remote=remote,
                                   local=local, backend=self.case.backend, settings=settings,
                                   free_ports=True, **kw)
        return self.config

    def start_up(self, remote=None, local=None, wait_up: bool = True, env=None, **kw):
        self.up = self.procs.up(self.write_config(remote, local, **kw), wait_up=wait_up, env=env)
        return self.up


@pytest.fixture
def mesh(request, procs, backend, test_ca, tmp_path):
    pod = None
    if backend.cluster:  # only this case starts the (session-wide) test cluster
        pod = KwokPod(request.getfixturevalue("cluster"), request.getfixturevalue("namespace"))
    try:
        yield Mesh(procs, backend, test_ca, tmp_path, pod=pod)
    finally:
        if pod is not None:
            pod.delete()
