"""TLS contexts shared by the network backends (wss://, https://).

Clients verify against the operating system's trust store by default, through
``truststore`` (python.org builds on macOS ship no CA bundle that OpenSSL would
find), or against ``ca_file`` alone for a private CA.  ``server_name`` overrides
the name checked in the certificate (and sent as SNI), for a gateway reached
by an address its certificate does not name.
"""

from __future__ import annotations

import os
import ssl


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file."""


def client_context(*, ca_file: str | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    if ca_file:
        if not os.path.isfile(ca_file):
            raise TLSConfigError(f"ca_file {ca_file}: no such file")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"ca_file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    else:
        try:
            import truststore

            ctx = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        except ImportError:  # pragma: no cover - truststore is a dependency
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def explain(exc: ssl.SSLError) -> str:
    """One line for a handshake failure, with the verifier's reason when there is one."""
    detail = getattr(exc, "verify_message", None)
    if detail:
        return f"certificate verify failed: {detail}"
    return str(exc.reason or exc)


def for_endpoint(endpoint, *, secure: bool, alpn: list[str] | None = None) -> tuple[ssl.SSLContext | None, str | None]:
    """The client context and the name to verify for a backend's endpoint.

    A context the provider built (``endpoint.ssl_context``) wins; otherwise
    ``ca_file`` and ``server_name`` come from the backend's ``[tunnel.<name>]`` table.
    """
    settings = endpoint.settings
    server_name = getattr(settings, "server_name", None)
    if not secure:
        return None, None
    ctx = endpoint.ssl_context or client_context(ca_file=getattr(settings, "ca_file", None), alpn=alpn)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx, server_name


def server_context(cert_file: str, key_file: str, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for flag, path in (("--tls-cert", cert_file), ("--tls-key", key_file)):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{flag} {path}: no such file")
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"--tls-cert {cert_file} / --tls-key {key_file}: not a usable certificate and key ({exc})"
        ) from None
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx
