"""Rich rendering of a status snapshot (shared by `velo status` and `velo demo`)."""

from __future__ import annotations

import time

from rich.console import Group
from rich.table import Table
from rich.text import Text


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status_table(status: dict) -> Group:
    tunnel = status["tunnel"]
    state = tunnel["state"]
    colour = {"up": "green", "reconnecting": "yellow", "connecting": "yellow"}.get(state, "red")
    head = Text.assemble(
        ("tunnel ", "bold"), (state, f"bold {colour}"),
        f"  backend {tunnel['backend'] or '-'}  {tunnel['url'] or ''}",
        f"  rtt {tunnel['rtt_ms']} ms" if tunnel["rtt_ms"] is not None else "  rtt -",
        f"  reconnects {tunnel['reconnects']}",
    )
    if tunnel.get("up_since"):
        head.append(f"  up {time.time() - tunnel['up_since']:.0f}s")
    if tunnel.get("peer_version") and state == "up":
        head.append(f"  gateway velo {tunnel['peer_version']}")
    parts = []
    if status.get("project"):
        parts.append(Text(f"project {status['project']}  provider {status.get('provider', '?')}  "
                          f"session {status.get('session', '?')}", style="dim"))
    parts.append(head)
    if tunnel.get("last_error") and state != "up":
        parts.append(Text(f"last error: {tunnel['last_error']}", style="red"))
    api = (status.get("cluster") or {}).get("api") or {}
    if api.get("state") == "failing":  # degraded, ridden out: forwards and the tunnel keep working
        since = f" for {time.time() - api['since']:.0f}s" if api.get("since") else ""
        parts.append(Text(f"cluster API failing{since} ({api.get('error')}); retrying", style="yellow"))
    table = Table(expand=False, box=None, header_style="bold")
    for column in ("", "name", "listen", "target"):
        table.add_column(column, no_wrap=True, overflow="fold")
    for column in ("open", "total", "up", "down", "errors"):
        table.add_column(column, justify="right", no_wrap=True)
    for f in status["forwards"]:
        table.add_row("fwd", f["name"], f["listen"].replace("127.0.0.1:", ":"), f["target"], str(f["open"]), str(f["total"]),
                      _bytes(f["bytes_up"]), _bytes(f["bytes_down"]), str(f["errors"]))
    rev = status.get("reverse_streams", {})
    for r in status["reverses"]:
        table.add_row("rev", r["name"], f"gw :{r['gateway_port']}", r["local"].replace("127.0.0.1:", ":"), str(rev.get("open", 0)),
                      str(rev.get("total", 0)), _bytes(rev.get("bytes_up", 0)), _bytes(rev.get("bytes_down", 0)),
                      r["state"] if r["state"] != "listening" else str(rev.get("errors", 0)))
    parts.append(table)
    for note in (status.get("cluster") or {}).get("notes") or []:  # e.g. a Service changed back
        parts.append(Text(note, style="yellow"))
    if status.get("candidates"):
        parts.append(candidates_table(status["candidates"]))
    if status.get("last_reload_error"):
        parts.append(Text(status["last_reload_error"], style="red"))
    return Group(*parts)


def candidates_table(candidates: list[dict]) -> Table:
    """The local processes velo runs: state, pid, restarts, last exit code, uptime."""
    table = Table(expand=False, box=None, header_style="bold")
    for column in ("", "name", "state", "pid", "restarts", "last exit", "up"):
        table.add_column(column, no_wrap=True)
    colours = {"running": "green", "starting": "yellow", "restarting": "yellow", "crashed": "red"}
    for c in candidates:
        state = c["state"] + (" (not watching: " + c["watch_error"] + ")" if c.get("watch_error") else "")
        table.add_row("run", c["name"], Text(state, style=colours.get(c["state"], "")),
                      str(c["pid"] or "-"), str(c["restarts"]),
                      "-" if c["last_exit"] is None else str(c["last_exit"]),
                      "-" if c["uptime"] is None else f"{c['uptime']:.0f}s")
    return table
