#!/usr/bin/env python3
"""Where a path's cost is: CPU per request and syscalls per request of every process on it.

Same processes as bench/compare.py (its Compare class: nginx, the gateway, the test cluster,
one `velo up` per backend, kubectl port-forward), on loopback. Per arm and connection count,
one wrk run of 1 KiB keep-alive requests; meanwhile the CPU time (utime + stime from
/proc/PID/stat) and the read and write syscalls (/proc/PID/io) of every process are read
before and after, and divided by the requests that went through. A hop whose reads carry
many requests each is batching; one whose CPU per request falls as connections rise pays
per message, not per request.

    .venv/bin/python bench/cost.py --arms velo-port-forward,kubectl --connections 1,32
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import bench_for, guarded  # noqa: E402
from run import BenchError, Fatal, cpu_seconds, interruptible, log, run_wrk  # noqa: E402

ARMS = "velo-websocket,velo-port-forward,kubectl"


def sample(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, read syscalls, write syscalls) of ``pid`` so far."""
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            io[key] = int(value)
    return cpu_seconds(pid), io["syscr"], io["syscw"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=ARMS, help=f"comma-separated (default {ARMS})")
    p.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    interruptible()
    wanted = args.arms.split(",")
    try:
        bench = bench_for(args, wanted)
    except Fatal as exc:
        log(str(exc))
        return exc.code
    tools = bench.tools

    def run() -> None:
        bench.start()
        ports = bench.start_arms("loopback", False)
        print(f"# loopback, 1 KiB keep-alive, wrk -t1 -d{args.duration}s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("# per process: CPU us per request / reads per request / writes per request")
        for arm in [a for a in wanted if a in ports]:
            procs = bench.path_pids("loopback", arm)
            for conns in args.connections:
                before = {name: sample(pid) for name, pid in procs.items()}
                try:
                    result = run_wrk(tools["wrk"], f"http://127.0.0.1:{ports[arm]}/1k.bin", conns, args.duration)
                except BenchError as exc:
                    print(f"{arm} c{conns}: FAILED: {exc}", flush=True)
                    continue
                after = {name: sample(pid) for name, pid in procs.items()}
                requests = result["rps"] * args.duration
                cells = []
                for name in procs:
                    cpu, reads, writes = (a - b for a, b in zip(after[name], before[name]))
                    if cpu > 0.01 or reads > requests / 100:
                        cells.append(f"{name} {1e6 * cpu / requests:.1f} us / {reads / requests:.2f} / "
                                     f"{writes / requests:.2f}")
                print(f"{arm} c{conns}: {result['rps']:,.0f} req/s; " + "; ".join(cells), flush=True)

    return guarded(bench, run)


if __name__ == "__main__":
    sys.exit(main())
