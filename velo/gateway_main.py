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


async def watch_lease(session: str, every: float, stop: asyncio.Event) -> None:
    """In a cluster: when the laptop's lease lapses, restore its Services, remove the
    session's objects (this pod's Deployment last) and stop.  Nothing depends on the laptop."""
    from velo.providers.kubernetes import intercept as ix
    from velo.providers.kubernetes.api import in_cluster_connection

    conn = in_cluster_connection()
    while not stop.is_set():
        try:
            alive = await asyncio.to_thread(ix.lease_alive, conn, session)
        except Exception as exc:  # API trouble is not proof of death: look again later
            log.warning("checking the lease of session %s failed: %s", session, exc)
            alive = True
        if not alive:
            log.warning("the lease of session %s lapsed: restoring its Services and removing its objects", session)
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


def serve(args, token: str) -> int:
    from velo.cli import UserError

    urls = args.listen or ["ws://0.0.0.0:7070/velo"]
    for url in urls:
        try:
            parse_listen_url(url)
        except ValueError as exc:
            raise UserError(str(exc)) from None
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
                server = await gateway.listen(url)
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
            watcher = asyncio.create_task(watch_lease(args.session, args.lease_check, stop))
        await stop.wait()
        log.info("shutting down")
        await gateway.close()
        return 0

    return run(main())
