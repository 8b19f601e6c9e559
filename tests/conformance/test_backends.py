"""What every tunnel backend must do, end to end, with real `velo gateway` / `velo up` processes.

Parametrized over every backend (tests/conformance/conftest.py: WebSocket and HTTP/2,
each plain and over TLS, the third-party plugin in plugins/velo-tcp, and port-forward
through the test cluster's kube-apiserver and kwok).  The path
is always  test -> velo up's listener -> tunnel -> gateway -> target  (forward) or
test -> gateway's reverse port -> tunnel -> velo up -> local candidate  (reverse).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import threading
import time

import psutil
import pytest

from tests.helpers import TOKEN, free_port, http_get, wait_for
from tests.servers import blob_chunks, blob_digest

MiB = 1 << 20


def fetch_all(port: int, send: bytes = b"", timeout: float = 120) -> bytes:
    """Send ``send``, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if send:
            sock.sendall(send)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def sha256_stream(port: int, size: int, timeout: float = 120) -> str:
    """Download through a listener and hash as it arrives (never holds it all)."""
    digest = hashlib.sha256()
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    assert got == size
    return digest.hexdigest()


@pytest.mark.slow
def test_large_transfers_are_byte_exact_both_ways(mesh):
    size = 64 * MiB
    blob = mesh.procs.server("blob", size=size)
    sink = mesh.procs.server("sink")
    local_blob = mesh.procs.server("blob", size=size)
    expose = free_port()
    mesh.start_gateway(f"127.0.0.1:{blob}", f"127.0.0.1:{sink}", allow_reverse=[expose])
    up = mesh.start_up(remote={"conf-blob": f"127.0.0.1:{blob}", "conf-sink": f"127.0.0.1:{sink}"},
                       local={"conf-candidate": (local_blob, expose)})
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    expected = blob_digest(size)
    assert sha256_stream(up.port("conf-blob"), size) == expected          # forward, download
    assert sha256_stream(expose, size) == expected                        # reverse, download
    payload = b"".join(blob_chunks(size, seed=11))
    answer = fetch_all(up.port("conf-sink"), payload)                     # forward, upload
    assert answer.decode() == hashlib.sha256(payload).hexdigest()


def test_500_concurrent_streams_echo_their_own_data(mesh):
    echo = mesh.procs.server("echo")
    mesh.start_gateway(f"127.0.0.1:{echo}")
    up = mesh.start_up(remote={"conf-echo": f"127.0.0.1:{echo}"})
    port = up.port("conf-echo")

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(1024 + i * 37)
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
        writer.close()
        return got == payload

    async def main():
        return await asyncio.gather(*(one(i) for i in range(500)))

    results = asyncio.run(main())
    assert all(results) and len(results) == 500
    wait_for(lambda: up.forward("conf-echo")["open"] == 0, 15, "all echo streams to close")
    assert up.forward("conf-echo")["total"] >= 500


@pytest.mark.slow
def test_a_stalled_reader_stalls_only_its_stream_and_memory_stays_bounded(mesh):
    big = mesh.procs.server("blob", size=256 * MiB)
    other = mesh.procs.server("blob", size=32 * MiB)
    gateway = mesh.start_gateway(f"127.0.0.1:{big}", f"127.0.0.1:{other}")
    up = mesh.start_up(remote={"conf-big": f"127.0.0.1:{big}", "conf-other": f"127.0.0.1:{other}"})
    rss = lambda: psutil.Process(up.proc.pid).memory_info().rss + psutil.Process(gateway.proc.pid).memory_info().rss
    baseline = rss()
    stalled = socket.create_connection(("127.0.0.1", up.port("conf-big")))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        wait_for(lambda: up.forward("conf-big")["bytes_down"] > 256 * 1024, 15, "the stalled stream to fill up")
        plateau = up.forward("conf-big")["bytes_down"]
        # Meanwhile another stream moves 32 MiB, intact.
        assert sha256_stream(up.port("conf-other"), 32 * MiB) == blob_digest(32 * MiB)
        assert up.forward("conf-big")["bytes_down"] < plateau + 8 * MiB, "the stalled stream kept buffering"
        assert rss() - baseline < 48 * MiB, f"memory grew by {(rss() - baseline) / MiB:.0f} MiB"
    finally:
        stalled.close()


def test_half_close_delivers_the_rest_and_then_eof(mesh):
    echo = mesh.procs.server("echo")
    mesh.start_gateway(f"127.0.0.1:{echo}")
    up = mesh.start_up(remote={"conf-echo": f"127.0.0.1:{echo}"})
    payload = os.urandom(3 * MiB + 17)
    # We half-close right after sending; the echo keeps answering, then closes its side.
    assert fetch_all(up.port("conf-echo"), payload, timeout=60) == payload


