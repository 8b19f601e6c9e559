"""Shared helpers for the mux tests: two Sessions wired back to back in memory."""

from __future__ import annotations

from collections.abc import Iterable

from velo.mux import DataReceived, Event, Session


def feed(session: Session, data: bytes, cuts: Iterable[int] = ()) -> list[Event]:
    """Deliver ``data`` split at ``cuts`` (offsets), as a socket might."""
    events: list[Event] = []
    prev = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        events += session.receive_data(data[prev:cut])
        prev = cut
    return events


class Pair:
    """A client and a server Session plus a manual "wire" between them.

    Moving bytes is explicit so tests control interleaving and can assert on
    what each side saw.
    """

    def __init__(self, client_kw: dict | None = None, server_kw: dict | None = None, **kw) -> None:
        self.client = Session(client=True, **{**kw, **(client_kw or {})})
        self.server = Session(client=False, **{**kw, **(server_kw or {})})

    def to_server(self, cuts: Iterable[int] = ()) -> list[Event]:
        return feed(self.server, self.client.data_to_send(), cuts)

    def to_client(self, cuts: Iterable[int] = ()) -> list[Event]:
        return feed(self.client, self.server.data_to_send(), cuts)

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Shuttle bytes until both sides are quiet; return (client, server) events."""
        cev: list[Event] = []
        sev: list[Event] = []
        while self.client.has_data_to_send() or self.server.has_data_to_send():
            sev += self.to_server()
            cev += self.to_client()
        return cev, sev


def received_bytes(events: Iterable[Event]) -> dict[int, bytes]:
    out: dict[int, bytearray] = {}
    for ev in events:
        if isinstance(ev, DataReceived):
            out.setdefault(ev.stream_id, bytearray()).extend(ev.data)
    return {k: bytes(v) for k, v in out.items()}
