"""The local candidates' ``run`` commands: started, watched, restarted, always stopped.

One ``Candidate`` supervises one command with an explicit state machine::

    starting -> running -> (file saved | env changed) -> restarting -> starting
                        -> exited non-zero -> crashed -(backoff)-> starting
                        -> exited 0 -> exited -(next change)-> starting
    any -> stopped (velo stops)

Each run goes through ``velo.engine.guard``, the leader of its own process group, which
takes the whole group down when velo stops or dies (even by SIGKILL): no orphans.
Restarting never touches the tunnel or the listeners; ``wait_ready`` lets a reverse
stream that arrives mid-restart wait for the new process instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from velo.engine.watch import DEFAULT_IGNORE, watch_changes

log = logging.getLogger("velo.candidates")

GRACE = 5.0  # SIGTERM -> SIGKILL
QUIET = 0.3  # a burst of saves closer together than this is one restart
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
STEADY_AFTER = 10.0  # running this long resets the crash backoff
COLOURS = (36, 33, 35, 32, 34, 31)


class Candidate:
    def __init__(self, name: str, run: str | list[str], cwd: Path, say: Callable[[str], None], *,
                 watch=(), ignore=(), colour: int | None = None, grace: float = GRACE):
        self.name = name
        self.argv = ["/bin/sh", "-c", run] if isinstance(run, str) else list(run)
        self.command = run if isinstance(run, str) else shlex.join(run)
        self.cwd = cwd
        self.say = say
        self.watch = list(watch)
        self.ignore = [*DEFAULT_IGNORE, *ignore]
        self.grace = grace
        self.prefix = f"\x1b[{colour}m[{name}]\x1b[0m" if colour is not None else f"[{name}]"
        self.state = "starting"
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self.watch_error = ""
        self.env: dict[str, str] = {}
        self._running_env: dict[str, str] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._wake = asyncio.Event()
        self._reason = ""
        self._ready = asyncio.Event()  # a reverse stream reached the new process
        self._stopping = False
        self._tasks: list[asyncio.Task] = []

    # ---- control ----------------------------------------------------------------

    def start(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self._tasks.append(asyncio.create_task(self._supervise(), name=f"supervising {self.name}"))
        if self.watch:
            self._tasks.append(asyncio.create_task(self._watch(), name=f"watching the files of {self.name}"))
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        """Never die quietly: one line, and the state says so in `velo status`."""
        if task.cancelled() or self._stopping or task.exception() is None:
            return
        exc = task.exception()
        log.debug("%s failed", task.get_name(), exc_info=exc)
        self.say(f"velo: {task.get_name()} failed: {exc}")
        if task.get_name().startswith("watching"):
            self.watch_error = str(exc) or type(exc).__name__
        else:
            self.state = "failed"

    def set_env(self, env: dict[str, str]) -> None:
        """The plan's environment changed (a config map, a service appeared): restart."""
        self.env = dict(env)
        if self._running_env is not None and env != self._running_env:
            self.restart("its environment changed")

    def restart(self, reason: str) -> None:
        self._reason = self._reason or reason
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            if task.get_name().startswith("watching"):
                task.cancel()
        await self._kill()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, self.grace + 5)
            except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
                task.cancel()
        self.state = "stopped"

    def spec(self) -> tuple:
        """What a config reload compares: a change means a new Candidate."""
        return (self.argv, str(self.cwd), self.watch, self.ignore)

    def status(self) -> dict:
        up = time.time() - self.started_at if self.started_at and self.state == "running" else None
        return {"name": self.name, "state": self.state, "pid": self.pid, "restarts": self.restarts,
                "last_exit": self.last_exit, "uptime": up, "command": self.command,
                "watch_error": self.watch_error}

    async def wait_ready(self, host: str, port: int, timeout: float) -> None:
        """Until the candidate accepts on ``port`` (bounded); instant when it is steady."""
        if self.state == "running" and self._ready.is_set():
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping:
            if self.state == "running":
                try:
                    _reader, writer = await asyncio.open_connection(host, port)
                    writer.close()
                    self._ready.set()
                    return
                except OSError:
                    pass
            await asyncio.sleep(0.05)

    # ---- the state machine ------------------------------------------------------

    async def _supervise(self) -> None:
        crashes = 0
        while not self._stopping:
            self._wake.clear()
            self._reason = ""
            code = await self._run_once()
            if self._stopping:
                break
            if self._reason:  # we stopped it: a file change or a new environment
                self.restarts += 1
                continue
            self.last_exit = code
            ran_for = time.time() - (self.started_at or time.time())
            crashes = 0 if ran_for >= STEADY_AFTER else crashes
            if code == 0:
                self.state = "exited"
                self.say(f"velo: {self.name} exited with code 0; it starts again on the next change")
                await self._wake.wait()
            else:
                crashes += 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (crashes - 1))
                self.state = "crashed"
                self.say(f"velo: {self.name} crashed (exit code {code}); restarting in {delay:g}s")
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)  # a save restarts at once
                except asyncio.TimeoutError:
                    pass
            if not self._stopping:
                self.restarts += 1

    async def _run_once(self) -> int | None:
        """Start the command, stream its output, return its exit code once it ends."""
        self.state = "starting"
        self._ready.clear()
        env = {**os.environ, **self.env}
        self._running_env = dict(self.env)
        try:
            process = await asyncio.create_subprocess_exec(
                # -P: the candidate's folder is not on sys.path (its own "velo" must not shadow ours)
                sys.executable, "-P", "-m", "velo.engine.guard", str(self.grace), "--", *self.argv,
                cwd=self.cwd, env=env, start_new_session=True, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            self.say(f"velo: cannot start {self.name} in {self.cwd}: {exc.strerror}")
            return 127
        self._process = process
        self.pid, self.started_at, self.state = process.pid, time.time(), "running"
        self.say(f"velo: started {self.name}: {self.command} (pid {process.pid})")
        pump = asyncio.create_task(self._output(process))
        waiter = asyncio.create_task(process.wait())
        woken = asyncio.create_task(self._wake.wait())
        await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        if not waiter.done():
            if self._reason and not self._stopping:
                self.state = "restarting"
                self.say(f"velo: restarting {self.name}: {self._reason}")
            await self._kill()
        code = await waiter
        try:
            await asyncio.wait_for(pump, 2)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pump.cancel()
        self._process = None
        if self._reason and not self._stopping:
            self.state = "restarting"
        return code

    async def _output(self, process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line longer than the stream limit: pass it on in pieces
                line = await process.stdout.read(65536)
            if not line:
                return
            self.say(f"{self.prefix} {line.decode(errors='replace').rstrip()}")

    async def _kill(self) -> None:
        """SIGTERM to the group (the guard passes it on), SIGKILL after the grace period."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        for signum, wait in ((signal.SIGTERM, self.grace + 1), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(process.wait(), wait)
                return
            except asyncio.TimeoutError:
                continue

    async def _watch(self) -> None:
        """Every batch of saves is one restart, once the files have been quiet for QUIET."""
        changes = watch_changes(self.cwd, self.watch, self.ignore)
        loop = asyncio.get_running_loop()
        last, pending = 0.0, set()
        queue: asyncio.Queue[set[str]] = asyncio.Queue()

        async def pump():
            async for batch in changes:
                queue.put_nowait(batch)

        feeder = asyncio.create_task(pump())
        try:
            while True:
                if not pending:
                    pending |= await queue.get()
                    last = loop.time()
                try:
                    pending |= await asyncio.wait_for(queue.get(), max(0.0, last + QUIET - loop.time()))
                    last = loop.time()
                    continue
                except asyncio.TimeoutError:
                    pass
                shown = ", ".join(sorted(pending)[:3]) + (f" and {len(pending) - 3} more" if len(pending) > 3 else "")
                pending = set()
                self.restart(f"{shown} changed")
        finally:
            feeder.cancel()


def make_candidates(config, say, *, only=None, colour: bool = False) -> list[Candidate]:
    """The candidates of ``config`` that have a ``run`` command (limited to ``only``)."""
    out = []
    env_file = config.env_file_path
    for i, (name, local) in enumerate(config.local.items()):
        if not local.run or (only and name not in only):
            continue
        cwd = config.resolve_path(local.cwd) if local.cwd else config.root
        ignore = list(local.ignore)
        ignore.append(".*.velo-tmp")  # the env file being written
        if env_file is not None:
            try:
                ignore.append(env_file.resolve().relative_to(cwd.resolve()).as_posix())
            except ValueError:
                pass
        out.append(Candidate(name, local.run, cwd, say, watch=local.watch, ignore=ignore,
                             colour=COLOURS[i % len(COLOURS)] if colour else None))
    return out
