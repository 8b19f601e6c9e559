"""Local candidates' `run` commands, started with the plan's environment.

Each runs in its own process group, so stopping velo stops the whole tree the
command started (npm, a dev server, its children) and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger("velo.candidates")


class Candidate:
    def __init__(self, name: str, command: str, cwd, say):
        self.name = name
        self.command = command
        self.cwd = cwd
        self.say = say
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None

    async def start(self, env: dict[str, str]) -> None:
        self.process = await asyncio.create_subprocess_shell(
            self.command, cwd=self.cwd, env={**os.environ, **env}, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self.say(f"velo: started {self.name}: {self.command} (pid {self.process.pid})")
        self._pump = asyncio.create_task(self._output())

    async def _output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            self.say(f"[{self.name}] {line.decode(errors='replace').rstrip()}")
        code = await self.process.wait()
        self.say(f"velo: {self.name} exited with code {code}")

    async def stop(self, grace: float = 5.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(process.wait(), wait)
                break
            except asyncio.TimeoutError:
                continue
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._pump.cancel()
