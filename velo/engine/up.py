"""`velo up`: config -> provider -> plan -> mesh, then keep them in step.

Three things can change the plan while it runs: an edit of velocity.toml, the
provider's inventory (services appearing in the cluster), and nothing else.
Each goes through the same ``_apply`` so there is one reconciler.  A bad edit
keeps the last good config running and says why.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Callable

from velo.config import ConfigError, VelocityConfig, load_config
from velo.engine import envfile
from velo.engine.candidates import Candidate, make_candidates
from velo.engine.client import IncompatiblePeer, TunnelClient
from velo.engine.control import ControlServer, socket_path
from velo.engine.mesh import Mesh
from velo.plan import WILDCARD_HOSTS, Inventory, Plan, build_plan, describe, describe_forward
from velo.plugins import PluginError, get_backend, get_provider
from velo.provider import ProviderError, ProviderSession

log = logging.getLogger("velo.up")


CANDIDATE_WAIT = 15.0  # how long a reverse stream waits for a restarting candidate


class StartupError(Exception):
    """`velo up` cannot start; the message is for the user (exit code 2)."""


class Up:
    def __init__(self, config: VelocityConfig, *, say: Callable[[str], None] = print,
                 run_candidates: bool = True, only: list[str] | None = None, colour: bool = False,
                 listen_host: str | None = None):
        self.config = config
        self.run_candidates = run_candidates  # False: `velo up --no-run`, an orchestrator runs them
        self.only = only
        self.colour = colour
        self.say = say
        self.listen_host = listen_host  # overrides remote.listen (velo up --compose)
        self.session_id = secrets.token_hex(6)
        self.provider: ProviderSession | None = None
        self.inventory = Inventory()
        self.client: TunnelClient | None = None
        self.mesh: Mesh | None = None
        self.control: ControlServer | None = None
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.reloads = 0
        self.fatal = ""
        self.last_reload_error = ""
        self._config_digest = _digest(config.source_path)
        # One reconciliation at a time: a live edit holds it from its check until its swap or
        # rollback, so a cluster change that arrives meanwhile is applied after it, on top of
        # whichever config won (never half-way, never undone by the rollback).
        self._reconciling = asyncio.Lock()
        self._edits = 0  # live edits taken up (applied or rolled back), counted under that lock
        self._tasks: list[asyncio.Task] = []
        self._must_run: set[asyncio.Task] = set()
        self.candidates: list[Candidate] = []
        self._env_warned: set[str] = set()

    # ---- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        check_backends(config)
        provider = get_provider(config.cluster.provider)
        self.provider = await provider.open(config)
        self.inventory = await self.provider.inventory()
        tunnel = config.tunnel
        self.client = TunnelClient(
            self._endpoints,
            self._resolve_reverse,
            session_id=self.session_id,
            connect_timeout=tunnel.connect_timeout,
            keepalive_interval=tunnel.keepalive_interval,
            keepalive_timeout=tunnel.keepalive_timeout,
            reconnect_max_delay=tunnel.reconnect_max_delay,
            wait_for_tunnel=tunnel.wait_for_tunnel,
        )
        self.mesh = Mesh(self.client)
        self.control = ControlServer(
            socket_path(config.root), {"status": lambda _r: self.status(), "shutdown": self._shutdown_request,
                                       "env": lambda _r: {"env": self.mesh.plan.env,
                                                          "secret_keys": sorted(self.mesh.plan.secret_keys)}}
        )
        try:
            await self.control.start()
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        plan = build_plan(config, self.inventory, listen_host=self.listen_host)
        problems = await self.mesh.apply(plan)
        if problems:
            raise StartupError("\n".join(problems))
        tunnel_task = self.client.start()  # before the provider's start: it intercepts only once this path works
        self._must_run = {tunnel_task}  # these end only by stop(); other watchers may finish
        tunnel_task.add_done_callback(self._task_done)
        await self.provider.start(self.say, self._path_ready)
        self._write_env(plan)
        if self.run_candidates:
            self.candidates = make_candidates(config, self.say, only=self.only, colour=self.colour)
            for candidate in self.candidates:
                if not candidate.cwd.is_dir():
                    raise StartupError(f"{config.source_path.name}: local.{candidate.name}.cwd: "
                                       f"folder {candidate.cwd} does not exist")
            for candidate in self.candidates:  # the listeners are bound: the env is true now
                candidate.start(plan.env)
        for coro, name in ((self._watch_config(), "watching velocity.toml"), (self._watch_provider(), "watching the provider"),
                           (self.provider.keepalive(), "keeping the session alive")):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        self._describe(plan)

    async def _endpoints(self):
        return await self.provider.endpoints()

    async def _path_ready(self, timeout: float) -> str | None:
        """None once the tunnel is up and the gateway reported every reverse listener bound;
        otherwise, after ``timeout`` (or at the gateway's first refusal), why not."""
        client = self.client
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            wanted = [r["name"] for r in client.reverse_wanted]
            status = client.reverse_status
            refused = [f"{n}: {status[n].get('error')}" for n in wanted if n in status and not status[n].get("ok")]
            if client.state == "up" and all(status.get(n, {}).get("ok") for n in wanted):
                return None
            if refused:
                return "the gateway could not open reverse " + "; ".join(refused)
            if asyncio.get_running_loop().time() >= deadline:
                if client.state != "up":
                    return f"the tunnel is not connected ({client.last_error or client.state})"
                return "the gateway did not confirm the reverse listeners " + ", ".join(wanted)
            await asyncio.sleep(0.1)

    async def _resolve_reverse(self, header: dict):
        host, port = await self.mesh.resolve_reverse(header)
        name = str(header.get("name", "")).split("/")[0]
        for candidate in self.candidates:  # mid-restart: wait for the new process (bounded)
            if candidate.name == name:
                await candidate.wait_ready(host, port, timeout=CANDIDATE_WAIT)
        return host, port

    def handle_signals(self) -> None:
        """SIGINT/SIGTERM ask for a clean stop in every state, start-up included; a second
        Ctrl-C exits at once (the user has seen the first one being slow)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass

    def _on_signal(self, signum: int) -> None:
        if self.stopping.is_set() and signum == signal.SIGINT:
            self.say("velo: second Ctrl-C: exiting now, without cleaning up (`velo down` cleans up later)")
            os._exit(130)
        self.stopping.set()

    async def start_unless_stopped(self) -> bool:
        """``start()``, abandoned as soon as a stop is asked (signal, `velo down`): waiting for
        the cluster or a slow provider must not delay a stop. False when stopped first."""
        starting = asyncio.ensure_future(self.start())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not starting.done():
                starting.cancel()
                await asyncio.wait({starting}, timeout=5)
        if not starting.done():
            log.error("start-up did not stop within 5s of being cancelled; stopping anyway")
            return False
        if starting.cancelled():
            return False
        starting.result()  # re-raises StartupError and friends
        return True

    async def run_until_stopped(self) -> None:
        self.handle_signals()
        await self.stopping.wait()

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.candidates))  # their grace periods overlap
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task that swallows its cancellation must not hold up the stop
            done, _ = await asyncio.wait(self._tasks, timeout=3)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: it was reported by _task_done already
        if self.mesh is not None:
            self.mesh.close()
        if self.client is not None:
            await self.client.stop()
        if self.provider is not None:
            try:
                await self.provider.close()
            except ProviderError as exc:
                self.say(f"velo: cleaning up failed: {exc}; run `velo down` to retry")
        if self.control is not None:
            self.control.close()

    def _task_done(self, task: asyncio.Task) -> None:
        """A background task must never die quietly: that would freeze the mesh without a
        word. Its end stops the session, with one line saying why (traceback at debug)."""
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        if isinstance(exc, (ProviderError, IncompatiblePeer)):  # said for the user already
            self.fatal = str(exc)
        elif exc is not None:
            log.debug("%s failed", task.get_name(), exc_info=exc)
            self.fatal = f"{task.get_name()} failed: {type(exc).__name__}: {exc}"
        elif task in self._must_run:
            self.fatal = f"{task.get_name()} ended unexpectedly"
        else:
            return
        self.say(f"velo: {self.fatal}; stopping")
        self.stopping.set()

    def _shutdown_request(self, _request: dict) -> dict:
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return {"ok": True}

    # ---- reconciling ------------------------------------------------------------

    async def _apply(self, reason: str | None) -> None:
        """``reason`` None: say nothing (going back to the last good config, already said)."""
        plan = build_plan(self.config, self.inventory, listen_host=self.listen_host)
        before = self.mesh.plan
        problems = await self.mesh.apply(plan)
        for problem in problems:
            self.say(f"velo: {problem}")
        self._write_env(plan)
        for candidate in self.candidates:
            candidate.set_env(plan.env)
        added = {f.key for f in plan.forwards} - {f.key for f in before.forwards}
        removed = {f.key for f in before.forwards} - {f.key for f in plan.forwards}
        if reason is not None and (added or removed or plan.reverses != before.reverses):
            self.say(f"velo: {reason}: " + ", ".join(
                [f"+{k}" for k in sorted(added)] + [f"-{k}" for k in sorted(removed)]
                or ["reverse routes updated"]
            ))
            for forward in plan.forwards:
                if forward.key in added and forward.key in self.mesh.forwards:
                    self.say(describe_forward(forward))

    async def _watch_config(self) -> None:
        from watchfiles import awatch

        path = self.config.source_path
        async for _changes in awatch(
            path.parent,
            watch_filter=lambda _change, changed: Path(changed).name == path.name,
            recursive=False,  # the folder itself, never node_modules & co below it
            debounce=100,
            step=50,
        ):
            digest = _digest(path)
            if digest == self._config_digest:
                continue
            self._config_digest = digest
            try:
                new = load_config(path)
                check_backends(new)
            except (ConfigError, PluginError) as exc:
                self.last_reload_error = str(exc)
                self.say(f"velo: {path.name} not applied, still running the last good config:\n{exc}")
                continue
            refused = self.provider.reload_refused(new)
            if refused:
                self.last_reload_error = refused
                self.say(f"velo: {path.name} not applied, still running the last good config: {refused}")
                continue
            await self._reload(new)

    async def _reload(self, new: VelocityConfig) -> None:
        async with self._reconciling:
            self._edits += 1
            await self._reload_locked(new)

    async def _reload_locked(self, new: VelocityConfig) -> None:
        old, self.config = self.config, new
        self.last_reload_error = ""
        self.reloads += 1
        inventory = self.inventory
        if new.cluster != old.cluster or new.tunnel != old.tunnel:
            await self.provider.close()
            self.provider = await get_provider(new.cluster.provider).open(new)
            tunnel = new.tunnel
            client = self.client
            client.connect_timeout = tunnel.connect_timeout
            client.keepalive_interval = tunnel.keepalive_interval
            client.keepalive_timeout = tunnel.keepalive_timeout
            client.reconnect_max_delay = tunnel.reconnect_max_delay
            client.wait_for_tunnel = tunnel.wait_for_tunnel
            client.restart()
            self.inventory = await self.provider.inventory()
        else:
            try:  # checked before anything changes: a refused edit touches nothing
                await self.provider.reconfigure(new)
                self.inventory = await self.provider.inventory()
            except ProviderError as exc:
                return await self._not_applied(old, inventory, exc)
        await self._apply(f"{new.source_path.name} changed")
        try:  # the mesh has the new routes; the provider redirects traffic to them
            await self.provider.apply_live(self.say, self._path_ready)
        except ProviderError as exc:
            # The mesh drops what the edit added (its reverse listeners) before the line says
            # the last good config runs: `velo status` right after it shows that config.
            await self._not_applied(old, inventory, exc, reapply=True)
            return
        await self._sync_candidates()

    async def _not_applied(self, old: VelocityConfig, inventory: Inventory, exc: ProviderError, *,
                           reapply: bool = False) -> None:
        self.config, self.inventory = old, inventory
        self.provider.update_config(old)
        self.reloads -= 1
        self.last_reload_error = str(exc)
        if reapply:
            await self._apply(None)
        self.say(f"velo: {old.source_path.name} not applied, still running the last good config: {exc}")

    async def _sync_candidates(self) -> None:
        """After a reload: candidates whose run/cwd/watch/ignore changed start anew."""
        if not self.run_candidates:
            return
        wanted = {c.name: c for c in make_candidates(self.config, self.say, only=self.only, colour=self.colour)}
        kept = []
        for candidate in self.candidates:
            if candidate.name in wanted and wanted[candidate.name].spec() == candidate.spec():
                kept.append(candidate)
                del wanted[candidate.name]
            else:
                self.say(f"velo: {candidate.name}: run settings changed" if candidate.name in wanted
                         else f"velo: {candidate.name}: no longer run by velo")
                await candidate.stop()
        for candidate in wanted.values():
            if not candidate.cwd.is_dir():
                self.say(f"velo: local.{candidate.name}.cwd: folder {candidate.cwd} does not exist; not started")
                continue
            candidate.start(self.mesh.plan.env)
            kept.append(candidate)
        self.candidates = kept

    async def _watch_provider(self) -> None:
        edits = self._edits
        async for inventory in self.provider.watch():
            async with self._reconciling:
                if self._edits != edits:
                    # An edit came between: this was read under a config that may not be the
                    # one running now (a rolled-back add's routes), so read it again.
                    edits = self._edits
                    try:
                        inventory = await self.provider.inventory()
                    except ProviderError:  # the API failing: the watch's own retries go on
                        pass
                self.inventory = inventory
                await self._apply("cluster changed")

    # ---- output -----------------------------------------------------------------

    def _write_env(self, plan: Plan) -> None:
        env = self.config.env
        if env.file:
            for warning in envfile.write(self.config.root / env.file, plan.env, env.format):
                if warning not in self._env_warned:  # the file is rewritten on every change
                    self._env_warned.add(warning)
                    self.say(f"velo: {env.file}: {warning}")

    def _describe(self, plan: Plan) -> None:
        config = self.config
        self.say(f"velo: project {config.project.name}, provider {config.cluster.provider}, session {self.session_id}")
        for line in describe(plan):
            self.say(line)
        if plan.forwards and plan.forwards[0].local_host in WILDCARD_HOSTS:
            self.say(f"velo: forwards listen on all interfaces ({plan.forwards[0].local_host}): "
                     "anyone who reaches this machine reaches the cluster's services through them")
        if config.env.file:
            self.say(f"  env     {len(plan.env)} variables in {config.env.file}")
        self.say("velo: running; Ctrl-C stops and cleans up")

    def status(self) -> dict:
        status = self.mesh.status()
        remote = self.provider.status() if self.provider is not None else {}
        status.update(
            project=self.config.project.name,
            provider=self.config.cluster.provider,
            session=self.session_id,
            config=str(self.config.source_path),
            started=self.started,
            reloads=self.reloads,
            last_reload_error=self.last_reload_error,
            candidates=[c.status() for c in self.candidates],
            cluster=remote,
        )
        no_route = remote.get("no_route") or {}
        for reverse in status["reverses"]:  # bound, but the provider knows nothing is sent to it
            why = no_route.get(reverse["name"].split("/")[0])
            if why and reverse["state"] == "listening":
                reverse["state"] = f"no route: {why}"
        return status


def check_backends(config: VelocityConfig) -> None:
    """Fail now, naming the key, rather than retrying a backend that cannot exist."""
    tunnel = config.tunnel
    for i, name in enumerate(tunnel.preference):
        get_backend(name, key=f"tunnel.prefer[{i}]" if tunnel.prefer else f"tunnel.{name}")
    get_provider(config.cluster.provider)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
