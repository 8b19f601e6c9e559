"""Process shell of `velo gateway`: listeners, signals, readiness file."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from velo.gateway import AllowList, Gateway, Limits, PortAllowList, parse_listen_url
from velo.plugins import PluginError
from velo.runtime import run

log = logging.getLogger("velo.gateway")


class GatewayStartError(Exception):
    pass


async def watch_lease(session: str, every: float, stop: asyncio.Event, client_connected=lambda: False) -> None:
    """In a cluster: when the laptop is gone, restore its Services, remove the session's
    objects (this pod's Deployment last) and stop.  Nothing depends on the laptop.

    Gone means: its tunnel is down and its Lease did not change for a lease's duration,
    both as seen on this pod's clock (``ix.Liveness``); a connected tunnel is proof of life."""
    from velo.providers.kubernetes import intercept as ix
    from velo.providers.kubernetes.api import in_cluster_connection

    conn = in_cluster_connection()
    liveness = ix.Liveness(conn, session)
    failing = False
    while not stop.is_set():
        if client_connected():
            liveness.tunnel_up()
        try:
            await asyncio.to_thread(liveness.look)
            if failing:
                log.warning("checking the lease of session %s works again", session)
            failing = False
        except Exception as exc:  # API trouble is not proof of death: look again later
            if not failing:  # once per streak, not every few seconds
                log.warning("checking the lease of session %s failed: %s (retrying)", session, exc)
            failing = True
        if client_connected():
            liveness.tunnel_up()
        if not liveness.alive():
            log.warning("session %s is gone (no tunnel, lease %s): restoring its Services and removing its objects",
                        session, "deleted" if liveness.gone else "not renewed")
            for attempt in range(30):
                try:
                    restored = await asyncio.to_thread(ix.clean_session, conn, session, everything=False)
                    log.warning("restored %s; session %s cleaned up", ", ".join(restored) or "nothing", session)
                    break
                except Exception as exc:
                    log.warning("cleanup attempt %d failed: %s", attempt + 1, exc)
                    await asyncio.sleep(2)
            stop.set()
            return
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


SECURE_SCHEMES = ("wss", "https")


def tls_contexts(urls: list[str], cert: str | None, key: str | None) -> dict:
    """One server context per wss:// / https:// listener (each backend sets its own ALPN)."""
    from velo.cli import UserError
    from velo.tls import TLSConfigError, server_context

    secure = [url for url in urls if parse_listen_url(url)[0] in SECURE_SCHEMES]
    if bool(cert) != bool(key):
        raise UserError("--tls-cert and --tls-key go together")
    if secure and not cert:
        raise UserError(f"--listen {secure[0]}: a TLS listener needs --tls-cert and --tls-key")
    if cert and not secure:
        raise UserError("--tls-cert given but no --listen is wss:// or https://")
    try:
        return {url: server_context(cert, key) for url in secure}
    except TLSConfigError as exc:
        raise UserError(str(exc)) from None


def serve(args, token: str) -> int:
    from velo.cli import UserError

    urls = args.listen or ["ws://0.0.0.0:7070/velo"]
    for url in urls:
        try:
            parse_listen_url(url)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    contexts = tls_contexts(urls, args.tls_cert, args.tls_key)
    try:
        reverse_policy = PortAllowList(getattr(args, "allow_reverse", None) or [])
        limits = Limits.parse(getattr(args, "limit", None) or [])
    except ValueError as exc:
        raise UserError(str(exc)) from None

    async def main() -> int:
        gateway = Gateway(
            token,
            AllowList(args.allow),
            reverse_host=args.reverse_host,
            keepalive_interval=args.keepalive_interval,
            keepalive_timeout=args.keepalive_timeout,
            reverse_policy=reverse_policy,
            limits=limits,
        )
        bound = []
        for url in urls:
            try:
                server = await gateway.listen(url, ssl_context=contexts.get(url))
            except PluginError as exc:
                raise UserError(str(exc)) from None
            except OSError as exc:
                raise UserError(f"--listen {url}: {exc.strerror or exc}") from None
            sock = server.sockets[0].getsockname()
            scheme, listen = parse_listen_url(url)
            bound.append(f"{scheme}://{sock[0]}:{sock[1]}{listen.path}")
        log.info("listening on %s; %d allow rule(s); reverse ports: %s", ", ".join(bound), len(args.allow), reverse_policy)
        if args.ready_file:
            Path(args.ready_file).write_text("\n".join(bound) + "\n")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if args.session:
            watcher = asyncio.create_task(watch_lease(
                args.session, args.lease_check, stop,
                lambda: any(s.tunnel is not None and s.tunnel.alive for s in gateway.sessions.values())))
        await stop.wait()
        log.info("shutting down")
        await gateway.close()
        return 0

    return run(main())