class ResettingServer:
    """Accepts, reads the first bytes, then closes with SO_LINGER 0 (an RST, not a FIN)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.got = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(100)
            self.got.set()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.close()


class HoldingServer:
    """Accepts one connection and reports how it ended: "eof" or "reset"."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.ended: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted.set()
        conn.settimeout(60)
        try:
            while conn.recv(65536):
                pass
            self.ended.append("eof")
        except ConnectionResetError:
            self.ended.append("reset")
        except OSError as exc:
            self.ended.append(f"error {exc}")
        conn.close()


def test_a_reset_crosses_the_tunnel_both_ways(mesh):
    resetting, holding = ResettingServer(), HoldingServer()
    try:
        mesh.start_gateway(f"127.0.0.1:{resetting.port}", f"127.0.0.1:{holding.port}")
        up = mesh.start_up(remote={"conf-resets": f"127.0.0.1:{resetting.port}",
                                   "conf-holds": f"127.0.0.1:{holding.port}"})
        # The target resets: the local client sees a reset too, not a clean end of stream.
        with socket.create_connection(("127.0.0.1", up.port("conf-resets")), timeout=20) as sock:
            sock.sendall(b"hello")
            assert resetting.got.wait(20)
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
        # The local client resets: the target's connection is reset too.
        sock = socket.create_connection(("127.0.0.1", up.port("conf-holds")), timeout=20)
        sock.sendall(b"hello")
        assert holding.accepted.wait(20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_for(lambda: holding.ended, 20, "the target's connection to end")
        assert holding.ended == ["reset"]
    finally:
        resetting.close()


def test_a_bad_token_is_refused_and_shown(mesh):
    http = mesh.procs.server("http", text="secret")
    gateway = mesh.start_gateway(f"127.0.0.1:{http}")
    up = mesh.start_up(remote={"conf-web": f"127.0.0.1:{http}"}, wait_up=False,
                       token_env="WRONG_TOKEN", env={"WRONG_TOKEN": "not-" + TOKEN})
    status = up.wait_state("unauthorized", timeout=20)
    assert "rejected the token" in status["tunnel"]["last_error"]
    assert "attached" not in gateway.proc.log(), "no session may exist for a rejected token"


def test_the_far_end_restarted_is_followed_and_the_listener_keeps_accepting(mesh):
    http = mesh.procs.server("http", text="still-here")
    gateway = mesh.start_gateway(f"127.0.0.1:{http}")
    up = mesh.start_up(remote={"conf-web": f"127.0.0.1:{http}"})
    port = up.port("conf-web")
    assert http_get(port).endswith(b"still-here")

    gateway.proc.signal(signal.SIGKILL)
    gateway.proc.wait()
    up.wait_state("reconnecting")
    # The local listener never stops accepting: a connection made now waits for the tunnel.
    waiting = socket.create_connection(("127.0.0.1", port), timeout=2)
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    restarted = mesh.start_gateway(port=gateway.port)
    back = time.monotonic()
    body = wait_for(lambda: http_get(port, timeout=2), 10, "a request through the same listener")
    elapsed = time.monotonic() - back
    assert body.endswith(b"still-here")
    assert elapsed < 3.0, f"first request succeeded {elapsed:.2f}s after the gateway was back"
    waiting.settimeout(10)
    assert waiting.recv(65536).startswith(b"HTTP/1.1 200"), "the connection that waited was served"
    waiting.close()
    assert up.status()["tunnel"]["reconnects"] >= 1
    assert restarted.proc.running()


def test_a_silent_far_end_is_detected_by_keepalive_and_recovered(mesh):
    """No FIN, no RST: the gateway just stops answering (a frozen VM, a dead NAT entry)."""
    http = mesh.procs.server("http", text="alive")
    gateway = mesh.start_gateway(f"127.0.0.1:{http}")
    up = mesh.start_up(remote={"conf-web": f"127.0.0.1:{http}"})  # keepalive 1 s / timeout 3 s
    gateway.proc.signal(signal.SIGSTOP)
    try:
        status = up.wait_state("reconnecting", timeout=3 + 1 + 5)
        assert "no keepalive answer" in status["tunnel"]["last_error"]
    finally:
        gateway.proc.signal(signal.SIGCONT)
    up.wait_state("up", timeout=15)
    assert http_get(up.port("conf-web")).endswith(b"alive")
