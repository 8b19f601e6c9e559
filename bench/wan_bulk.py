#!/usr/bin/env python3
"""One 64 MiB download over the emulated WAN, alternated between arms, every run printed.

The WAN download figure of bench/compare.py is a median of a few runs on a shared machine;
this says whether a difference between arms is real or noise, and whether an arm is limited
by CPU or by a window. Same processes as bench/compare.py (its Compare class): nginx, the
gateway, the test cluster (kube-apiserver + kwok), toxiproxy with --latency-ms each way and
a 1 Gbit/s cap on each arm's laptop -> cluster hop. Arms (default: direct, velo-websocket,
velo-port-forward, kubectl) are rotated each round, so every arm is measured within the
same minute as the others. Per download it prints MB/s and the CPU seconds spent in that
download by `velo up`, the gateway, kube-apiserver, kwok and toxiproxy (utime + stime from
/proc/PID/stat): an arm that is slow with a process near 1 CPU-second per wall-second is
CPU-bound; slow with everything idle is waiting on a window.

    .venv/bin/python bench/wan_bulk.py [--rounds 8] [--arms direct,velo-websocket,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import BULK_MIB, bench_for, guarded  # noqa: E402
from run import BenchError, Fatal, cpu_seconds, interruptible, log, run_curl  # noqa: E402
from wan import GBIT_KBPS  # noqa: E402

ARMS = "direct,velo-websocket,velo-port-forward,kubectl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--arms", default=ARMS, help=f"comma-separated (default {ARMS}; also velo-h2, kubectl-spdy)")
    p.add_argument("--latency-ms", type=float, default=10.0, help="added each way")
    p.add_argument("--rate-kbps", type=int, default=GBIT_KBPS, help="the cap during the download (KB/s)")
    p.add_argument("--bulk-timeout", type=float, default=120.0)
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
    samples: dict[str, list[float]] = {a: [] for a in wanted}

    def run() -> None:
        bench.start()
        ports = bench.start_arms("wan", True)
        print(f"# {BULK_MIB} MiB download, {args.latency_ms:g} ms added each way, cap {args.rate_kbps} KB/s; "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("# CPU seconds during the download: " + ", ".join(["up", *bench.shared_pids()]))
        for r in range(args.rounds):
            order = wanted[r % len(wanted):] + wanted[:r % len(wanted)]
            for arm in order:
                procs = bench.path_pids("wan", arm)
                bench.toxiproxy.set_rate(arm, args.rate_kbps)
                before = {k: cpu_seconds(v) for k, v in procs.items()}
                try:
                    res = run_curl(tools["curl"], f"http://127.0.0.1:{ports[arm]}/bulk-{BULK_MIB}m.bin",
                                   BULK_MIB << 20, args.bulk_timeout)
                except BenchError as exc:
                    print(f"round {r + 1} {arm:<18} FAILED: {exc}", flush=True)
                    continue
                finally:
                    bench.toxiproxy.set_rate(arm, None)
                cpu = {k: cpu_seconds(v) - before[k] for k, v in procs.items()}
                samples[arm].append(res["mbps"])
                print(f"round {r + 1} {arm:<18} {res['mbps']:6.1f} MB/s  {res['total_s']:5.2f} s  cpu "
                      + " ".join(f"{k}={v:.2f}" for k, v in cpu.items())
                      + f"  load {os.getloadavg()[0]:.2f}", flush=True)
        direct = statistics.median(samples["direct"]) if samples.get("direct") else None
        print("# medians:")
        for arm, values in samples.items():
            if values:
                med = statistics.median(values)
                ratio = f" = {med / direct:.2f} of direct" if direct else ""
                print(f"#   {arm:<18} {med:6.1f} MB/s{ratio} (min {min(values):.1f}, max {max(values):.1f}, "
                      f"n={len(values)})")
        print(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    return guarded(bench, run)


if __name__ == "__main__":
    sys.exit(main())
