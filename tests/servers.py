"""Small real servers the tests run as separate processes.

    python -m tests.servers echo|blob|sink|http|reset --ready-file F [--size N] [--text T]

echo: echoes every byte.  blob: sends --size deterministic bytes then closes.
sink: reads until EOF, answers the sha256 hex of what it got.  http: answers
every request line with --text (HTTP/1.1, keep-alive).  reset: sends --size bytes,
then resets the connection (RST) as soon as the client sends anything: a peer that
dies mid-transfer, at a moment the test chooses.  The bound port is written
to --ready-file once listening, so tests wait for a fact, not a sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
from pathlib import Path


def blob_chunks(size: int, seed: int = 7, chunk: int = 1 << 20):
    """Deterministic, incompressible bytes: the test recomputes the same digest."""
    counter = 0
    sent = 0
    while sent < size:
        block = b"".join(
            hashlib.sha256(f"{seed}:{counter}:{i}".encode()).digest() for i in range(chunk // 32)
        )
        counter += 1
        block = block[: size - sent]
        sent += len(block)
        yield block


def blob_digest(size: int, seed: int = 7) -> str:
    digest = hashlib.sha256()
    for block in blob_chunks(size, seed):
        digest.update(block)
    return digest.hexdigest()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.write_eof()  # half-close: echo what is still in flight, then EOF
        return True

    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()


class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.digest = hashlib.sha256()

    def data_received(self, data):
        self.digest.update(data)

    def eof_received(self):
        self.transport.write(self.digest.hexdigest().encode())
        self.transport.close()


class Reset(asyncio.Protocol):
    def __init__(self, size: int):
        self.size = size

    def connection_made(self, transport):
        self.transport = transport
        for block in blob_chunks(self.size):
            transport.write(block)

    def data_received(self, data):
        import socket
        import struct

        self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


async def blob(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    try:
        for block in blob_chunks(size):
            writer.write(block)
            await writer.drain()
        writer.close()
    except ConnectionError:
        pass


class Http(asyncio.Protocol):
    def __init__(self, text: bytes):
        self.body = text
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            close = b"connection: close" in head.lower()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(self.body), b"Connection: close\r\n" if close else b"", self.body)
            )
            if close:
                self.transport.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["echo", "blob", "sink", "http", "reset"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--text", default="hello")
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    if args.kind == "blob":
        server = await asyncio.start_server(lambda r, w: blob(r, w, args.size), args.host, args.port, backlog=4096)
    else:
        factory = {"echo": Echo, "sink": Sink, "http": lambda: Http(args.text.encode()),
                   "reset": lambda: Reset(args.size)}[args.kind]
        server = await loop.create_server(factory, args.host, args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, args.ready_file)
    await asyncio.Event().wait()


if __name__ == "__main__":
    # The stdlib loop, not uvloop: under bursts of thousands of echo connections
    # uvloop 0.23 aborted this server ("double free or corruption", MagicStack/uvloop#706
    # looks alike), and a test target must not be the thing that fails.
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
