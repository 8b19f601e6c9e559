"""`velo demo`: the whole mesh on one machine, no cluster and no config needed.

A real `velo gateway` process plays the in-cluster traffic-proxy; two small HTTP
services play the rest of the application ("remote"); a third plays the local
development candidate.  The mesh itself is the same `Up` that `velo up` runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from velo.config import load_config
from velo.engine.guard import set_parent_death_signal
from velo.engine.up import Up
from velo.runtime import run
from velo.ui import status_table


class _Http(asyncio.Protocol):
    """Just enough HTTP/1.1 for the demo's sample services."""

    def __init__(self, name: str):
        self.name = name
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1].decode(errors="replace") if b" " in head else "/"
            body = json.dumps({"service": self.name, "path": path, "time": round(time.time(), 3)}).encode() + b"\n"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def _serve(name: str) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.get_running_loop().create_server(lambda: _Http(name), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _get(port: int, path: str = "/") -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int([line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0].split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    return body


async def _demo(duration: float | None, console: Console) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="velo-demo-"))
    token = secrets.token_urlsafe(24)
    servers = []
    gateway = None
    up = None
    try:
        catalog, catalog_port = await _serve("catalog")
        inventory, inventory_port = await _serve("inventory")
        website, website_port = await _serve("website (your laptop)")
        servers += [catalog, inventory, website]
        gateway_port, reverse_port = _free_port(), _free_port()
        ready = workdir / "gateway.ready"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "velo", "gateway", "--listen", f"ws://127.0.0.1:{gateway_port}/velo",
             "--allow", f"127.0.0.1:{catalog_port}", "--allow", f"127.0.0.1:{inventory_port}",
             "--reverse-host", "127.0.0.1", "--allow-reverse", str(reverse_port),
             "--ready-file", str(ready), "--log-level", "warning",
             "--token-env", "VELO_DEMO_TOKEN"],
            env={**os.environ, "VELO_DEMO_TOKEN": token},
            stdin=subprocess.DEVNULL,
            # Its own session: the terminal's Ctrl-C reaches only the demo, which stops
            # `velo up` first and then the gateway (no "tunnel down" lines on the way out);
            # the parent-death signal still takes the gateway along if the demo is killed.
            start_new_session=True,
            preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
        )
        deadline = time.monotonic() + 15
        while not ready.exists():
            if gateway.poll() is not None or time.monotonic() > deadline:
                console.print("[red]velo demo: the gateway did not start[/red]")
                return 1
            await asyncio.sleep(0.05)
        config_path = workdir / "velocity.toml"
        config_path.write_text(f"""# written by `velo demo`; see velocity.toml.example for every key
[project]
name = "demo"

[tunnel]
token_env = "VELO_DEMO_TOKEN"

[tunnel.websocket]
url = "ws://127.0.0.1:{gateway_port}/velo"

[local.website]          # the development candidate, running "on your laptop"
port = {website_port}
expose = {reverse_port}  # where the "cluster" sends website's traffic

[remote.services.catalog]
target = "127.0.0.1:{catalog_port}"

[remote.services.inventory]
target = "127.0.0.1:{inventory_port}"
""")
        os.environ["VELO_DEMO_TOKEN"] = token
        lines: list[str] = []
        up = Up(load_config(config_path), say=lines.append)
        await up.start()
        for line in lines:
            console.print(line, highlight=False)
        if not await up.client.wait_up(15):
            console.print(f"[red]velo demo: tunnel did not come up: {up.client.last_error}[/red]")
            return 1
        for _ in range(100):
            if up.client.reverse_status.get("website", {}).get("ok"):
                break
            await asyncio.sleep(0.05)
        catalog_local = up.mesh.forwards["catalog"].spec.local_port
        body = await _get(catalog_local, "/items")
        console.print(f"[green]forward request ok[/green]: candidate -> 127.0.0.1:{catalog_local} -> tunnel -> catalog: {body.decode().strip()}")
        body = await _get(reverse_port, "/")
        console.print(f"[green]reverse request ok[/green]: cluster -> gateway :{reverse_port} -> tunnel -> website: {body.decode().strip()}")
        console.print(Text.assemble(
            "try it: ", (f"curl 127.0.0.1:{catalog_local}/", "bold"), " (forward)   ",
            (f"curl 127.0.0.1:{reverse_port}/", "bold"), " (reverse)   ",
            (f"velo status -c {config_path}", "bold"), "\nCtrl-C stops everything.",
        ))
        sys.stdout.flush()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, up.stopping.set)
        with Live(status_table(up.status()), console=console, refresh_per_second=4, transient=False) as live:
            while not up.stopping.is_set():
                if duration is not None and time.monotonic() - started >= duration:
                    break
                try:
                    await _get(catalog_local, "/tick")
                except (OSError, asyncio.TimeoutError, IndexError):
                    pass
                live.update(Group(status_table(up.status())))
                try:
                    await asyncio.wait_for(up.stopping.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
        console.print("\nvelo demo: stopping; nothing is left running")
        return 0
    finally:
        if up is not None:
            await up.stop()
        for server in servers:
            server.close()
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        for child in workdir.iterdir():
            child.unlink()
        workdir.rmdir()


def run_demo(duration: float | None = None) -> int:
    return run(_demo(duration, Console()))
