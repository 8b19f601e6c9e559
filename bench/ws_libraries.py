#!/usr/bin/env python3
"""WebSocket libraries as a byte pipe on loopback, both ends on uvloop: why velo uses picows.

    .venv/bin/python bench/ws_libraries.py                 # about 1 minute
    .venv/bin/python bench/ws_libraries.py --duration 1 --rounds 1 --bulk-mib 64   # smoke test

Each library gets its own server process (the far end) and is driven from this process
(the near end), like velo's two processes.  Measured, interleaved over --rounds rounds
(the library order rotates every round), medians reported:

  * ping-pong: one connection, a 1 KiB binary message goes out, the server echoes it,
    the next goes out when the echo is in: round trips per second;
  * bulk up: 64 KiB binary messages client -> server (masked, as a client must) as fast
    as the library's flow control lets them go; the clock stops when the server has
    counted every byte: MB/s (10^6 bytes);
  * bulk down: the same, server -> client (unmasked; the direction of a download
    through velo's gateway).

A raw uvloop TCP Protocol with the same message sizes runs alongside as the ceiling:
what the WebSocket layer costs.  The libraries are configured as velo would use them:
no compression, no automatic pings, frames up to 64 MiB.  websockets is the "asyncio
streams" style (a coroutine and a future per message); picows is the "Protocol" style
(synchronous callbacks, explicit pause/resume_writing), which is what velo's tunnel needs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from hostinfo import cpu_model, package_version as version

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MB = 1_000_000
PING_SIZE = 1024
CHUNK = 64 * 1024
MAX_FRAME = 64 * 1024 * 1024
LIBRARIES = ("picows", "websockets", "raw-tcp")


def log(message: str) -> None:
    print(f"ws-bench: {message}", file=sys.stderr, flush=True)


def new_loop():
    import uvloop

    return uvloop.new_event_loop()


def run(coro):
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(coro)


# ---- servers (each in its own process: `ws_libraries.py --serve LIB`) -------------------
# Paths: /echo echoes binary messages; /sink counts binary bytes and answers a text
# "end" with the count; /source answers a text "go N" with N bytes of 64 KiB messages,
# then a text "end".


async def serve_picows() -> None:
    from picows import WSCloseCode, WSListener, WSMsgType, ws_create_server

    chunk = bytes(CHUNK)

    class Server(WSListener):
        def __init__(self, mode: bytes):
            self.mode = mode
            self.count = 0
            self.remaining = 0
            self.paused = False
            self.sending = False
            self.t = None

        def on_ws_connected(self, transport):
            self.t = transport

        def on_ws_frame(self, transport, frame):
            kind = frame.msg_type
            if kind == WSMsgType.BINARY:
                if self.mode == b"/echo":
                    transport.send(WSMsgType.BINARY, frame.get_payload_as_memoryview())
                else:
                    self.count += frame.payload_size
            elif kind == WSMsgType.TEXT:
                text = frame.get_payload_as_ascii_text()
                if text == "end":
                    transport.send(WSMsgType.TEXT, str(self.count).encode())
                    self.count = 0
                elif text.startswith("go "):
                    self.remaining = int(text[3:])
                    self.sending = True
                    self.pump()
            elif kind == WSMsgType.CLOSE:
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()

        def pump(self):
            t = self.t
            while self.remaining > 0 and not self.paused:
                t.send(WSMsgType.BINARY, chunk)
                self.remaining -= CHUNK
            if self.sending and self.remaining <= 0:
                self.sending = False
                t.send(WSMsgType.TEXT, b"end")

        def pause_writing(self):
            self.paused = True

        def resume_writing(self):
            self.paused = False
            if self.sending:
                self.pump()

    server = await ws_create_server(lambda request: Server(request.path), "127.0.0.1", 0, max_frame_size=MAX_FRAME)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def serve_websockets() -> None:
    from websockets.asyncio.server import serve

    chunk = bytes(CHUNK)

    async def handler(ws):
        path = ws.request.path
        if path == "/echo":
            async for message in ws:
                await ws.send(message)
        elif path == "/sink":
            count = 0
            async for message in ws:
                if isinstance(message, bytes):
                    count += len(message)
                elif message == "end":
                    await ws.send(str(count))
                    count = 0
        elif path == "/source":
            async for message in ws:
                if isinstance(message, str) and message.startswith("go "):
                    remaining = int(message[3:])
                    while remaining > 0:
                        await ws.send(chunk)
                        remaining -= CHUNK
                    await ws.send("end")

    server = await serve(handler, "127.0.0.1", 0, compression=None, max_size=MAX_FRAME, ping_interval=None)
    print(list(server.sockets)[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def serve_raw() -> None:
    """Raw TCP: the first byte picks the mode: e (echo), u+u64 (sink N bytes, reply 8-byte ok), d+u64 (source N)."""
    chunk = bytes(CHUNK)

    class Raw(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.mode = None
            self.head = b""
            self.count = 0
            self.total = 0
            self.remaining = 0
            self.paused = False

        def data_received(self, data):
            if self.mode is None:
                self.head += data
                if self.head[:1] == b"e":
                    self.mode, data = "e", self.head[1:]
                elif len(self.head) >= 9:
                    self.mode = self.head[:1].decode()
                    (n,) = struct.unpack(">Q", self.head[1:9])
                    data = self.head[9:]
                    if self.mode == "u":
                        self.total = n
                    else:
                        self.remaining = n
                        self.pump()
                        return
                else:
                    return
            if self.mode == "e":
                if data:
                    self.t.write(data)
            else:
                self.count += len(data)
                if self.count >= self.total:
                    self.t.write(b"ok")
                    self.count = 0

        def pump(self):
            while self.remaining > 0 and not self.paused:
                self.t.write(chunk)
                self.remaining -= CHUNK

        def pause_writing(self):
            self.paused = True

        def resume_writing(self):
            self.paused = False
            self.pump()

    server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


SERVERS = {"picows": serve_picows, "websockets": serve_websockets, "raw-tcp": serve_raw}


# ---- clients ---------------------------------------------------------------------------


async def picows_pingpong(port: int, seconds: float) -> float:
    from picows import WSListener, WSMsgType, ws_connect

    message = os.urandom(PING_SIZE)
    loop = asyncio.get_running_loop()

    class Client(WSListener):
        def __init__(self):
            self.n = 0
            self.end = 0.0
            self.done = loop.create_future()

        def on_ws_frame(self, transport, frame):
            if frame.msg_type != WSMsgType.BINARY:
                return
            self.n += 1
            if time.perf_counter() < self.end:
                transport.send(WSMsgType.BINARY, message)
            else:
                self.done.set_result(None)

    transport, client = await ws_connect(Client, f"ws://127.0.0.1:{port}/echo", max_frame_size=MAX_FRAME)
    try:
        start = time.perf_counter()
        client.end = start + seconds
        transport.send(WSMsgType.BINARY, message)
        await client.done
        return client.n / (time.perf_counter() - start)
    finally:
        transport.disconnect()


async def picows_bulk_up(port: int, total: int) -> float:
    from picows import WSListener, WSMsgType, ws_connect

    chunk = bytes(CHUNK)
    loop = asyncio.get_running_loop()

    class Client(WSListener):
        def __init__(self):
            self.resumed = asyncio.Event()
            self.resumed.set()
            self.reply = loop.create_future()

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.TEXT and not self.reply.done():
                self.reply.set_result(int(frame.get_payload_as_ascii_text()))

        def pause_writing(self):
            self.resumed.clear()

        def resume_writing(self):
            self.resumed.set()

    transport, client = await ws_connect(Client, f"ws://127.0.0.1:{port}/sink", max_frame_size=MAX_FRAME)
    try:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            if not client.resumed.is_set():
                await client.resumed.wait()
            transport.send(WSMsgType.BINARY, chunk)
            sent += CHUNK
        transport.send(WSMsgType.TEXT, b"end")
        got = await client.reply
        elapsed = time.perf_counter() - start
        if got != sent:
            raise RuntimeError(f"server counted {got} of {sent} bytes")
        return sent / elapsed / MB
    finally:
        transport.disconnect()


async def picows_bulk_down(port: int, total: int) -> float:
    from picows import WSListener, WSMsgType, ws_connect

    loop = asyncio.get_running_loop()

    class Client(WSListener):
        def __init__(self):
            self.count = 0
            self.done = loop.create_future()

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.BINARY:
                self.count += frame.payload_size
            elif frame.msg_type == WSMsgType.TEXT and not self.done.done():
                self.done.set_result(None)

    transport, client = await ws_connect(Client, f"ws://127.0.0.1:{port}/source", max_frame_size=MAX_FRAME)
    try:
        start = time.perf_counter()
        transport.send(WSMsgType.TEXT, f"go {total}".encode())
        await client.done
        elapsed = time.perf_counter() - start
        if client.count < total:
            raise RuntimeError(f"received {client.count} of {total} bytes")
        return client.count / elapsed / MB
    finally:
        transport.disconnect()


def _ws_connect(port: int, path: str):
    from websockets.asyncio.client import connect

    return connect(f"ws://127.0.0.1:{port}{path}", compression=None, max_size=MAX_FRAME, ping_interval=None,
                   proxy=None)


async def websockets_pingpong(port: int, seconds: float) -> float:
    message = os.urandom(PING_SIZE)
    async with _ws_connect(port, "/echo") as ws:
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            await ws.send(message)
            await ws.recv()
            n += 1
            if time.perf_counter() >= end:
                break
        return n / (time.perf_counter() - start)


async def websockets_bulk_up(port: int, total: int) -> float:
    chunk = bytes(CHUNK)
    async with _ws_connect(port, "/sink") as ws:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            await ws.send(chunk)  # returns once the write buffer is below its limit: the flow control
            sent += CHUNK
        await ws.send("end")
        got = int(await ws.recv())
        elapsed = time.perf_counter() - start
        if got != sent:
            raise RuntimeError(f"server counted {got} of {sent} bytes")
        return sent / elapsed / MB


async def websockets_bulk_down(port: int, total: int) -> float:
    async with _ws_connect(port, "/source") as ws:
        start = time.perf_counter()
        await ws.send(f"go {total}")
        count = 0
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                break
            count += len(message)
        elapsed = time.perf_counter() - start
        if count < total:
            raise RuntimeError(f"received {count} of {total} bytes")
        return count / elapsed / MB


class _RawClient(asyncio.Protocol):
    def __init__(self):
        loop = asyncio.get_running_loop()
        self.buf = 0
        self.want = 0
        self.waiter: asyncio.Future | None = None
        self.on_data = None
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.on_data(data)

    def pause_writing(self):
        self.resumed.clear()

    def resume_writing(self):
        self.resumed.set()

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def _raw_connect(port: int) -> _RawClient:
    _t, client = await asyncio.get_running_loop().create_connection(_RawClient, "127.0.0.1", port)
    return client


async def raw_pingpong(port: int, seconds: float) -> float:
    message = os.urandom(PING_SIZE)
    client = await _raw_connect(port)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"got": 0, "n": 0}
    end = 0.0

    def on_data(data):
        state["got"] += len(data)
        if state["got"] >= PING_SIZE:
            state["got"] -= PING_SIZE
            state["n"] += 1
            if time.perf_counter() < end:
                client.t.write(message)
            elif not done.done():
                done.set_result(None)

    client.on_data = on_data
    try:
        client.t.write(b"e")
        start = time.perf_counter()
        end = start + seconds
        client.t.write(message)
        await done
        return state["n"] / (time.perf_counter() - start)
    finally:
        client.t.close()


async def raw_bulk_up(port: int, total: int) -> float:
    chunk = bytes(CHUNK)
    client = await _raw_connect(port)
    done = asyncio.get_running_loop().create_future()
    client.on_data = lambda data: done.done() or done.set_result(data)
    try:
        n = -(-total // CHUNK) * CHUNK
        start = time.perf_counter()
        client.t.write(b"u" + struct.pack(">Q", n))
        sent = 0
        while sent < n:
            if not client.resumed.is_set():
                await client.resumed.wait()
            client.t.write(chunk)
            sent += CHUNK
        await done
        return sent / (time.perf_counter() - start) / MB
    finally:
        client.t.close()


async def raw_bulk_down(port: int, total: int) -> float:
    client = await _raw_connect(port)
    done = asyncio.get_running_loop().create_future()
    state = {"got": 0}
    n = -(-total // CHUNK) * CHUNK

    def on_data(data):
        state["got"] += len(data)
        if state["got"] >= n and not done.done():
            done.set_result(None)

    client.on_data = on_data
    try:
        start = time.perf_counter()
        client.t.write(b"d" + struct.pack(">Q", n))
        await done
        return state["got"] / (time.perf_counter() - start) / MB
    finally:
        client.t.close()


CLIENTS = {
    "picows": (picows_pingpong, picows_bulk_up, picows_bulk_down),
    "websockets": (websockets_pingpong, websockets_bulk_up, websockets_bulk_down),
    "raw-tcp": (raw_pingpong, raw_bulk_up, raw_bulk_down),
}
TESTS = ("pingpong", "bulk_up", "bulk_down")


# ---- driver ----------------------------------------------------------------------------


def start_server(lib: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", lib], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    line = proc.stdout.readline()
    if not line.strip():
        proc.wait()
        raise RuntimeError(f"{lib} server did not start (exit {proc.returncode})")
    return proc, int(line)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stdout.close()


async def measure(lib: str, test: str, port: int, args) -> float:
    pingpong, up, down = CLIENTS[lib]
    total = args.bulk_mib * 1024 * 1024
    if test == "pingpong":
        return await pingpong(port, args.duration)
    if test == "bulk_up":
        return await up(port, total)
    return await down(port, total)


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}, Python {platform.python_version()}, "
            f"uvloop {version('uvloop')}, picows {version('picows')}, websockets {version('websockets')}")


def report(samples: dict, errors: dict, args, load: tuple[float, float]) -> str:
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# WebSocket libraries as a byte pipe, {when}\n",
           f"- machine: {machine()}",
           f"- method: loopback, client and server in separate processes, both on uvloop; {args.rounds} round(s), "
           f"library order rotated each round, medians; ping-pong {args.duration:g}s of 1 KiB echo round trips on "
           f"one connection; bulk {args.bulk_mib} MiB in 64 KiB binary messages with flow control; no compression; "
           "MB = 10^6 bytes",
           f"- client and server share {os.cpu_count()} cores; load average (1 min) at start {load[0]:.2f}, at end "
           f"{load[1]:.2f}" + (" -- **the machine was busy: figures are not representative**"
                               if max(load) > 0.5 * (os.cpu_count() or 1) + 0.5 else ""),
           "",
           "| library | 1 KiB ping-pong (round trips/s) | x picows | bulk up, client -> server (MB/s) | x picows "
           "| bulk down, server -> client (MB/s) | x picows |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    base = {t: _median(samples.get(("picows", t))) for t in TESTS}
    for lib in args.libraries:
        cells = []
        for test in TESTS:
            value = _median(samples.get((lib, test)))
            if value is None:
                cells += ["error" if errors.get((lib, test)) else "", ""]
                continue
            ratio = value / base[test] if base[test] else None
            cells += [f"{value:,.0f}", "" if ratio is None else f"{ratio:.2f}"]
        name = lib + (" (reference, no WebSocket)" if lib == "raw-tcp" else "")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if errors:
        out.append("\nErrors:\n")
        for (lib, test), messages in sorted(errors.items()):
            out.append(f"- {lib} {test}: " + "; ".join(sorted(set(messages))))
    out.append("\nPer-round values:\n")
    out.append("| library | test | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
    out.append("|---|---|" + "---:|" * args.rounds)
    for lib in args.libraries:
        for test in TESTS:
            values = samples.get((lib, test))
            if values:
                out.append(f"| {lib} | {test} | " + " | ".join(f"{v:,.0f}" for v in values) + " |")
    return "\n".join(out) + "\n"


def _median(values):
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="picows vs websockets as a byte pipe on loopback (uvloop).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds of ping-pong per run (default 3)")
    p.add_argument("--bulk-mib", type=int, default=512, help="MiB per bulk run (default 512)")
    p.add_argument("--libraries", type=lambda s: s.split(","), default=list(LIBRARIES),
                   help="comma-separated subset of " + ",".join(LIBRARIES))
    p.add_argument("--output", type=Path, default=RESULTS / "ws_libraries.md")
    p.add_argument("--serve", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            run(SERVERS[args.serve]())
        except (KeyboardInterrupt, SystemExit):
            pass
        return 0

    unknown = [lib for lib in args.libraries if lib not in LIBRARIES]
    if unknown:
        p.error(f"unknown library {unknown}; choose from {', '.join(LIBRARIES)}")
    missing = [lib for lib in ("uvloop", *args.libraries) if lib != "raw-tcp" and version(lib) == "not installed"]
    if missing:
        log(f"missing {', '.join(missing)}; install into the venv: .venv/bin/pip install -r bench/requirements.txt")
        return 2

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    load_start = os.getloadavg()[0]
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], list[str]] = {}
    try:
        for lib in args.libraries:
            servers[lib] = start_server(lib)
        libs = list(args.libraries)
        for r in range(args.rounds):
            order = libs[r % len(libs):] + libs[:r % len(libs)]
            log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
            for test in TESTS:
                for lib in order:
                    try:
                        value = run(asyncio.wait_for(measure(lib, test, servers[lib][1], args), 300))
                    except Exception as exc:  # one library failing must not hide the others
                        errors.setdefault((lib, test), []).append(f"{type(exc).__name__}: {exc}")
                        log(f"  {lib} {test}: ERROR {type(exc).__name__}: {exc}")
                        continue
                    samples.setdefault((lib, test), []).append(value)
                    unit = "round trips/s" if test == "pingpong" else "MB/s"
                    log(f"  {lib} {test}: {value:,.0f} {unit}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc, _port in servers.values():
            stop_server(proc)
    text = report(samples, errors, args, (load_start, os.getloadavg()[0]))
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    log(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
