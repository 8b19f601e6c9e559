"""An in-process endpoint for a tunnel stream.

The control stream is an ordinary mux stream, but its far end is Python code,
not a socket.  MessageChannel plays the socket's part for a Bridge, so control
traffic gets the same flow control and lifecycle as every other stream and the
tunnel needs no second code path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from velo import protocol

log = logging.getLogger("velo.channel")


class MessageChannel(asyncio.Transport):
    def __init__(self, on_message: Callable[[dict], None], on_close: Callable[[], None] | None = None):
        super().__init__()
        self._on_message = on_message
        self._on_close = on_close
        self._reader = protocol.MessageReader()
        self._protocol: asyncio.Protocol | None = None
        self._closing = False
        self._queued: list[dict] = []  # sent before the stream was attached

    # the tunnel side sees a socket
    def attach(self, bridge: asyncio.Protocol) -> None:
        self._protocol = bridge
        bridge.connection_made(self)  # the acceptor's reply goes first
        queued, self._queued = self._queued, []
        for message in queued:
            self.send(message)

    def write(self, data) -> None:
        if self._closing:
            return
        try:
            messages = self._reader.feed(data)
        except protocol.MessageError as exc:
            log.warning("control stream: %s", exc)
            self.abort()
            return
        for message in messages:
            self._on_message(message)

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._protocol is not None:
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)
        if self._on_close is not None:
            self._on_close()

    abort = close

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    # the Python side sends messages
    def send(self, message: dict) -> None:
        """Towards the peer; before the stream is attached, held until it is (a gateway's
        hello is said before its resolve callback even returned the channel)."""
        if self._closing:
            return
        if self._protocol is None:
            self._queued.append(message)
            return
        self._protocol.data_received(protocol.encode(message))
