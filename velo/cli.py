"""The `velo` command: a thin shell over the engine.

Every user error ends here as one or two lines on stderr and exit code 2;
no traceback reaches the user for anything they can fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from velo import __version__
from velo.config import ConfigError, find_config, load_config
from velo.plugins import PluginError
from velo.provider import ProviderError

EXIT_USAGE = 2


class UserError(Exception):
    """Anything the user can fix; printed as is, exit code 2."""


def _config(args):
    path = Path(args.config) if args.config else find_config(Path.cwd())
    return load_config(path)


def _log_level(args) -> None:
    level = getattr(logging, (getattr(args, "log_level", None) or "info").upper(), logging.INFO)
    logging.basicConfig(level=level, format="velo: %(message)s", stream=sys.stderr)
    for noisy in ("picows", "watchfiles", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# ---- commands ----------------------------------------------------------------------


def cmd_up(args) -> int:
    from velo.engine.up import StartupError, Up
    from velo.runtime import run_leaving_threads

    config = _config(args)
    _log_level(args)
    only = [name for item in args.only or [] for name in item.split(",") if name]
    unknown = [name for name in only if name not in config.local]
    if unknown:
        raise UserError(f"--only {', '.join(unknown)}: no such [local.<name>] in {config.source_path.name} "
                        f"(candidates: {', '.join(config.local) or 'none'})")

    compose = _compose_up(config) if args.compose else None

    async def main() -> int:
        up = Up(config, say=lambda line: print(line, flush=True), run_candidates=not args.no_run,
                only=only or None, colour=sys.stdout.isatty() and not os.environ.get("NO_COLOR"),
                listen_host=compose and compose.listen_host)
        up.handle_signals()  # before start: a stop while waiting for the cluster is a stop too
        try:
            if await up.start_unless_stopped():
                if compose is not None:
                    await compose.start(up, lambda line: print(line, flush=True))
                await up.run_until_stopped()
        except StartupError as exc:
            raise UserError(str(exc)) from None
        finally:  # also when start fails half-way or a stop lands during it
            if up.stopping.is_set():
                print("velo: stopping", flush=True)
            if compose is not None:
                await compose.stop()
            await up.stop()
        return 1 if up.fatal else 0

    return run_leaving_threads(main())


def cmd_run(args) -> int:
    """`velo run -- CMD`: CMD gets the environment of the running `velo up`, then replaces velo."""
    config = _config(args)
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise UserError("velo run needs a command: velo run -- CMD [ARGS...]")
    env, _secret_keys = _session_env(config)
    if env is None:
        raise UserError(f"no `velo up` is running for {config.root}; start it first")
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, {**os.environ, **env})
    except OSError as exc:
        raise UserError(f"cannot run {command[0]!r}: {exc.strerror}") from None


class _ComposeUp:
    """`velo up --compose`: forwards on the docker bridge, the override, `docker compose up`."""

    def __init__(self, config, listen_host: str):
        self.config = config
        self.listen_host = listen_host
        self.run = None

    async def start(self, up, say) -> None:
        from velo.integrations import compose

        try:
            path, lines = compose.write(self.config, up.mesh.plan)
        except compose.ComposeError as exc:
            raise UserError(str(exc)) from None
        for line in lines:
            say(line)
        say(f"velo: wrote {path.name}; forwards listen on {self.listen_host} (the docker bridge), "
            f"where containers reach them as {compose.HOST_ALIAS}")

        def exited(code: int) -> None:
            if not up.stopping.is_set():
                say(f"velo: docker compose up exited with code {code}; stopping")
                up.fatal = up.fatal or (f"docker compose up exited with code {code}" if code else "")
                up.stopping.set()

        self.run = compose.ComposeRun(self.config, say)
        await self.run.start(exited)

    async def stop(self) -> None:
        if self.run is not None:
            await self.run.stop()


def _compose_up(config) -> _ComposeUp:
    from velo.integrations import compose

    try:
        compose.project_files(config)  # fail before anything starts
        listen = config.remote.listen
        if listen in ("127.0.0.1", "localhost", "::1"):
            listen = compose.bridge_gateway()
    except compose.ComposeError as exc:
        raise UserError(str(exc)) from None
    return _ComposeUp(config, listen)


def cmd_compose(args) -> int:
    from velo.integrations import compose

    config = _config(args)
    try:
        path, lines = compose.write(config, _plan(config))
    except compose.ComposeError as exc:
        raise UserError(str(exc)) from None
    print(f"velo: wrote {path}")
    for line in lines:
        print(line)
    files = " ".join(f"-f {p.name}" for p in compose.project_files(config))
    print(f"velo: run `velo up --compose`, or `velo up` with remote.listen on an address containers reach "
          f"and `docker compose {files} -f {path.name} up`")
    return 0


def cmd_down(args) -> int:
    from velo.engine.control import request, socket_path
    from velo.plugins import get_provider
    from velo.runtime import run

    config = _config(args)
    try:
        request(socket_path(config.root), "shutdown", timeout=10)
        print("velo: asked the running `velo up` to stop")
        _wait_gone(socket_path(config.root), timeout=getattr(config.cluster, "ready_timeout", 120.0))
        print("velo: stopped")
    except (ConnectionError, OSError):
        print(f"velo: nothing running for {config.root}")

    async def repair() -> list[str]:
        session = await get_provider(config.cluster.provider).open(config)
        return await session.repair(everything=args.all)

    for line in run(repair()):
        print(f"velo: {line}")
    return 0


def _wait_gone(path, timeout: float) -> None:
    import time

    from velo.engine.control import ping

    deadline = time.monotonic() + timeout
    while ping(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def cmd_rbac(args) -> int:
    from velo.plugins import get_provider

    namespace = args.namespace
    provider_name = "kubernetes"
    if namespace is None:
        try:
            config = _config(args)
            namespace = getattr(config.cluster, "namespace", "") or None
            provider_name = config.cluster.provider
        except ConfigError:
            pass
    provider = get_provider(provider_name)
    if not hasattr(provider, "rbac"):
        raise UserError(f'cluster provider "{provider_name}" needs no cluster permissions')
    sys.stdout.write(provider.rbac(namespace or "NAMESPACE"))
    return 0


def cmd_status(args) -> int:
    from velo.engine.control import request, socket_path
    from velo.ui import status_table

    config = _config(args)
    try:
        status = request(socket_path(config.root), "status")
    except (ConnectionError, OSError):
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"velo: not running for {config.root} (start it with `velo up`)")
        return 1
    if args.json:
        print(json.dumps({"running": True, **status}, indent=2))
    elif args.ready:  # a probe's output lands in the orchestrator's log: one line
        print(f"velo: {_not_ready(status) or 'ready'}")
    else:
        from rich.console import Console

        Console().print(status_table(status))
    return 1 if args.ready and _not_ready(status) else 0


def _not_ready(status: dict) -> str:
    """Why the session is not ready ("" when the tunnel is up and every reverse route listens)."""
    tunnel = status["tunnel"]
    if tunnel["state"] != "up":
        return f"not ready: tunnel {tunnel['state']}" + (f" ({tunnel['last_error']})" if tunnel.get("last_error") else "")
    waiting = [f"{r['name']} ({r['state']})" for r in status["reverses"] if r["state"] != "listening"]
    return f"not ready: reverse {', '.join(waiting)}" if waiting else ""


def _plan(config):
    from velo.plan import build_plan
    from velo.plugins import get_provider
    from velo.runtime import run

    async def main():
        session = await get_provider(config.cluster.provider).open(config)
        try:
            return build_plan(config, await session.inventory())
        finally:
            await session.close()

    return run(main())


def cmd_config_check(args) -> int:
    from velo.plan import describe
    from velo.engine.up import check_backends

    config = _config(args)
    check_backends(config)
    plan = _plan(config)
    print(f"{config.source_path}: ok")
    tunnel = config.tunnel
    gateway = lambda table: table.gateway() if hasattr(table, "gateway") else getattr(table, "url", None)
    tried = [f"{name} {gateway(tunnel.table(name)) or '(through the provider)'}" for name in tunnel.preference]
    print(f"project {config.project.name}: provider {config.cluster.provider}, tunnel {' -> '.join(tried)}")
    for line in describe(plan):
        print(line)
    if config.env.file:
        print(f"  env     {len(plan.env)} variables -> {config.env.file} ({config.env.format})")
    return 0


def cmd_env(args) -> int:
    from velo.engine.envfile import render

    config = _config(args)
    env, secret_keys = _session_env(config)
    if env is None:  # no session running: the plan, as `velo up` would make it
        plan = _plan(config)
        env, secret_keys = plan.env, plan.secret_keys
    fmt = "sh" if args.export else (args.format or config.env.format)
    rendered = render(env, fmt, secret_keys=secret_keys, reveal=args.reveal or args.export)
    for warning in rendered.warnings:
        print(f"velo: {warning}", file=sys.stderr)
    sys.stdout.write(rendered.text)
    return 0


def _session_env(config):
    """The env of the `velo up` running for this project (fast: no cluster), or (None, ())."""
    from velo.engine.control import request, socket_path

    try:
        reply = request(socket_path(config.root), "env", timeout=2)
    except (ConnectionError, OSError, ValueError):
        return None, frozenset()
    if "env" not in reply:
        return None, frozenset()
    return reply["env"], frozenset(reply.get("secret_keys", ()))


def cmd_gateway(args) -> int:
    from velo.gateway_main import serve

    _log_level(args)
    token = _gateway_token(args)
    return serve(args, token)


def _gateway_token(args) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UserError(f"--token-file {args.token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get(args.token_env, "").strip()
    if not token:
        raise UserError(
            f"velo gateway needs a token: set ${args.token_env} or pass --token-file "
            "(a gateway without a token would be an open proxy)"
        )
    return token


def cmd_demo(args) -> int:
    from velo.demo import run_demo

    _log_level(args)
    return run_demo(duration=args.duration)


def cmd_plugins(args) -> int:
    from velo.plugins import backends, providers

    print("tunnel backends:")
    for name, backend in sorted(backends().items()):
        print(f"  {name:12} {', '.join(s + '://' for s in backend.schemes):16} {backend.description}")
    print("cluster providers:")
    for name, provider in sorted(providers().items()):
        print(f"  {name:12} {provider.description}")
    return 0


# ---- parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="velo",
        description="Develop one service of a Kubernetes application locally while the rest runs "
        "in the cluster: forward proxies to the cluster's services, reverse proxies from the "
        "cluster to your laptop, one reconnecting tunnel, all from velocity.toml.",
    )
    parser.add_argument("--version", action="version", version=f"velo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, func, help_, description=None):
        p = sub.add_parser(name, help=help_, description=description or help_)
        if func is not None:
            p.set_defaults(func=func)
        return p

    def config_arg(p):
        p.add_argument("-c", "--config", metavar="PATH",
                       help="velocity.toml to use (default: the nearest one in this folder or its parents)")

    def log_arg(p):
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="how much to log on stderr (default: info)")

    p = add("up", cmd_up, "start the mesh described by velocity.toml and keep it in step with the file",
            "Start forward listeners, reverse routes and the tunnel described by velocity.toml; "
            "watch the file and apply only what changed. Runs until Ctrl-C, SIGTERM or `velo down`.")
    config_arg(p)
    log_arg(p)
    p.add_argument("--no-run", action="store_true",
                   help="bring up only the mesh and the env file; start no candidate (for Tilt, Compose, ...)")
    p.add_argument("--only", action="append", metavar="NAME[,NAME]",
                   help="run only these candidates ([local.<name>]; repeatable)")
    p.add_argument("--compose", action="store_true",
                   help="also run `docker compose up` with velo's override (see `velo compose`); "
                   "forwards then listen on the docker bridge")

    p = add("run", cmd_run, "run a one-off command with the environment of the running `velo up`",
            "Run CMD (a test suite, a migration, a REPL) with the environment velo gives the candidates, "
            "taken from the running `velo up` of this project: velo run -- CMD [ARGS...]")
    config_arg(p)
    p.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    p = add("compose", cmd_compose, "write a Docker Compose override giving containerized candidates velo's env",
            "Write compose.override (default docker-compose.velo.yml): for each candidate that is a Compose "
            "service, velo's env with forwards at host.docker.internal, extra_hosts host-gateway, and the "
            "candidate's port published on this machine for the reverse path.")
    config_arg(p)

    p = add("down", cmd_down, "stop the `velo up` running for this project and undo its changes",
            "Stop the running `velo up` of this project (it restores what it changed), then repair "
            "whatever crashed sessions left behind in the namespace.")
    config_arg(p)
    p.add_argument("--all", action="store_true",
                   help="also clean up every other session of yours in the namespace, even live ones")

    p = add("rbac", cmd_rbac, "print the Kubernetes Role that velo needs, as YAML")
    config_arg(p)
    p.add_argument("--namespace", help="namespace for the Role (default: cluster.namespace of velocity.toml)")

    p = add("status", cmd_status, "show the tunnel, listeners and traffic of the running `velo up`")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--ready", action="store_true",
                   help="a readiness probe: one line, exit 1 unless the tunnel is up and every reverse route listens")

    p = add("env", cmd_env, "print the environment velo gives the local candidate",
            "Print the environment variables of the plan (service addresses, candidate configuration, "
            "overrides). Secrets are masked unless --reveal is given.")
    config_arg(p)
    from velo.engine.envfile import FORMATS

    p.add_argument("--format", choices=[*FORMATS, "shell"], metavar="FORMAT",
                   help="output format, named for its reader (default: env.format): "
                   + "; ".join(f"{f.name}: {f.readers}" for f in FORMATS.values()))
    p.add_argument("--export", action="store_true",
                   help='POSIX shell exports with the real values, for eval "$(velo env --export)"')
    p.add_argument("--reveal", action="store_true", help="show secret values instead of masking them")

    config = add("config", None, "work with velocity.toml")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = config_sub.add_parser("check", help="validate velocity.toml and print the resolved plan",
                                  description="Validate velocity.toml and print the resolved plan.")
    check.set_defaults(func=cmd_config_check)
    config_arg(check)

    p = add("gateway", cmd_gateway, "run the far end of the tunnel (the in-cluster traffic-proxy)",
            "Accept velo tunnels. Forward streams are dialled only if --allow permits the target; "
            "reverse listeners are opened for the connected client and closed when it leaves.")
    p.add_argument("--listen", action="append", metavar="URL",
                   help="where to accept tunnels; the scheme picks the backend "
                   "(default: ws://0.0.0.0:7070/velo; repeatable)")
    p.add_argument("--allow", action="append", default=[], metavar="HOST:PORT",
                   help="forward targets clients may reach (fnmatch patterns, e.g. 'db:5432', "
                   "'*.shop.svc.cluster.local:*'; repeatable; nothing is allowed by default)")
    p.add_argument("--allow-reverse", action="append", default=[], metavar="PORT",
                   help="a port (or LOW-HIGH range) clients may open a reverse listener on; repeatable; "
                   "none by default")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                   help="cap what one peer may use: tunnels (per token, default 64), streams (open per tunnel, "
                   "8192), accepting (per tunnel, waiting for header or dial, 4096), control (messages per "
                   "minute, 60), reverse (listeners per session, 256)")
    p.add_argument("--token-env", default="VELO_TOKEN", metavar="NAME",
                   help="environment variable holding the bearer token (default: VELO_TOKEN)")
    p.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file instead")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate chain for wss:// and https:// listeners")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--reverse-host", default="0.0.0.0", metavar="ADDR",
                   help="address reverse listeners bind to (default: 0.0.0.0)")
    p.add_argument("--keepalive-interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--keepalive-timeout", type=float, default=15.0, metavar="SECONDS")
    p.add_argument("--ready-file", metavar="PATH", help="write the listening URLs here once ready (for scripts)")
    p.add_argument("--session", metavar="ID",
                   help="in a cluster: the velo session this traffic-proxy serves; when its Lease lapses the "
                   "gateway restores the session's Services and removes its objects")
    p.add_argument("--lease-check", type=float, default=2.0, metavar="SECONDS",
                   help="how often to check the session's Lease (default: 2)")
    p.add_argument("--version", action="version", version=f"velo {__version__}",
                   help="print the version (the traffic-proxy image must match the client)")
    log_arg(p)

    p = add("demo", cmd_demo, "see velo work on this machine: no cluster, no config needed",
            "Start a local gateway, two sample remote services and a local candidate, run the mesh, "
            "show a forward and a reverse request, and keep a live status table until Ctrl-C.")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="stop by itself after this long (default: run until Ctrl-C)")
    log_arg(p)

    add("plugins", cmd_plugins, "list installed tunnel backends and cluster providers")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)  # already names the file and key
        return EXIT_USAGE
    except (PluginError, ProviderError, UserError) as exc:
        print(f"velo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
