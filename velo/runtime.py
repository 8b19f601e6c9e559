"""The event loop: uvloop where installed, the stdlib loop otherwise."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Coroutine


def loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


class _LeavingExecutor(ThreadPoolExecutor):
    """The loop's default executor for `velo up`: closing the loop does not wait for a
    worker still blocked in a call (a hung apiserver, a read with a long timeout)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


def run_leaving_threads(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` (which has cleaned up by the time it returns), then exit with its code
    even if an executor thread is still stuck: Python would otherwise join it at exit, and
    a stop would last as long as the slowest blocked call."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.get_loop().set_default_executor(_LeavingExecutor(thread_name_prefix="velo-blocking"))
        code = runner.run(coro)
    stuck = [t for t in threading.enumerate() if t.name.startswith("velo-blocking") and t.is_alive()]
    if stuck:
        logging.getLogger("velo").debug("exiting with %d blocked call(s) abandoned", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
