"""What machine a benchmark ran on: shared by bench/run.py and bench/ws_libraries.py."""

from __future__ import annotations

import importlib.metadata


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _proc_field("/proc/cpuinfo", "model name") or "?"


def memory() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal:")
    return f"{int(total.split()[0]) / 1024 / 1024:.0f} GiB RAM" if total else "?"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
