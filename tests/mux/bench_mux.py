"""Micro-benchmark: 1 KiB data frames through two wired Sessions.

Not a test (no ``test_`` prefix). Run:
    .venv/bin/python tests/mux/bench_mux.py [frames] [streams] [chunk]
Measures the full cycle a tunnel pays: send_data -> data_to_send ->
receive_data (fed in ``chunk``-sized pieces, like socket reads) ->
acknowledge -> window update back to the sender.
"""

from __future__ import annotations

import sys
import time

from velo.mux import DataReceived, Session


def run(frames: int = 200_000, nstreams: int = 4, chunk: int = 65536) -> float:
    client = Session(client=True)
    server = Session(client=False)
    sids = [client.open_stream() for _ in range(nstreams)]
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())

    payload = b"x" * 1024
    batch = 64  # frames per "write burst" before flushing, like a busy tunnel
    sent = received = 0
    t0 = time.perf_counter()
    while sent < frames:
        for i in range(batch):
            if client.send_data(sids[i % nstreams], payload) != 1024:
                raise RuntimeError("window exhausted: receiver not crediting")
        sent += batch
        wire = client.data_to_send()
        for off in range(0, len(wire), chunk):
            for ev in server.receive_data(wire[off : off + chunk]):
                if type(ev) is DataReceived:
                    received += len(ev.data)
                    server.acknowledge_received_data(ev.stream_id, len(ev.data))
        back = server.data_to_send()
        if back:
            client.receive_data(back)
    elapsed = time.perf_counter() - t0
    assert received == sent * 1024, (received, sent)
    return frames / elapsed


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    frames = args[0] if args else 200_000
    nstreams = args[1] if len(args) > 1 else 4
    chunk = args[2] if len(args) > 2 else 65536
    best = max(run(frames, nstreams, chunk) for _ in range(3))
    print(
        f"{best:,.0f} frames/s ({best * 1024 / 1e6:,.1f} MB/s payload), 1 KiB frames, "
        f"{nstreams} streams, {chunk}-byte reads (best of 3)"
    )


if __name__ == "__main__":
    main()
