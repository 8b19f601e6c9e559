"""The small process between velo and a candidate: it makes the candidate die with velo.

``python -m velo.engine.guard GRACE -- ARGV...``.  velo starts it as the leader of a new
process group; it asks the kernel for SIGTERM when velo dies (``PR_SET_PDEATHSIG``, even
when velo is killed with SIGKILL) and starts the candidate inside that group.  On that
signal, or a SIGTERM/SIGINT/SIGHUP from velo, it passes SIGTERM to the whole group (the
candidate and everything it started), waits GRACE seconds, then SIGKILLs the group, itself
included.  A parent-death signal alone would reach only the direct child; the group is
what catches grandchildren (npm -> node, a shell -> a server).  Processes that leave the
group on purpose (``setsid``, daemons) are out of reach by design.

Exit status: the candidate's (128 + N when it was killed by signal N).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _stop_group(child: subprocess.Popen | None, grace: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches us too
    group = os.getpgrp()
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while child is not None and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(group, signal.SIGKILL)  # stragglers and this guard; nothing survives


def main(argv: list[str]) -> int:
    grace = float(argv[0])
    command = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    if os.getpgrp() != os.getpid():  # never signal a group we did not make (a shell's)
        os.setpgid(0, 0)
    parent = os.getppid()
    child: subprocess.Popen | None = None

    def on_signal(_signum, _frame):
        _stop_group(child, grace)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # velo died before the kernel was told
        _stop_group(None, 0)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"velo: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
        return 127
    code = child.wait()
    # The candidate is gone; whatever it left running in the group goes with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    except ProcessLookupError:
        pass
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
