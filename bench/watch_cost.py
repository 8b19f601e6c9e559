"""What watching costs `velo up` in a project with a big tree (issue 11).

Makes a project folder with N files (default 100,000, mostly under node_modules, as a
JavaScript project has), a candidate with ``watch = ["src/**/*.js"]``, starts `velo up`
(static provider, a local gateway), and reports: time to ready, inotify watches held, and
CPU time used while idle.  ``--recursive-config-watch`` brings back the old config watcher
(the whole folder, recursively) for comparison, by patching it in the measured process.

    .venv/bin/python bench/watch_cost.py [--files 100000] [--idle 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import Procs, free_port, write_config  # noqa: E402

OLD_WATCHER = r'''
import sys, runpy
import watchfiles
_awatch = watchfiles.awatch
def awatch(*paths, **kw):
    kw["recursive"] = True   # what velo did before: the project folder, recursively
    return _awatch(*paths, **kw)
watchfiles.awatch = awatch
sys.argv = ["velo", *sys.argv[1:]]
runpy.run_module("velo", run_name="__main__")
'''


def make_tree(root: Path, files: int, per_dir: int) -> None:
    for i in range(files // per_dir):
        folder = root / "node_modules" / f"pkg{i // 50}" / f"lib{i % 50}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_dir):
            (folder / f"f{j}.js").write_bytes(b"")
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "index.js").write_text("// app\n")


def inotify_watches(pid: int) -> int:
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                total += sum(1 for line in (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().splitlines()
                             if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--per-dir", type=int, default=10, help="files per folder (node_modules: ~10)")
    parser.add_argument("--recursive-config-watch", action="store_true")
    args = parser.parse_args()
    os.environ["VELO_TEST_TOKEN"] = "bench-token-0123456789"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        project = tmp / "project"
        project.mkdir()
        made = time.monotonic()
        make_tree(project, args.files, args.per_dir)
        made = time.monotonic() - made
        procs = Procs(tmp)
        try:
            http = procs.server("http", text="x")
            gateway = procs.gateway(f"127.0.0.1:{http}", token="bench-token-0123456789")
            port = free_port()
            config = write_config(project / "velocity.toml", gateway_url=gateway.url,
                                  remote={"benchweb": f"127.0.0.1:{http}"}, local={"website": (port, free_port())})
            config.write_text(config.read_text().replace(
                f"port = {port}\n", f'port = {port}\nrun = "sleep 3600"\nwatch = ["src/**/*.js"]\n'))
            script = tmp / "old_watcher.py"
            script.write_text(OLD_WATCHER)
            argv = ([sys.executable, str(script)] if args.recursive_config_watch else [sys.executable, "-m", "velo"])
            started = time.monotonic()
            proc = procs.start("up", [*argv, "up", "-c", str(config)], cwd=project,
                               env={"PYTHONPATH": str(ROOT)})
            proc.wait_log("velo: running", timeout=300)
            ready = time.monotonic() - started
            time.sleep(2)  # let the watchers finish walking the tree before measuring idle
            watches = inotify_watches(proc.pid)
            startup_cpu = cpu_seconds(proc.pid)
            before, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.idle)
            idle_cpu = (cpu_seconds(proc.pid) - before) / (time.monotonic() - t0)
            result = {
                "files": args.files, "folders": args.files // args.per_dir, "config_watch": "recursive (old)" if args.recursive_config_watch else "folder only",
                "tree_made_s": round(made, 1), "ready_s": round(ready, 2), "inotify_watches": watches, "startup_cpu_s": round(startup_cpu, 2),
                "idle_cpu_percent": round(100 * idle_cpu, 2), "rss_mib": round(
                    int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1),
            }
            print(json.dumps(result))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
