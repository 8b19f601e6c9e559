"""The event loop: uvloop where installed, the stdlib loop otherwise."""

from __future__ import annotations

import asyncio
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
